"""`bd3lm`: the block mask against a direct construction, its two limits (block size 1 is
next-token prediction, block size T is `mdlm`), packed rows isolated, the cached block sampler
against re-encoding, the step rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import positions_of
from mdlm_jax import attention
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import bd3lm
from mdlm_jax.objectives import bd3lm_sampling
from mdlm_jax.objectives import mdlm

MASK, EOS, PAD, BOS = tokenizers.MASK, tokenizers.EOS, tokenizers.PAD, tokenizers.BOS


def make(make_config, name="bd3lm", seq_len=32, init_std=0.02, **opts):
  cfg = make_config({"objective.name": name, "data.seq_len": seq_len, "model.init_std": init_std,
                     **{k if "." in k else f"objective.{k}": v for k, v in opts.items()}})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  return obj, obj.build(nnx.Rngs(0))


def batch_of(seg, seed=0):
  seg = np.asarray(seg, np.int32)
  rng = np.random.default_rng(seed)
  x = rng.integers(tokenizers.NUM_SPECIAL, 60, seg.shape).astype(np.int32)
  starts = np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
  x[starts & (seg > 0)] = BOS
  x[seg == 0] = PAD
  return {"inputs": jnp.asarray(x), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(positions_of(seg))}


def plain_batch(b=4, t=32, seed=0):
  return batch_of(np.ones((b, t)), seed)


def test_training_mask_is_the_direct_construction():
  seg = np.array([[1] * 5 + [2] * 6 + [0]])
  size, t = 4, 12
  got = np.asarray(bd3lm.training_mask(jnp.asarray(seg), size).dense())[0, 0]
  want = np.zeros((2 * t, 2 * t), bool)
  for q in range(2 * t):
    for k in range(2 * t):
      qb, kb = (q % t) // size, (k % t) // size
      same = seg[0, q % t] == seg[0, k % t]
      if q < t:    # noised query: its own noised block, clean earlier blocks
        ok = (kb == qb) if k < t else (kb < qb)
      else:        # clean query: clean blocks up to its own
        ok = k >= t and kb <= qb
      want[q, k] = ok and same
  np.testing.assert_array_equal(got, want)


def test_block_size_of_the_row_is_mdlm(make_config):
  """One block: the noised half reads only itself, with mdlm's times and masks for the same
  key, so loss and validation bound equal mdlm's on the same parameters."""
  obj, model = make(make_config, block_size=32)
  ref, ref_model = make(make_config, name="mdlm")
  nnx.update(ref_model, nnx.state(model))
  batch = batch_of(np.array([[1] * 20 + [2] * 12, [1] * 32, [1] * 25 + [0] * 7]))
  for seed in range(3):
    rng = jax.random.key(seed)
    np.testing.assert_allclose(obj.loss(model, batch, rng)[0], ref.loss(ref_model, batch, rng)[0],
                               rtol=2e-5)
    got, want = obj.eval_sums(model, batch, rng), ref.eval_sums(ref_model, batch, rng)
    for key in ("nll", "tokens", "bytes", "mc_var"):
      np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)


def ar_factorisation_nll(model, batch):
  """sum over scored tokens of -log p(x_i | x_<i), each term from its own causal pass over
  [x_0 .. x_{i-1}, MASK, ...] read at i (the MASKs after i unseen by the causal mask): the
  network's next-token distribution computed directly."""
  x = np.asarray(batch["inputs"])
  b, t = x.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  causal = jax.jit(lambda row: model(row, pos, jnp.ones((b, t), jnp.int32), causal=True))
  total = 0.0
  for i in range(1, t):
    row = np.where(np.arange(t) < i, x, MASK)
    logits = causal(jnp.asarray(row))[:, i]
    logits = logits.at[:, MASK].set(-1e30)
    total += float(jnp.sum(-jax.nn.log_softmax(logits)[jnp.arange(b), x[:, i]]))
  return total


def test_block_size_1_with_every_token_masked_is_the_ar_factorisation(make_config):
  """Mask rate 1 (the clipped schedule at [1, 1]) makes the loss deterministic: the NLL of
  the network's own left-to-right factorisation, term by term."""
  obj, model = make(make_config, seq_len=12, block_size=1, noise_min=1.0, noise_max=1.0)
  batch = plain_batch(b=3, t=12)
  num, den, _ = obj.loss_sums(model, batch, jax.random.key(0))
  assert float(den) == 3 * 11
  np.testing.assert_allclose(float(num), ar_factorisation_nll(model, batch), rtol=1e-4)


