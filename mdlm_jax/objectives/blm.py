"""`blm`: the Blank Language Model (Shen et al. 2020); docs/objectives.md.

A canvas holds tokens and BLANKs. One action picks a blank b (softmax over the document's
blanks of u . h_b), a word w for it (the tied output layer on h_b) and whether a blank stays on
its left and/or right (a 4-way softmax of an MLP on [h_b; e_w]); a bidirectional encoder reads
the canvas. Generation repeats actions from [BOS] BLANK [EOS] until no blank is left.

Words are a document's real tokens except BOS and EOS (these stay on every canvas), and except
the prompt of prompt/answer rows (`sft_pairs`, `star_graph`): a prompt is given, never
generated or scored. Training
(one pass): for each document of n words draw k uniform in 0..n-1 and a random order, keep the
k earliest words, collapse each run of the others into one blank; every dropped word is a
target (its blank, itself, and whether dropped words remain on its left / right in that run):

  -log p(x) <= n * mean(CE of the dropped words' actions) - log n!   (in expectation)

Packed rows are handled per segment, each segment a document. `importance_nll` estimates
-log p(x) = log m - log n! - logsumexp_i log p(x, order_i) from m sampled orders.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mdlm_jax import attention
from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base

NUM_LR = 4  # (blank on the left?, blank on the right?) as 2 * left + right


class BLMNet(nnx.Module):
  """The bidirectional backbone, the blank scorer u and the left/right MLP."""

  def __init__(self, cfg: model_lib.ModelConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.backbone = model_lib.Transformer(cfg, rngs)
    self.blank_u = model_lib.param(rngs, (d,), ("embed",), cfg.init_std)
    self.lr_h = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
    self.lr_e = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
    self.lr_out = model_lib.param(rngs, (d, NUM_LR), ("mlp", None), cfg.init_std)

  def __call__(self, canvas_BxT, positions, segment_ids):
    """(final states (B, T, D), word logits (B, T, V) float32, blank scores (B, T) float32)."""
    net = self.backbone
    h = net.hidden(net.embed_tokens(canvas_BxT), positions, segment_ids)
    blank = model_lib.dense(h.astype(jnp.float32), self.blank_u[...][:, None])[..., 0]
    return h, net.logits(h), blank

  def lr_logits(self, h_xD, words_x):
    """4-way float32 logits of (left, right) for a word placed in a blank with state h."""
    e = self.backbone.embed_tokens(words_x)
    z = jax.nn.silu(model_lib.dense(h_xD, self.lr_h[...]) + model_lib.dense(e, self.lr_e[...]))
    return model_lib.dense(z.astype(jnp.float32), self.lr_out[...])


def _prev(a_BxT, fill):
  """a[:, t - 1] at t (fill at t = 0)."""
  return jnp.concatenate([jnp.full_like(a_BxT[:, :1], fill), a_BxT[:, :-1]], axis=1)


def _next(a_BxT, fill):
  """a[:, t + 1] at t (fill at the end)."""
  return jnp.concatenate([a_BxT[:, 1:], jnp.full_like(a_BxT[:, :1], fill)], axis=1)


def segment_key(segment_ids_BxT):
  """(B, T) int32: a flat id of each token's run of equal segment ids (row * T + its start)."""
  b, t = segment_ids_BxT.shape
  idx = jnp.arange(t, dtype=jnp.int32)
  start = jax.lax.cummax(jnp.where(attention.run_starts(segment_ids_BxT), idx, 0), axis=1)
  return start + t * jnp.arange(b, dtype=jnp.int32)[:, None]


def _log_factorial_per_document(batch, n_BxT):
  """log n! of each document, at its first token (0 elsewhere), so a sum counts it once."""
  first = is_first(segment_key(batch["segment_ids"]))
  return jnp.where(first, jax.lax.lgamma(n_BxT.astype(jnp.float32) + 1.0), 0.0), first


def per_segment(values_BxT, key_BxT, op=jax.ops.segment_sum):
  """`op` of the values over each segment (key in 0..B*T, B*T a catch-all for tokens outside
  every segment), read back at every token of it."""
  flat = op(values_BxT.reshape(-1), key_BxT.reshape(-1), num_segments=key_BxT.size + 1)
  return flat[key_BxT]


def is_first(key_BxT):
  """(B, T) bool: the first token of each segment of `segment_key`, so a sum counts it once."""
  t = key_BxT.shape[1]
  return key_BxT % t == jnp.arange(t)


