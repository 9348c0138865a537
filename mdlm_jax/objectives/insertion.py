"""`insertion`: the Insertion Transformer (Stern et al. 2019) with Fractional Positional
Encoding (Zhang, Zhang & Dolan 2023); semantics in docs/objectives.md. Canvases, FPE vectors
and insertions, which training and decoding share, are in `insertion_canvas.py`.

A canvas is a subsequence of the document; between each two neighbouring tokens is a slot,
whose state is a projection of [h_l; h_{l+1}] from a bidirectional encoder. The tied output
layer on a slot scores every word plus EOS, which here means end-of-slot. An action is a
(slot, word) pair: `joint` normalises its logits over all slots and words of the document,
`factorized` multiplies a softmax over slots (u . s_l) by a softmax over words per slot.

Anchors, always on the canvas: a document's BOS and EOS, and the first and last token of each
segment of a packed row (a document cut by the row's edge). Words: the other real tokens.

Training (Stern et al.'s soft binary-tree loss): per document, k uniform in 0..n kept words
in order; each slot's missing span x_i..x_j is a target with weights softmax(-|i - centre| /
tau) (`order=tree`) or uniform (`order=uniform`).
- `finalization=slot` (the default, for parallel decoding): an empty slot targets
  end-of-slot; the loss is the mean over the document's slots of -sum_i w_i log p(x_i, slot),
  then over documents. Every slot has a target under one softmax, so the loss is lowest with
  p(slot) uniform over the slots: p(word | slot) learns, where the words go does not.
- `finalization=sequence` (Stern et al.'s other termination, for sequential decoding): the
  target is the next action, each slot weighted by its share of the missing words (split
  within the slot by the weights above), and stop (end-of-slot in any slot) for the full
  canvas only; documents weighted by n + 1, minus log n! (a constant), per word: with
  order=uniform the loss is the one-pass estimate of the bound below.

Likelihood: insertion orders of a document's words correspond one-to-one to action sequences
(the slot index tells equal words apart), so as for `blm`
  -log p(x) <= -log n! + sum_{t=0..n} E[term_t],
term_t the mean over missing words of -log p(word, its slot) for a uniform canvas of t words
and term_n = -log p(stop), stop being end-of-slot in any slot. `bound_terms` draws t uniform in
0..n per document: an unbiased one-pass estimate.

FPE (`fpe=True`): no rotary positions; each token adds g * u to its embedding, u a unit-RMS
vector fixed when the token is placed: the first and last token of a segment take learned
vectors u_begin, u_end; a token inserted between neighbours l and r takes
u = rms_normalize(u_l W_l + u_r W_r). Training canvases place their interior tokens in
balanced-tree order (the middle one first, between the ends, then recursively), the history
parallel decoding follows. `fpe=False`: rotary positions of the canvas index.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import blm
from mdlm_jax.objectives import insertion_decoding as decoding_lib
from mdlm_jax.objectives.insertion_canvas import tree_positions
from mdlm_jax.objectives.insertion_canvas import fpe_vectors
from mdlm_jax.objectives.insertion_canvas import words
from mdlm_jax.objectives.insertion_canvas import draw_keep
from mdlm_jax.objectives.insertion_canvas import span_key
from mdlm_jax.objectives.insertion_canvas import canvas_of
from mdlm_jax.objectives.insertion_canvas import span_weights
from mdlm_jax.objectives.insertion_canvas import slots

ORDERS = ("tree", "uniform")
DISTRIBUTIONS = ("joint", "factorized")
FINALIZATIONS = ("slot", "sequence")


def _rms_normalize(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class InsertionNet(nnx.Module):
  """The bidirectional backbone, the slot projection, the slot scorer (factorized) and FPE."""

  def __init__(self, cfg: model_lib.ModelConfig, rngs: nnx.Rngs, fpe: bool):
    d = cfg.d_model
    self.fpe = fpe
    self.backbone = model_lib.Transformer(cfg, rngs)
    self.slot_l = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
    self.slot_r = model_lib.param(rngs, (d, d), ("embed", "mlp"), cfg.init_std)
    self.slot_u = model_lib.param(rngs, (d,), ("embed",), cfg.init_std)
    if fpe:
      # u_new starts near the normalised midpoint of its neighbours: positions interpolate
      eye = 0.5 * jnp.eye(d, dtype=jnp.float32)
      self.fpe_l = nnx.Param(eye + model_lib.param(rngs, (d, d), ("embed", "mlp"), 0.02)[...],
                             axes=("embed", "mlp"))
      self.fpe_r = nnx.Param(eye + model_lib.param(rngs, (d, d), ("embed", "mlp"), 0.02)[...],
                             axes=("embed", "mlp"))
      self.fpe_ends = model_lib.param(rngs, (2, d), (None, "embed"), 1.0)
      self.fpe_scale = nnx.Param(jnp.full((d,), cfg.init_std, jnp.float32), axes=("embed",))

  def between(self, u_left, u_right):
    """FPE: the position vector of a token placed between neighbours at u_left and u_right."""
    return _rms_normalize(u_left @ self.fpe_l[...] + u_right @ self.fpe_r[...])

  def ends(self):
    """Unit-RMS position vectors of a segment's first and last token."""
    return _rms_normalize(self.fpe_ends[...])

  def __call__(self, canvas_BxT, segment_ids_BxT, u_BxTxD=None):
    """(slot states (B, T, D) float32: slot t lies between tokens t and t + 1; word logits
    (B, T, V) float32 per slot; slot scores (B, T) float32)."""
    net = self.backbone
    x = net.embed_tokens(canvas_BxT)
    positions = tree_positions(segment_ids_BxT)[0]
    if self.fpe:
      x = x + (u_BxTxD * self.fpe_scale[...]).astype(x.dtype)
    h = net.hidden(x, positions, segment_ids_BxT, rope=not self.fpe)
    nxt = jnp.concatenate([h[:, 1:], jnp.zeros_like(h[:, :1])], axis=1)
    s = model_lib.dense(h, self.slot_l[...]) + model_lib.dense(nxt, self.slot_r[...])
    score = model_lib.dense(s.astype(jnp.float32), self.slot_u[...][:, None])[..., 0]
    return s, net.logits(s), score