def test_block_size_1_loss_is_the_ar_nll_in_expectation(make_config):
  """Linear schedule, eps 0: each token is masked with probability t and weighted 1/t, so the
  mean over keys is the AR factorisation's NLL for any time range (t_min = 0.1 keeps the
  estimator's variance small: 400 draws put it within about 1%)."""
  obj, model = make(make_config, seq_len=12, init_std=0.5, block_size=1, eps=0.0, t_min=0.1)
  batch = plain_batch(b=8, t=12)
  want = ar_factorisation_nll(model, batch) / (8 * 11)
  loss = jax.jit(lambda k: obj.loss(model, batch, k)[0])
  got = np.mean([float(loss(jax.random.key(s))) for s in range(400)])
  assert abs(got - want) / want < 0.03, (got, want)


def test_packed_documents_do_not_see_each_other(make_config):
  """The gradient of document 1's noised logits with respect to every input embedding is
  zero at document 2's positions (either half) and nonzero at its own earlier clean block."""
  _, model = make(make_config, block_size=4)
  seg = np.array([[1] * 10 + [2] * 22])
  batch = batch_of(seg)
  t = seg.shape[1]
  x2 = jnp.concatenate([batch["inputs"], batch["inputs"]], axis=1)
  emb = model.embed_tokens(x2)
  mask = bd3lm.training_mask(batch["segment_ids"], 4)
  pos2, seg2 = jnp.tile(batch["positions"], (1, 2)), jnp.tile(batch["segment_ids"], (1, 2))

  def doc1_out(e):
    h = model.hidden(e, pos2, seg2, mask_Bx1xTxT=mask)
    return jnp.sum(model.logits(h[:, 4:8]) ** 2)   # noised block 1 of document 1

  g = np.abs(np.asarray(jax.grad(doc1_out)(emb))).sum(-1)[0]
  doc2 = np.tile(seg[0] == 2, 2)
  assert np.all(g[doc2] == 0)
  assert np.all(g[t:t + 4] > 0), "clean block 0 of the same document must be read"
  assert np.all(g[t + 4:t + 10] == 0), "its own clean copy and later blocks must not be"
  assert np.all(g[0:4] == 0), "the noised block 0 is another block's noise"


@pytest.mark.parametrize("noised_layers", [0, 1])
def test_flops_count_the_doubled_sequence_and_the_mask(make_config, noised_layers):
  """Every layer runs the clean half, the last `noised_layers` (0: every one) the noised half;
  each half's pairs are counted from the mask's quadrants."""
  obj, _ = make(make_config, block_size=8, noised_layers=noised_layers)
  cfg = obj.model_config
  d, f, n, v, t = cfg.d_model, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size, 32
  mask = np.asarray(bd3lm.training_mask(jnp.ones((1, t), jnp.int32), 8).dense())[0, 0]
  assert mask.sum() == t * (t + 8)
  noised_pairs, clean_pairs = mask[:t].sum(), mask[t:].sum()
  k = noised_layers or n
  per_token = 2 * ((n + k) * (4 * d * d + 3 * d * f) + d * v
                   + 2 * d * (k * noised_pairs + n * clean_pairs) / t)
  np.testing.assert_allclose(obj.flops_per_token(t), 3 * per_token)


def test_options_are_checked(make_config):
  with pytest.raises(ValueError, match="block_size=5 must divide data.seq_len=32"):
    make(make_config, block_size=5)
  def check(**changes):
    opts = objectives.default_options("bd3lm")
    opts.update(changes)
    objectives.validate_options(opts)

  check(noise_min=0.3, noise_max=0.8)
  check(noise_min=0.5, noise_max=0.5)   # one fixed rate
  check(schedule="cosine")   # unclipped: any schedule
  check(eps=0.0, t_min=0.0, time_sampling="iid", eval_time_samples=1)   # the inclusive ends
  for name, value in [("eps", 1.0), ("t_min", 1.0), ("time_sampling", "stratified"),
                      ("eval_time_samples", 0), ("noise_max", 0.0)]:
    with pytest.raises(ValueError, match=f"objective.{name}="):
      check(**{name: value})
  with pytest.raises(ValueError, match="noise_min=0.9 and objective.noise_max=0.3"):
    check(noise_min=0.9, noise_max=0.3)
  with pytest.raises(ValueError, match="clipped schedule"):
    check(noise_min=0.3, noise_max=0.8, schedule="cosine")
  with pytest.raises(ValueError, match="block_size=0 must be >= 1"):
    check(block_size=0)
  with pytest.raises(ValueError, match="noised_layers=-1 must be >= 0"):
    check(noised_layers=-1)
  with pytest.raises(ValueError, match="noised_layers=3 must be at most model.num_layers=2"):
    make(make_config, noised_layers=3)


