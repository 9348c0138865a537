"""The default run: a small masked-diffusion (MDLM) byte-level model on the Python standard
library. Finishes in a few minutes on 2 CPU cores.

`cpu_config(objective)` is the CPU shape every `:tiny` variant of configs/*.py shares, so runs
of different objectives compare at equal model size and equal training tokens.
"""
from mdlm_jax import config as config_lib


def cpu_config(objective: str):
  """4 layers, d_model 256, 4 heads, seq 256, batch 16, 500 steps (2.05M training tokens)."""
  c = config_lib.base_config()
  c.objective = config_lib.objectives.default_options(objective)
  c.model.update(num_layers=4, d_model=256, num_heads=4, mlp_dim=768)
  c.data.seq_len = 256
  c.train.update(steps=500, batch_size=16, learning_rate=2e-3, warmup_steps=50,
                 log_every_steps=25)
  c.checkpoint.every_steps = 200
  c.eval.update(every_steps=200, batches=16)
  return c


def large_config(objective: str):
  """~125M parameters at seq 1024 in bfloat16, for GPUs and TPUs (configs/ar_125m.py): 10 layers,
  d_model 1024, 8 heads of 128, SwiGLU width 2816; 128.5M without the embedding, which the byte
  vocabulary grows by 0.3M and a 32k one by 32.8M. (GPT-2 small's 12 x 768 has 85M without its
  50k-token embedding: the `:small` variant.)"""
  c = config_lib.base_config()
  c.objective = config_lib.objectives.default_options(objective)
  c.model.update(num_layers=10, d_model=1024, num_heads=8, mlp_dim=2816, dtype="bfloat16",
                 remat="none", scan_layers=True, max_seq_len=1024, tied_embeddings=True)
  c.data.update(seq_len=1024, prefetch=4)
  c.train.update(steps=100_000, batch_size=64, learning_rate=6e-4, warmup_steps=2000,
                 weight_decay=0.1, grad_clip=1.0, ema_decay=0.0, log_every_steps=100)
  c.checkpoint.update(every_steps=2000, keep=3)
  c.eval.update(every_steps=2000, batches=64)
  return c


def small_config(objective: str):
  """The large recipe at GPT-2 small's / MDLM's shape: 12 layers, d_model 768, 12 heads of 64,
  SwiGLU width 2048 (85.2M parameters with the byte vocabulary)."""
  c = large_config(objective)
  c.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=2048)
  return c


VARIANTS = {"": large_config, "small": small_config, "tiny": cpu_config}


def sized(variant: str, objective: str):
  """`--config=configs/NAME.py` is the large recipe, `NAME.py:small` GPT-2 small's shape,
  `NAME.py:tiny` the CPU one."""
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is unknown; use ':tiny', ':small' or nothing.")
  return VARIANTS[variant](objective)


def get_config():
  return config_lib.finalize(cpu_config("mdlm"))
