"""BD3-LM (Arriola et al. 2025): block diffusion, autoregressive over blocks of 16 tokens and
masked diffusion (MDLM's linear schedule, weight 1/t) within each block.

  python train.py --config=configs/bd3lm.py --workdir=DIR        # ~125M, seq 1024, bf16
  python train.py --config=configs/bd3lm.py:tiny --workdir=DIR   # the CPU shape of default.py

--config.objective.block_size=4 (or 1: next-token prediction; data.seq_len: mdlm);
BD3-LM's clipped schedule: --config.objective.noise_min=0.3 --config.objective.noise_max=0.8.
--config.objective.noised_layers=k: the block being denoised runs only the last k layers
(the clean blocks all of them), so a denoising step costs k layers, not every one.
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  c = default.sized(variant, "bd3lm")
  c.objective.update(block_size=16, schedule="linear", eps=1e-3, t_min=1e-3)
  return config_lib.finalize(c)
