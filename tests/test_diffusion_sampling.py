"""Masked-diffusion samplers: given tokens stay, no MASK is left, the ancestral cache, LLaDA's
block order, classifier-free guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm_jax.objectives import mdlm_sampling as ds
from mdlm_jax import objectives
from mdlm_jax import tokenizers

MASK = tokenizers.MASK


@pytest.fixture(scope="module")
def setup(corpus, data_dir):
  from helpers import tiny_config
  cfg = tiny_config(corpus, data_dir, {"objective.name": "mdlm"})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


def canvas(b=3, t=24):
  """Rows with a prefix, a suffix and masked spans in between (infilling)."""
  rng = np.random.default_rng(0)
  x = rng.integers(tokenizers.NUM_SPECIAL, 200, (b, t)).astype(np.int32)
  x[:, 0] = tokenizers.BOS
  x[0, 4:12] = MASK
  x[1, 2:6] = MASK
  x[1, 15:22] = MASK
  x[2, 1:] = MASK            # unconditional
  return jnp.asarray(x)


SAMPLERS = [("ancestral", {}), ("ancestral", {"grid": "cosine", "top_p": 0.9}),
            ("confidence", {}), ("confidence", {"remask": True}),
            ("llada", {"block_length": 4}), ("llada", {"remasking": "random", "cfg_scale": 1.5})]


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", SAMPLERS)
def test_samplers_keep_given_tokens_and_leave_no_mask(setup, name, opts):
  obj, model = setup
  x0 = canvas()
  fn = jax.jit(lambda x, rng: obj.sample(model, x, rng, sampler=name, steps=10, **opts))
  out, info = fn(x0, jax.random.key(1))
  out, x0 = np.asarray(out), np.asarray(x0)
  given = x0 != MASK
  np.testing.assert_array_equal(out[given], x0[given])
  assert not (out == MASK).any()
  assert int(info["calls"]) >= 1


@pytest.mark.slow
def test_cached_ancestral_matches_uncached_with_fewer_network_calls(setup):
  obj, model = setup
  x0 = canvas()
  steps = 200
  run = lambda cache: jax.jit(lambda x, r: ds.ancestral(obj, model, x, r, steps=steps,
                                                         cache=cache))(x0, jax.random.key(2))
  cached, info_c = run(True)
  plain, info_p = run(False)
  np.testing.assert_array_equal(cached, plain)
  masks = int((np.asarray(x0) == MASK).sum())
  assert int(info_p["calls"]) == steps
  # the network runs again only after a step that revealed something in some row: at most
  # once per masked token, plus the first call
  assert int(info_c["calls"]) <= masks + 1 < steps / 3


@pytest.mark.slow
def test_synced_rows_share_reveal_steps_and_keep_each_rows_distribution(setup):
  obj, model = setup
  x0 = jnp.asarray(np.tile(np.concatenate([[tokenizers.BOS], [MASK] * 16]), (4, 1)), jnp.int32)
  run = jax.jit(lambda x, r, sync: ds.ancestral(obj, model, x, r, steps=64, sync_rows=sync,
                                                snapshots=64), static_argnums=2)
  out, info = run(x0, jax.random.key(3), True)
  left = (np.asarray(info["history"]) == MASK).sum(-1)        # (steps, rows)
  assert (left == left[:, :1]).all() and left[-1, 0] == 0     # the same count in every row
  assert int(info["calls"]) <= 16 + 1                          # as few calls as for one row
  _, info_u = run(x0, jax.random.key(3), False)
  assert int(info_u["calls"]) > int(info["calls"])
  # each row on its own: after the first of 2 linear steps Binomial(16, 1/2) masks are revealed
  first = jax.jit(jax.vmap(lambda r: (ds.ancestral(obj, model, x0, r, steps=2, snapshots=2)[1][
      "history"][0] != MASK).sum(-1) - 1))(jax.random.split(jax.random.key(4), 400))
  counts = np.asarray(first)[:, 2]                              # a row other than the first
  assert abs(counts.mean() - 8) < 0.4 and abs(counts.var() - 4) < 1.2


def test_llada_fills_blocks_in_order(setup):
  obj, model = setup
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 20, 21], [MASK] * 16])[None], jnp.int32)
  out, info = jax.jit(lambda x, r: ds.llada(obj, model, x, r, steps=8, block_length=4,
                                            snapshots=8))(x0, jax.random.key(0))
  hist = np.asarray(info["history"])[:, 0, 3:]        # (steps, 16) the generated span
  filled = (hist != MASK).reshape(8, 4, 4).sum(-1)     # per step, tokens in each block
  for step in range(8):
    for blk in range(1, 4):
      if filled[step, blk] > 0:
        assert filled[step, blk - 1] == 4, f"block {blk} started before block {blk - 1} was full"
  # 8 steps over 4 blocks: two steps per block, two tokens each
  np.testing.assert_array_equal(filled.sum(-1), [2, 4, 6, 8, 10, 12, 14, 16])


def test_confidence_schedule_of_masked_counts(setup):
  obj, model = setup
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS], [MASK] * 20])[None], jnp.int32)
  _, info = jax.jit(lambda x, r: ds.confidence(obj, model, x, r, steps=5, snapshots=5))(
      x0, jax.random.key(0))
  masked = (np.asarray(info["history"])[:, 0] == MASK).sum(-1)
  # linear schedule: floor(20 * (1 - k / 5)) stay masked after step k
  np.testing.assert_array_equal(masked, [16, 12, 8, 4, 0])


def test_classifier_free_guidance_formula():
  """u comes from the canvas with every given token masked, BOS included; each branch gets back
  its own self-conditioning state."""
  x = jnp.asarray([[tokenizers.BOS, 50, MASK, MASK, 60, tokenizers.PAD]])
  fixed = x != MASK
  seen = []

  def net(z, cond, time=None):
    seen.append((z, cond))
    return jnp.where((z == MASK)[..., None], 1.0, 3.0) * jnp.arange(5.0) + cond, cond + 10.0

  out, (next_c, next_u) = ds.guided(net, x, fixed, 2.0, (jnp.float32(1), jnp.float32(2)))
  calls = len(seen)
  unc = jnp.asarray([[MASK, MASK, MASK, MASK, MASK, tokenizers.PAD]])
  c, u = net(x, 1.0)[0], net(unc, 2.0)[0]
  np.testing.assert_allclose(out, u + 3.0 * (c - u))
  assert calls == 2 and float(next_c) == 11.0 and float(next_u) == 12.0
  np.testing.assert_array_equal(seen[1][0], unc)  # prompt, BOS and suffix masked; PAD stays
  assert float(seen[0][1]) == 1.0 and float(seen[1][1]) == 2.0


@pytest.mark.parametrize("name,opts", [("ancestral", {}), ("confidence", {"critic": True}),
                                       ("llada", {"cfg_scale": 1.0})])
@pytest.mark.slow
def test_self_conditioned_time_conditioned_critic_model_samples(corpus, data_dir, name, opts):
  from helpers import tiny_config
  cfg = tiny_config(corpus, data_dir, {"objective.name": "mdlm",
                                       "objective.self_condition_prob": 0.75,
                                       "objective.critic": "self",
                                       "objective.time_conditioning": True})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  model = obj.build(nnx.Rngs(0))
  x0 = canvas()
  out, info = jax.jit(lambda x, r: obj.sample(model, x, r, sampler=name, steps=6, **opts))(
      x0, jax.random.key(0))
  given = np.asarray(x0) != MASK
  np.testing.assert_array_equal(np.asarray(out)[given], np.asarray(x0)[given])
  assert not (np.asarray(out) == MASK).any()
  if name == "ancestral":  # self- and time-conditioned: the network runs at every step
    assert int(info["calls"]) >= 6


def test_critic_scores_need_a_critic(setup, corpus, data_dir):
  obj, model = setup
  with pytest.raises(ValueError, match="objective.critic"):
    obj.sample(model, canvas(), jax.random.key(0), sampler="confidence", critic=True)
  from helpers import tiny_config   # a DiffusionNet (time-conditioned) without a critic
  cfg = tiny_config(corpus, data_dir, {"objective.name": "mdlm",
                                       "objective.time_conditioning": True})
  sc = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  net = sc.build(nnx.Rngs(0))
  assert net.critic_kind == "none"
  with pytest.raises(ValueError, match="objective.critic"):
    sc.sample(net, canvas(), jax.random.key(0), sampler="confidence", critic=True)


@pytest.mark.parametrize("n,steps", [(3, 4), (2, 4), (4, 4), (1, 5), (3, 7), (5, 8)])
def test_snapshots_are_evenly_spaced_and_the_last_is_the_final_canvas(n, steps):
  """Snapshot j is the canvas after step ceil((j + 1) steps / n) - 1."""
  history = ds._history(n, jnp.zeros((1, 2), jnp.int32))
  for k in range(steps):
    history = ds._record(history, jnp.full((1, 2), k, jnp.int32), k, steps)
  want = [-(-(j + 1) * steps // n) - 1 for j in range(n)]
  np.testing.assert_array_equal(np.asarray(history)[:, 0, 0], want)
  assert want[-1] == steps - 1 and len(set(want)) == n


def test_sampler_snapshots_end_at_the_output_and_never_exceed_the_steps(setup):
  obj, model = setup
  for name in ("ancestral", "confidence", "llada"):
    out, info = obj.sample(model, canvas(), jax.random.key(0), sampler=name, steps=7,
                           snapshots=3)
    hist = np.asarray(info["history"])
    np.testing.assert_array_equal(hist[-1], out)
    masks = (hist == MASK).sum(axis=(1, 2))
    assert masks[0] > 0 and (np.diff(masks) <= 0).all(), (name, masks)
  with pytest.raises(ValueError, match="snapshots=8"):
    obj.sample(model, canvas(), jax.random.key(0), steps=7, snapshots=8)


def test_unknown_sampler_and_bad_steps_are_refused(setup):
  obj, model = setup
  with pytest.raises(ValueError, match="sampler 'ddim' is unknown"):
    obj.sample(model, canvas(), jax.random.key(0), sampler="ddim")
  with pytest.raises(ValueError, match="steps=0"):
    obj.sample(model, canvas(), jax.random.key(0), steps=0)


@pytest.mark.parametrize("name,opts", [("ancestral", {}), ("confidence", {}), ("llada", {}),
                                       ("llada", {"cfg_scale": 1.0})])
def test_each_call_gets_back_the_previous_calls_self_conditioning(setup, monkeypatch, name,
                                                                   opts):
  """A counting network: its next condition is its input condition + 1 (+ 100 in the
  unconditional branch, whose canvas has BOS masked). Each branch must see its own count."""
  obj, _ = setup
  seen = []

  def fake_network(objective, model):
    def net(x, cond=None, time=None):
      unconditional = x[0, 0] == MASK
      jax.debug.callback(lambda c, u: seen.append((bool(u), float(c))), cond, unconditional,
                         ordered=True)
      logits = jnp.zeros(x.shape + (obj.vocab_size,)).at[..., MASK].set(-1e9)
      return logits, cond + jnp.where(unconditional, 100.0, 1.0)
    return net

  monkeypatch.setattr(ds, "network", fake_network)
  monkeypatch.setattr(ds, "initial_condition", lambda *a: jnp.zeros((), jnp.float32))
  monkeypatch.setattr(type(obj), "self_conditioned", property(lambda self: True))
  steps = 4
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40], [MASK] * 6])[None], jnp.int32)
  jax.block_until_ready(ds.run(name, obj, None, x0, jax.random.key(0), steps=steps, **opts))
  cond_branch = [c for u, c in seen if not u][:steps]
  np.testing.assert_array_equal(cond_branch, np.arange(steps))
  if opts.get("cfg_scale"):
    np.testing.assert_array_equal([c for u, c in seen if u][:steps], 100.0 * np.arange(steps))


def recording_network(obj, seen):
  """A network whose logits depend on the canvas (each position favours its left
  neighbour's token plus the row's mask count, by position-dependent margins, so what a
  position takes depends on when it is committed) and that records each call's time and
  branch (True: CFG's unconditional one, whose BOS is masked)."""
  v = obj.vocab_size
  bias = jax.random.normal(jax.random.key(7), (64, v)).at[:, MASK].set(-1e9)

  def fake_network(objective, model):
    def net(x, cond=None, time=None):
      jax.debug.callback(lambda tm, u: seen.append((float(tm), bool(u))),
                         jnp.asarray(-1.0 if time is None else time, jnp.float32),
                         x[0, 0] == MASK, ordered=True)
      left = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
      masks = jnp.sum(x == MASK, axis=1, keepdims=True)
      logits = bias[:x.shape[1]] + 3.0 * jax.nn.one_hot((left + 1 + masks) % v, v)
      return logits.at[..., MASK].set(-1e9), cond
    return net
  return fake_network


@pytest.mark.parametrize("name,opts,calls", [
    ("confidence", {}, 5), ("confidence", {"remask": True}, 5), ("llada", {}, 5),
    ("llada", {"cfg_scale": 0.5}, 10), ("ancestral", {"cache": False}, 5)])
def test_the_network_sees_each_steps_time_and_calls_are_counted(setup, monkeypatch, name, opts,
                                                                calls):
  """Step k of S runs the network at time 1 - k / S (both CFG branches); `calls` counts the
  network evaluations."""
  obj, _ = setup
  seen = []
  monkeypatch.setattr(ds, "network", recording_network(obj, seen))
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40], [MASK] * 10])[None], jnp.int32)
  _, info = jax.block_until_ready(ds.run(name, obj, None, x0, jax.random.key(0), steps=5,
                                         **opts))
  assert int(info["calls"]) == calls == len(seen)
  want = [1 - k / 5 for k in range(5)]
  np.testing.assert_allclose([t for t, u in seen if not u], want, atol=1e-6)
  if opts.get("cfg_scale"):
    np.testing.assert_allclose([t for t, u in seen if u], want, atol=1e-6)


