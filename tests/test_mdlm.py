"""The `mdlm` and `mlm` objectives: schedules, ELBO weights, masking, losses, the bound."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import positions_of
from helpers import sft_config
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import base
from mdlm_jax.objectives import mdlm
from mdlm_jax.objectives import mlm

MASK = tokenizers.MASK
SCHEDULES = ("linear", "cosine", "poly2", "poly0.5")


def make(make_config, name="mdlm", **opts):
  cfg = make_config({"objective.name": name, **{f"objective.{k}": v for k, v in opts.items()}})
  return objectives.create(cfg, tokenizers.get_tokenizer("bytes"))


def packed_batch(seed=0, b=4, t=24):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(tokenizers.NUM_SPECIAL, 40, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, 10:] = 2
  seg[1, 18:] = 0
  inputs[:, 0] = tokenizers.BOS
  inputs[0, 10] = tokenizers.BOS
  pos = positions_of(seg)
  return {"inputs": jnp.asarray(inputs), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos)}


class TableModel:
  """logits[b, t] = table[b, t] + 3 * onehot(x_t): depends on its input, no network."""

  def __init__(self, table):
    self.table = table

  def __call__(self, x, positions, segment_ids):
    del positions, segment_ids
    return self.table + 3.0 * jax.nn.one_hot(x, self.table.shape[-1])


# ---------------------------------------------------------------- schedules and weights
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_fraction_runs_from_0_to_1_and_its_slope_is_the_derivative(schedule):
  m0, _ = mdlm.mask_fraction(schedule, jnp.asarray(0.0))
  m1, _ = mdlm.mask_fraction(schedule, jnp.asarray(1.0))
  np.testing.assert_allclose([m0, m1], [0.0, 1.0], atol=1e-6)
  t = jnp.linspace(0.05, 0.95, 19, dtype=jnp.float32)
  m, dm = mdlm.mask_fraction(schedule, t)
  h = 1e-3
  m_hi, m_lo = mdlm.mask_fraction(schedule, t + h)[0], mdlm.mask_fraction(schedule, t - h)[0]
  numeric = (m_hi - m_lo) / (2 * h)
  np.testing.assert_allclose(dm, numeric, rtol=2e-3)
  assert np.all(np.diff(np.asarray(m)) > 0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_elbo_weight_is_positive_and_equals_minus_alpha_slope_over_mask_prob(make_config, schedule):
  obj = make(make_config, schedule=schedule, eps=1e-3)
  t = jnp.linspace(0.01, 0.99, 50)   # (cosine's weight reaches 0 at t = 1, where alpha' = 0)
  w = mdlm.elbo_weight(obj.opts, t)
  assert np.all(np.asarray(w) > 0), "the ELBO weight must be positive"
  with jax.enable_x64(True):   # float64 central differences
    h = 1e-6
    alpha = lambda s: 1.0 - mdlm.mask_prob(obj.opts, s)
    inner = jnp.asarray(np.asarray(t), jnp.float64)
    ref = -(alpha(inner + h) - alpha(inner - h)) / (2 * h) / (1.0 - alpha(inner))
    np.testing.assert_allclose(mdlm.elbo_weight(obj.opts, inner), ref, rtol=1e-5)
  if schedule == "linear":
    np.testing.assert_allclose(w, 1.0 / t, rtol=1e-5)


def test_discrete_weight_is_the_t_step_formula_and_tends_to_the_continuous_one(make_config):
  obj = make(make_config, schedule="cosine", discrete_steps=10)
  t = jnp.arange(1, 11) / 10.0
  p = lambda s: np.asarray(mdlm.mask_prob(obj.opts, jnp.asarray(s)))
  want = 10 * (p(t) - p(t - 0.1)) / p(t)
  np.testing.assert_allclose(mdlm.elbo_weight(obj.opts, t), want, rtol=1e-5)
  fine = make(make_config, schedule="cosine", discrete_steps=100000)
  cont = make(make_config, schedule="cosine")
  with jax.enable_x64(True):
    ts = jnp.asarray([0.3, 0.5, 0.8], jnp.float64)
    np.testing.assert_allclose(mdlm.elbo_weight(fine.opts, ts), mdlm.elbo_weight(cont.opts, ts),
                               rtol=1e-4)


def test_llada_mask_prob_and_weight(make_config):
  obj = make(make_config, llada=True, eps=1e-3)
  t = jnp.asarray([0.0, 0.5, 1.0])
  np.testing.assert_allclose(mdlm.mask_prob(obj.opts, t), [1e-3, 1e-3 + 0.999 * 0.5, 1.0],
                             rtol=1e-6)


# ---------------------------------------------------------------- times and masking
def test_antithetic_times_cover_the_unit_interval_evenly():
  b = 16
  t = np.sort(np.asarray(mdlm.sample_times(jax.random.key(3), b, True, 0.0, 0)))
  np.testing.assert_allclose(np.diff(t), 1.0 / b, atol=1e-5)
  assert 0.0 < t[0] <= 1.0 / b + 1e-6 and t[-1] <= 1.0
  t_min = np.asarray(mdlm.sample_times(jax.random.key(3), b, True, 0.2, 0))
  assert t_min.min() > 0.2 and t_min.max() <= 1.0
  d = np.asarray(mdlm.sample_times(jax.random.key(4), b, True, 0.0, 8))
  np.testing.assert_allclose(np.sort(d), np.repeat(np.arange(1, 9) / 8, 2), atol=1e-6)


def test_bernoulli_and_exact_count_masking():
  b, t = 4, 2000
  eligible = jnp.ones((b, t), bool).at[:, :100].set(False)
  p = jnp.asarray([0.0, 0.1, 0.5, 0.9])
  m = np.asarray(mdlm.choose_masked(jax.random.key(0), eligible, p, exact=False))
  assert not m[:, :100].any()
  n = t - 100
  for i, pi in enumerate(np.asarray(p)):
    assert abs(m[i].sum() - pi * n) <= 4 * math.sqrt(n * pi * (1 - pi)) + 1e-9
  e = np.asarray(mdlm.choose_masked(jax.random.key(0), eligible, p, exact=True))
  assert not e[:, :100].any()
  assert e.sum(1).tolist() == [max(math.ceil(pi * n), 1) for pi in [0.0, 0.1, 0.5, 0.9]]


def test_bos_and_padding_are_never_masked():
  batch = packed_batch()
  eligible = np.asarray(mdlm.maskable(batch))
  inputs, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
  np.testing.assert_array_equal(eligible, (seg > 0) & (inputs != tokenizers.BOS))


def test_augmentation_proportions_and_coin_flips():
  b, t, vocab = 8, 512, 264
  x = jnp.full((b, t), 100, jnp.int32)
  masked = jnp.ones((b, t), bool)
  regimes, keep_frac, rand_frac = set(), [], []
  for seed in range(40):
    out = np.asarray(mdlm.augment(jax.random.key(seed), x, masked, 0.15, 0.10, vocab))
    kept, mask = (out == 100).mean(), (out == MASK).mean()
    rand = 1.0 - kept - mask
    # (a random token equals the original one time in 256: count a regime from 5% up)
    regimes.add((bool(kept > 0.05), bool(rand > 0.05)))
    if kept > 0.05:
      keep_frac.append(kept)
    if rand > 0.05:
      rand_frac.append(rand)
      assert out[(out != 100) & (out != MASK)].min() >= tokenizers.NUM_SPECIAL
  assert regimes == {(False, False), (True, False), (False, True), (True, True)}
  # per step: n = 4096 positions; +-4 sigma of a binomial fraction, plus the 1/264 chance that
  # a random token equals the original
  assert all(abs(f - 0.15 - 0.1 / 256) < 4 * math.sqrt(0.15 * 0.85 / 4096) for f in keep_frac)
  assert all(abs(f - 0.10 * (1 - 1 / 256)) < 4 * math.sqrt(0.1 * 0.9 / 4096) for f in rand_frac)
  unmasked = np.asarray(mdlm.augment(jax.random.key(0), x, jnp.zeros((b, t), bool), 0.15, 0.1,
                                     vocab))
  assert (unmasked == 100).all()


def test_crop_turns_the_tail_into_padding():
  batch = packed_batch()
  cut = mdlm.crop(jax.random.key(0), batch, 1.0)
  seg = np.asarray(cut["segment_ids"])
  length = int((seg.max(0) > 0).sum()) if seg[2].min() == 0 else seg.shape[1]
  assert (seg[2, :length] > 0).all() and (seg[2, length:] == 0).all()
  same = mdlm.crop(jax.random.key(0), batch, 0.0)
  np.testing.assert_array_equal(same["segment_ids"], batch["segment_ids"])


# ---------------------------------------------------------------- losses against numpy
def numpy_masked_ce(logits, targets, masked):
  z = np.asarray(logits, np.float64).copy()
  z[..., MASK] = -np.inf
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  ce = lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]
  return np.where(masked, ce, 0.0)


@pytest.mark.parametrize("opts", [
    dict(), dict(schedule="cosine", masking="exact"), dict(weighting="none"),
    dict(llada=True), dict(discrete_steps=16, time_sampling="iid", schedule="poly2")])
@pytest.mark.slow
def test_mdlm_loss_matches_numpy(make_config, opts):
  obj = make(make_config, **opts)
  batch = packed_batch()
  table = jax.random.normal(jax.random.key(1), (4, 24, obj.vocab_size))
  model = TableModel(table)
  rng = jax.random.key(7)
  loss, metrics = obj.loss(model, batch, rng)
  # replay the corruption with the same keys, then compute the loss independently
  o = obj.opts
  keys = mdlm.loss_keys(rng)
  k_t, k_mask = keys["time"], keys["mask"]
  eligible = mdlm.maskable(batch)
  t = mdlm.sample_times(k_t, 4, o.time_sampling == "antithetic", o.t_min, o.discrete_steps)
  masked = np.asarray(mdlm.choose_masked(k_mask, eligible, mdlm.mask_prob(o, t),
                                         o.masking == "exact"))
  assert masked.any()
  x_t = np.where(masked, MASK, np.asarray(batch["inputs"]))
  ce = numpy_masked_ce(model(jnp.asarray(x_t), None, None), batch["inputs"], masked)
  t = np.asarray(t, np.float64)
  if o.weighting == "none":
    want = ce.sum() / masked.sum()
  else:
    if o.llada:
      w = 1.0 / (o.eps + (1 - o.eps) * t)
    elif o.discrete_steps:
      p = lambda s: (1 - o.eps) * s ** 2
      w = o.discrete_steps * (p(t) - p(t - 1 / o.discrete_steps)) / p(t)
    else:
      w = {"linear": 1.0 / t, "cosine": 0.5 * np.pi * np.tan(0.5 * np.pi * (1 - t))}[o.schedule]
    want = (w[:, None] * ce).sum() / np.asarray(eligible).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce_masked"], ce.sum() / masked.sum(), rtol=1e-5)


@pytest.mark.slow
def test_unmasked_positions_and_the_mask_logit_receive_no_gradient(make_config):
  obj = make(make_config)
  batch = packed_batch()
  table = jax.random.normal(jax.random.key(1), (4, 24, obj.vocab_size))
  rng = jax.random.key(3)
  grad = np.asarray(jax.grad(lambda tb: obj.loss(TableModel(tb), batch, rng)[0])(table))
  keys = mdlm.loss_keys(rng)
  k_t, k_mask = keys["time"], keys["mask"]
  t = mdlm.sample_times(k_t, 4, True, obj.opts.t_min, 0)
  masked = np.asarray(mdlm.choose_masked(k_mask, mdlm.maskable(batch),
                                         mdlm.mask_prob(obj.opts, t), False))
  assert np.abs(grad[~masked]).max() == 0.0, "an unmasked position received gradient"
  assert np.abs(grad[masked]).sum(-1).min() > 0
  assert np.abs(grad[..., MASK]).max() == 0.0, "SUBS: MASK is never predicted"


# ---------------------------------------------------------------- self-conditioning, critic
@pytest.mark.slow
def test_self_conditioning_feeds_the_first_pass_states_without_gradient(make_config):
  obj = make(make_config, self_condition_prob=1.0)
  model = obj.build(nnx.Rngs(0))
  batch = packed_batch()
  rng = jax.random.key(3)
  loss, _ = obj.loss(model, batch, rng)
  _, k_t, k_mask, _, _, _ = jax.random.split(rng, 6)
  t = mdlm.sample_times(k_t, 4, True, obj.opts.t_min, 0)
  masked = mdlm.choose_masked(k_mask, mdlm.maskable(batch), mdlm.mask_prob(obj.opts, t), False)
  x_t = jnp.where(masked, MASK, batch["inputs"])
  pos, seg = batch["positions"], batch["segment_ids"]
  h1 = model.run(x_t, pos, seg)[1]
  logits = mdlm.subs_logits(model.run(x_t, pos, seg, h1)[0])
  ce = numpy_masked_ce(logits, batch["inputs"], np.asarray(masked))
  want = (np.asarray(mdlm.elbo_weight(obj.opts, t))[:, None] * ce).sum() / np.asarray(
      mdlm.maskable(batch)).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # with probability 0 the null embedding is used instead, and it is trained
  never = make(make_config, self_condition_prob=1e-9)
  grads = nnx.grad(lambda m: never.loss(m, batch, rng)[0])(model)
  assert np.abs(np.asarray(grads.sc_null[...])).sum() > 0
  grads = nnx.grad(lambda m: obj.loss(m, batch, rng)[0])(model)
  assert np.abs(np.asarray(grads.sc_null[...])).sum() == 0  # the first pass replaced it


@pytest.mark.slow
def test_time_conditioning_feeds_each_row_its_t(make_config):
  obj = make(make_config, time_conditioning=True)
  model = obj.build(nnx.Rngs(0))
  batch = packed_batch()
  x, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  a = model.run(x, pos, seg, t_B=jnp.full((4,), 0.2))[0]
  b = model.run(x, pos, seg, t_B=jnp.asarray([0.2, 0.9, 0.2, 0.2]))[0]
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4, "t must change the output"
  rng = jax.random.key(5)
  loss, _ = obj.loss(model, batch, rng)
  _, k_t, k_mask, _, _, _ = jax.random.split(rng, 6)
  t = mdlm.sample_times(k_t, 4, True, obj.opts.t_min, 0)
  masked = mdlm.choose_masked(k_mask, mdlm.maskable(batch), mdlm.mask_prob(obj.opts, t), False)
  logits = mdlm.subs_logits(model.run(jnp.where(masked, MASK, x), pos, seg, t_B=t)[0])
  ce = numpy_masked_ce(logits, x, np.asarray(masked))
  want = (np.asarray(1.0 / t)[:, None] * ce).sum() / np.asarray(mdlm.maskable(batch)).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.slow
def test_critic_targets_label_generated_tokens_that_differ():
  b, t, v = 4, 64, 30
  inputs = jax.random.randint(jax.random.key(0), (b, t), 8, v)
  masked = jax.random.bernoulli(jax.random.key(1), 0.5, (b, t))
  # logits that favour the original token, but not overwhelmingly: some draws differ
  logits = 2.0 * jax.nn.one_hot(inputs, v) + jax.random.normal(jax.random.key(2), (b, t, v))
  x_gen, labels = mdlm.critic_targets(jax.random.key(3), inputs, masked, logits)
  x_gen, labels, inputs, masked = map(np.asarray, (x_gen, labels, inputs, masked))
  np.testing.assert_array_equal(x_gen[~masked], inputs[~masked])
  np.testing.assert_array_equal(labels, x_gen != inputs)
  assert not labels[~masked].any() and labels[masked].any() and not labels[masked].all()


def test_critic_generator_draws_at_a_uniform_random_temperature():
  """P(x_gen = v) = integral over tau in [0, 1) of softmax(z / tau)_v (Gumbel-max at tau)."""
  v, n = 3, 20000
  z = jnp.asarray([0.0, -0.7, -1.5])
  logits = jnp.broadcast_to(z, (1, 1, v))
  draw = jax.jit(jax.vmap(lambda k: mdlm.critic_targets(
      k, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), logits)[0][0, 0]))
  freq = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), n))), minlength=v) / n
  taus = (np.arange(4000) + 0.5) / 4000
  zt = np.asarray(z)[None] / taus[:, None]
  want = (np.exp(zt - zt.max(1, keepdims=True)) /
          np.exp(zt - zt.max(1, keepdims=True)).sum(1, keepdims=True)).mean(0)
  np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / n))


@pytest.mark.slow
def test_crop_prob_1_trains_on_the_cropped_batch(make_config):
  obj = make(make_config, crop_prob=1.0)
  batch = packed_batch()
  table = jax.random.normal(jax.random.key(1), (4, 24, obj.vocab_size))
  rng = jax.random.key(11)
  cropped = mdlm.crop(mdlm.loss_keys(rng)["crop"], batch, 1.0)
  assert np.asarray(cropped["segment_ids"] == 0).sum() > np.asarray(batch["segment_ids"] == 0).sum()
  plain = make(make_config)
  got = obj.loss_sums(TableModel(table), batch, rng)
  want = plain.loss_sums(TableModel(table), cropped, rng)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["self", "separate"])
def test_critic_loss_is_bce_on_the_generated_sequence(make_config, kind):
  obj = make(make_config, critic=kind, critic_weight=0.5)
  model = obj.build(nnx.Rngs(0))
  batch = packed_batch()
  rng = jax.random.key(4)
  losses, _ = obj.losses(model, batch, rng)
  np.testing.assert_allclose(losses.loss, losses.generator_loss + 0.5 * losses.critic_loss,
                             rtol=1e-6)
  _, k_t, k_mask, _, _, k_critic = jax.random.split(rng, 6)
  eligible = mdlm.maskable(batch)
  t = mdlm.sample_times(k_t, 4, True, obj.opts.t_min, 0)
  masked = mdlm.choose_masked(k_mask, eligible, mdlm.mask_prob(obj.opts, t), False)
  x_t = jnp.where(masked, MASK, batch["inputs"])
  logits, _ = obj.apply(model, x_t, batch["positions"], batch["segment_ids"])
  x_gen, labels = mdlm.critic_targets(k_critic, batch["inputs"], masked, logits)
  z = np.asarray(model.critic(x_gen, batch["positions"], batch["segment_ids"]), np.float64)
  y = np.asarray(labels, np.float64)
  bce = np.logaddexp(0, z) - y * z
  e = np.asarray(eligible)
  np.testing.assert_allclose(losses.critic_loss, bce[e].mean(), rtol=1e-5)
  if kind == "separate":
    assert hasattr(model, "critic_net")


# ---------------------------------------------------------------- the bound
class CopyDenoiser:
  """The exact denoiser of rows [BOS, a, a] with a uniform over K tokens."""

  def __init__(self, k, vocab):
    self.k, self.vocab = k, vocab

  def __call__(self, x, positions, segment_ids):
    del positions, segment_ids
    tokens = jnp.arange(self.vocab)
    real = (tokens >= tokenizers.NUM_SPECIAL) & (tokens < tokenizers.NUM_SPECIAL + self.k)
    uniform = jnp.where(real, 0.0, -1e9)
    other = x[:, jnp.array([0, 2, 1])]  # position 1 sees position 2 and vice versa
    seen = jnp.where(jax.nn.one_hot(other, self.vocab) > 0, 0.0, -1e9)
    return jnp.where((other == MASK)[..., None], uniform, seen)


@pytest.mark.parametrize("schedule,opts", [
    ("linear", {}), ("cosine", {}), ("poly2", {}),
    # alpha(1) = eps > 0 in training: the bound is still complete (evaluated with eps = 0)
    ("cosine", {"eps": 0.5}), ("linear", {"llada": True, "eps": 0.5})])
def test_perfect_denoiser_bound_equals_the_data_entropy(make_config, schedule, opts):
  k, rows = 5, 64
  obj = make(make_config, schedule=schedule, eval_time_samples=400, **{"eps": 0.0, **opts})
  a = np.random.default_rng(0).integers(0, k, rows) + tokenizers.NUM_SPECIAL
  batch = {"inputs": jnp.asarray(np.stack([np.full(rows, tokenizers.BOS), a, a], 1), jnp.int32),
           "segment_ids": jnp.ones((rows, 3), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(3), (rows, 3))}
  nll, tokens, _ = obj.row_bounds(CopyDenoiser(k, obj.vocab_size), batch, jax.random.key(0))
  per_row = np.asarray(nll)
  est, se = per_row.mean(), per_row.std() / math.sqrt(rows)
  # the data entropy of a row is log K (the second token copies the first)
  assert abs(est - math.log(k)) < 4 * se + 1e-3, (est, se, math.log(k))
  assert (np.asarray(tokens) == 2).all()


def test_discrete_bound_of_independent_tokens_equals_their_entropy(make_config):
  """With independent tokens the factorised reverse step is exact, so the T-step bound of the
  exact denoiser (the marginal) equals the entropy exactly, for any T."""
  rows, n = 64, 6
  q = np.array([0.5, 0.3, 0.2])
  obj = make(make_config, discrete_steps=4, eps=0.0, eval_time_samples=300)
  rng = np.random.default_rng(1)
  x = rng.choice(3, (rows, n), p=q) + tokenizers.NUM_SPECIAL
  x[:, 0] = tokenizers.BOS  # a row's first token is never scored
  logits = np.full(obj.vocab_size, -1e9)
  logits[tokenizers.NUM_SPECIAL:tokenizers.NUM_SPECIAL + 3] = np.log(q)
  model = lambda xt, p, s: jnp.broadcast_to(jnp.asarray(logits, jnp.float32),
                                            xt.shape + (obj.vocab_size,))
  batch = {"inputs": jnp.asarray(x, jnp.int32), "segment_ids": jnp.ones((rows, n), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(n), (rows, n))}
  nll, _, _ = obj.row_bounds(model, batch, jax.random.key(2))
  exact = -np.log(q[x[:, 1:] - tokenizers.NUM_SPECIAL]).sum(1)
  diff = np.asarray(nll) - exact
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(rows) + 1e-3


def test_mdlm_scores_exactly_the_tokens_ar_predicts(make_config):
  """Rows continuing a document start without BOS; neither objective scores their first token."""
  from mdlm_jax.objectives import ar
  batch = dict(packed_batch())
  seg = np.asarray(batch["segment_ids"]).copy()
  inputs = np.asarray(batch["inputs"]).copy()
  inputs[2, 0] = 77            # row 2 continues a document from the previous row
  seg[3, :5], seg[3, 5:] = 1, 2  # row 3: a continued segment, then one starting with BOS
  inputs[3, 0], inputs[3, 5] = 78, tokenizers.BOS
  batch.update(inputs=jnp.asarray(inputs), segment_ids=jnp.asarray(seg),
               positions=jnp.asarray(positions_of(seg)))
  _, valid = ar.next_token_targets(batch)
  scored_by_ar = np.roll(np.asarray(valid), 1, axis=1)  # valid[t] scores token t + 1
  np.testing.assert_array_equal(np.asarray(mdlm.maskable(batch)), scored_by_ar)
  obj = make(make_config)
  sums = obj.eval_sums(TableModel(jnp.zeros((4, 24, obj.vocab_size))), batch, jax.random.key(0))
  assert sums["tokens"] == scored_by_ar.sum()


@pytest.mark.slow
@pytest.mark.parametrize("opts", [dict(discrete_steps=4), dict(llada=True, eps=0.1)])
def test_reported_error_is_the_monte_carlo_error_of_the_bound(make_config, opts):
  """Over independent seeds the estimate's spread is the true Monte-Carlo error: the reported
  one matches it and falls as 1/sqrt(K); the spread between rows is reported separately."""
  from mdlm_jax import evaluate
  rows, n, seeds = 32, 6, 60
  q = np.array([0.5, 0.3, 0.2])
  rng = np.random.default_rng(3)
  x = rng.choice(3, (rows, n), p=q) + tokenizers.NUM_SPECIAL
  x[:, 0] = tokenizers.BOS
  logits = np.full(264, -1e9)
  logits[tokenizers.NUM_SPECIAL:tokenizers.NUM_SPECIAL + 3] = np.log(q)
  batch = {"inputs": jnp.asarray(x, jnp.int32), "segment_ids": jnp.ones((rows, n), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(n), (rows, n))}
  reported = {}
  for k in (2, 8):
    obj = make(make_config, eval_time_samples=k, **opts)
    model = lambda xt, p, s: jnp.broadcast_to(jnp.asarray(logits, jnp.float32),
                                              xt.shape + (obj.vocab_size,))
    fn = jax.jit(lambda key: obj.eval_sums(model, batch, key))
    out = [evaluate.summarize({a: float(b) for a, b in fn(jax.random.key(i)).items()})
           for i in range(seeds)]
    losses = np.array([r["eval/loss"] for r in out])
    reported[k] = np.mean([r["eval/loss_stderr"] for r in out])
    assert 0.75 < reported[k] / losses.std(ddof=1) < 1.33, (k, reported[k], losses.std())
    between = np.mean([r["eval/loss_between_rows_stderr"] for r in out])
    assert between > 0 and "between rows" in evaluate.format_line(0, out[0])
  assert 1.6 < reported[2] / reported[8] < 2.5


@pytest.mark.slow
def test_eval_sums_report_the_bound_and_its_standard_error(make_config):
  from mdlm_jax import evaluate
  obj = make(make_config, eval_time_samples=3)
  model = obj.build(nnx.Rngs(0))
  batch = packed_batch()
  sums = jax.device_get(obj.eval_sums(model, batch, jax.random.key(0)))
  nll, tokens, _ = obj.row_bounds(model, batch, jax.random.key(0))
  np.testing.assert_allclose(sums["nll"], np.sum(nll), rtol=1e-6)
  assert sums["tokens"] == np.asarray(mdlm.maskable(batch)).sum() == sums["bytes"]
  r = evaluate.summarize({k: float(v) for k, v in sums.items()})
  ratio = np.asarray(nll) / np.asarray(tokens)
  assert r["eval/loss_stderr"] > 0 and r["eval/loss"] == pytest.approx(sums["nll"] / sums["tokens"])
  # the ratio estimator's standard error is of the order of the per-row spread / sqrt(rows)
  assert 0.2 < r["eval/loss_between_rows_stderr"] / (ratio.std() / 2) < 5


def test_summarize_reports_each_figure_from_its_sums():
  """Every figure `summarize` reports against its definition, from per-row NLLs r_i over n_i
  tokens: the loss sum(r) / sum(n), bits, perplexity (capped at e^50), the Monte-Carlo error
  sqrt(mc_var) / sum(n), the between-rows error of the ratio estimator, and their per-byte
  forms; and the line `format_line` prints."""
  from mdlm_jax import evaluate
  r, n = np.array([90.0, 110.0, 100.0, 0.0]), np.array([30.0, 40.0, 30.0, 0.0])
  real = n > 0
  sums = {"nll": r.sum(), "tokens": n.sum(), "bytes": 150.0, "mc_var": 0.25,
          "rows": float(real.sum()), "nll_sq": (r ** 2).sum(), "nll_tokens": (r * n).sum(),
          "tokens_sq": (n ** 2).sum()}
  got = evaluate.summarize(sums)
  ln2, loss = math.log(2), 3.0
  between = math.sqrt(((r - loss * n)[real] ** 2).sum() * 3 / 2) / 100
  want = {"eval/loss": loss, "eval/bits_per_token": loss / ln2,
          "eval/bits_per_byte": 300 / ln2 / 150, "eval/perplexity": math.exp(3.0),
          "eval/tokens": 100.0, "eval/loss_stderr": 0.5 / 100,
          "eval/bits_per_byte_stderr": 0.5 / 100 * 100 / ln2 / 150,
          "eval/loss_between_rows_stderr": between,
          "eval/bits_per_byte_between_rows_stderr": between * 100 / ln2 / 150}
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12), k
  assert evaluate.format_line(7, got) == (
      f"eval @ step 7: loss 3.0000 ± 0.0050 (± Monte-Carlo error; between rows ± "
      f"{between:.4f}) | bits/token {3 / ln2:.4f} | bits/byte {2 / ln2:.4f} ± "
      f"{0.5 / ln2 / 150:.4f} | 100 tokens")
  # one row scored, one token, one byte: no spread between rows, no division by more than 1
  one = evaluate.summarize({"nll": 60.0, "tokens": 1.0, "bytes": 1.0, "rows": 1.0,
                            "nll_sq": 3600.0, "nll_tokens": 60.0, "tokens_sq": 1.0})
  assert one == {"eval/loss": 60.0, "eval/bits_per_token": 60 / ln2,
                 "eval/bits_per_byte": 60 / ln2, "eval/perplexity": math.exp(50.0),
                 "eval/tokens": 1.0}
  assert evaluate.format_line(0, one) == (f"eval @ step 0: loss 60.0000 | bits/token "
                                          f"{60 / ln2:.4f} | bits/byte {60 / ln2:.4f} | 1 tokens")
  # nothing scored: finite figures; a rounding-negative variance reads as 0
  zero = evaluate.summarize({"nll": 0.0, "tokens": 0.0, "bytes": 0.0, "mc_var": -1e-9})
  assert zero["eval/loss"] == 0.0 and zero["eval/loss_stderr"] == 0.0


def test_bound_error_sums_count_the_rows_that_hold_tokens():
  draws = jnp.asarray([[4.0, 2.0, 0.0, 9.0], [6.0, 2.0, 0.0, 7.0], [5.0, 5.0, 0.0, 8.0]])
  tokens = jnp.asarray([2.0, 1.0, 0.0, 3.0])  # a one-token row and an empty one
  got = jax.device_get(base.bound_error_sums(draws, tokens))
  totals = np.asarray(draws).sum(1)
  nll = np.asarray(draws).mean(0)
  want = {"mc_var": totals.var(ddof=1) / 3, "rows": 3.0, "nll_sq": (nll ** 2).sum(),
          "nll_tokens": (nll * np.asarray(tokens)).sum(), "tokens_sq": 14.0}
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert float(got[k]) == pytest.approx(v, rel=1e-6), k
  assert "mc_var" not in base.bound_error_sums(draws[:1], tokens)  # one draw: no error


@pytest.mark.parametrize("opts", [{}, dict(discrete_steps=4), dict(llada=True)])
def test_each_draw_of_the_bound_spreads_its_times_antithetically(make_config, opts,
                                                                  monkeypatch):
  """Within one draw the rows' times are u + i / B mod 1 (one offset, B equally spaced
  strata; on the grid 1/T .. 1 with T steps), each row scored at its own time, and the draws
  use independent offsets. The scorer returns t^2 for a row at time t: with the linear
  schedule the weight is 1/t in all three forms, so each draw reads t back."""
  obj = make(make_config, eval_time_samples=3, **opts)

  def masked_ce(model, batch, x_t, masked, cond=None, t_B=None):
    return jnp.zeros(masked.shape).at[:, 0].set(t_B ** 2), None
  monkeypatch.setattr(obj, "masked_ce", masked_ce)
  b = 8
  draws, _, _ = obj.bound_draws(None, packed_batch(b=b, t=24), jax.random.key(0))
  t = np.sort(np.asarray(draws), axis=1)
  assert ((t > 0) & (t <= 1)).all()
  if opts.get("discrete_steps"):
    np.testing.assert_allclose(t * 4, np.round(t * 4), atol=1e-5)  # on the grid
    assert all(np.bincount(np.round(r * 4).astype(int), minlength=5)[1:].tolist() == [2] * 4
               for r in t)                                       # two rows per stratum
  else:
    np.testing.assert_allclose(np.diff(t, axis=1), 1 / b, atol=1e-5)
    assert len({round(float(r[0]), 6) for r in t}) == 3  # each draw its own offset


# ---------------------------------------------------------------- mlm
def test_mlm_selection_and_80_10_10():
  b, t, vocab = 8, 4096, 264
  x = jnp.full((b, t), 100, jnp.int32)
  eligible = jnp.ones((b, t), bool).at[:, 0].set(False)
  out, sel = mlm.corrupt(jax.random.key(0), x, eligible, 0.3, vocab)
  out, sel = np.asarray(out), np.asarray(sel)
  n = eligible.sum()
  assert not sel[:, 0].any()
  assert abs(sel.sum() / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
  s = sel.sum()
  frac_mask = (out[sel] == MASK).mean()
  frac_same = (out[sel] == 100).mean()
  assert abs(frac_mask - 0.8) < 4 * math.sqrt(0.16 / s)
  assert abs(frac_same - (0.1 + 0.1 / 256)) < 4 * math.sqrt(0.09 / s)
  assert (out[~sel] == 100).all()


def test_mlm_loss_is_mean_ce_over_selected(make_config):
  obj = make(make_config, name="mlm")
  batch = packed_batch()
  table = jax.random.normal(jax.random.key(1), (4, 24, obj.vocab_size))
  model = TableModel(table)
  loss, _ = obj.loss(model, batch, jax.random.key(5))
  x, sel = mlm.corrupt(jax.random.key(5), batch["inputs"], mdlm.maskable(batch), 0.3,
                       obj.vocab_size)
  z = np.asarray(model(x, None, None), np.float64)
  lse = np.log(np.exp(z).sum(-1))
  ce = lse - np.take_along_axis(z, np.asarray(batch["inputs"])[..., None], -1)[..., 0]
  sel = np.asarray(sel)
  np.testing.assert_allclose(loss, ce[sel].mean(), rtol=1e-5)
  sums = obj.eval_sums(model, batch, jax.random.key(5))
  _, sel15 = mlm.corrupt(jax.random.key(5), batch["inputs"], mdlm.maskable(batch), 0.15,
                         obj.vocab_size)
  assert sums["tokens"] == np.asarray(sel15).sum()


@pytest.mark.parametrize("name,bad,match", [
    ("mdlm", {"schedule": "poly"}, "objective.schedule"),
    ("mdlm", {"schedule": "sqrt"}, "objective.schedule"),
    ("mdlm", {"weighting": "simple"}, "objective.weighting"),
    ("mdlm", {"masking": "topk"}, "objective.masking"),
    ("mdlm", {"llada": True, "schedule": "cosine"}, "objective.llada"),
    ("mdlm", {"llada": True, "discrete_steps": 8}, "objective.discrete_steps=0"),
    ("mdlm", {"no_replace_prob": 0.8, "random_token_prob": 0.5}, "no_replace_prob"),
    ("mdlm", {"meap_mask_ratio": 0.1}, "objective.meap_mask_ratio"),
    ("mdlm", {"critic": "both"}, "objective.critic"),
    ("mdlm", {"self_condition_prob": 1.5}, "objective.self_condition_prob"),
    ("mlm", {"mask_rate": 0.0}, "objective.mask_rate"),
])
def test_bad_options_are_refused(make_config, name, bad, match):
  from mdlm_jax import config as config_lib
  with pytest.raises((ValueError, config_lib.ConfigError), match=match):
    config_lib.validate(make_config({"objective.name": name,
                                     **{f"objective.{k}": v for k, v in bad.items()}}))


@pytest.mark.slow
def test_conditional_bound_of_an_exact_independent_model_is_the_answer_nll(make_config,
                                                                           pairs_glob):
  obj = objectives.create(sft_config(make_config, pairs_glob), tokenizers.get_tokenizer("bytes"))
  rows, t = 32, 10
  q = np.array([0.6, 0.3, 0.1])
  rng = np.random.default_rng(2)
  x = rng.choice(3, (rows, t), p=q) + tokenizers.NUM_SPECIAL
  x[:, 0] = tokenizers.BOS
  pm = (np.arange(t)[None] < rng.integers(2, 6, rows)[:, None]).astype(np.int32)
  logits = np.full(obj.vocab_size, -1e9, np.float32)
  logits[tokenizers.NUM_SPECIAL:tokenizers.NUM_SPECIAL + 3] = np.log(q)
  model = lambda xt, p, s: jnp.broadcast_to(jnp.asarray(logits), xt.shape + (obj.vocab_size,))
  batch = {"inputs": jnp.asarray(x, jnp.int32), "segment_ids": jnp.ones((rows, t), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(t), (rows, t)),
           "prompt_mask": jnp.asarray(pm)}
  nll, n, answer = obj.conditional_bound(model, batch, jax.random.key(0), 64)
  exact = np.where(np.asarray(answer), -np.log(q[np.clip(x - tokenizers.NUM_SPECIAL, 0, 2)]),
                   0).sum(1)
  np.testing.assert_array_equal(np.asarray(n), (1 - pm).sum(1))
  diff = np.asarray(nll) - exact
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(rows) + 1e-3


@pytest.mark.slow
def test_conditional_bound_of_an_exact_copy_model_is_the_answer_entropy(make_config, pairs_glob):
  """Answers [a, a], a uniform over K: the exact model copies a visible twin. With l
  stratified over 1..L the estimate is log K (l = 1 scores 0, l = 2 scores 2 log K); a bound
  that always masked all L would give 2 log K."""
  obj = objectives.create(sft_config(make_config, pairs_glob), tokenizers.get_tokenizer("bytes"))
  k, rows, v = 5, 64, obj.vocab_size
  a = np.random.default_rng(0).integers(0, k, rows) + tokenizers.NUM_SPECIAL
  x = np.stack([np.full(rows, tokenizers.BOS), np.full(rows, 50), a, a], 1).astype(np.int32)

  def model(xt, p, s):
    other = xt[:, jnp.array([0, 1, 3, 2])]
    real = (jnp.arange(v) >= tokenizers.NUM_SPECIAL) & (jnp.arange(v) < tokenizers.NUM_SPECIAL + k)
    seen = jnp.where(jax.nn.one_hot(other, v) > 0, 0.0, -1e9)
    return jnp.where((other == tokenizers.MASK)[..., None], jnp.where(real, 0.0, -1e9), seen)

  batch = {"inputs": jnp.asarray(x), "segment_ids": jnp.ones((rows, 4), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(4), (rows, 4)),
           "prompt_mask": jnp.asarray(np.tile([1, 1, 0, 0], (rows, 1)), jnp.int32)}
  draws, n, _ = obj.conditional_bound(model, batch, jax.random.key(0), 64)
  assert (np.asarray(n) == 2).all()
  np.testing.assert_allclose(np.asarray(draws).mean(), math.log(k), rtol=0.02)


def test_sft_validation_bound_is_the_conditional_bound(make_config, pairs_glob):
  """With `sft` the validation draws are LLaDA's conditional bound itself (same key, K =
  eval_time_samples), and eval_sums averages them over the answer tokens."""
  obj = objectives.create(sft_config(make_config, pairs_glob, eval_time_samples=3),
                          tokenizers.get_tokenizer("bytes"))
  rng = np.random.default_rng(5)
  x = rng.integers(tokenizers.NUM_SPECIAL, 60, (4, 9)).astype(np.int32)
  x[:, 0] = tokenizers.BOS
  pm = (np.arange(9)[None] < np.array([[3], [2], [5], [4]])).astype(np.int32)
  table = jnp.asarray(rng.normal(size=(4, 9, obj.vocab_size)), jnp.float32)
  model = TableModel(table)
  batch = {"inputs": jnp.asarray(x), "segment_ids": jnp.ones((4, 9), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(9), (4, 9)), "prompt_mask": jnp.asarray(pm)}
  key = jax.random.key(3)
  draws, n, answer = obj.bound_draws(model, batch, key)
  want, want_n, want_answer = obj.conditional_bound(model, batch, key, 3)
  assert draws.shape == (3, 4)
  np.testing.assert_allclose(draws, want, rtol=1e-6)
  np.testing.assert_array_equal(n, want_n)
  np.testing.assert_array_equal(answer, want_answer)
  np.testing.assert_allclose(obj.eval_sums(model, batch, key)["nll"], np.asarray(want).mean(0).sum(),
                             rtol=1e-6)
