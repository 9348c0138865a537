"""Prompt/answer rows (`sft_pairs`, `star_graph`) for the objectives that insert tokens: the
prompt stays on every training canvas and is never a target nor scored."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.objectives import blm
from mdlm_jax.objectives import insertion


def prompted_batch():
  rng = np.random.default_rng(0)
  b, t, p = 3, 16, 5  # BOS + 4 prompt tokens, an answer of 3..8 tokens, EOS, padding
  x = np.full((b, t), tokenizers.PAD, np.int32)
  seg, prompt = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  answers = [3, 8, 5]
  for r, a in enumerate(answers):
    n = p + a + 1
    x[r, :n] = np.concatenate([[tokenizers.BOS], rng.integers(20, 200, n - 2), [tokenizers.EOS]])
    seg[r, :n], prompt[r, :p] = 1, 1
  pos = np.where(seg > 0, np.arange(t), 0)
  return ({"inputs": jnp.asarray(x), "segment_ids": jnp.asarray(seg),
           "positions": jnp.asarray(pos), "prompt_mask": jnp.asarray(prompt)}, p, answers)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blm", "insertion"])
def test_the_prompt_stays_on_every_canvas_and_only_the_answer_is_scored(make_config, name):
  batch, p, answers = prompted_batch()
  lib = {"blm": blm, "insertion": insertion}[name]
  # the answer's tokens between the prompt and EOS are the words (insertion also keeps the
  # segment's last token, EOS here, as an anchor)
  np.testing.assert_array_equal(np.asarray(lib.words(batch)).sum(1), answers)
  x = np.asarray(batch["inputs"])
  for seed in range(20):
    keep = lib.draw_keep(jax.random.key(seed), batch)[0]
    canvas = lib.canvas_of(batch, keep)[0]["inputs"]
    np.testing.assert_array_equal(np.asarray(canvas)[:, :p], x[:, :p])
  cfg = make_config({"objective.name": name, "data.name": "sft_pairs"})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  from flax import nnx
  model = obj.build(nnx.Rngs(0))
  sums = obj.eval_sums(model, batch, jax.random.key(0))
  assert float(sums["tokens"]) == sum(answers)
  num, den, _ = obj.loss_sums(model, batch, jax.random.key(1))
  assert np.isfinite(float(num)) and float(den) > 0