def test_llada_finishes_left_masks_greedily_at_time_0(setup, monkeypatch):
  """One step for two blocks fills the first; the second is finished greedily, per position,
  by one more call at time 0."""
  obj, _ = setup
  seen = []
  monkeypatch.setattr(ds, "network", recording_network(obj, seen))
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40], [MASK] * 6])[None], jnp.int32)
  out, info = ds.run("llada", obj, None, x0, jax.random.key(0), steps=1, block_length=3)
  assert int(info["calls"]) == 2 and [t for t, _ in seen] == [1.0, 0.0]
  out = np.asarray(out)[0]
  assert (out != MASK).all()
  before = jnp.asarray(np.where(np.arange(8) >= 5, MASK, out))[None]  # the second block left
  logits = recording_network(obj, [])(obj, None)(before)[0][0]
  np.testing.assert_array_equal(out[5:], np.argmax(np.asarray(logits), -1)[5:])


@pytest.mark.parametrize("name,opts", [("confidence", {}), ("confidence", {"remask": True}),
                                       ("llada", {}), ("llada", {"block_length": 4})])
def test_greedy_rows_decode_alone_as_in_a_batch(setup, monkeypatch, name, opts):
  """At temperature 0 a row's output does not depend on the other rows of its batch (rows
  with different numbers of masks)."""
  obj, _ = setup
  monkeypatch.setattr(ds, "network", recording_network(obj, []))
  rows = np.full((2, 10), MASK, np.int32)
  rows[:, 0] = tokenizers.BOS
  rows[0, 1:4] = [40, 41, 42]
  run = lambda x: np.asarray(ds.run(name, obj, None, jnp.asarray(x), jax.random.key(0), steps=4,
                                    temperature=0.0, **opts)[0])
  together = run(rows)
  np.testing.assert_array_equal(together[0], run(rows[:1])[0])
  np.testing.assert_array_equal(together[1], run(rows[1:])[0])


