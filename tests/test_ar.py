"""The `ar` objective (next-token loss, MEAP, z-loss) and the shared sampling primitives."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import positions_of
from mdlm_jax import objectives
from mdlm_jax import sampling
from mdlm_jax import tokenizers
from mdlm_jax.objectives import ar


def packed_batch(seed=0, b=3, t=20):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(tokenizers.NUM_SPECIAL, 40, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, 8:] = 2                 # two documents
  seg[1, 15:] = 0                # padding at the end
  pos = positions_of(seg)
  return {"inputs": jnp.asarray(inputs), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos)}


def objective(make_config, **opts):
  cfg = make_config({f"objective.{k}": v for k, v in opts.items()})
  tok = tokenizers.get_tokenizer("bytes")
  obj = objectives.create(cfg, tok)
  return obj, obj.build(nnx.Rngs(0))


def numpy_next_token_nll(logits, inputs, seg, prompt=None):
  """Independent reference: mean over (t, t+1) pairs inside one real segment (and, given a
  prompt mask, whose target t+1 is not in the prompt)."""
  logits = np.asarray(logits, np.float64)
  total, count = 0.0, 0
  for b in range(inputs.shape[0]):
    for t in range(inputs.shape[1] - 1):
      if prompt is not None and prompt[b, t + 1]:
        continue
      if seg[b, t] > 0 and seg[b, t + 1] == seg[b, t]:
        z = logits[b, t]
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[inputs[b, t + 1]]
        count += 1
  return total / count, count


@pytest.mark.slow
def test_prompt_tokens_are_never_targets(make_config):
  """Prompt/answer rows (SFT pairs, star-graph problems): the loss and the evaluation count the
  answer's tokens only; the prompt is read, never predicted."""
  obj, model = objective(make_config)
  batch = dict(packed_batch())
  pm = np.zeros((3, 20), np.int32)
  pm[0, :5], pm[1, :9], pm[2, :1] = 1, 1, 1
  batch["prompt_mask"] = jnp.asarray(pm)
  loss, _ = obj.loss(model, batch, jax.random.key(0))
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  ref, count = numpy_next_token_nll(logits, np.asarray(batch["inputs"]),
                                    np.asarray(batch["segment_ids"]), pm)
  assert count == (7 - 4) + 11 + (14 - 8) + 19
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  sums = obj.eval_sums(model, batch, jax.random.key(0))
  np.testing.assert_allclose(sums["nll"] / sums["tokens"], ref, rtol=1e-5)
  assert sums["tokens"] == count


def test_next_token_loss_matches_numpy(make_config):
  obj, model = objective(make_config)
  batch = packed_batch()
  loss, metrics = obj.loss(model, batch, jax.random.key(0))
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  ref, count = numpy_next_token_nll(logits, np.asarray(batch["inputs"]),
                                    np.asarray(batch["segment_ids"]))
  assert count == 7 + 11 + 14 + 19  # pairs: row 0 (8-1, 12-1), row 1 (15-1), row 2 (20-1)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  sums = obj.eval_sums(model, batch, jax.random.key(0))
  np.testing.assert_allclose(sums["nll"] / sums["tokens"], ref, rtol=1e-5)
  assert sums["tokens"] == count and sums["bytes"] == count  # every target is one byte


def test_z_loss_adds_its_coefficient_times_mean_squared_logsumexp(make_config):
  obj, model = objective(make_config, z_loss=1e-2)
  batch = packed_batch()
  loss, metrics = obj.loss(model, batch, jax.random.key(0))
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  _, valid = ar.next_token_targets(batch)
  lse = np.asarray(jax.nn.logsumexp(logits, -1))[np.asarray(valid)]
  np.testing.assert_allclose(metrics["z_loss"], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["ce"] + 1e-2 * np.mean(lse ** 2), rtol=1e-6)


def test_meap_masks_floor_ratio_of_eligible_inputs_never_the_last():
  batch = packed_batch(t=40)
  _, eligible = ar.next_token_targets(batch)
  for seed in range(20):
    masked_inputs, masked = ar.meap_mask(batch["inputs"], eligible, 0.15, jax.random.key(seed))
    masked, eligible_np = np.asarray(masked), np.asarray(eligible)
    assert not (masked & ~eligible_np).any(), "masked a position without a target"
    seg = np.asarray(batch["segment_ids"])
    last_of_segment = (seg > 0) & (np.roll(seg, -1, 1) != seg)
    last_of_segment[:, -1] = seg[:, -1] > 0
    assert not (masked & last_of_segment).any(), "masked the last position of a document"
    np.testing.assert_array_equal(masked.sum(1), np.floor(0.15 * eligible_np.sum(1)))
    np.testing.assert_array_equal(np.asarray(masked_inputs)[masked], tokenizers.MASK)
    np.testing.assert_array_equal(np.asarray(masked_inputs)[~masked],
                                  np.asarray(batch["inputs"])[~masked])