def reference_noised_logits(model, batch, x_t, size: int, enter: int):
  """The noised half's logits built block by block: for block b, the clean tokens of blocks
  <= b run layers [0, enter) alone (block-causal), block b's states are replaced by x_t's
  embeddings, and the row up to block b's end runs the remaining layers block-causally, so
  block b reads itself and the clean blocks before it."""
  x0, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  t = x0.shape[1]
  out = []
  for blk in range(t // size):
    end = (blk + 1) * size
    p, s = pos[:, :end], seg[:, :end]
    order = jnp.broadcast_to(jnp.arange(end) // size, s.shape)
    mask = attention.attention_mask(s, s, order, order, True)
    h = model.hidden(model.embed_tokens(x0[:, :end]), p, s, mask_Bx1xTxT=mask,
                     layers=(0, enter))
    h = h.at[:, blk * size:end].set(model.embed_tokens(x_t[:, blk * size:end]))
    h = model.hidden(h, p, s, mask_Bx1xTxT=mask, layers=(enter, model.cfg.num_layers))
    out.append(h[:, blk * size:])
  return mdlm.subs_logits(model.logits(jnp.concatenate(out, axis=1)))


@pytest.mark.parametrize("noised_layers", [1, 2])
def test_noised_layers_forward_is_the_block_by_block_construction(make_config, noised_layers):
  """`noised_layers` k: the noised half joins the clean half at layer L - k. Against the
  block-by-block construction on packed rows (k = L is every layer: BD3-LM's forward, the
  same logits as the default 0)."""
  obj, model = make(make_config, block_size=4, init_std=0.3, noised_layers=noised_layers)
  batch = batch_of(np.array([[1] * 10 + [2] * 22, [1] * 32]))
  x_t = jnp.where(jax.random.uniform(jax.random.key(1), (2, 32)) < 0.5, MASK, batch["inputs"])
  got = obj.noised_logits(model, batch, x_t)
  want = reference_noised_logits(model, batch, x_t, 4, 2 - noised_layers)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  every = make(make_config, block_size=4, init_std=0.3)[0].noised_logits(model, batch, x_t)
  if noised_layers == 2:
    np.testing.assert_allclose(every, want, rtol=2e-4, atol=2e-4)
  else:   # the construction tells the two apart
    assert not np.allclose(got, every, atol=1e-2)


def test_noised_layers_keep_documents_and_later_blocks_apart(make_config):
  """With the noised half on the last layer only, document 1's noised block 1 (positions 4-7)
  changes when its clean block 0 or its own noised tokens change, and not when document 2,
  its own clean block or a later block change."""
  obj, model = make(make_config, block_size=4, init_std=0.3, noised_layers=1)
  batch = batch_of(np.array([[1] * 10 + [2] * 22]))
  x_t = batch["inputs"].at[:, 5].set(MASK)
  out = lambda b, xt: np.asarray(obj.noised_logits(model, b, xt)[0, 4:8])
  base_out = out(batch, x_t)
  def changed(cols, noised: bool):
    x = np.asarray(x_t if noised else batch["inputs"]).copy()
    x[:, cols] = 70
    if noised:
      return not np.allclose(out(batch, jnp.asarray(x)), base_out, atol=1e-6)
    return not np.allclose(out(dict(batch, inputs=jnp.asarray(x)), x_t), base_out, atol=1e-6)
  assert changed([1, 2], noised=False)          # its clean block 0
  assert changed([6], noised=True)              # its own noised block
  assert not changed([4, 5, 6, 7, 8, 9], noised=False)   # its own clean copy, later clean
  assert not changed(list(range(10, 32)), noised=False)  # document 2
  assert not changed([0, 1, 2, 3, 9, 20], noised=True)    # other noised blocks


def test_clipped_schedule_draws_each_blocks_rate_in_its_interval(make_config):
  """BD3-LM's clipped schedule: one mask rate per (row, block), uniform in [noise_min,
  noise_max], masking that fraction of the block, with the weight 1 / rate."""
  obj, _ = make(make_config, seq_len=512, block_size=256, noise_min=0.3, noise_max=0.8)
  eligible = jnp.ones((200, 512), bool)
  masked, w = obj._noise(jax.random.key(0), jax.random.key(1), eligible, True, 1e-3, None,
                         obj.clipped)
  masked, w = np.asarray(masked).reshape(400, 256), np.asarray(w).reshape(400, 256)
  assert np.all(w == w[:, :1])   # one weight per block
  rate = 1.0 / w[:, 0]
  assert 0.3 <= rate.min() < 0.31 and 0.79 < rate.max() <= 0.8
  np.testing.assert_allclose(np.histogram(rate, bins=5, range=(0.3, 0.8))[0] / 400, 0.2,
                             atol=0.06)
  frac = masked.mean(1)   # 256 Bernoulli(rate) a block: sd <= 0.032
  assert np.max(np.abs(frac - rate)) < 0.15
  np.testing.assert_allclose(np.mean(frac - rate), 0.0, atol=0.01)


# ---------------------------------------------------------------- sampling
def test_commit_rules():
  masked = jnp.array([[True, True, False, True, True]])
  conf = jnp.log(jnp.array([[0.95, 0.5, 0.99, 0.91, 0.2]]))
  key = jax.random.key(0)
  got = bd3lm_sampling.commit("threshold", 0, 5, masked, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[True, False, False, True, False]])
  low = jnp.log(jnp.array([[0.3, 0.5, 0.99, 0.4, 0.2]]))
  got = bd3lm_sampling.commit("threshold", 0, 5, masked, low, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[False, True, False, False, False]])  # the most confident
  picks = np.array([np.asarray(bd3lm_sampling.commit(
      "threshold", 0, 5, masked, low, jax.random.key(s), threshold=0.9, fallback="random"))[0]
                    for s in range(400)])
  assert np.all(picks.sum(1) == 1) and not picks[:, 2].any()
  np.testing.assert_allclose(picks[:, [0, 1, 3, 4]].mean(0), 0.25, atol=0.07)
  for s in range(20):   # the fallback only when nothing passes: no extra random position
    got = bd3lm_sampling.commit("threshold", 0, 5, masked, conf, jax.random.key(s),
                                threshold=0.9, fallback="random")
    np.testing.assert_array_equal(got, [[True, False, False, True, False]])
  got = bd3lm_sampling.commit("confidence", 1, 3, masked, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[True, False, False, True, False]])  # ceil(4 / 2)
  got = bd3lm_sampling.commit("confidence", 2, 3, masked, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, masked)   # the last step commits what is left
  got = bd3lm_sampling.commit("left_to_right", 1, 3, masked, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[True, True, False, False, False]])  # leftmost two
  later = jnp.array([[False, True, True, False, True]])
  got = bd3lm_sampling.commit("left_to_right", 0, 5, later, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[False, True, False, False, False]])
  got = bd3lm_sampling.commit("left_to_right", 1, 3, later, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[False, True, True, False, False]])
  # dilated over the 4 open positions 0, 1, 3, 4 (ranks 0..3, places 0, 2, 1, 3): 0, 3, 1, 4
  got = bd3lm_sampling.commit("dilated", 1, 3, masked, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[True, False, False, True, False]])   # 0 and 3
  got = bd3lm_sampling.commit("dilated", 0, 5, later, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[False, True, False, False, False]])
  got = bd3lm_sampling.commit("dilated", 1, 3, later, conf, key, threshold=0.9)
  np.testing.assert_array_equal(got, [[False, True, False, False, True]])   # 1 and 4 of 1, 2, 4
  # later in a block: the order stays the one over the positions open at its first step
  got = bd3lm_sampling.commit("dilated", 1, 3, later, conf, key, threshold=0.9,
                              open_BxL=jnp.ones((1, 5), bool))   # places 0, 4, 2, 6, 1
  np.testing.assert_array_equal(got, [[False, False, True, False, True]])   # 4 and 2
  one = jnp.arange(6)[None] == 3   # place 6 in a block of 6: still before the unmasked
  got = bd3lm_sampling.commit("dilated", 0, 4, one, jnp.zeros((1, 6)), key, threshold=0.9)
  np.testing.assert_array_equal(got, one)
  picks = np.array([np.asarray(bd3lm_sampling.commit("random", 1, 3, masked, conf,
                                                     jax.random.key(s), threshold=0.9))[0]
                    for s in range(400)])
  assert np.all(picks.sum(1) == 2) and not picks[:, 2].any()   # ceil(4 / 2) masked ones
  np.testing.assert_allclose(picks[:, [0, 1, 3, 4]].mean(0), 0.5, atol=0.08)   # uniformly
  # fewer steps than positions: the threshold's passing ones, topped up to ceil(masked /
  # steps left) in the fallback's order; more passing than that: every one of them
  top_up = lambda c, k, steps, fb: np.asarray(bd3lm_sampling.commit(
      "threshold", k, steps, masked, jnp.log(jnp.array([c])), key, threshold=0.9,
      fallback=fb))[0].tolist()
  some = [0.3, 0.95, 0.99, 0.4, 0.5]   # 1 passes of the 4 masked (0, 1, 3, 4)
  assert top_up(some, 0, 2, "confident") == [False, True, False, False, True]
  assert top_up(some, 0, 2, "left_to_right") == [True, True, False, False, False]
  assert top_up(some, 0, 2, "dilated") == [True, True, False, False, False]
  assert top_up(some, 0, 1, "dilated") == [True, True, False, True, True]   # the last step
  assert top_up(some, 0, 4, "dilated") == [False, True, False, False, False]   # 1 passes
  assert top_up([0.3, 0.95, 0.99, 0.2, 0.1], 1, 4, "dilated") == [True, True, False, False,
                                                                     False]   # ceil(4/3) = 2
  other = [0.95, 0.3, 0.99, 0.2, 0.4]   # 0 passes; each order tops up a different one
  assert top_up(other, 0, 2, "confident") == [True, False, False, False, True]
  assert top_up(other, 0, 2, "left_to_right") == [True, True, False, False, False]
  assert top_up(other, 0, 2, "dilated") == [True, False, False, True, False]
  assert top_up([0.92, 0.95, 0.99, 0.91, 0.1], 0, 2, "dilated") == [True, True, False, True,
                                                                     False]
  nothing = [0.3, 0.5, 0.99, 0.4, 0.2]
  assert top_up(nothing, 0, 2, "dilated") == [True, False, False, True, False]   # 0 and 3
  assert top_up(nothing, 1, 3, "left_to_right") == [True, True, False, False, False]
  # each row tops up against its own passing positions, not the batch's
  rows = jnp.log(jnp.array([[0.95, 0.99, 0.3, 0.4], [0.3, 0.2, 0.4, 0.5]]))
  got = bd3lm_sampling.commit("threshold", 0, 2, jnp.ones((2, 4), bool), rows, key,
                              threshold=0.9, fallback="dilated")
  np.testing.assert_array_equal(got, [[True, True, False, False], [True, False, True, False]])
  reveal = np.mean([np.asarray(bd3lm_sampling.commit(
      "ancestral", 1, 4, jnp.ones((1, 400), bool), jnp.zeros((1, 400)), jax.random.key(s),
      threshold=0.9)) for s in range(20)])
  np.testing.assert_allclose(reveal, (0.75 - 0.5) / 0.75, atol=0.02)