@pytest.mark.parametrize("name,defaults", [
    ("ancestral", dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)),
    ("confidence", dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, remask=False,
                        critic=False, critic_noise=1.0)),
    ("llada", dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, block_length=0,
                   remasking="low_confidence", cfg_scale=0.0))])
def test_sampler_defaults_are_the_documented_ones(setup, monkeypatch, name, defaults):
  obj, _ = setup
  monkeypatch.setattr(ds, "network", recording_network(obj, []))
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40], [MASK] * 10])[None], jnp.int32)
  run = lambda **o: np.asarray(ds.run(name, obj, None, x0, jax.random.key(4), steps=4, **o)[0])
  np.testing.assert_array_equal(run(), run(**defaults))
  assert ds.run(name, obj, None, x0, jax.random.key(4), steps=4)[1]["history"] is None


@pytest.mark.parametrize("name", ["ancestral", "confidence", "llada"])
def test_samplers_pass_every_filter_to_the_draw(setup, monkeypatch, name):
  obj, _ = setup
  monkeypatch.setattr(ds, "network", recording_network(obj, []))
  got = []
  draw = ds.sampling.draw

  def spy(key, logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    got.append((top_k, top_p, min_p))
    return draw(key, logits, temperature, top_k, top_p, min_p)
  monkeypatch.setattr(ds.sampling, "draw", spy)
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40], [MASK] * 10])[None], jnp.int32)
  ds.run(name, obj, None, x0, jax.random.key(4), steps=4, temperature=0.7, top_k=5, top_p=0.8,
         min_p=0.05)
  assert got and set(got) == {(5, 0.8, 0.05)}


