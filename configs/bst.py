"""Belief State Transformer (Hu et al. 2024): a forward and a backward decoder whose states meet
in a head trained on every prefix/suffix pair of a document (next and previous token).

  python train.py --config=configs/bst.py:tiny --workdir=DIR   # the CPU shape of default.py
  python train.py --config=configs/bst.py --workdir=DIR        # ~125M, seq 1024, bf16

Star-graph path finding, the paper's first task: configs/star_graph.py:bst.
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  return config_lib.finalize(default.sized(variant, "bst"))