def action_logprobs(net: InsertionNet, canvas, distribution: str, u_BxTxD=None,
                    allowed_BxT=None):
  """log p(word, slot) (B, T, V) float32 over the allowed slots of each document (default: all
  its slots); specials other than EOS (end-of-slot) are never inserted. Non-slots: NEG_INF."""
  seg = canvas["segment_ids"]
  if u_BxTxD is None and net.fpe:
    u_BxTxD = fpe_vectors(net, seg)
  _, logits, score = net(canvas["inputs"], seg, u_BxTxD)
  v = logits.shape[-1]
  ok_word = (jnp.arange(v) >= tokenizers.NUM_SPECIAL) | (jnp.arange(v) == tokenizers.EOS)
  logits = jnp.where(ok_word, logits, sampling.NEG_INF)
  lse_w = jax.nn.logsumexp(logits, axis=-1)
  slot_score = lse_w if distribution == "joint" else score
  ok = slots(canvas) if allowed_BxT is None else slots(canvas) & allowed_BxT
  key = blm.segment_key(seg)
  log_p_slot = slot_score - blm.segment_logsumexp(slot_score, ok, key)
  out = log_p_slot[..., None] + logits - lse_w[..., None]
  return jnp.where(ok[..., None], out, sampling.NEG_INF)


def _log_prob_of_missing(logp_BxTxV, batch, slot_BxT, missing_BxT):
  """log p(x_i, slot_i) at each missing word (0 elsewhere)."""
  rows = jnp.arange(slot_BxT.shape[0])[:, None]
  lp = logp_BxTxV[rows, slot_BxT, batch["inputs"]]
  return jnp.where(missing_BxT, lp, 0.0)


