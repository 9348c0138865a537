"""Insertion canvases (`insertion`): anchors and words, the kept subset and its slots, the
binary-tree span weights, FPE vectors along a balanced-tree history, and the insertion step
that decoding repeats (`net` is the objective's InsertionNet: `fpe`, `ends`, `between`).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from mdlm_jax import attention
from mdlm_jax import tokenizers
from mdlm_jax.objectives import blm
from mdlm_jax.objectives import insertion_history as history


def tree_positions(segment_ids_BxT):
  """(index of each token within its segment, the segment's length), both (B, T) int32."""
  key = blm.segment_key(segment_ids_BxT)
  t = segment_ids_BxT.shape[1]
  start = key % t
  length = blm.per_segment(jnp.ones_like(key), key)
  return jnp.arange(t, dtype=jnp.int32) - start, length


def edge_canvases(batches, rows: int):
  """(canvas, region) numpy (rows, T): the first and last token of the first `rows` rows of
  `batches` (an iterator of packed batches) that one document fills with no BOS or EOS, the
  canvas training gives a segment cut by both edges of its row, PAD between; the first token
  is given (region 0), the last closes the row (region 2)."""
  picked = []
  for batch in batches:
    for x, seg in zip(np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])):
      if (seg[0] > 0 and (seg == seg[0]).all()
          and not np.isin(x, [tokenizers.BOS, tokenizers.EOS]).any()):
        picked.append(x)
    if len(picked) >= rows:
      break
  if len(picked) < rows:
    raise ValueError(f"{rows} rows asked for, but only {len(picked)} rows of the split are "
                     "filled by one document: ask for fewer.")
  x = np.stack(picked[:rows])
  canvas = np.full_like(x, tokenizers.PAD)
  canvas[:, 0], canvas[:, 1] = x[:, 0], x[:, -1]
  region = np.zeros_like(x)
  region[:, 1] = 2
  return canvas, region


def fpe_vectors(net, segment_ids_BxT):
  """(B, T, D) float32 FPE vectors of a canvas whose tokens were placed ends first, then the
  interior in balanced-tree order: the token at the middle (lo + hi) // 2 of an open interval
  of placed tokens lo < i < hi goes between them, then each half recursively (the vectors of
  the bidirectional encoder; placement attention reads `insertion_history`)."""
  ends = attention.run_starts(segment_ids_BxT)
  ends |= jnp.concatenate([ends[:, 1:], jnp.ones_like(ends[:, :1])], axis=1)
  steps = history.history_steps(segment_ids_BxT, ends)
  return history.history_vectors(net, segment_ids_BxT, steps)


def anchors(batch):
  """(B, T) bool: tokens every canvas keeps (BOS, EOS, each segment's first and last, and the
  prompt of prompt/answer rows: given, never inserted or scored)."""
  x, seg = batch["inputs"], batch["segment_ids"]
  first = attention.run_starts(seg)
  last = jnp.concatenate([first[:, 1:], jnp.ones_like(first[:, :1])], axis=1)
  out = (x == tokenizers.BOS) | (x == tokenizers.EOS) | first | last
  if "prompt_mask" in batch:
    out |= batch["prompt_mask"] > 0
  return (seg > 0) & out


def words(batch):
  """(B, T) bool: the tokens the model inserts (real tokens but the anchors)."""
  return (batch["segment_ids"] > 0) & ~anchors(batch)


def draw_keep(rng, batch):
  """Per document k uniform in 0..n and the k earliest words of a random order: (keep, n, k)
  per token."""
  k_order, k_k = jax.random.split(rng)
  place, n = blm.draw_order(k_order, batch, words(batch))
  start = blm.segment_key(batch["segment_ids"]) % place.shape[1]
  v = jnp.take_along_axis(jax.random.uniform(k_k, place.shape), start, axis=1)
  k = jnp.minimum(jnp.floor(v * (n + 1)), n).astype(jnp.int32)
  return (place >= 0) & (place < k), n, k


def keep_order(rng, batch):
  """The random order of each document's words that `draw_keep(rng, batch)` keeps the
  earliest k of (0 first, -1 for other tokens)."""
  return blm.draw_order(jax.random.split(rng)[0], batch, words(batch))[0]


def canvas_values(batch, keep_BxT, values_BxT, fill=0):
  """Per-token values moved to the canvas layout of `canvas_of` (fill past its end)."""
  x, seg = batch["inputs"], batch["segment_ids"]
  b, t = x.shape
  on = (seg > 0) & ~(words(batch) & ~keep_BxT)
  target = jnp.where(on, jnp.cumsum(on, axis=1, dtype=jnp.int32) - 1, t)
  return jnp.full((b, t), fill, values_BxT.dtype).at[jnp.arange(b)[:, None], target].set(
      values_BxT, mode="drop")


