"""LLaDA SFT: prompt/answer data, the prompt never masked, per-answer normalisation, and the
conditional likelihood bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import sft_config
from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax import trainer
from mdlm_jax.data import pipeline
from mdlm_jax.objectives import mdlm

MASK = tokenizers.MASK
TOK = tokenizers.get_tokenizer("bytes")


def test_pair_rows_are_bos_prompt_answer_eos_padded(make_config, pairs_glob):
  cfg = sft_config(make_config, pairs_glob)
  batch = next(iter(pipeline.train_dataset(cfg, TOK)))
  assert set(batch) == set(pipeline.PROMPT_KEYS)
  for row, pm in zip(batch["inputs"], batch["prompt_mask"]):
    n_prompt = int(pm.sum())
    text = TOK.decode(row[1:n_prompt])
    assert row[0] == tokenizers.BOS and text.endswith("=") and (pm[:n_prompt] == 1).all()
    answer = row[n_prompt:]
    end = int(np.flatnonzero(answer == tokenizers.EOS)[0])
    a, b = map(int, text[:-1].split("+"))
    assert TOK.decode(answer[:end]) == str(a + b)
    assert (answer[end:] == tokenizers.EOS).all()  # the padding is EOS, part of the answer
  assert (batch["segment_ids"] == 1).all()


def test_rows_longer_than_seq_len_are_cut():
  row = pipeline.TokenizePair(TOK, 6)({"prompt": b"abcd", "answer": b"efgh"})
  np.testing.assert_array_equal(row["inputs"], [tokenizers.BOS, *TOK.encode("abcde")])
  np.testing.assert_array_equal(row["prompt_mask"], [1, 1, 1, 1, 1, 0])


def sft_batch(b=4, t=12):
  rng = np.random.default_rng(1)
  x = rng.integers(tokenizers.NUM_SPECIAL, 40, (b, t)).astype(np.int32)
  x[:, 0] = tokenizers.BOS
  prompt_len = np.array([3, 5, 2, 7])
  pm = (np.arange(t)[None] < prompt_len[:, None]).astype(np.int32)
  x[1, 9:] = tokenizers.EOS
  return {"inputs": jnp.asarray(x), "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t), (b, t)), "prompt_mask": jnp.asarray(pm)}


@pytest.mark.slow
def test_sft_never_masks_the_prompt_and_normalises_by_answer_length(make_config, pairs_glob):
  obj = objectives.create(sft_config(make_config, pairs_glob), TOK)
  batch = sft_batch()
  table = jax.random.normal(jax.random.key(0), (4, 12, obj.vocab_size))
  model = lambda x, p, s: table + 3.0 * jax.nn.one_hot(x, obj.vocab_size)
  for seed in range(20):
    rng = jax.random.key(seed)
    loss, _ = obj.loss(model, batch, rng)
    _, k_t, k_mask, _, _, _ = jax.random.split(rng, 6)
    eligible = obj.maskable(batch)
    t = mdlm.sample_times(k_t, 4, True, obj.opts.t_min, 0)
    p = mdlm.mask_prob(obj.opts, t)
    masked = np.asarray(mdlm.choose_masked(k_mask, eligible, p, False))
    assert not (masked & (np.asarray(batch["prompt_mask"]) == 1)).any()
    logits = np.asarray(mdlm.subs_logits(model(jnp.where(masked, MASK, batch["inputs"]), 0, 0)),
                        np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, np.asarray(batch["inputs"])[..., None], -1)[..., 0]
    answer_len = np.asarray(eligible).sum(1)
    want = np.mean((np.where(masked, ce, 0).sum(1) / np.asarray(p)) / answer_len)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.slow
def test_sft_trains_on_pairs_and_needs_them(make_config, pairs_glob, tmp_path):
  cfg = sft_config(make_config, pairs_glob)
  with cfg.unlocked():
    cfg.train.steps = 2
    cfg.eval.every_steps = 2
  out = trainer.train(cfg, str(tmp_path / "wd"), log=lambda _: None)
  assert np.isfinite(out["train/loss"]) and out["eval/tokens"] > 0
  obj = objectives.create(sft_config(make_config, pairs_glob), TOK)
  batch = {k: v for k, v in sft_batch().items() if k != "prompt_mask"}
  with pytest.raises(ValueError, match="data.name=sft_pairs"):
    obj.loss(lambda x, p, s: jnp.zeros(x.shape + (obj.vocab_size,)), batch, jax.random.key(0))