def test_llada_threshold_commits_exactly_the_positions_above_it(setup, monkeypatch):
  """Fast-dLLM's rule on a fixed network whose top tokens have known probabilities: a step
  commits the positions above the threshold (at least the most confident one), and the loop
  stops once nothing is masked (`steps` is a cap)."""
  obj, _ = setup
  v = obj.vocab_size
  top = np.array([0.95, 0.5, 0.85, 0.99, 0.3])
  probs = np.tile((1 - top)[:, None] / (v - 2), (1, v))
  probs[np.arange(5), 40 + np.arange(5)] = top
  probs[:, MASK] = 0.0
  logits = jnp.asarray(np.log(np.maximum(np.concatenate([np.ones((1, v)) / v, probs]), 1e-30)))
  seen = []

  def fixed(objective, model):
    def net(x, cond=None, time=None):
      jax.debug.callback(lambda: seen.append(1), ordered=True)
      return jnp.broadcast_to(logits, x.shape + (v,)).astype(jnp.float32), cond
    return net
  monkeypatch.setattr(ds, "network", fixed)
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS], [MASK] * 5])[None], jnp.int32)
  first_step = lambda thr: np.asarray(ds.run("llada", obj, None, x0, jax.random.key(0), steps=1,
                                             threshold=thr, snapshots=1)[1]["history"][0, 0, 1:])
  np.testing.assert_array_equal(first_step(0.9), [40, MASK, MASK, 43, MASK])
  np.testing.assert_array_equal(first_step(0.8), [40, MASK, 42, 43, MASK])
  np.testing.assert_array_equal(first_step(0.995), [MASK, MASK, MASK, 43, MASK])  # the best
  seen.clear()
  out, info = ds.run("llada", obj, None, x0, jax.random.key(0), steps=10, threshold=0.8)
  assert int(info["calls"]) == 3 == len(seen)   # {.95, .85, .99}, then .5, then .3
  np.testing.assert_array_equal(np.asarray(out)[0, 1:], 40 + np.arange(5))


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_threshold_gates_on_the_top_probability_at_temperature_one(setup, monkeypatch,
                                                                         remasking):
  """At temperature 1 the first step commits exactly the positions whose top probability
  passes (0.95, 0.95, 0.99 of 0.95, 0.5, 0.95, 0.99, 0.3), in every row, whatever was drawn
  there: the committed tokens keep the model's share of the second token (a gate on the
  drawn token's probability would hold those back); no extra fallback position is added."""
  obj, _ = setup
  v = obj.vocab_size
  top = np.array([0.95, 0.5, 0.95, 0.99, 0.3])
  probs = np.full((5, v), 1e-30)
  probs[np.arange(5), 40 + np.arange(5)] = top
  probs[np.arange(5), 50 + np.arange(5)] = 1 - top
  logits = jnp.asarray(np.log(np.concatenate([np.ones((1, v)) / v, probs])), jnp.float32)
  monkeypatch.setattr(ds, "network", lambda objective, model: (
      lambda x, cond=None, time=None: (jnp.broadcast_to(logits, x.shape + (v,)), cond)))
  rows = 500
  x0 = jnp.asarray(np.tile(np.concatenate([[tokenizers.BOS], [MASK] * 5]), (rows, 1)), jnp.int32)
  first = np.asarray(ds.run("llada", obj, None, x0, jax.random.key(0), steps=1, threshold=0.9,
                            temperature=1.0, remasking=remasking,
                            snapshots=1)[1]["history"][0, :, 1:])
  np.testing.assert_array_equal(first[:, [1, 4]], MASK)
  placed = first[:, [0, 2, 3]]
  assert np.all(placed != MASK)
  np.testing.assert_allclose(np.mean(placed >= 50, axis=0), 1 - top[[0, 2, 3]], atol=0.025)
  if remasking == "low_confidence":   # none passes 0.995: the top probability's best, 0.99
    first = np.asarray(ds.run("llada", obj, None, x0, jax.random.key(0), steps=1,
                              threshold=0.995, temperature=1.0,
                              snapshots=1)[1]["history"][0, :, 1:])
    np.testing.assert_array_equal(first[:, [0, 1, 2, 4]], MASK)
    assert np.all(first[:, 3] != MASK) and np.any(first[:, 3] == 53)   # 53: drawn at 1%


