"""The Belief State Transformer's all-pairs head loss, chunked, with a fused gradient (`bst`).

Pairs (i, k) of one segment are enumerated by gap slots: slot g holds the pairs of gap g and,
folded into the same lanes, those of gap n - g. A `lax.scan` walks chunks of slots, and each
chunk's loss and exact gradient come from one custom VJP, so only one chunk's (pairs, 2V)
logits exist at a time and nothing is recomputed.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

LEAK = 0.01  # LeakyReLU slope of the head MLPs


def leaky(x):
  return jnp.where(x > 0, x, LEAK * x)


def head_logits(a, c, w, bias):
  h = leaky(a + c)
  return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) + bias


# ------------------------------------------------------------------------------------------
# All pairs, chunked, with a fused gradient.


class PairSpec(NamedTuple):
  """Static settings of the pair loss. `groups`: per head, the (size, label kind, weight) of
  each softmax group of its outputs; kinds are 'next' (x_{i+1}), 'prev' (x_k, i.e. x_{j-1})
  and 'gap' (j - i, clipped to size - 1)."""
  groups: tuple
  max_k_gap: int       # largest k - i (= max j - i minus 1)
  slots_per_chunk: int


def gap_slots(n: int, max_k_gap: int) -> int:
  """Slots 1..S cover every gap k - i in [1, max_k_gap]; see the module docstring."""
  return max(1, min(max_k_gap, n // 2)) if n >= 2 else 0


def pair_lanes(slots_BxG, n: int):
  """Slot g's n lanes: lane l < n - g pairs (l, l + g); lane l >= n - g pairs (l + g - n, l).
  Returns forward index, backward slot, gap k - i and a validity mask, each (B, G, n)."""
  lane = jnp.arange(n)
  g = slots_BxG[..., None]
  straight = lane < n - g
  fi = jnp.where(straight, lane, lane + g - n)
  bk = jnp.where(straight, lane + g, lane)
  gap = jnp.where(straight, g, n - g)
  ok = (straight | (n - g > g)) & (g >= 1)  # a folded lane must not repeat a pair
  return fi, bk, gap, ok


def _take(x, idx_BxP):
  return jnp.take_along_axis(x, idx_BxP[..., None] if x.ndim == 3 else idx_BxP, axis=1)


def _chunk(spec: PairSpec, heads, data, slots_BxG, with_grad: bool):
  """Sums (one per group, then the pair count) of one chunk, and the gradient of
  sum_g weight_g * sum_g with respect to `heads` when `with_grad`."""
  next_BxT, prev_BxT, seg_BxT = data
  b, n = seg_BxT.shape
  fi, bk, gap, ok = (x.reshape(b, -1) for x in
                     jnp.broadcast_arrays(*pair_lanes(slots_BxG, n)))
  seg_f = _take(seg_BxT, fi)
  mask = ok & (gap <= spec.max_k_gap) & (seg_f == _take(seg_BxT, bk)) & (seg_f > 0)
  maskf = mask.astype(jnp.float32)
  labels = {"next": _take(next_BxT, fi), "prev": _take(prev_BxT, bk), "gap": gap + 1}
  sums, grads = [], []
  for (a, c, w, bias), groups in zip(heads, spec.groups):
    pre = _take(a, fi) + _take(c, bk)                       # (B, P, d)
    h = leaky(pre)
    z = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) + bias
    dz, lo = [], 0
    for size, kind, weight in groups:
      zg = z[..., lo:lo + size]
      lo += size
      label = jnp.minimum(labels[kind], size - 1)
      lse = jax.nn.logsumexp(zg, axis=-1)
      ce = lse - jnp.take_along_axis(zg, label[..., None], axis=-1)[..., 0]
      sums.append(jnp.sum(ce * maskf))
      if with_grad:
        onehot = jnp.arange(size) == label[..., None]
        dz.append((weight * maskf)[..., None] * (jnp.exp(zg - lse[..., None]) - onehot))
    if with_grad:
      dz = jnp.concatenate(dz, axis=-1) if len(dz) > 1 else dz[0]
      dw = jnp.einsum("bpd,bpv->dv", h, dz.astype(h.dtype), preferred_element_type=jnp.float32)
      dh = jnp.dot(dz.astype(h.dtype), w.astype(h.dtype).T, preferred_element_type=jnp.float32)
      dpre = (dh * jnp.where(pre > 0, 1.0, LEAK)).astype(a.dtype)
      rows = jnp.arange(b)[:, None]
      da = jnp.zeros(a.shape, jnp.float32).at[rows, fi].add(dpre.astype(jnp.float32))
      dc = jnp.zeros(c.shape, jnp.float32).at[rows, bk].add(dpre.astype(jnp.float32))
      grads.append((da, dc, dw, jnp.sum(dz, axis=(0, 1))))
  sums.append(jnp.sum(maskf))
  return jnp.stack(sums), grads


def _scan(spec: PairSpec, heads, data, slots_BxK, with_grad: bool):
  b, k = slots_BxK.shape
  g = max(1, min(spec.slots_per_chunk, k))
  chunks = -(-k // g)
  slots = jnp.pad(slots_BxK, ((0, 0), (0, chunks * g - k)))  # slot 0 is empty
  xs = slots.reshape(b, chunks, g).transpose(1, 0, 2)
  zero_sums = jnp.zeros(1 + sum(len(gr) for gr in spec.groups), jnp.float32)
  zero_grads = [tuple(jnp.zeros(x.shape, jnp.float32) for x in head) for head in heads]

  def body(carry, slots_BxG):
    sums, grads = carry
    s, gr = _chunk(spec, heads, data, slots_BxG, with_grad)
    if with_grad:
      grads = jax.tree.map(jnp.add, grads, gr)
    return (sums + s, grads), None

  if chunks == 1:
    (sums, grads), _ = body((zero_sums, zero_grads), xs[0])
  else:
    (sums, grads), _ = jax.lax.scan(body, (zero_sums, zero_grads), xs)
  return sums, grads


def _weighted(spec, sums):
  weights = [w for groups in spec.groups for _, _, w in groups]
  return sum(w * sums[i] for i, w in enumerate(weights))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def pair_loss(spec: PairSpec, heads, data, slots_BxK):
  """(sum_g weight_g * S_g, sums): S_g the summed cross-entropy of group g over the valid
  pairs of the slots, sums = (S_1, ..., count). Only the first output is differentiable;
  `heads` is a list of (A, C, w_out, b_out) per head, `data` (next, prev, segment_ids)."""
  sums, _ = _scan(spec, heads, data, slots_BxK, with_grad=False)
  return _weighted(spec, sums), sums


def _pair_loss_fwd(spec, heads, data, slots_BxK):
  sums, grads = _scan(spec, heads, data, slots_BxK, with_grad=True)
  return (_weighted(spec, sums), sums), (grads, heads)


def _pair_loss_bwd(spec, res, cotangents):
  grads, heads = res
  g = cotangents[0]
  out = [tuple((g * d).astype(x.dtype) for d, x in zip(gr, head))
         for gr, head in zip(grads, heads)]
  return out, None, None


pair_loss.defvjp(_pair_loss_fwd, _pair_loss_bwd)


def answer_window(heads, data, prompt_mask_BxT, width: int):
  """Prompt/answer rows: only pairs whose targets lie in the answer are formed. Each row's
  per-position arrays are read from its last prompt token o on into `width` lanes (0: the row
  length), so lane 0 holds f_o (whose next token starts the answer) and lanes past the row are
  padding. Returns (heads, data, rows_cut): rows whose answer (EOS included) does not fit."""
  b, n = prompt_mask_BxT.shape
  w = width or n
  o = jnp.maximum(jnp.sum(prompt_mask_BxT, axis=1) - 1, 0)
  idx = o[:, None] + jnp.arange(w)
  inside = idx < n
  idx = jnp.minimum(idx, n - 1)
  nxt, prev, seg = data
  row_seg = _take(seg, o[:, None])[:, 0]
  after = _take(seg, jnp.minimum(o + w, n - 1)[:, None])[:, 0]
  cut = (o + w < n) & (after == row_seg) & (row_seg > 0)
  heads = [(_take(a, idx), _take(c, idx), wo, bo) for a, c, wo, bo in heads]
  data = (_take(nxt, idx), _take(prev, idx), jnp.where(inside, _take(seg, idx), 0))
  return heads, data, jnp.sum(cut)
