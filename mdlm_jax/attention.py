"""Attention kernels by platform, one entry point (`dot_product_attention`) for the backbone.

XLA's dense product everywhere; a chunked causal kernel for CPU; cuDNN flash attention on GPU
(with or without the packed-segment layout); Pallas splash attention on TPU (`splash.py`).
Shape suffixes as in `model.py`: B batch, T query length, S key length, N heads, H head dim.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mdlm_jax import splash


def attention_mask(q_seg_BxT, k_seg_BxS, q_idx_BxT, k_idx_BxS, causal: bool):
  """(B, 1, T, S) boolean: same segment and, if causal, key index <= query index."""
  mask = q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  if causal:
    mask &= k_idx_BxS[:, None, :] <= q_idx_BxT[:, :, None]
  return mask[:, None]


class BlockDiffusionMask(NamedTuple):
  """Block diffusion's mask over x_t ⊕ x_0 (`splash.block_diffusion_mask`, within segments),
  kept as its parts: splash reads them and skips the tiles the mask empties; `dense()` is the
  (B, 1, 2T, 2T) boolean every other kernel reads."""
  segment_ids: jax.Array   # (B, T): the row's, the same in both halves
  block_size: int

  def row_segment_ids(self):
    return jnp.tile(self.segment_ids, (1, 2))

  def dense(self):
    seg = self.row_segment_ids()
    structure = splash.block_diffusion_mask(seg.shape[1], self.block_size, xp=jnp)
    return (structure[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]


def _chunked_attention(q, k, v, mask, causal: bool, chunk: int = 64):
  """Softmax attention computed per block of `chunk` queries; with causal masking a block
  only reads the keys up to its own end, skipping the upper triangle (about 2x less work on
  CPU than the full masked product). Runs head-major so each block is a plain batched
  matmul (one transpose per input instead of one per block)."""
  t, scale = q.shape[1], q.shape[-1] ** -0.5
  nb = t // chunk if causal and t % chunk == 0 and t > chunk else 1
  size, outs = t // nb, []
  bias = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)  # additive: no select in the backward
  b, _, n, h = q.shape
  # queries chunk-major (nb, B, N, size, H): a block is a free leading-axis index; the scale is
  # applied to q (T*H elements) rather than to the scores (T*S)
  q = (q * jnp.asarray(scale, q.dtype)).reshape(b, nb, size, n, h).transpose(1, 0, 3, 2, 4)
  k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))   # (B, N, S, H)
  for i in range(nb):
    lo, hi = i * size, (i + 1) * size
    kv_end = hi if causal and nb > 1 else k.shape[2]
    outs.append(_head_major_attention(q[i], k[:, :, :kv_end], v[:, :, :kv_end],
                                      bias[:, :, lo:hi, :kv_end]))
  o = jnp.stack(outs)                                # (nb, B, N, size, H)
  return o.transpose(1, 0, 3, 2, 4).reshape(b, t, n, h)


def _head_major_attention(q, k, v, bias, keys: str = "bnsh"):
  """Scaled q (B, N, T, H), k (B, N, S, H), or (B, N, H, S) with `keys="bnhs"`, v (B, N, S, H),
  additive float32 bias (B, 1, T, S) -> (B, N, T, H): the softmax normalised after the value
  product, one (T, H) division instead of a (T, S) one."""
  s = jnp.einsum(f"bnth,{keys}->bnts", q, k, preferred_element_type=jnp.float32) + bias
  e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
  o = jnp.einsum("bnts,bnsh->bnth", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (o / e.sum(axis=-1, keepdims=True)).astype(v.dtype)


def attention_impl(name: str, dtype, length: int | None = None) -> str:
  """'auto' picks cuDNN on GPU (bf16/fp16), splash on TPU, the chunked XLA kernel on CPU, else
  XLA's. Splash (chosen or picked) on rows of `length` it cannot tile (not a multiple of 128,
  as sampling canvases may be) is XLA's product."""
  if name == "auto":
    platform = jax.devices()[0].platform
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      name = "cudnn"
    else:
      name = {"cpu": "chunked", "tpu": "splash"}.get(platform, "xla")
  if name == "splash" and length is not None and not splash.supports(length, length):
    return "xla"
  return name


def dense_mask_impl(impl: str) -> str:
  """The kernel to use instead of `impl` with a dense (B, 1, T, S) mask (cached decoding, a
  generation-order mask): the kernels that read segment ids or skip the causal triangle by
  index give way to the masked product."""
  return {"chunked": "xla", "cudnn_packed": "cudnn", "splash": "xla"}.get(impl, impl)


class PackedSegments(NamedTuple):
  """Segment ids (B, T) and their cuDNN packed layout: `offsets` (B, M+1), the first index of
  each run of equal ids, then -1; `lengths` (B, M), each run's length, then -1; `fits`, whether
  every row has at most M runs (the layout then describes the rows exactly)."""
  ids: jax.Array
  offsets: jax.Array
  lengths: jax.Array
  fits: jax.Array


