"""Backbone properties: causality, segment isolation, packing, KV cache, remat, attention."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm_jax import attention as attention_lib
from mdlm_jax import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=40, num_layers=2, d_model=32, num_heads=2, mlp_dim=64)


def make(cfg=CFG, **kw):
  import dataclasses
  return model_lib.Transformer(dataclasses.replace(cfg, **kw), nnx.Rngs(0))


def row(t, seg=None):
  seg = np.ones((1, t), np.int32) if seg is None else np.asarray(seg, np.int32)[None]
  pos = np.zeros_like(seg)
  for i in range(1, t):
    pos[0, i] = pos[0, i - 1] + 1 if seg[0, i] == seg[0, i - 1] else 0
  return jnp.asarray(pos), jnp.asarray(seg)


def input_jacobian(model, t, seg=None, causal=None):
  """|d (r . h_t) / d x_s| summed over input features, for a random projection r: (T, T),
  rows = outputs, cols = inputs."""
  pos, seg = row(t, seg)
  x = jax.random.normal(jax.random.key(1), (1, t, CFG.d_model))
  r = jax.random.normal(jax.random.key(2), (CFG.d_model,))
  jac = jax.jit(jax.jacrev(lambda x: model.hidden(x, pos, seg, causal)[0] @ r))(x)  # (T,1,T,D)
  return np.abs(np.asarray(jac)).sum(axis=(1, 3))


@pytest.mark.parametrize("attention", ["chunked", "xla"])
def test_causal_outputs_never_depend_on_later_inputs(attention):
  t = 130  # > 2 chunks of 64, not a multiple: exercises the chunked path's fallback too
  j = input_jacobian(make(attention=attention), t)
  upper = np.triu(np.ones((t, t), bool), k=1)
  assert j[upper].max() == 0.0, "an output received gradient from a later position"
  assert (j[~upper] > 0).mean() > 0.99, "earlier positions should influence outputs"


def test_chunked_causal_with_exact_chunks_is_causal():
  t = 128
  j = input_jacobian(make(attention="chunked"), t)
  assert j[np.triu(np.ones((t, t), bool), k=1)].max() == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_segments_never_see_each_other(causal):
  seg = [1] * 5 + [2] * 7 + [3] * 4
  j = input_jacobian(make(), len(seg), seg, causal=causal)
  s = np.asarray(seg)
  across = s[:, None] != s[None, :]
  assert j[across].max() == 0.0, "gradient flowed across a document boundary"
  if not causal:
    assert (j[~across] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_packed_document_matches_document_alone(causal):
  model = make()
  doc = jax.random.randint(jax.random.key(2), (1, 9), 0, 40)
  other = jax.random.randint(jax.random.key(3), (1, 6), 0, 40)
  packed = jnp.concatenate([other, doc], axis=1)
  pos, seg = row(15, [1] * 6 + [2] * 9)
  alone_pos, alone_seg = row(9)
  out_packed = model(packed, pos, seg, causal)[:, 6:]
  out_alone = model(doc, alone_pos, alone_seg, causal)
  chex.assert_trees_all_close(out_packed, out_alone, atol=1e-5)


@pytest.mark.slow
def test_chunked_attention_matches_reference_softmax():
  b, t, n, h = 2, 192, 2, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, t, n, h)) for kk in ks)
  seg = jnp.asarray(np.repeat([[1, 2, 3]], b, 0).repeat(64, 1))
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  for causal in (True, False):
    mask = attention_lib.attention_mask(seg, seg, idx, idx, causal)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    s = np.where(np.asarray(mask), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bnts,bsnh->btnh", p, v)
    got = attention_lib.dot_product_attention(q, k, v, mask, causal, "chunked")
    np.testing.assert_allclose(got, ref, atol=1e-5)


def runs_of(seg_row):
  """(start, length) of each run of equal ids, by walking the row."""
  runs, start = [], 0
  for i in range(1, len(seg_row) + 1):
    if i == len(seg_row) or seg_row[i] != seg_row[i - 1]:
      runs.append((start, i - start))
      start = i
  return runs


@pytest.mark.slow
def test_packed_segments_layout_matches_the_runs_of_each_row():
  rows = [[1] * 170 + [2] * 170 + [3] * 172,             # cuDNN's own example: 3 segments
          [1] * 150 + [2] * 187 + [3] * 175,
          [1] * 190 + [2] * 190 + [0] * 132,             # the padding is a run of its own
          [4] * 512]
  for m in (3, 5):
    got = attention_lib.packed_segments(jnp.asarray(rows, jnp.int32), m)
    for b, seg_row in enumerate(rows):
      runs = runs_of(seg_row)
      want_off = [s for s, _ in runs] + [-1] * (m + 1 - len(runs))
      want_len = [n for _, n in runs] + [-1] * (m - len(runs))
      np.testing.assert_array_equal(got.offsets[b], want_off)
      np.testing.assert_array_equal(got.lengths[b], want_len)
    assert bool(got.fits)
  np.testing.assert_array_equal(attention_lib.packed_segments(jnp.asarray(rows), 3).offsets[0],
                                [0, 170, 340, -1])
  too_many = jnp.asarray([[1, 1, 2, 3, 3, 4, 0, 0], [1] * 8], jnp.int32)
  assert not bool(attention_lib.packed_segments(too_many, 4).fits)
  assert bool(attention_lib.packed_segments(too_many, 5).fits)


def packed_reference(q, k, v, offsets, lengths, causal, scale_out=1.0):
  """Attention within the runs that offsets/lengths describe (read back from them alone);
  a token in no described run gets zeros, as cuDNN leaves tokens outside its sequences."""
  t = q.shape[1]
  pos = jnp.arange(t)
  off, n = offsets[:, :-1, None], lengths[:, :, None]
  member = (pos >= off) & (pos < off + n) & (n > 0)                 # (B, M, T)
  run = jnp.where(member.any(1), jnp.argmax(member, axis=1), -1)    # (B, T)
  mask = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
  if causal:
    mask &= pos[None, None, :] <= pos[None, :, None]
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  s = jnp.where(mask[:, None], s, -1e30)
  p = jax.nn.softmax(s, axis=-1) * mask[:, None].any(-1, keepdims=True)
  return scale_out * jnp.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_packed_attention_is_exact_with_and_without_room(causal, monkeypatch):
  """The packed path (its cuDNN call replaced by a reference reading offsets/lengths back)
  gives the masked model's outputs and gradients; a batch with a row of more runs than
  max_segments takes the exact masked kernel instead (the replaced call doubles its output,
  so the branch taken shows)."""
  seg_fit = [[1] * 5 + [2] * 7 + [3] * 4, [1] * 12 + [0] * 4]
  seg_over = [[1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8], [1] * 16]
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 40)
  packed = make(attention="cudnn_packed", max_segments=4)
  masked = make(attention="xla")
  for seg, scale in ((seg_fit, 1.0), (seg_over, 1.0), (seg_fit, 2.0)):
    monkeypatch.setattr(attention_lib, "_cudnn_packed",
                        lambda *a, s=scale: packed_reference(*a, scale_out=s))
    seg = jnp.asarray(seg, jnp.int32)
    pos = jnp.stack([row(16, r)[0][0] for r in np.asarray(seg)])

    def hidden_and_grad(model):
      graphdef, params = nnx.split(model)
      h = lambda p: nnx.merge(graphdef, p).hidden(
          nnx.merge(graphdef, p).embed_tokens(tokens), pos, seg, causal)
      return jax.jit(h)(params), jax.jit(jax.grad(lambda p: jnp.mean(h(p) ** 2)))(params)

    got, ref = hidden_and_grad(packed), hidden_and_grad(masked)
    if scale != 1.0:  # this batch fits: the (doubled) packed kernel must be the one used
      assert np.abs(got[0] - ref[0]).max() > 1e-3, "the packed kernel was not used"
    else:  # exact, whichever branch (a row over max_segments reads the masked kernel)
      chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN may be present")
def test_cudnn_packed_without_cudnn_names_the_setting():
  pos, seg = row(8)
  with pytest.raises(RuntimeError, match="model.attention='cudnn_packed' is not available"):
    make(attention="cudnn_packed", dtype="bfloat16")(jnp.zeros((1, 8), jnp.int32), pos, seg)


@pytest.mark.slow
def test_kv_cache_decoding_matches_full_forward():
  model = make()
  t = 12
  tokens = jax.random.randint(jax.random.key(4), (2, t), 0, 40)
  pos, seg = row(t)
  full = model(tokens, jnp.broadcast_to(pos, (2, t)), jnp.broadcast_to(seg, (2, t)))
  cache = model.init_cache(2, 16)
  prefill, cache = model.decode(tokens[:, :5], cache)
  steps = [prefill]
  for i in range(5, t):
    logits, cache = model.decode(tokens[:, i:i + 1], cache)
    steps.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing_but_memory(remat):
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 40)
  pos, seg = row(16)
  pos, seg = jnp.broadcast_to(pos, (2, 16)), jnp.broadcast_to(seg, (2, 16))

  def loss_and_grad(model):
    graphdef, params = nnx.split(model)
    f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, pos, seg) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  base = loss_and_grad(make())
  other = loss_and_grad(make(remat=remat))
  chex.assert_trees_all_close(base, other, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = make(dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
  pos, seg = row(8)
  logits = model(jnp.zeros((1, 8), jnp.int32), pos, seg)
  assert logits.dtype == jnp.float32
  ref = make()(jnp.zeros((1, 8), jnp.int32), pos, seg)
  np.testing.assert_allclose(logits, ref, atol=0.05)


@pytest.mark.slow
def test_rope_rotates_each_pair_by_position_times_frequency():
  h, base = 8, 10000.0
  pos = jnp.asarray([[0, 5, 17, 63]])
  x = jax.random.normal(jax.random.key(3), (1, 4, 1, h))
  got = np.asarray(model_lib.apply_rope(x, model_lib.rope_tables(pos, h, base, 64)))
  freq = base ** (-np.arange(0, h, 2) / h)
  ang = np.asarray(pos)[0, :, None] * freq                  # (T, H/2)
  x1, x2 = np.asarray(x)[0, :, 0, :h // 2], np.asarray(x)[0, :, 0, h // 2:]
  want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
  np.testing.assert_allclose(got[0, :, 0], want, atol=1e-5)
  # a rotation: norms are kept, and the dot product of two rotated vectors depends only on
  # the difference of their positions
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def unstacked(scanned_params, num_layers: int):
  """A scanned model's params in the unrolled layout (blocks 0..L-1), by slicing, not by the
  model's own code."""
  blocks = scanned_params["blocks"]
  return dict(scanned_params, blocks={
      i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)})


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoding_only_the_last_outputs_keeps_their_states_and_the_whole_cache(scan_layers):
  """`decode_hidden(..., outputs=n)`: the last n states and every layer's keys and values
  are those of the full call, and the next call reads the same cache; unrolled, the last
  layer skips the other positions' queries, attention and MLP (fewer flops). The same with
  each row's own positions, in their order."""
  model = make(num_layers=3, scan_layers=scan_layers)
  tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, 40)
  _, cache = model.decode_hidden(tokens[:, :4], model.init_cache(2, 12), block=4)
  call = lambda m, c, outputs: m.decode_hidden(tokens[:, 4:8], c, block=2, outputs=outputs)
  full, cache_full = call(model, cache, None)
  last, cache_last = call(model, cache, 3)
  assert last.shape == (2, 3, CFG.d_model)
  chex.assert_trees_all_close(last, full[:, -3:], atol=1e-6)
  chex.assert_trees_all_close(cache_last, cache_full, atol=1e-6)
  nxt = lambda c: model.decode_hidden(tokens[:, 8:], c, block=2)[0]
  chex.assert_trees_all_close(nxt(cache_last), nxt(cache_full), atol=1e-6)
  at = jnp.asarray([[2, 0], [1, 3]])
  some, cache_some = call(model, cache, at)
  chex.assert_trees_all_close(some, jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-6)
  chex.assert_trees_all_close(cache_some, cache_full, atol=1e-6)
  graphdef, params = nnx.split(model)
  flops = lambda n: jax.jit(lambda p, c: call(nnx.merge(graphdef, p), c, n)).lower(
      params, cache).compile().cost_analysis()["flops"]
  if not scan_layers:   # at least the MLP of 3 of the 4 positions in the last layer
    assert flops(1) < flops(None) - 3 * 2 * 3 * CFG.d_model * CFG.mlp_dim * 2
    assert flops(at) < flops(None) - 2 * 2 * 3 * CFG.d_model * CFG.mlp_dim * 2


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_layers_compute_what_unrolled_layers_do(remat):
  """Same init, same logits, same gradients (layer by layer), same KV-cache decoding."""
  cfg = dict(num_layers=3, remat=remat)
  unrolled, scanned = make(**cfg), make(scan_layers=True, **cfg)
  graphdef_u, params_u = nnx.split(unrolled)
  graphdef_s, params_s = nnx.split(scanned)
  params_s, params_u = nnx.to_pure_dict(params_s), nnx.to_pure_dict(params_u)
  assert params_s["blocks"]["mlp"]["w_up"].shape == (3, 32, 64)
  chex.assert_trees_all_equal(unstacked(params_s, 3), params_u)
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 40)
  pos, seg = row(16, [1] * 9 + [2] * 7)
  pos, seg = jnp.broadcast_to(pos, (2, 16)), jnp.broadcast_to(seg, (2, 16))

  def loss_and_grad(graphdef, params):
    f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, pos, seg) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  loss_u, grad_u = loss_and_grad(graphdef_u, params_u)
  loss_s, grad_s = loss_and_grad(graphdef_s, params_s)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  chex.assert_trees_all_close(unstacked(grad_s, 3), grad_u, rtol=1e-5, atol=1e-8)
  cache = scanned.init_cache(2, 12)   # keys (L, B, N, H, S), values (L, B, N, S, H)
  assert len(cache) == 1 and cache[0]["k"].shape == (3, 2, 2, 16, 12)
  assert cache[0]["v"].shape == (3, 2, 2, 12, 16)
  prefill, cache = scanned.decode(tokens[:, :5], cache)
  nxt, cache = scanned.decode(tokens[:, 5:6], cache)
  full = unrolled(tokens, *row(16))
  chex.assert_trees_all_close(jnp.concatenate([prefill, nxt], 1), full[:, :6], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_range_of_layers_then_the_rest_is_the_whole_network(scan_layers):
  """`hidden(layers=(0, j))` then `hidden(layers=(j, L))` is `hidden()`: the final norm only
  after the last layer; and the first range alone is not the whole network."""
  model = make(num_layers=3, scan_layers=scan_layers)
  pos, seg = row(16, [1] * 9 + [2] * 7)
  x = model.embed_tokens(jax.random.randint(jax.random.key(1), (1, 16), 0, 40))
  want = model.hidden(x, pos, seg)
  for j in (0, 1, 2):
    got = model.hidden(model.hidden(x, pos, seg, layers=(0, j)), pos, seg, layers=(j, 3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"j={j}")
  first = model.hidden(x, pos, seg, layers=(0, 2))
  assert not np.allclose(first, want, atol=1e-3)
  np.testing.assert_allclose(model.hidden(x, pos, seg, layers=(0, 0)), x)   # no layer, no norm
