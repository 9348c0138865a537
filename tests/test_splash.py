"""Splash attention (the TPU kernel) in Pallas' interpret mode against a dense reference:
values and gradients, causal, bidirectional, block-causal and block diffusion's x_t ⊕ x_0
mask, packed rows, sharded; `bd3lm`'s loss through it."""
import dataclasses
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import positions_of
from mdlm_jax import attention as attention_lib
from mdlm_jax import model as model_lib
from mdlm_jax import objectives
from mdlm_jax import sharding
from mdlm_jax import splash
from mdlm_jax import tokenizers

# Interpret mode discharges each kernel into a large XLA program that no other test or
# process compiles, so writing it to the run's persistent compilation cache would be work
# for nothing: these compile without the cache.
pytestmark = pytest.mark.usefixtures("uncached_compilation")

# a packed row over 2 tiles of 128: runs that cross the tile boundary, and a padding run
PACKED = [1] * 100 + [2] * 90 + [3] * 50 + [0] * 16
SEGS = np.asarray([PACKED, [5] * 256], np.int32)


def diffusion_sees(i, j, half, block):
  """Block diffusion over x_t ⊕ x_0 (each half `half` long): a noised query reads its own
  noised block and the clean blocks before it, a clean one the clean blocks up to its own."""
  qb, kb = (i % half) // block, (j % half) // block
  if i < half:
    return kb == qb if j < half else kb < qb
  return j >= half and kb <= qb


def dense_reference(q, k, v, seg, block, diffusion=False):
  """softmax(q k^T / sqrt(H)) v over the keys each query may see, the mask built by loops."""
  t = q.shape[1]
  allowed = np.zeros((len(seg), t, t), bool)
  for b in range(len(seg)):
    for i in range(t):
      for j in range(t):
        if diffusion:
          sees = diffusion_sees(i, j, t // 2, block)
        else:
          sees = True if block == 0 else j // block <= i // block
        allowed[b, i, j] = sees and seg[b][i] == seg[b][j]
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(allowed[:, None], s, -1e30), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def qkv(t=256, n=2, h=32, seed=0):
  return tuple(jax.random.normal(k, (2, t, n, h)) for k in jax.random.split(jax.random.key(seed), 3))


@pytest.mark.parametrize("block", [1, 0, 32], ids=["causal", "bidirectional", "block_causal"])
def test_splash_matches_the_dense_product_values_and_gradients(block):
  q, k, v = qkv()
  seg = jnp.asarray(SEGS)
  w = jax.random.normal(jax.random.key(9), q.shape)  # a cotangent that weighs every output
  got_fn = lambda q, k, v: splash.attention(q, k, v, seg, block, max_tile=128)
  ref_fn = lambda q, k, v: dense_reference(q, k, v, SEGS, block)
  np.testing.assert_allclose(got_fn(q, k, v), ref_fn(q, k, v), atol=2e-5)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (got_fn, ref_fn)]
  chex.assert_trees_all_close(*grads, atol=2e-4, rtol=1e-4)


def test_block_diffusion_matches_the_dense_product_values_and_gradients():
  """x_t ⊕ x_0 of a packed half-row of 128 (two tiles of 128: the clean queries' tile of noised
  keys is empty and skipped), blocks of 16."""
  q, k, v = qkv()
  halves = np.concatenate([SEGS[:, :128], SEGS[:, :128]], axis=1)
  w = jax.random.normal(jax.random.key(9), q.shape)
  got_fn = lambda q, k, v: splash.attention(q, k, v, jnp.asarray(halves), 16, max_tile=128,
                                            diffusion=True)
  ref_fn = lambda q, k, v: dense_reference(q, k, v, halves, 16, diffusion=True)
  np.testing.assert_allclose(got_fn(q, k, v), ref_fn(q, k, v), atol=2e-5)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (got_fn, ref_fn)]
  chex.assert_trees_all_close(*grads, atol=2e-4, rtol=1e-4)
  want = np.array([[diffusion_sees(i, j, 6, 2) for j in range(12)] for i in range(12)])
  np.testing.assert_array_equal(splash.block_diffusion_mask(12, 2), want)


