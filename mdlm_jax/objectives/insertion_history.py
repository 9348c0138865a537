"""Placement histories of insertion canvases (`insertion` with `attention='placement'`).

A history gives each canvas token the step it was placed at. Under placement attention a
token attends only to the tokens of its segment placed at the same or an earlier step, and
its FPE vector is fixed when it is placed, from its neighbours then: the nearest tokens on
either side placed at a strictly earlier step (its *parents*). So a token's state never
changes once it is placed, and the states of a whole history come from one pass over its
final canvas: training, the likelihood and the cached decoder all read the same numbers.

Steps. The anchors (BOS, EOS, a segment's first and last token, a prompt) come first: the
segment's ends at step 0, the other anchors by a balanced tree over the anchors (the middle
one between the ends, then each half). The words follow from step `word_base(T)` on:
- `tree` (parallel decoding): a balanced tree over each run of words between two anchors,
  one tree level per step: what parallel decoding does when every slot takes its middle word;
- `order` (sequential decoding): one word of each document per step, in a given order.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import blm


def tree_rounds(t: int) -> int:
  """Levels a balanced tree over at most t positions needs (besides its ends)."""
  return max(1, math.ceil(math.log2(max(t, 2))))


def word_base(t: int) -> int:
  """The first step of the words on a canvas of width t (every anchor is placed before)."""
  return tree_rounds(t) + 1


def _tree_levels(member_BxT, local_BxT, length_BxT, rounds: int):
  """Level of each member in a balanced tree over its group: `local` its index in the group
  (0 .. length - 1), the two ends level 0, the middle (lo + hi) // 2 of an open interval
  lo < i < hi level 1 + the interval's depth. Non-members: 0."""
  level = jnp.zeros_like(local_BxT)
  placed = ~member_BxT | (local_BxT == 0) | (local_BxT == length_BxT - 1)
  lo, hi = jnp.zeros_like(local_BxT), length_BxT - 1
  for r in range(rounds):
    mid = (lo + hi) // 2
    now = ~placed & (local_BxT == mid)
    level = jnp.where(now, r + 1, level)
    placed = placed | now
    lo = jnp.where(~placed & (local_BxT > mid), mid, lo)
    hi = jnp.where(~placed & (local_BxT < mid), mid, hi)
  return level


def history_steps(segment_ids_BxT, anchor_BxT, order_BxT=None):
  """(B, T) int32 placement steps of a canvas (module docstring): anchors first, then the
  words by a balanced tree over each run between two anchors (`order_BxT` None) or in the
  order `order_BxT` gives (0 first, per document)."""
  b, t = segment_ids_BxT.shape
  real = segment_ids_BxT > 0
  anchor = real & anchor_BxT
  key = blm.segment_key(segment_ids_BxT)
  start = key % t
  idx = jnp.arange(t, dtype=jnp.int32)
  # anchors: a tree over the segment's anchors
  a_local = jnp.cumsum(anchor, axis=1, dtype=jnp.int32) - anchor
  a_local = a_local - jnp.take_along_axis(a_local, start, axis=1)
  a_count = blm.per_segment(anchor.astype(jnp.int32), key)
  rounds = tree_rounds(t)
  a_level = _tree_levels(anchor, a_local, a_count, rounds)
  if order_BxT is None:
    # words: a tree between the anchors on either side (their indices lo and hi)
    left = jax.lax.cummax(jnp.where(anchor, idx, -1), axis=1)
    right = jax.lax.cummin(jnp.where(anchor, idx, t), axis=1, reverse=True)
    word = real & ~anchor
    w_level = _tree_levels(word, idx - left, right - left + 1, rounds) - 1
  else:
    w_level = order_BxT
  return jnp.where(anchor, a_level, word_base(t) + w_level).astype(jnp.int32) * real


def parents(segment_ids_BxT, steps_BxT):
  """(left, right) (B, T) int32: each token's nearest tokens of its segment placed at a
  strictly earlier step, on its left and on its right (-1: none, for a segment's ends)."""
  t = segment_ids_BxT.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  earlier = same & (steps_BxT[:, None, :] < steps_BxT[:, :, None])   # [b, i, j]: j before i
  left = jnp.max(jnp.where(earlier & (idx[None, :] < idx[:, None]), idx, -1), axis=2)
  right = jnp.min(jnp.where(earlier & (idx[None, :] > idx[:, None]), idx, t), axis=2)
  return left, jnp.where(right == t, -1, right)


