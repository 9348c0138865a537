"""Autoregressive baseline on the embedded corpus, at the CPU shape of configs/default.py.

Variants: --config.objective.meap_mask_ratio=0.15 (MEAP), --config.objective.z_loss=1e-4.
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config():
  return config_lib.finalize(default.cpu_config("ar"))