def test_meap_loss_keeps_original_next_token_targets(make_config):
  obj, model = objective(make_config, meap_mask_ratio=0.3)
  batch = packed_batch()
  rng = jax.random.key(7)
  loss, _ = obj.loss(model, batch, rng)
  _, eligible = ar.next_token_targets(batch)
  masked_inputs, masked = ar.meap_mask(batch["inputs"], eligible, 0.3, rng)
  assert np.asarray(masked).sum() > 0
  logits = model(masked_inputs, batch["positions"], batch["segment_ids"])
  ref, _ = numpy_next_token_nll(logits, np.asarray(batch["inputs"]),
                                np.asarray(batch["segment_ids"]))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # evaluation never masks
  sums = obj.eval_sums(model, batch, rng)
  clean = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  ref_clean, _ = numpy_next_token_nll(clean, np.asarray(batch["inputs"]),
                                      np.asarray(batch["segment_ids"]))
  np.testing.assert_allclose(sums["nll"] / sums["tokens"], ref_clean, rtol=1e-5)


@pytest.mark.parametrize("bad", [{"meap_mask_ratio": 1.0}, {"z_loss": -1.0}])
def test_bad_ar_options_are_refused(make_config, bad):
  cfg = make_config({f"objective.{k}": v for k, v in bad.items()})
  from mdlm_jax import config as config_lib
  with pytest.raises(ValueError, match="objective." + list(bad)[0]):
    config_lib.validate(cfg)


# ---- sampling primitives ----

def test_top_k_top_p_min_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.asarray(sampling.filter_logits(logits, **kw) > -1e29)[0].tolist()
  assert keep(top_k=2) == [True, True, False, False]
  # top-p keeps the token that crosses the threshold: 0.5 < 0.6 -> 0.8 >= 0.6
  assert keep(top_p=0.6) == [True, True, False, False]
  assert keep(top_p=0.5) == [True, False, False, False]
  assert keep(top_p=0.81) == [True, True, True, False]
  assert keep(min_p=0.5) == [True, True, False, False]   # p >= 0.25
  assert keep(min_p=0.2) == [True, True, True, False]    # p >= 0.1


def test_filters_act_on_the_last_axis_of_every_row():
  """(B, T, V) logits, as the diffusion samplers draw them: each (b, t) row is filtered alone,
  exactly as the same row on its own."""
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)) * 2, jnp.float32)
  for kw in ({"top_k": 2}, {"top_p": 0.7}, {"min_p": 0.3}):
    rows = jnp.stack([sampling.filter_logits(z[i, j][None], **kw)[0]
                      for i in range(2) for j in range(3)]).reshape(z.shape)
    np.testing.assert_array_equal(sampling.filter_logits(z, **kw), rows)


def test_draw_computes_in_float32_whatever_the_logits_dtype():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7)) * 3, jnp.float32)
  z16 = z.astype(jnp.bfloat16)
  tok16, logp16 = sampling.draw(jax.random.key(0), z16, 0.7, top_p=0.9)
  tok32, logp32 = sampling.draw(jax.random.key(0), z16.astype(jnp.float32), 0.7, top_p=0.9)
  assert logp16.dtype == jnp.float32
  np.testing.assert_array_equal(tok16, tok32)
  np.testing.assert_array_equal(logp16, logp32)


def test_sampling_frequencies_and_greedy():
  probs = np.array([0.6, 0.3, 0.1])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
  draws = np.asarray(sampling.sample_logits(jax.random.key(0), logits))
  freq = np.bincount(draws, minlength=3) / len(draws)
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / len(draws)))
  assert (np.asarray(sampling.sample_logits(jax.random.key(0), logits, 0.0)) == 0).all()


def _tempered_then_filtered(probs, temperature, top_p=1.0, min_p=0.0):
  """The exact distribution HF / vLLM sample from: temperature first, then the filters."""
  q = probs ** (1.0 / temperature)
  q = q / q.sum()
  order = np.argsort(-q)
  before = np.cumsum(q[order]) - q[order]
  keep = np.zeros(len(q), bool)
  keep[order[before < top_p]] = True
  keep &= q >= min_p * q.max()
  q = np.where(keep, q, 0.0)
  return q / q.sum()