def test_block_cache_window_after_a_refresh_is_the_full_pass(setup):
  obj, model = setup
  x = canvas()
  b, t = x.shape
  full = ds.network(obj, model)(x)[0]
  # prefix windows compile at widths 4, 8, 16, 24 (t): the narrowest reaching every row's end
  for kind, start, width in (("dual", [4, 2, 9], 4), ("prefix", [4, 2, 9], 24),
                             ("prefix", [17, 20, 21], 8)):
    start = jnp.asarray(start)
    cache_ = ds.BlockCache(model, b, t, 4, kind)
    logits, cache = cache_.refresh(x, cache_.init())
    np.testing.assert_allclose(logits, full, atol=1e-5)
    got, _, used = cache_.window(x, start, jnp.zeros_like(logits), cache)
    assert int(used) == width
    for r in range(b):
      end = int(start[r]) + 4 if kind == "dual" else t
      np.testing.assert_allclose(got[r, int(start[r]):end], full[r, int(start[r]):end],
                                 atol=1e-5)
      assert not np.any(np.asarray(got[r, :int(start[r])]))   # only the window is written
      assert not np.any(np.asarray(got[r, end:]))


def llada_schedule(masks_per_block, steps):
  """The masks a row has left after each step: the steps shared evenly among its blocks
  (steps // blocks each, at least 1), each step committing ceil(masks left in the current
  block / steps left for it); a block done, the next one gets its own share."""
  per_block = max(steps // len(masks_per_block), 1)
  left_in, spent, out = list(masks_per_block), 0, []
  for _ in range(steps):
    cur = next((i for i, m in enumerate(left_in) if m), None)
    if cur is not None:
      left_in[cur] -= -(-left_in[cur] // max(per_block - spent, 1))
      spent = 0 if left_in[cur] == 0 else spent + 1
    out.append(sum(left_in))
  return out


@pytest.mark.parametrize("steps", [3, 4, 5, 7])
def test_llada_shares_each_rows_steps_among_its_blocks(setup, steps):
  """Rows with 6 and 3 masks in blocks of 3 (two blocks and one): the masks left after each
  step follow each row's own schedule."""
  obj, model = setup
  x0 = np.full((2, 8), tokenizers.PAD, np.int32)
  x0[:, :2] = [tokenizers.BOS, 40]
  x0[0, 2:8] = MASK
  x0[1, 2:5] = MASK
  _, info = ds.llada(obj, model, jnp.asarray(x0), jax.random.key(0), steps=steps,
                     block_length=3, temperature=1.0, snapshots=steps)
  left = (np.asarray(info["history"]) == MASK).sum(-1)        # (steps, rows)
  np.testing.assert_array_equal(left[:, 0], llada_schedule([3, 3], steps))
  np.testing.assert_array_equal(left[:, 1], llada_schedule([3], steps))
  with pytest.raises(ValueError, match="threshold=1.0"):
    ds.llada(obj, model, jnp.asarray(x0), jax.random.key(0), steps=steps, threshold=1.0)


def test_llada_dual_cache_windows_the_current_block(setup, monkeypatch):
  """Between refreshes the window starts at each row's current block: its first MASK plus
  the finished blocks."""
  obj, model = setup
  starts = []
  window = ds.BlockCache.window

  def spy(self, x, start_b, logits, cache):
    jax.debug.callback(lambda s: starts.append(np.asarray(s).tolist()), start_b, ordered=True)
    return window(self, x, start_b, logits, cache)
  monkeypatch.setattr(ds.BlockCache, "window", spy)
  x0 = np.full((2, 15), MASK, np.int32)
  x0[:, 0] = tokenizers.BOS
  x0[0, 1:3] = [40, 41]                    # row 0's blocks start at 3, 7, 11; row 1's at 1, 5, 9
  x0[1, 13:] = [50, 51]                    # (a suffix: both rows hold 3 blocks, 4 steps each)
  ds.llada(obj, model, jnp.asarray(x0), jax.random.key(2), steps=12, block_length=4,
           temperature=1.0, kv_cache="dual")
  # lax.cond traces both branches but runs one: 3 windows after each of the 3 refreshes
  assert starts == [[3, 1]] * 3 + [[7, 5]] * 3 + [[11, 9]] * 3, starts


def test_llada_dual_cache(setup):
  """Refreshed at the first step and whenever a row finishes a block: with one step per block
  every call is a refresh and the output is the uncached sampler's; with four steps per
  block three of each four calls encode the block alone."""
  obj, model = setup
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40, 41], [MASK] * 12])[None].repeat(2, 0),
                   jnp.int32)
  run = lambda steps, cache: ds.llada(obj, model, x0, jax.random.key(2), steps=steps,
                                      block_length=4, temperature=1.0, kv_cache=cache)
  (a, ia), (c, _) = run(3, "dual"), run(3, None)
  np.testing.assert_array_equal(a, c)
  assert int(ia["encoded"]) == 3 * 15
  out, info = run(12, "dual")
  assert int(info["calls"]) == 12 and int(info["encoded"]) == 3 * 15 + 9 * 4
  assert not np.any(np.asarray(out) == MASK)
  # prefix: the windows reach the row's end, at widths 15 (from 3), 8 (from 7), 4 (from 11)
  out, info = run(12, "prefix")
  assert int(info["calls"]) == 12 and int(info["encoded"]) == 3 * 15 + 3 * (15 + 8 + 4)
  assert not np.any(np.asarray(out) == MASK)
  with pytest.raises(ValueError, match="kv_cache='dual' needs"):
    ds.llada(obj, model, x0, jax.random.key(0), steps=4, block_length=4, cfg_scale=1.0,
             kv_cache="dual")