def slot_loss(net, batch, keep_BxT, distribution: str, order: str, tau: float):
  """Stern et al.'s soft binary-tree loss of one canvas: (sum over documents of the mean
  slot loss, number of documents with a slot)."""
  canvas, missing, slot, span_idx, span_len = canvas_of(batch, keep_BxT)
  logp = action_logprobs(net, canvas, distribution)
  w = span_weights(span_idx, span_len, span_key(missing, slot), order, tau)
  lp = _log_prob_of_missing(logp, batch, slot, missing)
  b, t = slot.shape
  rows = jnp.arange(b)[:, None]
  per_slot = jnp.zeros((b, t), jnp.float32).at[rows, jnp.where(missing, slot, t)].add(
      -w * lp, mode="drop")
  is_slot = slots(canvas)
  filled = jnp.zeros((b, t), bool).at[rows, jnp.where(missing, slot, t)].set(True, mode="drop")
  empty = is_slot & ~filled
  per_slot = per_slot - jnp.where(empty, logp[..., tokenizers.EOS], 0.0)
  key = blm.segment_key(canvas["segment_ids"])
  n_slots = blm.per_segment(is_slot.astype(jnp.float32), key)
  per_doc = blm.per_segment(jnp.where(is_slot, per_slot, 0.0), key)
  first = is_slot & blm.is_first(key)  # each document once, if it has a slot
  return (jnp.sum(jnp.where(first, per_doc / jnp.maximum(n_slots, 1.0), 0.0)),
          jnp.sum(first).astype(jnp.float32))


def log_stop(logp_BxTxV, canvas):
  """log p(stop) per canvas token (read at any token of a document): end-of-slot in any
  slot."""
  key = blm.segment_key(canvas["segment_ids"])
  return blm.segment_logsumexp(logp_BxTxV[..., tokenizers.EOS], slots(canvas), key)


def canvas_terms(net, batch, keep_BxT, k_BxT, n_BxT, distribution: str, order="uniform",
                 tau=1.0):
  """Per document (read at its first token, 0 elsewhere): the cross-entropy of its next action
  on this canvas, -sum over missing words of q_i log p(word_i, slot_i), or -log p(stop) when
  k = n. q is a distribution over the missing words: each slot's share is its span's share of
  the n - k missing words, split within the span by `span_weights` (`order`, `tau`). With
  order='uniform', q_i = 1 / (n - k) and this is term_k of the bound."""
  canvas, missing, slot, span_idx, span_len = canvas_of(batch, keep_BxT)
  logp = action_logprobs(net, canvas, distribution)
  lp = _log_prob_of_missing(logp, batch, slot, missing)
  q = span_weights(span_idx, span_len, span_key(missing, slot), order, tau) * span_len
  q = q / jnp.maximum(n_BxT - k_BxT, 1)
  key = blm.segment_key(batch["segment_ids"])
  first = (batch["segment_ids"] > 0) & blm.is_first(key)
  next_word = -blm.per_segment(q * lp, key)
  # the canvas's own first token of the same document reads its stop probability
  c_first = jnp.cumsum((batch["segment_ids"] > 0) & ~missing, axis=1, dtype=jnp.int32) - 1
  c_key = blm.segment_key(canvas["segment_ids"])
  has_slot = blm.per_segment(slots(canvas).astype(jnp.int32), c_key) > 0
  # a document of one token has no slot: it stops with probability 1
  stop = jnp.where(has_slot, -log_stop(logp, canvas), 0.0)
  stop = jnp.take_along_axis(stop, jnp.maximum(c_first, 0), axis=1)
  return jnp.where(first, jnp.where(k_BxT < n_BxT, next_word, stop), 0.0), first


def sequence_loss(net, batch, rng, distribution: str, order="uniform", tau=1.0):
  """Sequence finalization: one canvas per document (k uniform in 0..n), the cross-entropy of
  its next action (`canvas_terms`), end-of-slot (stop) the target of the full canvas only:
  (sum over documents of (n + 1) term_k - log n!, words, documents). With order='uniform'
  this is the one-pass estimate of the bound (`bound_terms`)."""
  keep, n, k = draw_keep(rng, batch)
  term, first = canvas_terms(net, batch, keep, k, n, distribution, order, tau)
  log_fact = jax.lax.lgamma(n.astype(jnp.float32) + 1.0)
  total = jnp.sum(jnp.where(first, (n + 1) * term - log_fact, 0.0))
  return total, jnp.sum(words(batch)).astype(jnp.float32), jnp.sum(first).astype(jnp.float32)


