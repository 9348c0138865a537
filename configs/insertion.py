"""Insertion Transformer (Stern et al. 2019) with Fractional Positional Encoding (Zhang, Zhang &
Dolan 2023): a bidirectional encoder scores (slot, word) insertions into a partial canvas;
trained with the soft binary-tree loss (tau 1); validation reports the one-pass bound on
-log p(x) over uniform insertion orders, per word and per byte.

  python train.py --config=configs/insertion.py:tiny --workdir=DIR   # the CPU shape of default.py
  python train.py --config=configs/insertion.py --workdir=DIR        # ~125M, seq 1024, bf16

Options: objective.order=uniform, objective.tau, objective.distribution=factorized,
objective.fpe=False (rotary positions of the canvas index), objective.decoding=sequential,
objective.finalization=sequence (the next action is the target and only a full canvas stops:
with order=uniform the training loss is the bound; decodes sequentially).
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  return config_lib.finalize(default.sized(variant, "insertion"))