def segment_logsumexp(values_BxT, valid_BxT, key_BxT):
  """logsumexp of the valid values over each segment, read back at every token of it (finite,
  and unused, where a segment has none)."""
  v = jnp.where(valid_BxT, values_BxT, sampling.NEG_INF)
  m = jax.lax.stop_gradient(per_segment(v, key_BxT, jax.ops.segment_max))
  total = per_segment(jnp.where(valid_BxT, jnp.exp(v - m), 0.0), key_BxT)
  return m + jnp.log(jnp.where(total > 0, total, 1.0))


def words(batch):
  """(B, T) bool: the tokens a BLM generates (real tokens but BOS, EOS and, on prompt/answer
  rows, the prompt: it stays on every canvas and is never a target)."""
  x = batch["inputs"]
  out = (batch["segment_ids"] > 0) & (x != tokenizers.BOS) & (x != tokenizers.EOS)
  if "prompt_mask" in batch:
    out &= batch["prompt_mask"] == 0
  return out


def draw_order(rng, batch, word_BxT=None):
  """Per word (default: `words(batch)`), its place in a uniformly random order of its
  document's words (0 first), and per token the document's word count n."""
  word = words(batch) if word_BxT is None else word_BxT
  key = segment_key(batch["segment_ids"])
  start = key % word.shape[1]
  u = jax.random.uniform(rng, word.shape)
  rank = base.rank_in_row(jnp.where(word, start + u, 2.0 * word.shape[1]))
  before = jnp.take_along_axis(jnp.cumsum(word, axis=1) - word, start, axis=1)
  n = per_segment(word.astype(jnp.int32), key)
  return jnp.where(word, rank - before, -1), n


def canvas_of(batch, keep_BxT):
  """The canvas of the kept tokens: every run of dropped words of a document collapsed into
  one BLANK, then padding. Returns (canvas dict {inputs, positions, segment_ids}, the canvas
  index of each token's place (its blank for a dropped word), dropped (B, T), and per dropped
  word its (left, right) class 2 * left + right: whether dropped words of its run remain on
  each side once it is inserted)."""
  x, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
  b, t = x.shape
  dropped = words(batch) & ~keep_BxT
  left = dropped & _prev(dropped, False) & (_prev(seg, -1) == seg)
  right = dropped & _next(dropped, False) & (_next(seg, -1) == seg)
  occupies = ~dropped | ~left  # kept tokens and the first word of each dropped run
  c_idx = jnp.cumsum(occupies, axis=1, dtype=jnp.int32) - 1
  rows = jnp.arange(b)[:, None]
  target = jnp.where(occupies, c_idx, t)  # t: dropped by the scatter
  put = lambda fill, v: jnp.full((b, t), fill, jnp.int32).at[rows, target].set(v, mode="drop")
  canvas_x = put(tokenizers.PAD, jnp.where(dropped, tokenizers.BLANK, x))
  canvas_seg = put(0, seg)
  # positions restart at each canvas segment, from its first token's original position
  first_pos = put(0, jnp.take_along_axis(pos, segment_key(seg) % t, axis=1))
  c_key = segment_key(canvas_seg)
  canvas_pos = jnp.arange(t, dtype=jnp.int32) - c_key % t + first_pos
  canvas = {"inputs": canvas_x, "segment_ids": canvas_seg,
            "positions": jnp.where(canvas_seg > 0, canvas_pos, 0)}
  return canvas, c_idx, dropped, 2 * left.astype(jnp.int32) + right.astype(jnp.int32)


def action_logprobs(net: BLMNet, batch, keep_BxT):
  """log p(action | canvas of the kept tokens) of inserting each dropped word (B, T) (0
  elsewhere), and the dropped mask."""
  canvas, c_idx, dropped, lr = canvas_of(batch, keep_BxT)
  x = batch["inputs"]
  b = x.shape[0]
  h, logits, score = net(canvas["inputs"], canvas["positions"], canvas["segment_ids"])
  # blank: softmax over the blanks of the document
  is_blank = canvas["inputs"] == tokenizers.BLANK
  lse = segment_logsumexp(score, is_blank, segment_key(canvas["segment_ids"]))
  logp_blank = jnp.take_along_axis(score - lse, c_idx, axis=1)
  # word: softmax over real tokens at the blank's state
  word_logits = jnp.where(jnp.arange(logits.shape[-1]) < tokenizers.NUM_SPECIAL,
                          sampling.NEG_INF, logits)
  lse_w = jax.nn.logsumexp(word_logits, axis=-1)
  rows = jnp.arange(b)[:, None]
  logp_word = logits[rows, c_idx, x] - lse_w[rows, c_idx]
  lr_logp = jax.nn.log_softmax(net.lr_logits(h[rows, c_idx], x), axis=-1)
  logp_lr = jnp.take_along_axis(lr_logp, lr[..., None], axis=-1)[..., 0]
  return jnp.where(dropped, logp_blank + logp_word + logp_lr, 0.0), dropped