def test_dilated_order_is_coarse_to_fine():
  """In a block of 2^m, the first 2^j places of the order hold exactly the multiples of
  2^(m - j): each step's positions lie as far apart as the count allows."""
  for m in range(5):
    n = 2 ** m
    place = np.asarray(bd3lm_sampling.dilated_order(n))
    open_ = np.zeros((1, n + 3), bool)
    open_[0, 3:] = True   # the same order over n open positions after 3 closed ones
    np.testing.assert_array_equal(bd3lm_sampling.dilated_places(jnp.asarray(open_))[0, 3:],
                                  place)
    np.testing.assert_array_equal(np.sort(place), np.arange(n))
    for j in range(m + 1):
      np.testing.assert_array_equal(np.flatnonzero(place < 2 ** j),
                                    np.arange(0, n, n >> j), err_msg=f"n={n}, j={j}")


@pytest.mark.parametrize("rule,noised_layers,scan", [
    ("confidence", 0, False), ("threshold", 0, False), ("ancestral", 0, False),
    ("random", 0, False), ("left_to_right", 0, False), ("dilated", 0, False),
    ("confidence", 1, False), ("dilated", 1, False), ("dilated", 1, True)])
def test_cached_sampler_equals_reencoding(make_config, rule, noised_layers, scan):
  """Token for token (a large init makes every draw depend on what the network reads); with
  the block entering at the last layer, unrolled and scanned."""
  obj, model = make(make_config, block_size=4, init_std=0.5, noised_layers=noised_layers,
                    **{"model.scan_layers": scan})
  prompt = jnp.asarray(np.array([[BOS, 40, 41, 42, 43, 44]] * 3, np.int32))
  run = lambda cache: obj.generate_blocks(model, prompt, jax.random.key(3), sampler=rule,
                                          steps=3, max_new_tokens=20, temperature=1.0,
                                          threshold=0.05, kv_cache=cache)
  (a, ia), (b, ib) = run(True), run(False)
  np.testing.assert_array_equal(a, b)
  assert int(ia["calls"]) == int(ib["calls"])
  np.testing.assert_array_equal(a[:, :6], prompt)
  assert a.shape == (3, 26)
  assert int(ia["blocks"]) >= 1


