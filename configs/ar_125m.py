"""A ~125M-parameter autoregressive model at sequence length 1024 in bfloat16 (GPU / TPU).

  python train.py --config=configs/ar_125m.py --workdir=/ckpt/ar125m \
      --config.data.name=lm1b --config.data.data_dir=/data/tfds \
      --config.data.tokenizer=/data/tok32k.model
"""
from mdlm_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048, dtype="bfloat16",
                 remat="none", max_seq_len=1024, tied_embeddings=True)
  c.data.update(seq_len=1024, prefetch=4)
  c.train.update(steps=100_000, batch_size=64, learning_rate=6e-4, warmup_steps=2000,
                 weight_decay=0.1, grad_clip=1.0, ema_decay=0.0, log_every_steps=100)
  c.checkpoint.update(every_steps=2000, keep=3)
  c.eval.update(every_steps=2000, batches=64)
  return config_lib.finalize(c)
