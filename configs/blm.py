"""Blank Language Model (Shen et al. 2020): a bidirectional encoder over a canvas of tokens and
blanks; trained with the one-pass bound (k ~ U{0..n-1} kept words of a random order, every
dropped word's insertion scored); validation reports that bound per word and per byte.

  python train.py --config=configs/blm.py:tiny --workdir=DIR   # the CPU shape of default.py
  python train.py --config=configs/blm.py --workdir=DIR        # ~125M, seq 1024, bf16

--config.objective.eval_orders=M estimates -log p(x) by importance sampling over M orders
instead (M x data.seq_len network passes per validation batch).
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  return config_lib.finalize(default.sized(variant, "blm"))
