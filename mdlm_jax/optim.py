"""The optimizer: AdamW after global-norm clipping on a warmup + cosine or constant schedule,
weight decay on matrices only; the EMA's warmed-up decay."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _is_matrix(path, x) -> bool:
  """Weight decay on matrices, not on norm scales or vectors; the leading layers axis of
  model.scan_layers' stacked blocks (`blocks` then a name, not a layer number) not counted."""
  keys = [getattr(k, "key", None) for k in path]
  stacked = any(a == "blocks" and isinstance(b, str) and not b.isdigit()
                for a, b in zip(keys, keys[1:]))
  return x.ndim - stacked >= 2


def make_optimizer(t) -> tuple[optax.GradientTransformation, Callable]:
  if t.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.min_lr_ratio)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)),
         optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=t.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def ema_decay(decay: float, updates):
  """The EMA's decay at its `updates`-th update: min(decay, (1 + n) / (10 + n)), the warm-up of
  MDLM's (score-SDE's) EMA, so a short run's EMA is not still mostly the initialisation (with
  0.9999 and no warm-up, 96% of it after 400 steps)."""
  return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))
