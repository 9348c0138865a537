"""Pallas splash attention (TPU): softmax(q k^T / sqrt(H)) v within segments, under a causal,
bidirectional or block-causal mask or block diffusion's mask over x_t ⊕ x_0, never forming the
(T, S) scores in memory and skipping the tiles the mask empties.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention`; off TPU it runs in Pallas'
interpret mode (slow, exact: how the tests check it on CPU against XLA's product). Under a
mesh (the train step traces under one) it runs per shard through `jax.shard_map`, batch split
as the RULES table splits it and heads over `tensor`, since a Pallas call is not partitioned by
XLA. Rows must be a multiple of 128 tokens (the smallest tile); `supports` says whether they are.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from mdlm_jax import sharding

TILE = 128  # the smallest tile the kernel takes (a TPU lane width)


def supports(t: int, s: int) -> bool:
  """Whether splash attention runs on T queries over S keys (self-attention, tiled rows)."""
  return t == s and t % TILE == 0


def block_causal_mask(t: int, block: int) -> np.ndarray:
  """(T, T) bool: a query sees every key of its own block and of earlier blocks (block 1:
  causal)."""
  i = np.arange(t) // block
  return i[None, :] <= i[:, None]


def block_diffusion_mask(t2: int, block: int, xp=np):
  """(2T, 2T) bool over block diffusion's training row x_t ⊕ x_0 (the segments aside): noised
  block b sees noised block b and clean blocks < b; clean block b sees clean blocks <= b.
  `xp`: numpy (a kernel's host-side block maps) or jax.numpy (a dense mask in the program)."""
  t = t2 // 2
  blk = xp.tile(xp.arange(t) // block, 2)
  noised = xp.arange(t2) < t
  q_blk, k_blk, q_noised, k_noised = blk[:, None], blk[None, :], noised[:, None], noised[None, :]
  return xp.where(q_noised, xp.where(k_noised, k_blk == q_blk, k_blk < q_blk),
                  ~k_noised & (k_blk <= q_blk))


@functools.lru_cache(maxsize=32)
def _kernel(t: int, heads: int, block: int, diffusion: bool, max_tile: int, interpret: bool):
  """The kernel for one shape and mask, built once: its block maps are computed on the host."""
  if diffusion:
    mask = sa.NumpyMask(block_diffusion_mask(t, block))
  elif block == 0:
    mask = sa.FullMask((t, t))
  elif block == 1:
    mask = sa.CausalMask((t, t))
  else:
    mask = sa.NumpyMask(block_causal_mask(t, block))
  tile = max(b for b in (TILE, 2 * TILE, 4 * TILE) if b <= max(max_tile, TILE) and t % b == 0)
  sizes = sa.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                        block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile,
                        block_kv_dq=tile)
  with jax.ensure_compile_time_eval():  # concrete block maps, reusable across traces
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT, block: int,
              max_tile: int = 4 * TILE, diffusion: bool = False):
  """(B, T, N, H) attention where query i sees key j of the same segment when `block` is 0
  (bidirectional), or when j // block <= i // block (1: causal; b > 1: block-causal); with
  `diffusion`, the row is x_t ⊕ x_0 and `block_diffusion_mask` of blocks of `block` says
  which. Tiles of up to `max_tile` tokens."""
  interpret = jax.devices()[0].platform != "tpu"

  def local(q, k, v, seg):
    kernel = _kernel(q.shape[1], q.shape[2], block, diffusion, max_tile, interpret)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    o = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v),
                         sa.SegmentIds(q=seg, kv=seg))
    return heads_major(o)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)
  spec = sharding.logical_to_spec(("batch", None, "heads", None), q_BxTxNxH.shape, mesh)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)),
                       out_specs=spec, check_vma=False)(
                           q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)
