"""The shared Transformer backbone (Flax NNX): RMSNorm, RoPE, SwiGLU, causal or bidirectional.

Parameters are float32 and carry logical axis names (metadata `axes`) that `sharding.py` maps to
the device mesh; compute runs in `model.dtype` (bfloat16 or float32) and logits are float32.
Packed rows are handled with segment ids: a token attends only within its own segment.
Shape suffixes: B batch, T query length, S key length, D d_model, N heads, H head dim, F mlp,
V vocabulary, L layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mdlm_jax import sharding
from mdlm_jax.attention import (BlockDiffusionMask, attention_impl, attention_mask,
                                cached_attention, dense_mask_impl, dot_product_attention,
                                packed_segments)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 768
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  max_seq_len: int = 2048
  tied_embeddings: bool = True
  attention: str = "auto"
  max_segments: int = 4
  rope_base: float = 10000.0
  init_std: float = 0.02
  causal: bool = True

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int, causal: bool) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "causal"}
    return cls(vocab_size=vocab_size, causal=causal, **{k: model_cfg[k] for k in fields})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
  """A float32 parameter with logical axis names; std None means ones (norm scales)."""
  if std is None:
    value = jnp.ones(shape, jnp.float32)
  else:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ("embed",), None)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * self.scale[...]).astype(x.dtype)


def rope_tables(positions_BxT, head_dim: int, base: float, max_len: int):
  """(sin, cos), each (B, T, 1, H/2) float32, for positions in [0, max_len).

  Gathered from a (max_len, H/2) table that XLA folds to a constant: computing sin/cos of the
  positions directly lets XLA fuse the transcendentals into every use (per head, per layer,
  and again in the backward pass), which costs more than the attention softmax on CPU."""
  freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle = jnp.arange(max_len, dtype=jnp.float32)[:, None] * freq
  sin, cos = (jnp.take(f(angle), positions_BxT, axis=0)[:, :, None] for f in (jnp.sin, jnp.cos))
  return sin, cos


def take_positions(x, positions, axis: int = 1):
  """The entries of a (B, ...) array x along its positions axis `axis`: the last `positions`
  if an int, else each row's own (B, n) `positions`, in their order."""
  if isinstance(positions, int):
    return jax.lax.slice_in_dim(x, x.shape[axis] - positions, x.shape[axis], axis=axis)
  index = positions.reshape(positions.shape[:1] + (1,) * (axis - 1) + positions.shape[1:] +
                            (1,) * (x.ndim - axis - 1))
  return jnp.take_along_axis(x, index, axis=axis)


