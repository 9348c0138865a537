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


import jax
import jax.numpy as jnp
from flax import nnx

from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import blm
from mdlm_jax.objectives import insertion_decoding as decoding_lib
from mdlm_jax.objectives.insertion_canvas import tree_positions
from mdlm_jax.objectives.insertion_canvas import fpe_vectors
from mdlm_jax.objectives.insertion_history import history_steps
from mdlm_jax.objectives.insertion_history import history_vectors
from mdlm_jax.objectives.insertion_history import normalize_actions
from mdlm_jax.objectives.insertion_history import trajectory_logprob
from mdlm_jax.objectives.insertion_history import tree_rounds
from mdlm_jax.objectives.insertion_canvas import anchors
from mdlm_jax.objectives.insertion_canvas import canvas_values
from mdlm_jax.objectives.insertion_canvas import keep_order
from mdlm_jax.objectives.insertion_canvas import words
from mdlm_jax.objectives.insertion_canvas import draw_keep
from mdlm_jax.objectives.insertion_canvas import span_key
from mdlm_jax.objectives.insertion_canvas import canvas_of
from mdlm_jax.objectives.insertion_canvas import span_weights
from mdlm_jax.objectives.insertion_canvas import slots

ORDERS = ("tree", "uniform")
ENCODERS = ("auto", "placement", "bidirectional")
DISTRIBUTIONS = ("joint", "factorized")
FINALIZATIONS = ("slot", "sequence")