def draw_keep(rng, batch):
  """The kept words of a training canvas: per document, k uniform in 0..n-1 and the k
  earliest words of a uniformly random order. Returns (keep, n, k), n and k per token."""
  k_order, k_k = jax.random.split(rng)
  place, n = draw_order(k_order, batch)
  start = segment_key(batch["segment_ids"]) % place.shape[1]
  v = jnp.take_along_axis(jax.random.uniform(k_k, place.shape), start, axis=1)
  k = jnp.floor(v * n).astype(jnp.int32)
  return (place >= 0) & (place < k), n, k


def bound_terms(net, batch, rng):
  """One-pass estimate of -log p(x) per document, summed: (nll, words)."""
  keep, n, k = draw_keep(rng, batch)
  logp, dropped = action_logprobs(net, batch, keep)
  log_fact, _ = _log_factorial_per_document(batch, n)
  weight = n / jnp.maximum(n - k, 1).astype(jnp.float32)
  nll = jnp.sum(jnp.where(dropped, -logp * weight, 0.0)) - jnp.sum(log_fact)
  return nll, jnp.sum(words(batch)).astype(jnp.float32)


def order_logprob(net, batch, place_BxT, n_BxT):
  """log p(x, order) per document, read at each of its tokens: the sum over t of the log
  probability of inserting the word placed t-th into the canvas of the t earlier ones."""
  def step(total, t):
    logp, _ = action_logprobs(net, batch, (place_BxT >= 0) & (place_BxT < t))
    return total + jnp.where(place_BxT == t, logp, 0.0), None
  steps = jnp.arange(place_BxT.shape[1])
  total, _ = jax.lax.scan(step, jnp.zeros(place_BxT.shape, jnp.float32), steps)
  key = segment_key(batch["segment_ids"])
  return jnp.where(n_BxT > 0, per_segment(total, key), 0.0)


def importance_nll(net, batch, rng, orders: int, logprob_fn=None, word_BxT=None):
  """-log p(x) ~ log m - log n! - logsumexp_i log p(x, order_i) over m uniform orders of the
  words (default: this objective's), summed over documents: (nll, words). `logprob_fn(net,
  batch, place, n)` scores one order (default: `order_logprob`). Costs m * T network passes."""
  logprob_fn = logprob_fn or order_logprob
  word_BxT = words(batch) if word_BxT is None else word_BxT
  n = draw_order(rng, batch, word_BxT)[1]
  logs = [logprob_fn(net, batch, draw_order(r, batch, word_BxT)[0], n)
          for r in jax.random.split(rng, orders)]
  log_fact, first = _log_factorial_per_document(batch, n)
  per_doc = math.log(orders) - log_fact - jax.nn.logsumexp(jnp.stack(logs), axis=0)
  # a document without words has one order: per_doc is then -log p(x) (0 for blm)
  return (jnp.sum(jnp.where(first & (batch["segment_ids"] > 0), per_doc, 0.0)),
          jnp.sum(word_BxT).astype(jnp.float32))


def check_eval_orders(opts):
  if opts.eval_orders < 0:
    raise ValueError(f"objective.eval_orders={opts.eval_orders} must be >= 0 (0: the "
                     "one-pass bound; m > 0: importance sampling over m orders).")


def one_blank(prompt_BxP, max_new_tokens: int, suffix_BxS=None):
  """prompt BLANK suffix EOS, then room for the blank to grow to `max_new_tokens` tokens."""
  b = prompt_BxP.shape[0]
  suffix = jnp.zeros((b, 0), jnp.int32) if suffix_BxS is None else jnp.asarray(suffix_BxS)
  full = lambda n, tok: jnp.full((b, n), tok, jnp.int32)
  return jnp.concatenate([prompt_BxP, full(1, tokenizers.BLANK), suffix.astype(jnp.int32),
                          full(1, tokenizers.EOS), full(max_new_tokens - 1, tokenizers.PAD)], 1)