def test_dual_cache_window_rewrites_its_own_keys(corpus, data_dir):
  """One layer: a position's keys depend on its own token only, so after a refresh on one
  canvas a window over another that differs only inside the window must give that canvas's
  full-pass logits exactly, which needs the window's own keys rewritten."""
  from helpers import tiny_config
  cfg = tiny_config(corpus, data_dir, {"objective.name": "mdlm", "model.num_layers": 1,
                                       "model.init_std": 0.5})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  model = obj.build(nnx.Rngs(1))
  x_a = canvas()
  b, t = x_a.shape
  start = jnp.array([4, 2, 9])
  inside = (jnp.arange(t)[None] >= start[:, None]) & (jnp.arange(t)[None] < start[:, None] + 4)
  x_b = jnp.where(inside, 77, x_a)
  dual = ds.BlockCache(model, b, t, 4, "dual")
  _, cache = dual.refresh(x_a, dual.init())
  got, _, _ = dual.window(x_b, start, jnp.zeros((b, t, obj.vocab_size)), cache)
  full = ds.network(obj, model)(x_b)[0]
  np.testing.assert_allclose(np.where(inside[..., None], got, 0.0),
                             np.where(inside[..., None], full, 0.0), atol=1e-4)


@pytest.fixture
def one_layer(corpus, data_dir):
  """A one-layer mdlm network: a position's keys and values depend on its own token only."""
  from helpers import tiny_config
  cfg = tiny_config(corpus, data_dir, {"objective.name": "mdlm", "model.num_layers": 1,
                                       "model.init_std": 0.5})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(1))


