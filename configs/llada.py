"""LLaDA pre-training (Nie et al. 2025): mask probability eps + (1 - eps) t with eps 1e-3, loss
sum of masked cross-entropy / p over B * L, and 1% of batches cropped to a random length.

  python train.py --config=configs/llada.py --workdir=DIR
  python train.py --config=configs/llada.py:tiny --workdir=DIR
Sample with the LLaDA sampler: tools/sample.py --sampler=llada --block_length=32 ...
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  c = default.sized(variant, "mdlm")
  c.objective.update(schedule="linear", llada=True, eps=1e-3, crop_prob=0.01,
                     weighting="elbo", time_sampling="iid", masking="bernoulli")
  return config_lib.finalize(c)