@pytest.mark.parametrize("temperature,filters", [
    (0.5, {}), (2.0, {}), (0.3, {"top_p": 0.6}), (2.0, {"min_p": 0.5}), (1.5, {"top_p": 0.75})])
def test_draws_follow_the_tempered_then_filtered_distribution(temperature, filters):
  probs = np.array([0.5, 0.3, 0.2])
  n = 40000
  want = _tempered_then_filtered(probs, temperature, **filters)
  logits = jnp.log(jnp.asarray(np.tile(probs, (n, 1)), jnp.float32))
  for draws in (sampling.sample_logits(jax.random.key(1), logits, temperature, **filters),
                # a traced temperature (the annealed samplers)
                jax.jit(lambda t: sampling.draw(jax.random.key(2), logits, t, **filters)[0])(
                    jnp.float32(temperature))):
    freq = np.bincount(np.asarray(draws), minlength=3) / n
    assert (freq[want == 0] == 0).all(), (freq, want)
    np.testing.assert_allclose(freq, want, atol=4.5 * np.sqrt(0.25 / n))


def test_gumbel_has_its_distribution_and_an_untruncated_tail():
  g = np.asarray(sampling.gumbel(jax.random.key(0), (400000,)), np.float64)
  np.testing.assert_allclose(g.mean(), np.euler_gamma, atol=0.01)
  np.testing.assert_allclose(g.var(), math.pi ** 2 / 6, rtol=0.02)
  # P(G > x) = 1 - exp(-exp(-x)); a float32 uniform caps G near 16.6, ours reaches ~44.
  for x in (2.0, 5.0):
    np.testing.assert_allclose((g > x).mean(), -np.expm1(-np.exp(-x)), rtol=0.1)
  zero = jnp.zeros((), jnp.uint32)
  top = float(sampling.gumbel_from_bits(zero, zero))
  assert top > 40.0, top
  assert float(sampling.gumbel_from_bits(zero, jnp.uint32(2 ** 20))) > 30.0


@pytest.mark.slow
def test_generate_keeps_prompt_and_stops_at_eos(make_config):
  obj, model = objective(make_config)
  prompt = jnp.asarray([[tokenizers.BOS, 10, 11, 12]] * 3, jnp.int32)
  # raise EOS's logit so that every row stops early, at different steps
  original = model.logits
  object.__setattr__(model, "logits",
                     lambda h: original(h).at[..., tokenizers.EOS].add(5.0))
  out = np.asarray(obj.generate(model, prompt, jax.random.key(0), max_new_tokens=30,
                                temperature=1.0))
  np.testing.assert_array_equal(out[:, :4], np.asarray(prompt))
  for r in out:
    gen = r[4:]
    eos = np.flatnonzero(gen == tokenizers.EOS)
    assert len(eos), "with EOS strongly favoured every row should stop"
    assert (gen[eos[0] + 1:] == tokenizers.PAD).all(), "tokens after EOS"
    assert (gen[:eos[0]] != tokenizers.PAD).all(), "padding before the row finished"
  greedy = np.asarray(obj.generate(model, prompt, jax.random.key(1), max_new_tokens=8,
                                   temperature=0.0))
  assert (greedy == greedy[0]).all(), "greedy decoding must not depend on the row"


@pytest.mark.slow
def test_sampling_defaults_are_temperature_1_and_no_filter(make_config):
  """The documented defaults: what a caller gets without options is the plain distribution."""
  z = jax.random.normal(jax.random.key(0), (64, 300))
  np.testing.assert_array_equal(sampling.filter_logits(z), z)
  key = jax.random.key(1)
  plain = sampling.sample_logits(key, z, 1.0, 0, 1.0, 0.0)
  np.testing.assert_array_equal(sampling.sample_logits(key, z), plain)
  np.testing.assert_array_equal(sampling.draw(key, z, 1.0)[0], plain)
  _, model = objective(make_config, name="ar")
  prompt = jnp.full((4, 1), tokenizers.BOS, jnp.int32)
  gen = lambda **kw: np.asarray(sampling.generate_ar(model, prompt, jax.random.key(2),
                                                     max_new_tokens=6, **kw))
  np.testing.assert_array_equal(gen(), gen(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
  assert gen().dtype == np.int32