def test_prefix_cache_window_recomputes_the_row_to_its_end(one_layer):
  """After a refresh on one canvas, a window over another that differs from `start` to the
  row's end gives that canvas's full-pass logits there with the prefix cache (the prefix's
  keys are still right in one layer); the dual cache, keeping the stale keys after its
  block, does not."""
  obj, model = one_layer
  x_a = canvas()
  b, t = x_a.shape
  start = jnp.array([4, 2, 9])
  after = jnp.arange(t)[None] >= start[:, None]
  x_b = jnp.where(after, 77, x_a)
  full = ds.network(obj, model)(x_b)[0]
  err = {}
  for kind in ds.BlockCache.KINDS:
    cache_ = ds.BlockCache(model, b, t, 4, kind)
    _, cache = cache_.refresh(x_a, cache_.init())
    got, _, _ = cache_.window(x_b, start, jnp.zeros((b, t, obj.vocab_size)), cache)
    diff = np.where(after[..., None] & np.isfinite(full), got - full, 0.0)  # MASK: -inf
    err[kind] = np.abs(diff).max()
  assert err["prefix"] < 1e-4 < err["dual"], err


def test_llada_prefix_cache_is_exact_in_one_layer(one_layer):
  """One layer, four steps per block: the finished blocks' keys never go stale, so the
  prefix-cached sampler writes what the uncached one writes."""
  obj, model = one_layer
  x0 = jnp.asarray(np.concatenate([[tokenizers.BOS, 40, 41], [MASK] * 12])[None].repeat(3, 0),
                   jnp.int32)
  for key in range(3):
    run = lambda cache: ds.llada(obj, model, x0, jax.random.key(key), steps=12, block_length=4,
                                 temperature=1.0, kv_cache=cache)[0]
    np.testing.assert_array_equal(run("prefix"), run(None))
