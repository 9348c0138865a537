"""Masked diffusion's forward process: which tokens may be masked, how many at time t (the
noise schedules) and the ELBO weights (`mdlm`; read by its samplers and likelihood too).

The schedule is written through its mask fraction m(t) (linear t, cosine cos(pi/2 (1 - t)),
poly{K} t^K) as 1 - alpha(t) = (1 - eps) m(t), so the continuous-time ELBO weight
-alpha'(t) / (1 - alpha(t)) = m'(t) / m(t) is positive and free of eps (linear: 1/t).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdlm_jax import tokenizers
from mdlm_jax.objectives import base


def parse_schedule(name: str) -> tuple[str, float]:
  """'linear' | 'cosine' | 'poly{K}' (K > 0) -> (kind, K)."""
  if name in ("linear", "cosine"):
    return name, 1.0
  if name.startswith("poly"):
    try:
      k = float(name[4:])
    except ValueError:
      k = -1.0
    if k > 0:
      return "poly", k
  raise ValueError(f"objective.schedule={name!r} is unknown; choose 'linear', 'cosine' or "
                   "'poly{K}' with K > 0 (e.g. 'poly2').")


def mask_fraction(schedule: str, t):
  """(m(t), m'(t)): the schedule's mask fraction, 0 at t = 0 and 1 at t = 1, and its slope."""
  kind, k = parse_schedule(schedule)
  if kind == "linear":
    return t, jnp.ones_like(t)
  if kind == "cosine":
    a = 0.5 * math.pi * (1.0 - t)
    return jnp.cos(a), 0.5 * math.pi * jnp.sin(a)
  return t ** k, k * t ** (k - 1.0)


def mask_prob(opts, t, eps=None):
  """1 - alpha(t). LLaDA: eps + (1 - eps) t; otherwise (1 - eps) m(t). `eps` overrides
  objective.eps (the validation bound uses 0)."""
  eps = opts.eps if eps is None else eps
  if opts.llada:
    return eps + (1.0 - eps) * t
  return (1.0 - eps) * mask_fraction(opts.schedule, t)[0]


def elbo_weight(opts, t, eps=None):
  """-alpha'(t) / (1 - alpha(t)) > 0, or with `discrete_steps` T the T-step weight
  T (alpha_s - alpha_t) / (1 - alpha_t), s = t - 1/T."""
  eps = opts.eps if eps is None else eps
  if opts.discrete_steps:
    steps = opts.discrete_steps
    p_t = mask_prob(opts, t, eps)
    p_s = mask_prob(opts, jnp.maximum(t - 1.0 / steps, 0.0), eps)
    return steps * (p_t - p_s) / p_t
  if opts.llada:
    return (1.0 - eps) / mask_prob(opts, t, eps)
  m, dm = mask_fraction(opts.schedule, t)
  return dm / m


def sample_times(rng, batch: int, antithetic: bool, t_min: float, discrete_steps: int):
  """One t per row in (t_min, 1]. Antithetic: (u + i / B) mod 1 with one u for the batch,
  so the rows cover [0, 1) evenly; with T discrete steps t lies on {1/T, ..., 1}."""
  if antithetic:
    r = jnp.mod(jax.random.uniform(rng, ()) + jnp.arange(batch) / batch, 1.0)
  else:
    r = jax.random.uniform(rng, (batch,))
  if discrete_steps:
    return (jnp.floor(r * discrete_steps) + 1.0) / discrete_steps
  return t_min + (1.0 - t_min) * (1.0 - r)


def maskable(batch):
  """What masking may hide and the loss counts: real tokens that are not the first of their
  segment (a document's BOS, or the first token of a row continuing a document), exactly the
  tokens the autoregressive baseline predicts."""
  seg = batch["segment_ids"]
  prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
  return (seg > 0) & (seg == prev) & (batch["inputs"] != tokenizers.BOS)


def choose_masked(rng, eligible_BxT, p_B, exact: bool):
  """Bernoulli(p) per eligible token, or exactly ceil(max(p n, 1)) eligible tokens per row
  chosen uniformly (n the row's eligible count)."""
  if not exact:
    return eligible_BxT & (jax.random.uniform(rng, eligible_BxT.shape) < p_B[:, None])
  n = jnp.sum(eligible_BxT, axis=1)
  return base.choose_count(rng, eligible_BxT, jnp.ceil(jnp.maximum(p_B * n, 1.0)))