def run_starts(segment_ids_BxT):
  """(B, T) bool: the first token of each run of equal segment ids (a document, or the
  padding after the last one)."""
  b, _ = segment_ids_BxT.shape
  return jnp.concatenate([jnp.ones((b, 1), bool),
                          segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)


def packed_segments(segment_ids_BxT, max_segments: int) -> PackedSegments:
  """The layout of rows made of contiguous segments, as the pipeline packs them (padding is
  one more run at the row's end, attending to itself as in `attention_mask`)."""
  b, _ = segment_ids_BxT.shape
  run_BxT = jnp.cumsum(run_starts(segment_ids_BxT), axis=1, dtype=jnp.int32) - 1
  m_M = jnp.arange(max_segments, dtype=jnp.int32)
  lengths = (run_BxT[:, None, :] == m_M[:, None]).sum(-1, dtype=jnp.int32)
  starts = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths
  runs_B = run_BxT[:, -1] + 1
  used = m_M < runs_B[:, None]
  offsets = jnp.concatenate([jnp.where(used, starts, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
  return PackedSegments(segment_ids_BxT, offsets, jnp.where(used, lengths, -1),
                        jnp.all(runs_B <= max_segments))


def _cudnn_packed(q, k, v, offsets, lengths, causal: bool):
  """cuDNN flash attention over the runs given by offsets/lengths (no mask, no bias). The
  public `jax.nn.dot_product_attention` takes no segments: a mask there becomes a (B, 1, T, S)
  bias that every head of every layer reads, forward and backward (and JAX before 0.11 also
  computes its gradient)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  try:
    return cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                       q_offsets=offsets, kv_offsets=offsets,
                                       scale=q.shape[-1] ** -0.5, mask_type=mask_type)
  except (NotImplementedError, RuntimeError) as e:  # no cuDNN, or a GPU before Hopper
    raise RuntimeError(f"model.attention='cudnn_packed' is not available here ({e}); use "
                       "model.attention='cudnn' (or 'auto').") from e


def _packed_attention(q, k, v, segs: PackedSegments, causal: bool):
  """Exact either way: cuDNN's packed layout when every row fits in `max_segments` runs, else
  the masked kernel `auto` picks (rematerialised, so the branch keeps no (T, S) residual)."""
  def masked(q, k, v, ids):
    idx = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    mask = attention_mask(ids, ids, idx, idx, causal)
    return dot_product_attention(q, k, v, mask, causal, attention_impl("auto", q.dtype))
  return jax.lax.cond(segs.fits,
                      lambda: _cudnn_packed(q, k, v, segs.offsets, segs.lengths, causal),
                      lambda: jax.checkpoint(masked)(q, k, v, segs.ids))


def cached_attention(q, k_BxNxHxS, v_BxNxSxH, mask, impl: str):
  """q (B, T, N, H) against a cache of keys (B, N, H, S) and values (B, N, S, H), mask (B, 1,
  T, S) -> (B, T, N, H). Both products are batched matmuls over (B, N) that read the cache as
  it lies, each a plain (T, H) x (H, S) and (T, S) x (S, H) product: no cache-sized copy or
  transpose a call (a cost that grows with the cache), and on CPU a few queries a row (a
  block of `bd3lm`) cost about what one does, where keys (B, N, S, H) cost twice as much from
  two queries on. cuDNN, which reads (B, S, N, H), is used only for 128 queries or more (a
  prompt, a full refresh), where the cache's transposes are small beside what it saves."""
  if impl == "cudnn" and q.shape[1] >= 128:
    k, v = k_BxNxHxS.transpose(0, 3, 1, 2), v_BxNxSxH.transpose(0, 2, 1, 3)
    return dot_product_attention(q, k, v, mask, False, impl)
  q = (q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
  bias = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
  return _head_major_attention(q, k_BxNxHxS, v_BxNxSxH, bias, keys="bnhs").transpose(0, 2, 1, 3)


def dot_product_attention(q, k, v, mask, causal: bool, impl: str):
  """q (B, T, N, H), k/v (B, S, N, H), mask (B, 1, T, S) -> (B, T, N, H); for 'cudnn_packed'
  the mask is a `PackedSegments`, for 'splash' the segment ids (B, T) (self-attention, T == S)
  or a `BlockDiffusionMask`."""
  if impl == "splash" and isinstance(mask, BlockDiffusionMask):
    return splash.attention(q, k, v, mask.row_segment_ids(), block=mask.block_size,
                            diffusion=True)
  if impl == "splash":
    return splash.attention(q, k, v, mask, block=int(causal))
  if impl == "chunked":
    return _chunked_attention(q, k, v, mask, causal)
  if impl == "cudnn_packed":
    return _packed_attention(q, k, v, mask, causal)
  full_causal = causal and q.shape[1] == k.shape[1]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=full_causal,
                                      implementation=impl)