def bound_terms(net, batch, rng, distribution: str):
  """One-pass estimate of the bound on -log p(x) per document, summed: (nll, words)."""
  return sequence_loss(net, batch, rng, distribution)[:2]


def order_logprob(net, batch, place_BxT, n_BxT, distribution: str):
  """log p(x, order) per document, read at each of its tokens: the sum over t of log p(the
  word placed t-th, its slot) on the canvas of the t earlier ones, plus log p(stop) on the
  full canvas (canvases scored with their tree-order FPE vectors, as the bound does)."""
  def step(total, t):
    keep = (place_BxT >= 0) & (place_BxT < t)
    canvas, missing, slot, _, _ = canvas_of(batch, keep)
    lp = _log_prob_of_missing(action_logprobs(net, canvas, distribution), batch, slot, missing)
    return total + jnp.where(place_BxT == t, lp, 0.0), None
  total, _ = jax.lax.scan(step, jnp.zeros(place_BxT.shape, jnp.float32),
                          jnp.arange(place_BxT.shape[1]))
  key = blm.segment_key(batch["segment_ids"])
  stop, _ = canvas_terms(net, batch, words(batch), n_BxT, n_BxT, distribution)
  return blm.per_segment(total - stop, key)


@objectives.register
class Insertion(base.Objective):
  name = "insertion"
  causal = False
  accepts_suffix = True
  samplers = decoding_lib.DECODINGS
  # decoding 'auto': parallel after slot finalization, sequential after sequence finalization
  # eval_orders > 0: validation by importance sampling over that many orders (as blm's)
  defaults = dict(order="tree", tau=1.0, distribution="joint", fpe=True, decoding="auto",
                  finalization="slot", eval_orders=0)

  @classmethod
  def validate(cls, opts):
    if opts.order not in ORDERS:
      raise ValueError(f"objective.order={opts.order!r}; choose one of {ORDERS}.")
    if not opts.tau > 0:
      raise ValueError(f"objective.tau={opts.tau} must be > 0 (order='uniform' is tau -> inf).")
    if opts.distribution not in DISTRIBUTIONS:
      raise ValueError(f"objective.distribution={opts.distribution!r}; choose one of "
                       f"{DISTRIBUTIONS}.")
    if opts.finalization not in FINALIZATIONS:
      raise ValueError(f"objective.finalization={opts.finalization!r}; choose one of "
                       f"{FINALIZATIONS}.")
    decoding_lib.resolve_decoding(opts.decoding, opts.finalization)
    blm.check_eval_orders(opts)

  def build(self, rngs):
    return InsertionNet(self.model_config, rngs, self.opts.fpe)

  def loss_sums(self, model, batch, rng):
    o = self.opts
    if o.finalization == "sequence":
      total, weight, docs = sequence_loss(model, batch, rng, o.distribution, o.order, o.tau)
      return total, weight, {"documents": docs}
    keep, _, _ = draw_keep(rng, batch)
    total, docs = slot_loss(model, batch, keep, o.distribution, o.order, o.tau)
    return total, docs, {"documents": docs}

  def eval_sums(self, model, batch, rng):
    dist = self.opts.distribution
    if self.opts.eval_orders > 0:
      nll, n = blm.importance_nll(
          model, batch, rng, self.opts.eval_orders, word_BxT=words(batch),
          logprob_fn=lambda net, b, place, n: order_logprob(net, b, place, n, dist))
    else:
      nll, n = bound_terms(model, batch, rng, dist)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": nll, "tokens": n,
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * words(batch))}

  def flops_per_token(self, seq_len: int) -> float:
    """The backbone, the slot projection (2 d x d) and, with FPE, one (2 d x d) map per
    placement level of the canvas, forward and backward."""
    d = self.model_config.d_model
    levels = (math.ceil(math.log2(max(seq_len, 2))) + 1) if self.opts.fpe else 0
    return 3.0 * (base.forward_flops_per_token(self.model_config, seq_len)
                  + 2 * 2 * d * d * (1 + levels))

  def generate(self, model, prompt_BxP, rng, *, max_new_tokens=256, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, suffix_BxS=None, decoding=None):
    """Inserts up to `max_new_tokens` words between the prompt and the suffix (none: the empty
    suffix; EOS closes the canvas). Returns the prompt, the middle, EOS, then padding."""
    b, p = prompt_BxP.shape
    suffix = (jnp.zeros((b, 0), jnp.int32) if suffix_BxS is None
              else jnp.asarray(suffix_BxS, jnp.int32))
    s = suffix.shape[1]
    full = lambda n, tok: jnp.full((b, n), tok, jnp.int32)
    canvas = jnp.concatenate([prompt_BxP.astype(jnp.int32), suffix, full(1, tokenizers.EOS),
                              full(max_new_tokens, tokenizers.PAD)], axis=1)
    region = jnp.concatenate([full(p, 0), full(s + 1, 2), full(max_new_tokens, 0)], axis=1)
    canvas, region, _ = self.fill(model, canvas, region, rng, temperature=temperature,
                                  top_k=top_k, top_p=top_p, min_p=min_p, decoding=decoding)
    # the prompt, then the middle (region 1) in order, then EOS
    middle = region == 1
    order = jnp.argsort(jnp.where(middle, jnp.arange(canvas.shape[1]), canvas.shape[1]), axis=1,
                        stable=True)
    mid = jnp.where(jnp.take_along_axis(middle, order, 1),
                    jnp.take_along_axis(canvas, order, 1), tokenizers.PAD)
    n_mid = jnp.sum(middle, axis=1, keepdims=True)
    idx = jnp.arange(max_new_tokens)
    mid = jnp.where(idx < n_mid, mid[:, :max_new_tokens],
                    jnp.where(idx == n_mid, tokenizers.EOS, tokenizers.PAD))
    return jnp.concatenate([prompt_BxP.astype(jnp.int32), mid], axis=1)

  def resolve_sampler(self, name: str | None) -> str:
    """--sampler: `parallel` or `sequential`; by default what objective.decoding resolves to
    (parallel after slot finalization); parallel refused after sequence finalization."""
    if name is not None and name not in decoding_lib.DECODINGS:
      raise ValueError(f"--sampler={name!r}: an insertion model decodes with "
                       "--sampler=parallel or --sampler=sequential.")
    try:
      return decoding_lib.resolve_decoding(name or self.opts.decoding, self.opts.finalization)
    except ValueError as e:
      raise ValueError(f"--sampler={name}: {e}" if name else str(e)) from None

  def canvas_width(self, prompt_len: int, suffix_len: int, max_new_tokens: int) -> int:
    return prompt_len + suffix_len + 1 + max_new_tokens  # prompt, suffix, EOS, room

  def fill(self, model, canvas_BxT, region_BxT, rng, *, temperature=1.0, top_k=0, top_p=1.0,
           min_p=0.0, decoding=None):
    """Inserts words into the slots between region-0 and region-2 tokens (a slot is open when
    its left token's region is <= 1 and its right token's >= 1; inserted tokens are region 1)
    until the model ends every open slot, or stops (sequential), or the row is full. Given
    tokens are never changed. `parallel`: each open slot draws a word or end-of-slot from its
    own distribution p(word | slot), all at once (about log2 n steps); `sequential`: one
    (slot, word) action from the joint distribution per step, end-of-slot meaning stop.
    Returns (canvas, region, info) with info["calls"], the network evaluations."""
    decoding = decoding_lib.resolve_decoding(decoding or self.opts.decoding,
                                             self.opts.finalization)
    logprobs = lambda c, u, open_: action_logprobs(model, c, self.opts.distribution, u, open_)
    return decoding_lib.fill(model, canvas_BxT, region_BxT, rng, logprobs, decoding,
                             self.opts.finalization == "slot", temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p)
