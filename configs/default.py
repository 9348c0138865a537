"""The default run: a small autoregressive byte-level model on the Python standard library.
Finishes in a few minutes on 2 CPU cores."""
from mdlm_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 768
  c.data.seq_len = 256
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.log_every_steps = 25
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 200
  c.eval.batches = 16
  return config_lib.finalize(c)