class Logits:
  """The wrapped model (its cache and layers) with its logits replaced by `fn(model, h)`."""

  def __init__(self, model, fn):
    self.model, self.fn = model, fn

  def __getattr__(self, name):
    return getattr(self.model, name)

  def logits(self, h):
    return self.fn(self.model, h)


def ends_at(model, bias):
  """The model's logits with EOS favoured by `bias` (a scalar, or (B, 1): per row)."""
  return Logits(model, lambda m, h: m.logits(h).at[..., EOS].add(bias))


def fixed(model, logits_V):
  """`logits_V` at every position."""
  return Logits(model, lambda m, h: jnp.broadcast_to(logits_V, h.shape[:-1] + logits_V.shape))


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("rule,steps,read", [("dilated", 2, 2), ("left_to_right", 3, 2),
                                             ("random", 2, 4), ("threshold", 2, 4)])
def test_position_rules_form_logits_only_where_they_commit(make_config, kv_cache, rule, steps,
                                                           read):
  """`left_to_right` and `dilated` know which positions a step commits before its call: every
  call forms the logits (and the cached last layer) at the most a step of a block of 4
  commits (2 in 2 or 3 steps), the other rules at the whole block."""
  obj, model = make(make_config, block_size=4)
  shapes = set()
  model = Logits(model, lambda m, h: shapes.add(h.shape) or m.logits(h))
  out, _ = obj.generate_blocks(model, jnp.full((2, 1), BOS, jnp.int32), jax.random.key(0),
                               sampler=rule, steps=steps, max_new_tokens=10, kv_cache=kv_cache)
  assert shapes == {(2, read, model.cfg.d_model)}
  assert not np.any(np.asarray(out) == MASK)


