"""Generation rows fit the model: `canvas_width` is the widest row each objective's `generate`
reads, and a row past model.max_seq_len is what it guards against (NaN logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdlm_jax import objectives
from mdlm_jax import tokenizers


def widest_input(obj, model, p, s, n):
  """The widest row any network call of `generate` receives (a full pass or a KV cache)."""
  widths = []
  cls = type(model)
  real_call, real_cache = cls.__call__, getattr(cls, "init_cache", None)

  def call(self, x, *args, **kwargs):
    widths.append(x.shape[1])
    return real_call(self, x, *args, **kwargs)

  def init_cache(self, batch, length):
    widths.append(length)
    return real_cache(self, batch, length)

  prompt = jnp.full((1, p), 70, jnp.int32).at[:, 0].set(tokenizers.BOS)
  suffix = jnp.full((1, s), 71, jnp.int32) if s else None
  cls.__call__ = call
  if real_cache is not None:
    cls.init_cache = init_cache
  try:
    jax.eval_shape(lambda: obj.generate(model, prompt, jax.random.key(0), max_new_tokens=n,
                                        **({"suffix_BxS": suffix} if s else {})))
  finally:
    cls.__call__ = real_call
    if real_cache is not None:
      cls.init_cache = real_cache
  return max(widths)


@pytest.mark.parametrize("name,over", [("blm", {}), ("insertion", {"objective.fpe": False}),
                                       ("ar", {}), ("ar", {"objective.fim_rate": 0.5}),
                                       ("bd3lm", {"objective.block_size": 16})])
def test_canvas_width_is_the_widest_row_generate_reads(make_config, name, over):
  cfg = make_config({"objective.name": name, **over})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  model = obj.build(nnx.Rngs(0))
  for p, s, n in ((3, 0, 5), (4, 6, 5)) if obj.accepts_suffix else ((3, 0, 5),):
    assert obj.canvas_width(p, s, n) == widest_input(obj, model, p, s, n), (p, s, n)


@pytest.mark.slow
def test_a_row_past_max_seq_len_gives_nan_logits(make_config):
  """Why the width is checked: one position past the rotary table and every logit is NaN."""
  cfg = make_config({"objective.name": "blm", "model.max_seq_len": 16})
  obj = objectives.create(cfg, tokenizers.get_tokenizer("bytes"))
  model = obj.build(nnx.Rngs(0))
  for t, nan in ((16, False), (17, True)):
    out = model(jnp.full((1, t), 70, jnp.int32), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
    logits = np.asarray(out[1] if isinstance(out, tuple) else out)
    assert np.isnan(logits).all() if nan else not np.isnan(logits).any()