def apply_rope(x_BxTxNxH, tables):
  if tables is None:  # no rotary positions (the input embeddings carry them)
    return x_BxTxNxH
  sin, cos = tables
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def dense(x, w, in_dims: int = 1):
  """Contracts the last `in_dims` axes of x with the first of w as one 2-D matmul (XLA's CPU
  backend is markedly faster on 2-D dots than on the equivalent batched einsum)."""
  k = math.prod(w.shape[:in_dims])
  y = x.reshape(-1, k) @ w.reshape(k, -1).astype(x.dtype)
  return y.reshape(*x.shape[:x.ndim - in_dims], *w.shape[in_dims:])


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.cfg = cfg
    self.wq = param(rngs, (d, n, h), ("embed", "heads", "kv"), cfg.init_std)
    self.wk = param(rngs, (d, n, h), ("embed", "heads", "kv"), cfg.init_std)
    self.wv = param(rngs, (d, n, h), ("embed", "heads", "kv"), cfg.init_std)
    self.wo = param(rngs, (n, h, d), ("heads", "kv", "embed"), out_std)

  def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, causal: bool, cache=None, queries=None):
    """With `queries` (decoding only; `take_positions`' last n or (B, n) positions): every
    position's keys and values are written to the cache, but only those positions attend (the
    output is (B, n, D))."""
    cfg = self.cfg
    if queries is not None:
      some = lambda x: take_positions(x, queries)
      q = apply_rope(dense(some(x_BxTxD), self.wq[...]),
                     None if rope is None else tuple(map(some, rope)))
      mask_Bx1xTxS = take_positions(mask_Bx1xTxS, queries, axis=2)
    else:
      q = apply_rope(dense(x_BxTxD, self.wq[...]), rope)
    k = apply_rope(dense(x_BxTxD, self.wk[...]), rope)
    v = dense(x_BxTxD, self.wv[...])
    impl = attention_impl(cfg.attention, cfg.dtype, x_BxTxD.shape[1])
    if cache is not None:
      # decoding: write the new keys/values at `index` (a scalar: T positions from there; a
      # (B, T) array: each row's own positions, out-of-range ones dropped) of the cache, keys
      # (B, N, H, S) and values (B, N, S, H) (`init_cache`), attend per mask
      index, rows = cache["index"], jnp.arange(k.shape[0])[:, None]

      def put(c, x_BxTxNxH, axis):   # the cache's position axis
        if jnp.ndim(index) == 0:
          order = (0, 2, 3, 1) if axis == 3 else (0, 2, 1, 3)
          return jax.lax.dynamic_update_slice_in_dim(
              c, x_BxTxNxH.transpose(order).astype(c.dtype), index, axis)
        at = (rows, slice(None), slice(None), index) if axis == 3 else (rows, slice(None), index)
        return c.at[at].set(x_BxTxNxH.astype(c.dtype), mode="drop")  # indexed as (B, T, N, H)

      cache = dict(k=put(cache["k"], k, 3), v=put(cache["v"], v, 2), index=index)
      o = cached_attention(q, cache["k"], cache["v"], mask_Bx1xTxS, dense_mask_impl(impl))
      return dense(o, self.wo[...], in_dims=2), cache
    if impl in ("splash", "cudnn_packed") and getattr(mask_Bx1xTxS, "ndim", 0) == 4:
      impl = dense_mask_impl(impl)  # a mask these kernels cannot read
    o = dot_product_attention(q, k, v, mask_Bx1xTxS, causal, impl)
    return dense(o, self.wo[...], in_dims=2), None


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.cfg = cfg
    self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / (2 * cfg.num_layers) ** 0.5)

  def __call__(self, x_BxTxD):
    h = jax.nn.silu(dense(x_BxTxD, self.w_gate[...])) * dense(x_BxTxD, self.w_up[...])
    return dense(h, self.w_down[...])


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, rope, mask, causal, cache=None, queries=None):
    a, cache = self.attn(self.attn_norm(x), rope, mask, causal, cache, queries)
    x = x if queries is None else take_positions(x, queries)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stacked_blocks(blocks: list[Block]) -> Block:
  """One Block whose every parameter holds the L blocks' values stacked on a leading `layers`
  axis (what `scan_layers` scans over): the same values as the unrolled list."""
  graphdef = nnx.split(blocks[0])[0]
  states = [nnx.to_pure_dict(nnx.state(b)) for b in blocks]
  stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
  for _, var in nnx.iter_graph(stacked):
    if isinstance(var, nnx.Param):
      var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
  return stacked


