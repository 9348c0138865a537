"""MDLM (Sahoo et al. 2024): log-linear schedule with eps 1e-3, continuous-time ELBO weight 1/t,
antithetic times, Bernoulli masking, SUBS, no time conditioning, EMA 0.9999 (with MDLM's warm-up).

  python train.py --config=configs/mdlm.py --workdir=DIR        # ~125M, seq 1024, bf16
  python train.py --config=configs/mdlm.py:small --workdir=DIR  # GPT-2 small's 12 x 768
  python train.py --config=configs/mdlm.py:tiny --workdir=DIR   # the CPU shape of default.py

MD4 (Shi et al. 2024): --config.objective.schedule=cosine (or poly2, ...).
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  c = default.sized(variant, "mdlm")
  c.objective.update(schedule="linear", eps=1e-3, t_min=1e-3, weighting="elbo",
                     time_sampling="antithetic", masking="bernoulli")
  if variant != "tiny":
    c.train.ema_decay = 0.9999
  return config_lib.finalize(c)