@pytest.mark.slow
def test_bd3lm_loss_through_splash_matches_xla(make_config):
  """`bd3lm`'s loss and every gradient on packed rows of 128 (x_t ⊕ x_0: 256 positions) with
  `model.attention=splash` (the structured mask) and `xla` (the dense one)."""
  rows = [[1] * 50 + [2] * 45 + [3] * 25 + [0] * 8, [4] * 128]
  seg = np.asarray(rows, np.int32)
  pos = positions_of(seg)
  tokens = np.asarray(jax.random.randint(jax.random.key(4), seg.shape, 4, 60), np.int32)
  batch = {"inputs": jnp.asarray(np.where(seg > 0, tokens, 0)), "segment_ids": jnp.asarray(seg),
           "positions": jnp.asarray(pos)}

  def loss_and_grad(attention):
    cfg = make_config({"objective.name": "bd3lm", "objective.block_size": 16,
                       "data.seq_len": 128, "model.max_seq_len": 128,
                       "model.attention": attention})
    obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
    graphdef, params = nnx.split(obj.build(nnx.Rngs(0)))
    loss = lambda p: obj.loss_sums(nnx.merge(graphdef, p), batch, jax.random.key(1))[0]
    kernel = "pallas_call" in str(jax.make_jaxpr(loss)(params))
    assert kernel == (attention == "splash"), "splash must read the mask's parts, not its dense form"
    return jax.jit(jax.value_and_grad(loss))(params)

  got, ref = loss_and_grad("splash"), loss_and_grad("xla")
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=2e-5)


def test_block_causal_mask_matches_its_definition():
  m = splash.block_causal_mask(8, 4)
  want = np.array([[j < 4 or i >= 4 for j in range(8)] for i in range(8)])
  np.testing.assert_array_equal(m, want)
  np.testing.assert_array_equal(splash.block_causal_mask(6, 1), np.tril(np.ones((6, 6), bool)))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_model_with_splash_matches_xla_values_and_gradients(causal):
  """The whole backbone on packed rows: hidden states and every parameter's gradient."""
  cfg = model_lib.ModelConfig(vocab_size=40, num_layers=2, d_model=64, num_heads=2, mlp_dim=64)
  tokens = jax.random.randint(jax.random.key(3), SEGS.shape, 0, 40)
  seg = jnp.asarray(SEGS)
  pos = np.zeros_like(SEGS)  # restarting at each document, as the pipeline packs
  for b, i in np.ndindex(SEGS.shape[0], SEGS.shape[1] - 1):
    pos[b, i + 1] = pos[b, i] + 1 if SEGS[b, i + 1] == SEGS[b, i] else 0
  pos = jnp.asarray(pos)

  def hidden_and_grad(attention):
    graphdef, params = nnx.split(model_lib.Transformer(
        dataclasses.replace(cfg, attention=attention), nnx.Rngs(0)))
    h = lambda p: nnx.merge(graphdef, p).hidden(
        nnx.merge(graphdef, p).embed_tokens(tokens), pos, seg, causal)
    return jax.jit(h)(params), jax.jit(jax.grad(lambda p: jnp.mean(h(p) ** 2)))(params)

  got, ref = hidden_and_grad("splash"), hidden_and_grad("xla")
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("diffusion", [False, True], ids=["causal", "block_diffusion"])
def test_splash_under_a_mesh_runs_per_shard_and_matches(diffusion):
  """Under a data 2 x fsdp 2 x tensor 2 mesh (as the train step traces) the kernel runs per
  (batch, heads) shard; the result equals the dense product."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  q, k, v = qkv(n=2, seed=1)
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # batch 4: one row per shard
  segs = np.concatenate([SEGS, SEGS[::-1]])
  block = 1
  if diffusion:   # x_t ⊕ x_0 of half-rows of 128, blocks of 16
    segs, block = np.concatenate([segs[:, :128], segs[:, :128]], axis=1), 16

  @jax.jit
  def run(q, k, v, seg):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return splash.attention(q, k, v, seg, block, max_tile=128, diffusion=diffusion)

  with jax.set_mesh(mesh):
    got = run(q, k, v, jnp.asarray(segs))
  np.testing.assert_allclose(got, dense_reference(q, k, v, segs, block, diffusion), atol=2e-5)
  assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, jnp.asarray(segs)))


def test_auto_picks_splash_on_tpu_for_tiled_rows_only(monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform="tpu")])
  assert attention_lib.attention_impl("auto", "bfloat16", 1024) == "splash"
  assert attention_lib.attention_impl("auto", "float32", 2048) == "splash"
  assert attention_lib.attention_impl("auto", "bfloat16", 200) == "xla"  # not tileable
  assert attention_lib.attention_impl("splash", "bfloat16", 96) == "xla"
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform="cpu")])
  assert attention_lib.attention_impl("auto", "float32", 1024) == "chunked"
