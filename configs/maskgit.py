"""MaskGIT-style masked token prediction (as in x-transformers' NonAutoregressiveWrapper):
cosine schedule, an exact count of ceil(max(m n, 1)) masked tokens per row, mean cross-entropy
over the masked set, BERT augmentation inside it (15% kept, 10% random, each behind a coin
flip per step). Sample with --sampler=confidence.

  python train.py --config=configs/maskgit.py --workdir=DIR
  python train.py --config=configs/maskgit.py:tiny --workdir=DIR
The MDLM weighting instead of the plain mean: --config.objective.weighting=elbo.
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  c = default.sized(variant, "mdlm")
  c.objective.update(schedule="cosine", masking="exact", weighting="none",
                     time_sampling="iid", no_replace_prob=0.15, random_token_prob=0.10)
  return config_lib.finalize(c)
