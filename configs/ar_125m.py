"""A ~125M-parameter autoregressive model at sequence length 1024 in bfloat16 (GPU / TPU).

  python train.py --config=configs/ar_125m.py --workdir=/ckpt/ar125m \
      --config.data.name=lm1b --config.data.data_dir=/data/tfds \
      --config.data.tokenizer=/data/tok32k.model
"""
from configs import default
from mdlm_jax import config as config_lib


def get_config():
  return config_lib.finalize(default.large_config("ar"))