def span_key(missing_BxT, slot_BxT):
  """(B, T) int32: one value per slot's run of missing words (row * T + slot), B * T at the
  other tokens."""
  b, t = missing_BxT.shape
  return jnp.where(missing_BxT, slot_BxT + t * jnp.arange(b, dtype=jnp.int32)[:, None], b * t)


def canvas_of(batch, keep_BxT):
  """The canvas of the anchors and kept words (left-aligned, then padding): (canvas {inputs,
  segment_ids}, missing (B, T): words not kept, slot (B, T): for each missing word the canvas
  index of its left neighbour, span_idx / span_len (B, T): its place in its slot's run of
  missing words and that run's length)."""
  x, seg = batch["inputs"], batch["segment_ids"]
  b, t = x.shape
  missing = words(batch) & ~keep_BxT
  on = (seg > 0) & ~missing
  c_idx = jnp.cumsum(on, axis=1, dtype=jnp.int32) - 1  # a missing word: its left neighbour
  canvas = {"inputs": canvas_values(batch, keep_BxT, x, tokenizers.PAD),
            "segment_ids": canvas_values(batch, keep_BxT, seg)}
  key = span_key(missing, c_idx)
  span_len = blm.per_segment(missing.astype(jnp.int32), key)
  before = jnp.cumsum(missing, axis=1, dtype=jnp.int32) - missing
  run_first = blm.per_segment(jnp.where(missing, before, t), key, jax.ops.segment_min)
  return canvas, missing, c_idx, before - run_first, span_len


def span_weights(span_idx, span_len, span_key, order: str, tau: float):
  """At each missing word, its weight in its slot's target: softmax(-|i - centre| / tau) over
  the span, the binary-tree weights (order='tree'), or uniform (order='uniform', tau -> inf).
  `span_key` tells spans apart (one value per span)."""
  if order == "uniform":
    return 1.0 / jnp.maximum(span_len, 1).astype(jnp.float32)
  centre = (span_len.astype(jnp.float32) - 1.0) / 2.0
  nearest = jnp.where(span_len % 2 == 1, 0.0, 0.5)  # the centre word's distance: e <= 1
  e = jnp.exp(-(jnp.abs(span_idx.astype(jnp.float32) - centre) - nearest) / tau)
  e = jnp.where(span_len > 0, e, 0.0)
  return e / jnp.maximum(blm.per_segment(e, span_key), 1e-30)


def slots(canvas):
  """(B, T) bool: canvas index t is a slot (tokens t and t + 1 in the same segment)."""
  seg = canvas["segment_ids"]
  nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
  return (seg > 0) & (nxt == seg)


def insert(net, canvas_BxT, u_BxTxD, region_BxT, after_BxT, new_BxT):
  """Inserts new_BxT[t] right after canvas index t wherever after_BxT[t]. Tokens keep their
  order and FPE vectors; a new token's vector is `between` its neighbours' (u is passed
  through untouched when the net has no FPE). Regions: new tokens are 1 (middle)."""
  b, t = canvas_BxT.shape
  rows = jnp.arange(b)[:, None]
  idx = jnp.arange(t, dtype=jnp.int32)
  shift = jnp.cumsum(after_BxT, axis=1, dtype=jnp.int32) - after_BxT
  old_to = jnp.where(canvas_BxT != tokenizers.PAD, idx + shift, t)
  new_to = jnp.where(after_BxT, idx + shift + 1, t)
  tok = jnp.full((b, t), tokenizers.PAD, jnp.int32).at[rows, old_to].set(canvas_BxT, mode="drop")
  tok = tok.at[rows, new_to].set(new_BxT, mode="drop")
  reg = jnp.zeros((b, t), jnp.int32).at[rows, old_to].set(region_BxT, mode="drop")
  reg = reg.at[rows, new_to].set(1, mode="drop")
  if not net.fpe:
    return tok, u_BxTxD, reg
  nxt = jnp.concatenate([u_BxTxD[:, 1:], u_BxTxD[:, :1]], axis=1)
  u = jnp.zeros_like(u_BxTxD).at[rows, old_to].set(u_BxTxD, mode="drop")
  u = u.at[rows, new_to].set(net.between(u_BxTxD, nxt), mode="drop")
  return tok, u, reg
