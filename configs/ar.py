"""Autoregressive baseline on the embedded corpus (the CPU-sized default shape).

Variants: --config.objective.meap_mask_ratio=0.15 (MEAP), --config.objective.z_loss=1e-4.
"""
from configs import default


def get_config():
  return default.get_config()
