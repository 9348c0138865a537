"""ModernBERT-style masked language model: 30% of tokens selected (80% MASK, 10% random, 10%
kept), loss on the selected positions, evaluation at 15%.

  python train.py --config=configs/mlm.py --workdir=DIR
  python train.py --config=configs/mlm.py:tiny --workdir=DIR
BERT: --config.objective.mask_rate=0.15.
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config(variant: str = ""):
  c = default.sized(variant, "mlm")
  c.objective.update(mask_rate=0.30, eval_mask_rate=0.15)
  return config_lib.finalize(c)