@pytest.mark.slow
def test_generate_passes_every_option_to_the_block_sampler(make_config):
  """`generate` (what tools/sample.py and the gen-PPL task call) is the block sampler's
  tokens for the same options and defaults."""
  obj, model = make(make_config, block_size=4, init_std=0.5)
  prompt = jnp.asarray(np.array([[BOS, 40, 41], [BOS, 50, 61]], np.int32))
  kw = {"temperature": 0.5, "steps": 2}   # the filters at their defaults
  want = obj.generate_blocks(model, prompt, jax.random.key(2), max_new_tokens=9, **kw)[0]
  got = obj.generate(model, prompt, jax.random.key(2), max_new_tokens=9, **kw)
  np.testing.assert_array_equal(got, want)
  assert got.shape == (2, 12)


def test_sampler_options_are_checked(make_config):
  obj, model = make(make_config, block_size=4)
  prompt = jnp.full((1, 1), BOS, jnp.int32)
  run = lambda **kw: bd3lm_sampling.generate(
      model, prompt, jax.random.key(0), **{"block_size": 4, "rule": "random", "steps": 4,
                                           "max_new_tokens": 4, **kw})
  for kw, message in [({"rule": "greedy"}, "--sampler='greedy' is unknown for bd3lm"),
                      ({"steps": 0}, "steps=0 must be >= 1"),
                      ({"fallback": "best"}, "fallback='best' must be one of \\('confident'"),
                      ({"threshold": 0.0}, r"--threshold=0.0 must be in \(0, 1\]"),
                      ({"threshold": 1.5}, r"--threshold=1.5 must be in \(0, 1\]")]:
    with pytest.raises(ValueError, match=message):
      run(**kw)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache,p,new,rule,size,steps,noised_layers", [
    (True, 6, 18, "confidence", 4, 2, 0), (False, 6, 18, "confidence", 4, 2, 0),
    (True, 2, 6, "confidence", 4, 2, 0), (True, 6, 6, "left_to_right", 4, 2, 0),
    (True, 1, 11, "dilated", 4, 2, 0), (True, 1, 15, "dilated", 8, 4, 0),
    (True, 6, 18, "confidence", 4, 2, 1), (False, 1, 11, "dilated", 4, 2, 1)])
