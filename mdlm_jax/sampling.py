"""Decoding building blocks shared by every objective's samplers, and the autoregressive sampler.

Categorical draws use the Gumbel-max trick with a high-dynamic-range Gumbel: the uniform that
decides the upper tail is built from 64 random bits, so Gumbel values reach ~44 instead of the
~16 that a float32 uniform allows (a truncated tail lowers the effective temperature).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdlm_jax import tokenizers

NEG_INF = -1e30


def gumbel(key, shape):
  """Gumbel(0, 1) noise, G = -log(-log1p(-V)), V uniform in (0, 1) with resolution 2^-64."""
  bits = jax.random.bits(key, (2,) + tuple(shape), jnp.uint32)
  return gumbel_from_bits(bits[0], bits[1])


def gumbel_from_bits(hi, lo):
  frac = (lo.astype(jnp.float32) + 0.5) * 2.0 ** -32
  v = (hi.astype(jnp.float32) + frac) * 2.0 ** -32
  v = jnp.minimum(v, 1.0 - 2.0 ** -24)
  return -jnp.log(-jnp.log1p(-v))


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
  """Sets excluded tokens to NEG_INF. top-k keeps the k largest; top-p keeps the smallest set
  whose probability reaches p (the token that crosses the threshold is kept); min-p keeps
  tokens whose probability is at least min_p times the largest."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  if min_p > 0.0:
    logp = jax.nn.log_softmax(logits, axis=-1)
    keep = logp >= jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)
    logits = jnp.where(keep, logits, NEG_INF)
  return logits


def draw(key, logits, temperature, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
  """One Gumbel-max draw per row of float32 logits (..., V) at a (possibly traced)
  temperature, 0 being argmax. As in HF and vLLM, the logits are divided by the temperature
  before top-k / top-p / min-p filter them. Returns (token ids, log-probabilities at
  temperature 1 renormalised over the kept tokens: the confidence samplers rank by them)."""
  logits = logits.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p, min_p)
  kept = scaled > NEG_INF / 2
  noise = jnp.where(temperature > 0, gumbel(key, logits.shape), 0.0)
  tok = jnp.argmax(jnp.where(kept, scaled + noise, -jnp.inf), axis=-1).astype(jnp.int32)
  return tok, jax.nn.log_softmax(jnp.where(kept, logits, NEG_INF), axis=-1)


def sample_logits(key, logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0):
  """Token ids from float32 logits (..., V); temperature 0 is greedy (see `draw`)."""
  return draw(key, logits, temperature, top_k, top_p, min_p)[0]


def generate_ar(model, prompt_BxP, rng, *, max_new_tokens: int, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
  """Left-to-right sampling with a KV cache. The prompt (same length P >= 1 for every row,
  normally starting with BOS) is prefilled in one call; decoding stops when every row has
  produced EOS (later positions are PAD). Returns (B, P + max_new_tokens) int32."""
  b, p = prompt_BxP.shape
  total = p + max_new_tokens
  cache = model.init_cache(b, total)
  logits, cache = model.decode(prompt_BxP, cache)
  tokens = jnp.concatenate([prompt_BxP, jnp.full((b, max_new_tokens), tokenizers.PAD,
                                                 jnp.int32)], axis=1)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tokens, cache, last_logits, done, rng = carry
    rng, key = jax.random.split(rng)
    tok = sample_logits(key, last_logits, temperature, top_k, top_p, min_p)
    tok = jnp.where(done, tokenizers.PAD, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], p + i, axis=1)
    done = done | (tok == tokenizers.EOS)
    logits, cache = model.decode(tok[:, None], cache)
    return i + 1, tokens, cache, logits[:, -1], done, rng

  carry = (jnp.zeros((), jnp.int32), tokens, cache, logits[:, -1], jnp.zeros((b,), bool), rng)
  return jax.lax.while_loop(cond, body, carry)[1]