@objectives.register
class BLM(base.Objective):
  name = "blm"
  causal = False
  accepts_suffix = True
  defaults = dict(eval_orders=0)  # > 0: validation by importance sampling over that many orders

  @classmethod
  def validate(cls, opts):
    check_eval_orders(opts)

  def build(self, rngs):
    return BLMNet(self.model_config, rngs)

  def loss_sums(self, model, batch, rng):
    nll, n = bound_terms(model, batch, rng)
    return nll, n, {"words": n}

  def eval_sums(self, model, batch, rng):
    if self.opts.eval_orders > 0:
      nll, n = importance_nll(model, batch, rng, self.opts.eval_orders)
    else:
      nll, n = bound_terms(model, batch, rng)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": nll, "tokens": n,
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * words(batch))}

  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, suffix_BxS=None):
    """Fills one blank between the prompt and the suffix (none: the empty suffix) with at most
    `max_new_tokens` words. Returns the prompt, the middle, EOS, then padding."""
    p = prompt_BxP.shape[1]
    s = 0 if suffix_BxS is None else suffix_BxS.shape[1]
    canvas = one_blank(prompt_BxP, max_new_tokens, suffix_BxS)
    canvas, _ = self.fill(model, canvas, rng, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p)
    # drop the suffix: the middle ends s + 1 tokens before the canvas's end (EOS)
    length = jnp.sum(canvas != tokenizers.PAD, axis=1, keepdims=True)
    idx = jnp.arange(canvas.shape[1])
    src = jnp.where(idx < length - s - 1, idx, idx + s)
    out = jnp.take_along_axis(canvas, jnp.minimum(src, canvas.shape[1] - 1), axis=1)
    return jnp.where(idx < length - s, out, tokenizers.PAD)[:, :p + max_new_tokens]

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    return prompt_len + suffix_len + max_new_tokens + 1  # `one_blank`: BLANK ... EOS

  def fill(self, model, canvas_BxT, rng, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Replaces every BLANK of `canvas_BxT` (one document per row, PAD after its end) by
    actions until none is left or the row is full (a full row adds no new blanks). Tokens
    that are not BLANKs are never changed, only moved right by insertions. Returns (canvas,
    info) with info["calls"], the network evaluations (one per inserted token of the longest
    row)."""
    b, t = canvas_BxT.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    rows = jnp.arange(b)

    def body(state):
      canvas, key, i = state
      key, k_b, k_w, k_lr = jax.random.split(key, 4)
      real = canvas != tokenizers.PAD
      h, logits, score = model(canvas, jnp.where(real, idx, 0), real.astype(jnp.int32))
      blanks = canvas == tokenizers.BLANK
      blank = sampling.sample_logits(k_b, jnp.where(blanks, score, sampling.NEG_INF),
                                     temperature)
      word_logits = jnp.where(jnp.arange(logits.shape[-1]) < tokenizers.NUM_SPECIAL,
                              sampling.NEG_INF, logits[rows, blank])
      w = sampling.sample_logits(k_w, word_logits, temperature, top_k, top_p, min_p)
      room = t - jnp.sum(real, axis=1)
      lr_logits = model.lr_logits(h[rows, blank], w)
      grow = jnp.arange(NUM_LR) // 2 + jnp.arange(NUM_LR) % 2
      lr = sampling.sample_logits(k_lr, jnp.where(grow <= room[:, None], lr_logits,
                                                  sampling.NEG_INF), temperature)
      left, right = (lr // 2)[:, None], (lr % 2)[:, None]
      at = blank[:, None]
      src = jnp.where(idx < at, idx, jnp.where(idx > at + left + right, idx - left - right, -1))
      new = jnp.where(src >= 0, jnp.take_along_axis(canvas, jnp.maximum(src, 0), axis=1),
                      tokenizers.BLANK)
      new = jnp.where(idx == at + left, w[:, None], new)
      return jnp.where(jnp.any(blanks, axis=1, keepdims=True), new, canvas), key, i + 1

    def cond(state):
      canvas, _, i = state
      return jnp.any(canvas == tokenizers.BLANK) & (i < t)

    canvas, _, calls = jax.lax.while_loop(cond, body, (canvas_BxT, rng, 0))
    return canvas, {"calls": calls}
