"""Sample from a trained model: python tools/sample.py --workdir=DIR [--prompt=TEXT] ...

Restores the latest params (their EMA when the run kept one) onto the local devices and calls
the objective's sampler. For `ar`: temperature, top-k, top-p, min-p, KV cache, EOS stop.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from mdlm_jax import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text the samples continue.")
_NUM = flags.DEFINE_integer("num_samples", 2, "Samples to draw.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate at most.")
_TEMP = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep tokens with prob >= min_p * max prob (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA params when the run kept them.")


def check_sampling_flags():
  if _NUM.value < 1 or _MAX_NEW.value < 1:
    raise app.UsageError("--num_samples and --max_new_tokens must be >= 1.")
  if _TEMP.value < 0 or not 0 < _TOP_P.value <= 1 or not 0 <= _MIN_P.value < 1 or _TOP_K.value < 0:
    raise app.UsageError("need --temperature >= 0, 0 < --top_p <= 1, 0 <= --min_p < 1, "
                         "--top_k >= 0.")


def main(argv):
  del argv
  check_sampling_flags()
  distributed.initialize(logging.ERROR)
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mdlm_jax import restore, tokenizers  # pylint: disable=g-import-not-at-top

  setup, params, step = restore.load(_WORKDIR.value, use_ema=_EMA.value, step=_STEP.value)
  tok = setup.tokenizer
  prompt = np.concatenate([[tokenizers.BOS], tok.encode(_PROMPT.value)]).astype(np.int32)
  limit = setup.config.model.max_seq_len
  if len(prompt) + _MAX_NEW.value > limit:
    raise app.UsageError(f"prompt ({len(prompt)} tokens) + --max_new_tokens={_MAX_NEW.value} "
                         f"exceeds the model's limit model.max_seq_len={limit}.")
  prompts = np.tile(prompt, (_NUM.value, 1))
  options = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value, top_k=_TOP_K.value,
                 top_p=_TOP_P.value, min_p=_MIN_P.value)

  @functools.partial(jax.jit)
  def run(params, prompts, rng):
    return setup.objective.generate(nnx.merge(setup.graphdef, params), prompts, rng, **options)

  out = np.asarray(jax.device_get(run(params, prompts, jax.random.key(_SEED.value))))
  print(f"# {setup.config.objective.name} model from {_WORKDIR.value}, step {step}")
  for i, row in enumerate(out):
    ids = row[len(prompt):]
    end = np.flatnonzero(ids == tokenizers.EOS)
    ids = ids[: end[0]] if len(end) else ids
    print(f"--- sample {i} ---\n{_PROMPT.value}{tok.decode(ids)}")


if __name__ == "__main__":
  app.run(main)