def test_greedy_sampler_reads_the_training_conditionals(make_config, kv_cache, p, new, rule,
                                                         size, steps, noised_layers):
  """Greedy decoding, two steps a block of 4 (four a block of 8), replayed with the training
  forward (`noised_logits` on x_t ⊕ x_0, the block-causal mask) on the row the sampler builds:
  the prompt left-padded with PAD (a segment of its own) to end at a block's end, then whole
  blocks, the positions past the cap left MASK. Each step's tokens are the argmax of the
  logits training gives the block's noised state after the clean blocks before it, and its
  positions the most confident (`confidence`), the leftmost (`left_to_right`) or the first
  in the order 0, 2, 1, 3 (`dilated`; over a last block's 3 positions before the cap: 0, 2,
  1; a block of 8 keeps the order of its first step's open positions) masked ones. A
  sampler that read a different context (a shifted position, the padding, a block's own
  clean keys, a later block, the other row) than the loss trains on would decode other
  tokens. Two blocks in all (p=2, new=6): the second block's first logits come from the call
  that writes the first. With `noised_layers` the block enters the last layer only, in
  training and in sampling."""
  obj, model = make(make_config, block_size=size, init_std=0.5, noised_layers=noised_layers)
  model = ends_at(model, -100.0)    # no EOS: every block is decoded
  prompt = jnp.asarray(np.array([[BOS, 40, 41, 42, 43, 44], [BOS, 50, 61, 52, 63, 54]],
                                np.int32)[:, :p])
  out, info = obj.generate_blocks(model, prompt, jax.random.key(0), sampler=rule,
                                  steps=steps, max_new_tokens=new, temperature=0.0,
                                  kv_cache=kv_cache)
  out = np.asarray(out)
  pad, blocks = -p % size, -(-new // size)
  width = pad + p + blocks * size
  cap = pad + p + new
  row = np.full((2, width), MASK)
  row[:, :pad], row[:, pad:cap] = PAD, out
  batch = {"inputs": jnp.asarray(row), "positions": jnp.broadcast_to(jnp.arange(width),
                                                                        row.shape),
           "segment_ids": jnp.asarray(np.broadcast_to(np.arange(width) >= pad, row.shape),
                                      jnp.int32)}
  x_t = np.where(np.arange(width) >= pad + p, MASK, row)
  wanted = np.arange(width) < cap
  for blk in range((pad + p) // size, width // size):
    cols = slice(blk * size, (blk + 1) * size)
    dilated = np.full((2, size), 99)   # each open position's place, by its rank among them
    for places, opened in zip(dilated, (x_t[:, cols] == MASK) & wanted[cols]):
      places[opened] = {8: [0, 4, 2, 6, 1, 5, 3, 7], 7: [0, 4, 2, 6, 1, 5, 3], 4: [0, 2, 1, 3],
                        3: [0, 2, 1], 2: [0, 1], 1: [0], 0: []}[opened.sum()]
    for k in range(steps):
      logp = jax.nn.log_softmax(obj.noised_logits(model, batch, jnp.asarray(x_t))[:, cols])
      tok, conf = np.asarray(jnp.argmax(logp, -1)), np.asarray(jnp.max(logp, -1))
      masked = (x_t[:, cols] == MASK) & wanted[cols]
      count = -(-masked.sum(1) // (steps - k))
      score = {"confidence": -conf, "left_to_right": np.arange(size) + 0 * conf,
               "dilated": dilated + 0 * conf}[rule]
      rank = np.argsort(np.argsort(np.where(masked, score, np.inf), axis=1), axis=1)
      chosen = masked & (rank < count[:, None])
      x_t[:, cols] = np.where(chosen, tok, x_t[:, cols])
  np.testing.assert_array_equal(x_t[:, pad:cap], out)
  assert int(info["calls"]) == steps * blocks
  assert len(np.unique(out[:, p:])) > 4   # not one token repeated: the test can tell


def test_threshold_gates_on_the_top_probability_not_on_the_draw(make_config):
  """Every position puts 0.95 on token 40 and 0.05 on token 50. At threshold 0.9 the first
  call commits the block's 3 masked positions (the cap cuts the 4th) whatever was drawn
  there, so the committed tokens keep the model's 5% of 50s (a gate on the drawn token's
  probability would hold the 50s back and re-draw them); at 0.96 and at 1 nothing passes,
  and one position a call is committed."""
  obj, model = make(make_config, block_size=4)
  v = obj.vocab_size
  probs = np.full(v, 1e-30)
  probs[40], probs[50] = 0.95, 0.05
  fixed_model = fixed(model, jnp.asarray(np.log(probs), jnp.float32))
  prompt = jnp.full((400, 1), BOS, jnp.int32)
  run = lambda thr, fallback="confident": obj.generate_blocks(
      fixed_model, prompt, jax.random.key(1), max_new_tokens=3, steps=4, sampler="threshold",
      temperature=1.0, threshold=thr, fallback=fallback)
  out, info = run(0.9)
  assert int(info["calls"]) == 1   # the prompt's call gives the first logits; nothing more
  made = np.asarray(out)[:, 1:]
  assert set(np.unique(made)) == {40, 50}
  np.testing.assert_allclose(np.mean(made == 50), 0.05, atol=0.02)   # 1200 draws
  for thr, fallback in [(0.96, "confident"), (0.96, "random"), (1.0, "confident")]:
    out, info = run(thr, fallback)
    assert int(info["calls"]) == 3
    np.testing.assert_allclose(np.mean(np.asarray(out)[:, 1:] == 50), 0.05, atol=0.02)
  # 2 steps for the 3 masks: nothing passes 0.96, the floor commits ceil(3 / 2), then the last
  out, info = obj.generate_blocks(fixed_model, prompt, jax.random.key(1), max_new_tokens=3,
                                  steps=2, sampler="threshold", threshold=0.96,
                                  fallback="dilated")
  assert int(info["calls"]) == 2
  np.testing.assert_allclose(np.mean(np.asarray(out)[:, 1:] == 50), 0.05, atol=0.02)
  # a cap that cuts a block: only its positions before the cap are drawn, one call for one
  out, info = obj.generate_blocks(fixed_model, prompt, jax.random.key(1), max_new_tokens=5,
                                  steps=4, sampler="random")
  assert int(info["calls"]) == 5 and out.shape == (400, 6)
  assert set(np.unique(np.asarray(out)[:, 1:])) == {40, 50}


@pytest.mark.parametrize("filters,want", [
    ({"top_k": 3}, {40: 0.5 / 0.95, 41: 0.3 / 0.95, 42: 0.15 / 0.95}),
    ({"top_p": 0.7}, {40: 0.5 / 0.8, 41: 0.3 / 0.8}),   # the smallest set reaching 0.7
    ({"min_p": 0.2}, {40: 0.5 / 0.95, 41: 0.3 / 0.95, 42: 0.15 / 0.95}),   # p >= 0.1
    ({"temperature": 0.5}, {40: 25 / 36.5, 41: 9 / 36.5, 42: 2.25 / 36.5,
                            50: 0.25 / 36.5})])   # p^2, renormalised
def test_block_sampler_draws_with_every_filter(make_config, filters, want):
  """Every position puts 0.5, 0.3, 0.15, 0.05 on tokens 40, 41, 42, 50: the committed tokens'
  frequencies are the filtered distribution, worked out by hand (1200 draws)."""
  obj, model = make(make_config, block_size=4)
  probs = np.full(obj.vocab_size, 1e-30)
  probs[[40, 41, 42, 50]] = 0.5, 0.3, 0.15, 0.05
  fixed_model = fixed(model, jnp.asarray(np.log(probs), jnp.float32))
  out, _ = obj.generate_blocks(fixed_model, jnp.full((400, 1), BOS, jnp.int32),
                               jax.random.key(3), max_new_tokens=3, steps=2,
                               sampler="dilated", **filters)
  made = np.asarray(out)[:, 1:]
  assert set(np.unique(made)) == set(want)
  for tok, p in want.items():
    np.testing.assert_allclose(np.mean(made == tok), p, atol=0.04)


def test_sampler_stops_at_eos_and_pads_after_it(make_config):
  obj, model = make(make_config, block_size=4)
  prompt = jnp.full((2, 1), BOS, jnp.int32)
  out, info = obj.generate_blocks(ends_at(model, 100.0), prompt, jax.random.key(0),
                                  max_new_tokens=40, steps=4, sampler="random")
  assert int(info["blocks"]) == 1
  assert int(info["calls"]) == 4   # the block after BOS's (padded) one: 4 masks, one a call
  assert np.all(np.asarray(out[:, 1]) == EOS) and np.all(np.asarray(out[:, 2:]) == PAD)
  out, info = obj.generate_blocks(ends_at(model, -100.0), prompt, jax.random.key(0),
                                  max_new_tokens=40, steps=4, sampler="random")
  assert int(info["blocks"]) == 10 and not np.any(np.asarray(out) == PAD)
  # a whole block of prompt: the EOS written at the next block's first position ends it
  prompt = jnp.asarray(np.array([[BOS, 40, 41, 42]] * 2, np.int32))
  out, info = obj.generate_blocks(ends_at(model, 100.0), prompt, jax.random.key(0),
                                  max_new_tokens=40, steps=4, sampler="random")
  assert int(info["blocks"]) == 1
  assert np.all(np.asarray(out[:, 4]) == EOS) and np.all(np.asarray(out[:, 5:]) == PAD)
  # a row that ends leaves the others running: EOS favoured in row 0 only
  row0 = ends_at(model, jnp.array([[100.0], [-100.0]]))   # (B, 1): per row
  out, info = obj.generate_blocks(row0, jnp.full((2, 1), BOS, jnp.int32), jax.random.key(0),
                                  max_new_tokens=40, steps=4, sampler="random")
  out = np.asarray(out)
  assert int(info["blocks"]) == 10
  assert out[0, 1] == EOS and np.all(out[0, 2:] == PAD)
  assert not np.any(out[1] == PAD) and not np.any(out[1] == EOS)
  # an EOS inside the prompt is the user's text: it neither stops nor truncates the row
  prompt = jnp.asarray(np.array([[BOS, 40, 41, 42, 43, EOS]] * 2, np.int32))
  out, info = obj.generate_blocks(ends_at(model, -100.0), prompt, jax.random.key(0),
                                  max_new_tokens=10, steps=4, sampler="random")
  assert int(info["blocks"]) == 3
  np.testing.assert_array_equal(out[:, :6], prompt)
  assert not np.any(np.asarray(out) == PAD)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_threshold_one_is_one_position_a_call_by_the_fallback(make_config, temperature):
  """At threshold 1 nothing passes, so each call commits the fallback's one position: the
  uniformly chosen one is the `random` rule with one step a position, token for token (the
  same keys); the most confident one, greedily, is the greedy `confidence` rule's."""
  obj, model = make(make_config, block_size=4, init_std=0.5)
  prompt = jnp.asarray(np.array([[BOS, 40, 41], [BOS, 50, 61]], np.int32))
  run = lambda rule, **kw: np.asarray(obj.generate_blocks(
      model, prompt, jax.random.key(5), sampler=rule, steps=4, max_new_tokens=13,
      temperature=temperature, **kw)[0])
  by_random = run("threshold", threshold=1.0, fallback="random")
  np.testing.assert_array_equal(by_random, run("random"))
  if temperature == 0.0:
    by_confidence = run("threshold", threshold=1.0, fallback="confident")
    np.testing.assert_array_equal(by_confidence, run("confidence"))
    assert np.any(by_confidence != by_random)   # the two orders differ, so does the text