def _rms_normalize(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class InsertionNet(nnx.Module):
  """The backbone (bidirectional, or by placement step), the slot projection, the slot scorer
  (factorized) and FPE."""

  def __init__(self, cfg: model_lib.ModelConfig, rngs: nnx.Rngs, fpe: bool,
               placement: bool = False):
    d = cfg.d_model
    self.fpe = fpe
    self.placement = placement
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

  def inputs(self, tokens_BxT, u_BxTxD=None):
    """Token embeddings plus, with FPE, the scaled position vectors."""
    x = self.backbone.embed_tokens(tokens_BxT)
    if self.fpe:
      x = x + (u_BxTxD * self.fpe_scale[...]).astype(x.dtype)
    return x

  def states(self, canvas_BxT, segment_ids_BxT, u_BxTxD=None, steps_BxT=None):
    """Final token states (B, T, D): bidirectional, or with placement attention (each token
    attends to the tokens of its segment placed at its step `steps_BxT` or before)."""
    if self.placement and steps_BxT is None:
      raise ValueError("placement attention needs each token's placement step")
    positions = tree_positions(segment_ids_BxT)[0]
    return self.backbone.hidden(self.inputs(canvas_BxT, u_BxTxD), positions, segment_ids_BxT,
                                rope=not self.fpe,
                                order_BxT=steps_BxT if self.placement else None)

  def slot_halves(self, h):
    """Each token's share of the slots on its right and on its left: a slot between tokens
    l and r has the state left[l] + right[r]."""
    return model_lib.dense(h, self.slot_l[...]), model_lib.dense(h, self.slot_r[...])

  def slot_head(self, s):
    """(word logits (.., V) float32, slot scores float32) of slot states s."""
    score = model_lib.dense(s.astype(jnp.float32), self.slot_u[...][:, None])[..., 0]
    return self.backbone.logits(s), score

  def slot_outputs(self, h_left, h_right):
    """(slot states, word logits, slot scores) of the slots between tokens whose states are
    h_left and h_right."""
    s = model_lib.dense(h_left, self.slot_l[...]) + model_lib.dense(h_right, self.slot_r[...])
    return (s, *self.slot_head(s))

  def __call__(self, canvas_BxT, segment_ids_BxT, u_BxTxD=None, steps_BxT=None):
    """(slot states (B, T, D) float32: slot t lies between tokens t and t + 1; word logits
    (B, T, V) float32 per slot; slot scores (B, T) float32)."""
    h = self.states(canvas_BxT, segment_ids_BxT, u_BxTxD, steps_BxT)
    return self.slot_outputs(h, jnp.concatenate([h[:, 1:], jnp.zeros_like(h[:, :1])], axis=1))


def action_logprobs(net: InsertionNet, canvas, distribution: str, u_BxTxD=None,
                    allowed_BxT=None):
  """log p(word, slot) (B, T, V) float32 over the allowed slots of each document (default: all
  its slots); specials other than EOS (end-of-slot) are never inserted. Non-slots: NEG_INF."""
  seg = canvas["segment_ids"]
  steps = canvas.get("steps") if net.placement else None
  if u_BxTxD is None and net.fpe:
    u_BxTxD = fpe_vectors(net, seg) if steps is None else history_vectors(net, seg, steps)
  _, logits, score = net(canvas["inputs"], seg, u_BxTxD, steps)
  ok = slots(canvas) if allowed_BxT is None else slots(canvas) & allowed_BxT
  return normalize_actions(logits, score, ok, seg, distribution)


def _log_prob_of_missing(logp_BxTxV, batch, slot_BxT, missing_BxT):
  """log p(x_i, slot_i) at each missing word (0 elsewhere)."""
  rows = jnp.arange(slot_BxT.shape[0])[:, None]
  lp = logp_BxTxV[rows, slot_BxT, batch["inputs"]]
  return jnp.where(missing_BxT, lp, 0.0)


def with_history(net, batch, keep_BxT, canvas, place_BxT=None):
  """The canvas of the kept words with its placement steps, for placement attention (else
  unchanged): the anchors, then the kept words by a balanced tree (`place_BxT` None: the
  history of parallel decoding) or one per step in the order `place_BxT` gives (that of
  sequential decoding)."""
  if not net.placement:
    return canvas
  anchor = canvas_values(batch, keep_BxT, anchors(batch))
  order = None if place_BxT is None else canvas_values(batch, keep_BxT, place_BxT)
  return dict(canvas, steps=history_steps(canvas["segment_ids"], anchor, order))


def slot_loss(net, batch, keep_BxT, distribution: str, order: str, tau: float,
              place_BxT=None):
  """Stern et al.'s soft binary-tree loss of one canvas (its history from `place_BxT`, see
  `with_history`): (sum over documents of the mean slot loss, number of documents with a
  slot)."""
  canvas, missing, slot, span_idx, span_len = canvas_of(batch, keep_BxT)
  logp = action_logprobs(net, with_history(net, batch, keep_BxT, canvas, place_BxT),
                         distribution)
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
                 tau=1.0, place_BxT=None):
  """Per document (read at its first token, 0 elsewhere): the cross-entropy of its next action
  on this canvas, -sum over missing words of q_i log p(word_i, slot_i), or -log p(stop) when
  k = n. q is a distribution over the missing words: each slot's share is its span's share of
  the n - k missing words, split within the span by `span_weights` (`order`, `tau`). With
  order='uniform', q_i = 1 / (n - k) and this is term_k of the bound. The canvas's history:
  `with_history` (`place_BxT`)."""
  canvas, missing, slot, span_idx, span_len = canvas_of(batch, keep_BxT)
  logp = action_logprobs(net, with_history(net, batch, keep_BxT, canvas, place_BxT),
                         distribution)
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
  this is the one-pass estimate of the bound (`bound_terms`). Placement attention: the kept
  words were placed one per step in the order they were kept in."""
  keep, n, k = draw_keep(rng, batch)
  place = keep_order(rng, batch) if net.placement else None
  term, first = canvas_terms(net, batch, keep, k, n, distribution, order, tau, place)
  log_fact = jax.lax.lgamma(n.astype(jnp.float32) + 1.0)
  total = jnp.sum(jnp.where(first, (n + 1) * term - log_fact, 0.0))
  return total, jnp.sum(words(batch)).astype(jnp.float32), jnp.sum(first).astype(jnp.float32)


def bound_terms(net, batch, rng, distribution: str):
  """One-pass estimate of the bound on -log p(x) per document, summed: (nll, words)."""
  return sequence_loss(net, batch, rng, distribution)[:2]


def order_logprob(net, batch, place_BxT, n_BxT, distribution: str):
  """log p(x, order) per document, read at each of its tokens: the sum over t of log p(the
  word placed t-th, its slot) on the canvas of the t earlier ones, plus log p(stop) on the
  full canvas. Placement attention: the canvases' history is the order itself, and one
  network pass scores every step (`trajectory_logprob`); bidirectional: each canvas is
  encoded anew with its tree-order FPE vectors, as the bound does."""
  if net.placement:
    steps = history_steps(batch["segment_ids"], anchors(batch), place_BxT)
    return trajectory_logprob(net, batch, steps, parallel=False, distribution=distribution)

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
  # encoder 'auto': placement attention with FPE (cached decoding, `kv_cache`), else
  # bidirectional (the whole canvas encoded anew at every step)
  defaults = dict(order="tree", tau=1.0, distribution="joint", fpe=True, decoding="auto",
                  finalization="slot", eval_orders=0, encoder="auto", kv_cache=True)

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
    decoding = decoding_lib.resolve_decoding(opts.decoding, opts.finalization)
    blm.check_eval_orders(opts)
    if opts.encoder not in ENCODERS:
      raise ValueError(f"objective.encoder={opts.encoder!r}; choose one of {ENCODERS}.")
    if opts.encoder == "placement" and not opts.fpe:
      raise ValueError("objective.encoder='placement' needs objective.fpe=True (a token's "
                       "position must be fixed when it is placed); use encoder='bidirectional'.")
    if opts.eval_orders > 0 and decoding == "parallel" and cls.placement(opts):
      raise ValueError("objective.eval_orders > 0 scores insertion orders, the histories of "
                       "sequential decoding; a model trained for parallel decoding under "
                       "placement attention is scored exactly along its balanced tree: set "
                       "objective.eval_orders=0 (or objective.decoding=sequential).")

  @staticmethod
  def placement(opts) -> bool:
    return opts.encoder == "placement" or (opts.encoder == "auto" and opts.fpe)

  @property
  def parallel(self) -> bool:
    """Trained for parallel decoding: balanced-tree histories (else one word per step)."""
    return decoding_lib.resolve_decoding(self.opts.decoding, self.opts.finalization) == \
        "parallel"

  def build(self, rngs):
    return InsertionNet(self.model_config, rngs, self.opts.fpe, self.placement(self.opts))

  def loss_sums(self, model, batch, rng):
    o = self.opts
    if o.finalization == "sequence":
      total, weight, docs = sequence_loss(model, batch, rng, o.distribution, o.order, o.tau)
      return total, weight, {"documents": docs}
    keep, _, _ = draw_keep(rng, batch)
    place = keep_order(rng, batch) if model.placement and not self.parallel else None
    total, docs = slot_loss(model, batch, keep, o.distribution, o.order, o.tau, place)
    return total, docs, {"documents": docs}

  def eval_sums(self, model, batch, rng):
    """The NLL bound per word: with `eval_orders` importance sampling over orders; for
    parallel decoding with FPE, -log p(x, its balanced tree) under the parallel decoder,
    exact (placement attention: one network pass; bidirectional: one per tree level); else
    the one-pass estimate over uniform orders."""
    dist = self.opts.distribution
    if self.opts.eval_orders > 0:
      nll, n = blm.importance_nll(
          model, batch, rng, self.opts.eval_orders, word_BxT=words(batch),
          logprob_fn=lambda net, b, place, n: order_logprob(net, b, place, n, dist))
    elif self.parallel and model.fpe:
      seg = batch["segment_ids"]
      lp = trajectory_logprob(model, batch, history_steps(seg, anchors(batch)), parallel=True,
                              levels=tree_rounds(seg.shape[1]) + 1)
      first = (seg > 0) & blm.is_first(blm.segment_key(seg))
      nll, n = -jnp.sum(jnp.where(first, lp, 0.0)), jnp.sum(words(batch)).astype(jnp.float32)
    else:
      nll, n = bound_terms(model, batch, rng, dist)
    token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
    return {"nll": nll, "tokens": n,
            "bytes": jnp.sum(token_bytes[batch["inputs"]] * words(batch))}

  def flops_per_token(self, seq_len: int) -> float:
    """The backbone, the slot projection (2 d x d) and, with FPE, the (2 d x d) map that
    places each token, forward and backward."""
    d = self.model_config.d_model
    return 3.0 * (base.forward_flops_per_token(self.model_config, seq_len)
                  + 2 * 2 * d * d * (1 + int(self.opts.fpe)))

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
    Placement attention: `insertion_decoding.fill_placed` (cached with objective.kv_cache).
    Returns (canvas, region, info) with info["calls"], the network evaluations."""
    decoding = decoding_lib.resolve_decoding(decoding or self.opts.decoding,
                                             self.opts.finalization)
    if model.placement:
      return decoding_lib.fill_placed(model, canvas_BxT, region_BxT, rng,
                                      self.opts.distribution, decoding,
                                      self.opts.finalization == "slot", self.opts.kv_cache,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      min_p=min_p)
    logprobs = lambda c, u, open_: action_logprobs(model, c, self.opts.distribution, u, open_)
    return decoding_lib.fill(model, canvas_BxT, region_BxT, rng, logprobs, decoding,
                             self.opts.finalization == "slot", temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p)
