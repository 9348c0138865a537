"""The config schema shared by every `configs/*.py`, and its validation.

`base_config()` holds every key with its default; a config file starts from it and changes
values. The returned ConfigDict is locked, so a misspelt `--config.KEY=VALUE` is refused by
absl before anything runs; `validate()` then checks values and cross-key contracts.
"""
from __future__ import annotations

import os

import ml_collections

from mdlm_jax import objectives

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
ATTENTION = ("auto", "xla", "cudnn", "cudnn_packed", "chunked", "splash")
SCHEDULES = ("cosine", "constant")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = objectives.default_options("ar")
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, d_model=256, num_heads=4, mlp_dim=768, dtype="float32", remat="none",
      scan_layers=False, max_seq_len=2048, tied_embeddings=True, attention="auto", max_segments=4,
      rope_base=10000.0, init_std=0.02))
  c.data = ml_collections.ConfigDict(dict(
      name="python_stdlib", data_dir=os.path.join("~", "tensorflow_datasets"), files="",
      tokenizer="bytes", seq_len=256, prefetch=2, workers=0, pack=True, shuffle_window=1024,
      graph=ml_collections.ConfigDict(dict(degree=2, path_length=5, nodes=50,
                                           train_examples=200_000, validation_examples=1000))))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, learning_rate=1e-3, warmup_steps=100, schedule="cosine",
      min_lr_ratio=0.1, grad_clip=1.0, weight_decay=0.1, b1=0.9, b2=0.95, adam_eps=1e-8,
      ema_decay=0.0, grad_accum_steps=1, log_every_steps=25, max_skipped_steps=3,
      profile_start=10, profile_steps=0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1,
                                         allow_unused_devices=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, restore_data=True,
                                                lock_timeout_s=600.0))
  c.eval = ml_collections.ConfigDict(dict(every_steps=500, batches=16, sample_tokens=128,
                                          task_examples=256))
  return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the options of every registered objective under `objective.` and of every
  evaluation hook under `eval.`, and locks the config."""
  from mdlm_jax import tasks  # pylint: disable=g-import-not-at-top  (tasks imports the data)
  for k, v in tasks.OPTIONS.items():
    if k not in c.eval:
      c.eval[k] = v
  for name in objectives.names():
    for k, v in objectives.default_options(name).items():
      if k not in c.objective:
        c.objective[k] = v
  c.lock()
  return c


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by a run (workdir/config.json), completed with today's defaults."""
  c = finalize(base_config())
  with c.unlocked():
    _update(c, saved)
  return c


def _update(c, d):
  for k, v in d.items():
    if isinstance(v, dict) and k in c and isinstance(c[k], ml_collections.ConfigDict):
      _update(c[k], v)
    else:
      c[k] = v


class ConfigError(ValueError):
  pass


def _check(ok: bool, msg: str):
  if not ok:
    raise ConfigError(msg)


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks values and cross-key contracts; raises ConfigError naming the key and the fix."""
  m, d, t = c.model, c.data, c.train
  _check(c.objective.name in objectives.names(),
         f"objective.name={c.objective.name!r} is unknown; choose one of {objectives.names()}.")
  objectives.validate_options(c.objective)
  for key in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_seq_len"):
    _check(m[key] >= 1, f"model.{key}={m[key]} must be >= 1.")
  _check(m.d_model % m.num_heads == 0,
         f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}.")
  _check((m.d_model // m.num_heads) % 2 == 0, "model.d_model / model.num_heads must be even "
         "(rotary embeddings rotate pairs of features).")
  _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r}; choose one of {DTYPES}.")
  _check(m.remat in REMAT, f"model.remat={m.remat!r}; choose one of {REMAT}.")
  _check(m.attention in ATTENTION, f"model.attention={m.attention!r}; choose one of {ATTENTION}.")
  _check(not m.attention.startswith("cudnn") or m.dtype == "bfloat16",
         f"model.attention={m.attention!r} needs model.dtype='bfloat16' (got {m.dtype!r}); "
         "use model.attention='auto' or 'xla' for float32.")
  _check(m.max_segments >= 2, f"model.max_segments={m.max_segments} must be >= 2 (segments per "
         "row that model.attention='cudnn_packed' lays out; rows with more use the masked kernel).")
  _check(d.workers >= 0, f"data.workers={d.workers} must be >= 0 (0: no worker processes).")
  _check(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2.")
  _check(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} exceeds the model's limit model.max_seq_len={m.max_seq_len}; "
         "lower data.seq_len or raise model.max_seq_len.")
  from mdlm_jax.data import builders  # pylint: disable=g-import-not-at-top
  try:
    builders.check(d)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1.")
  _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1.")
  _check(t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
         f"train.batch_size={t.batch_size} must be divisible by "
         f"train.grad_accum_steps={t.grad_accum_steps} (>= 1).")
  _check(t.learning_rate > 0, f"train.learning_rate={t.learning_rate} must be > 0.")
  _check(0 <= t.warmup_steps, f"train.warmup_steps={t.warmup_steps} must be >= 0.")
  _check(t.adam_eps > 0, f"train.adam_eps={t.adam_eps} must be > 0 (AdamW's denominator floor).")
  _check(t.schedule in SCHEDULES, f"train.schedule={t.schedule!r}; choose one of {SCHEDULES}.")
  _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1).")
  _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables).")
  _check(t.log_every_steps >= 1, f"train.log_every_steps={t.log_every_steps} must be >= 1.")
  _check(t.profile_steps >= 0 and t.profile_start >= 1,
         f"train.profile_steps={t.profile_steps} (>= 0; 0 = no trace) and train.profile_start="
         f"{t.profile_start} (>= 1, the first traced step) out of range.")
  _check(t.max_skipped_steps >= 1, f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1 "
         "(consecutive non-finite steps skipped before the run stops).")
  _check(d.shuffle_window >= 0, f"data.shuffle_window={d.shuffle_window} must be >= 0 (packed "
         "rows shuffled together; 0 keeps the packing order).")
  _check(c.checkpoint.lock_timeout_s > 0, f"checkpoint.lock_timeout_s="
         f"{c.checkpoint.lock_timeout_s} must be > 0 (a workdir lock without a heartbeat for "
         "that long is taken over).")
  for key in ("data", "fsdp", "tensor"):
    v = c.mesh[key]
    _check(v == -1 or v >= 1, f"mesh.{key}={v} must be -1 (infer) or >= 1.")
  _check(sum(c.mesh[k] == -1 for k in ("data", "fsdp", "tensor")) <= 1,
         "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
  _check(c.mesh.dcn_data >= 1, f"mesh.dcn_data={c.mesh.dcn_data} must be >= 1 (the slices or "
         "hosts the data axis spans over the data-center network; 1: one).")
  _check(c.checkpoint.every_steps >= 1 and c.checkpoint.keep >= 1,
         "checkpoint.every_steps and checkpoint.keep must be >= 1.")
  _check(c.eval.every_steps >= 0 and c.eval.batches >= 1,
         "eval.every_steps must be >= 0 (0 disables) and eval.batches >= 1.")
  _check(c.eval.task_examples >= 0,
         f"eval.task_examples={c.eval.task_examples} must be >= 0 (0: no task evaluation).")
  _check(0 <= c.eval.sample_tokens <= m.max_seq_len - 1,
         f"eval.sample_tokens={c.eval.sample_tokens} must be in [0, model.max_seq_len - 1].")