class Transformer(nnx.Module):
  """Token embedding -> L blocks -> final norm -> (tied) unembedding. With `scan_layers` the
  blocks are one Block of stacked parameters run by `jax.lax.scan` (compile time flat in L)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
    blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
    self.blocks = stacked_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, rngs)
    if not cfg.tied_embeddings:
      self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           cfg.init_std)

  def embed_tokens(self, tokens_BxT):
    table = sharding.constrain(self.embed[...], "vocab", None)  # gathered whole over fsdp
    x = jnp.take(table, tokens_BxT, axis=0).astype(self.cfg.compute_dtype)
    return sharding.constrain(x, "batch", "length", "embed")

  def hidden(self, x_BxTxD, positions_BxT, segment_ids_BxT, causal: bool | None = None,
             rope: bool = True, order_BxT=None, mask_Bx1xTxT=None, layers=None):
    """Runs the blocks on input embeddings; returns final-normed states (B, T, D). `layers`
    (start, stop): only those blocks, and the final norm only if stop is the last. With
    rope=False the positions are not used (the embeddings carry their own). `order_BxT`: a
    token attends to the tokens of its segment whose order is <= its own (a generation
    order, e.g. the step each token was placed at), whatever their index. `mask_Bx1xTxT`:
    the attention mask itself (boolean, segments included), instead of one built here, or a
    `BlockDiffusionMask` (dense but for splash, which reads its parts)."""
    causal = self.cfg.causal if causal is None else causal
    x_BxTxD = sharding.constrain(x_BxTxD, "batch", "length", "embed")
    impl = attention_impl(self.cfg.attention, self.cfg.dtype, x_BxTxD.shape[1])
    if mask_Bx1xTxT is not None:
      mask, causal = mask_Bx1xTxT, False
      if isinstance(mask, BlockDiffusionMask) and impl != "splash":
        mask = mask.dense()
    elif order_BxT is not None:
      mask = attention_mask(segment_ids_BxT, segment_ids_BxT, order_BxT, order_BxT, True)
      causal = False  # the mask holds the order; the kernels' causal masks go by index
    elif impl == "cudnn_packed":
      mask = packed_segments(segment_ids_BxT, self.cfg.max_segments)
    elif impl == "splash":  # the kernel masks from the ids alone
      mask = segment_ids_BxT
    else:
      idx_BxT = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), positions_BxT.shape)
      mask = attention_mask(segment_ids_BxT, segment_ids_BxT, idx_BxT, idx_BxT, causal)
    rope = rope_tables(positions_BxT, self.cfg.head_dim, self.cfg.rope_base,
                       self.cfg.max_seq_len) if rope else None

    start, stop = layers or (0, self.cfg.num_layers)
    norm = self.final_norm if stop == self.cfg.num_layers else (lambda x: x)
    if self.cfg.scan_layers:
      graphdef, params = nnx.split(self.blocks)

      def layer(x, params_of_layer):
        x = nnx.merge(graphdef, params_of_layer)(x, rope, mask, causal)[0]
        return sharding.constrain(x, "batch", "length", "embed"), None

      if self.cfg.remat != "none":  # prevent_cse=False is safe (and faster) under scan
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
      x_BxTxD, _ = jax.lax.scan(layer, x_BxTxD, _layer_slice(params, start, stop))
      return norm(x_BxTxD)

    def run(block, x):
      return sharding.constrain(block(x, rope, mask, causal)[0], "batch", "length", "embed")

    if self.cfg.remat != "none":
      run = nnx.remat(run, policy=_REMAT_POLICIES[self.cfg.remat])
    for block in list(self.blocks)[start:stop]:
      x_BxTxD = run(block, x_BxTxD)
    return norm(x_BxTxD)

  def logits(self, h_BxTxD):
    w_DxV = self.embed[...].T if self.cfg.tied_embeddings else self.unembed[...]
    b, t, d = h_BxTxD.shape
    logits = jnp.dot(h_BxTxD.reshape(b * t, d), w_DxV.astype(h_BxTxD.dtype),
                     preferred_element_type=jnp.float32)
    return logits.reshape(b, t, -1)

  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, causal: bool | None = None):
    h = self.hidden(self.embed_tokens(tokens_BxT), positions_BxT, segment_ids_BxT, causal)
    return self.logits(h)

  # ---- incremental decoding with a KV cache (causal models) ----
  def init_cache(self, batch: int, length: int) -> list[dict[str, Any]]:
    cfg = self.cfg
    # keys (B, N, H, S), values (B, N, S, H): both products read them as they lie
    # (`attention.cached_attention`)
    n, h = cfg.num_heads, cfg.head_dim
    stack = (cfg.num_layers,) if cfg.scan_layers else ()  # the scan reads the layers stacked
    zeros = lambda *shape: jnp.zeros(stack + (batch, n) + shape, cfg.compute_dtype)
    return [dict(k=zeros(h, length), v=zeros(length, h), index=jnp.zeros((), jnp.int32))
            for _ in range(1 if cfg.scan_layers else cfg.num_layers)]

  def decode(self, tokens_BxT, cache):
    """Appends T tokens at position cache index; returns (float32 logits (B, T, V), cache)."""
    h, cache = self.decode_hidden(tokens_BxT, cache)
    return self.logits(h), cache

  def decode_hidden(self, tokens_BxT, cache, block: int = 1, start: int = 0, outputs=None,
                    late: tuple[int, int] | None = None):
    """`decode` up to the final norm: (final states (B, T, D), cache). With `block` > 1 the
    new tokens attend block-causally (a token sees every position of its own block of
    `block` positions, counted from 0, and of the blocks before it). The cache positions
    before `start` are padding: no token attends to them. With `outputs` (an int n: the last n
    new tokens; a (B, n) array: each row's n positions among them), only those states are
    returned, (B, n, D); unless the layers are scanned, the last layer then computes only the
    keys and values of the others (what the cache keeps of them), not their queries,
    attention and MLP. With `late` (n, j), the last n new tokens enter at layer j: they skip
    the layers before it (which neither read nor write their cache positions) and start
    there from their embeddings."""
    b, t = tokens_BxT.shape
    index = cache[0]["index"]
    s = cache[0]["v"].shape[-2]
    q_idx = jnp.broadcast_to(index + jnp.arange(t), (b, t))
    k_idx = jnp.broadcast_to(jnp.arange(s), (b, s))
    written = k_idx < index + t
    if start:   # (a Python int: no padding, no compare)
      written &= k_idx >= start
    mask = attention_mask(jnp.ones((b, t), jnp.int32), written.astype(jnp.int32),
                          q_idx // block, k_idx // block, causal=True)
    x = self.embed_tokens(tokens_BxT)
    rope = rope_tables(q_idx, self.cfg.head_dim, self.cfg.rope_base, self.cfg.max_seq_len)
    h, cache = self._cached_blocks(x, rope, mask, cache, index, outputs, late)
    return h, [dict(c, index=index + t) for c in cache]

  def extend_hidden(self, x_BxTxD, index_BxT, mask_Bx1xTxS, cache):
    """Cached encoding of T new tokens given as input embeddings (which carry their own
    positions: no rotary tables) into each row's cache positions `index_BxT` (out-of-range
    ones are not written), attending to the cache's keys by `mask_Bx1xTxS` (B, 1, T, S).
    Returns (final states (B, T, D), cache). `init_cache` makes the cache."""
    return self._cached_blocks(x_BxTxD, None, mask_Bx1xTxS, cache, index_BxT)

  def _cached_blocks(self, x, rope, mask, cache, index, outputs=None, late=None):
    num_layers = self.cfg.num_layers
    # stretches of layers: (first, stop, the tokens that enter there, rotary tables, mask rows)
    stretches = [(0, num_layers, x, rope, mask)]
    if late:   # the last n tokens enter at layer `enter`; the others run the layers before it
      n, enter = late
      t = x.shape[1] - n
      head = lambda a, axis=1: jax.lax.slice_in_dim(a, 0, t, axis=axis)
      stretches = [(0, enter, head(x), rope and tuple(map(head, rope)), head(mask, 2)),
                   (enter, num_layers, x[:, t:], rope, mask)]
    if self.cfg.scan_layers:
      graphdef, params = nnx.split(self.blocks)
      stacked, ks, vs, h = cache[0], [], [], None

      def run(x, lo, hi, rope, mask):
        def layer(x, params_and_cache):
          p, k, v = params_and_cache
          x, c = nnx.merge(graphdef, p)(x, rope, mask, False, dict(k=k, v=v, index=index))
          return x, (c["k"], c["v"])
        return jax.lax.scan(layer, x, (_layer_slice(params, lo, hi),
                                       stacked["k"][lo:hi], stacked["v"][lo:hi]))

      for lo, hi, new, r, m in stretches:
        h = new if h is None else jnp.concatenate([h, new], axis=1)
        if hi > lo and h.shape[1]:
          h, (k, v) = run(h, lo, hi, r, m)
        else:   # no layer, or no token yet: those layers' cache is kept
          k, v = stacked["k"][lo:hi], stacked["v"][lo:hi]
        ks.append(k)
        vs.append(v)
      k, v = (ks[0], vs[0]) if len(ks) == 1 else (jnp.concatenate(ks), jnp.concatenate(vs))
      h = h if outputs is None else take_positions(h, outputs)
      return self.final_norm(h), [dict(stacked, k=k, v=v)]
    new_cache, h = list(cache), None
    for lo, hi, new, r, m in stretches:
      h = new if h is None else jnp.concatenate([h, new], axis=1)
      for j in range(lo, hi) if h.shape[1] else ():
        h, c = self.blocks[j](h, r, m, False, dict(cache[j], index=index),
                              queries=outputs if j == num_layers - 1 else None)
        new_cache[j] = dict(cache[j], k=c["k"], v=c["v"])
    return self.final_norm(h), new_cache


def _layer_slice(stacked_params, start: int, stop: int):
  """Layers start .. stop - 1 of scanned (stacked) block parameters."""
  return jax.tree.map(lambda p: p[start:stop], stacked_params)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