def history_vectors(net, segment_ids_BxT, steps_BxT):
  """(B, T, D) float32 FPE vectors along a history: a segment's first and last token take
  `net.ends()`, every other token `net.between` its parents' vectors, computed in step
  order (one token of each row per scan step)."""
  b, t = segment_ids_BxT.shape
  real = segment_ids_BxT > 0
  left, right = parents(segment_ids_BxT, steps_BxT)
  u_begin, u_end = net.ends()
  ends = real & ((left < 0) | (right < 0))
  local0 = blm.is_first(blm.segment_key(segment_ids_BxT))
  u = jnp.where((ends & local0)[..., None], u_begin,
                jnp.where(ends[..., None], u_end, jnp.zeros((b, t, u_begin.shape[0]))))
  inner = real & ~ends
  sort = jnp.where(inner, steps_BxT, jnp.iinfo(jnp.int32).max // (2 * t)) * t + jnp.arange(t)
  order = jnp.argsort(sort, axis=1).astype(jnp.int32)   # inner tokens by (step, index)
  rows = jnp.arange(b)

  def place(u, i_B):
    ok = inner[rows, i_B]
    new = net.between(u[rows, jnp.maximum(left[rows, i_B], 0)],
                      u[rows, jnp.maximum(right[rows, i_B], 0)])
    return u.at[rows, i_B].set(jnp.where(ok[:, None], new, u[rows, i_B])), None

  u, _ = jax.lax.scan(place, u, order.T)
  return u


def normalize_actions(logits_BxTxV, score_BxT, ok_BxT, segment_ids_BxT, distribution: str):
  """`action_logprobs` from the slots' word logits and scores: `joint` normalises the word
  logits over every ok slot of a document and its words, `factorized` p(slot) (softmax of
  the scores over the ok slots) times p(word | slot)."""
  v = logits_BxTxV.shape[-1]
  ok_word = (jnp.arange(v) >= tokenizers.NUM_SPECIAL) | (jnp.arange(v) == tokenizers.EOS)
  logits = jnp.where(ok_word, logits_BxTxV, sampling.NEG_INF)
  lse_w = jax.nn.logsumexp(logits, axis=-1)
  slot_score = lse_w if distribution == "joint" else score_BxT
  key = blm.segment_key(segment_ids_BxT)
  log_p_slot = slot_score - blm.segment_logsumexp(slot_score, ok_BxT, key)
  out = log_p_slot[..., None] + logits - lse_w[..., None]
  return jnp.where(ok_BxT[..., None], out, sampling.NEG_INF)


def trajectory_logprob(net, batch, steps_BxT, parallel: bool, distribution: str = "joint",
                       u_BxTxD=None, levels: int | None = None):
  """log p(x, history) per document (read at every token of it) of the decoder that builds
  the row's canvas along `steps_BxT`: under placement attention from one pass of the network
  over the whole canvas (each token's state is the one it had when placed); a bidirectional
  encoder (with FPE) encodes the canvas of every step anew, as its decoder does.

  From the anchors, step s = word_base(T), word_base(T) + 1, ... places the words of that
  step; a slot is open unless both its tokens are prompt (decoding never opens those).
  `parallel`: every open slot draws its word (the one placed between its tokens at step s)
  or end-of-slot from p(word | slot), until a step places nothing (that step's end-of-slots
  counted too). Sequential: one word per document per step from the joint p(slot, word)
  (`distribution`) over the open slots, then stop (end-of-slot in any open slot).
  `levels`: the steps scanned after the anchors (default T)."""
  x, seg = batch["inputs"], batch["segment_ids"]
  b, t = x.shape
  real = seg > 0
  if u_BxTxD is None:
    u_BxTxD = history_vectors(net, seg, steps_BxT)
  if net.placement:
    halves = net.slot_halves(net.states(x, seg, u_BxTxD, steps_BxT))
  elif not net.fpe:
    raise ValueError("the likelihood of a history needs FPE (objective.fpe=True): rotary "
                     "positions of the canvas index move as the canvas grows")
  left_parent, _ = parents(seg, steps_BxT)
  base_step = word_base(t)
  prompt = batch.get("prompt_mask", jnp.zeros_like(x)) > 0
  key = blm.segment_key(seg)
  idx = jnp.arange(t, dtype=jnp.int32)
  rows = jnp.arange(b)[:, None]
  word = real & (steps_BxT >= base_step)
  last = blm.per_segment(jnp.where(word, steps_BxT, base_step - 1), key, jax.ops.segment_max)
  first = real & blm.is_first(key)

  def level(total, s):
    present = real & (steps_BxT < s)
    h_left, h_right = (halves if net.placement else
                       net.slot_halves(net.states(x, jnp.where(present, seg, 0), u_BxTxD)))
    nxt = jax.lax.cummin(jnp.where(present, idx, t), axis=1, reverse=True)
    right = jnp.minimum(jnp.concatenate([nxt[:, 1:], jnp.full((b, 1), t, jnp.int32)], 1), t - 1)
    open_ = (present & (right > idx) & present[rows, right] & (seg[rows, right] == seg)
             & ~(prompt & prompt[rows, right]))
    logp = normalize_actions(*net.slot_head(h_left + h_right[rows, right]), open_, seg,
                             distribution)
    new = word & (steps_BxT == s)
    at = jnp.where(new, left_parent, t)
    target = jnp.full((b, t), tokenizers.EOS, jnp.int32).at[rows, at].set(x, mode="drop")
    chosen = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    if parallel:  # each open slot's own p(word | slot)
      got = jnp.where(open_ & (s <= last + 1),
                      chosen - jax.nn.logsumexp(logp, axis=-1), 0.0)
    else:
      placed = jnp.zeros((b, t), bool).at[rows, at].set(True, mode="drop")
      stop = blm.segment_logsumexp(logp[..., tokenizers.EOS], open_, key)
      has_slot = blm.per_segment(open_.astype(jnp.int32), key) > 0
      got = (jnp.where(placed, chosen, 0.0)
             + jnp.where(first & has_slot & (s == last + 1), stop, 0.0))
    return total + blm.per_segment(got, key), None

  n = t if levels is None else levels
  total, _ = jax.lax.scan(level, jnp.zeros((b, t), jnp.float32),
                          base_step + jnp.arange(n, dtype=jnp.int32))
  return jnp.where(real, total, 0.0)
