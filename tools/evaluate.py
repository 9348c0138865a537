"""Evaluate a trained model: python tools/evaluate.py --workdir=DIR [--split=validation]

Reports the objective's NLL (or its bound) per token, bits per token, bits per byte and
perplexity over the split (all of it by default), and prints them as one JSON line. For
masked diffusion the figure is the ELBO bound estimated with --time_samples draws of t per
sequence, with its standard error (`loss_stderr`, `bits_per_byte_stderr`).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from mdlm_jax import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_BATCHES = flags.DEFINE_integer("batches", -1, "Batches to read (-1: the whole split).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA params when the run kept them.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override data.data_dir of the run.")
_TIME_SAMPLES = flags.DEFINE_integer("time_samples", None,
                                     "mdlm: time samples per sequence for the bound.")


def main(argv):
  del argv
  distributed.initialize(logging.ERROR)
  from mdlm_jax import evaluate, restore  # pylint: disable=g-import-not-at-top

  overrides = {"data.data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
  if _TIME_SAMPLES.value is not None:
    overrides["objective.eval_time_samples"] = _TIME_SAMPLES.value
  setup, params, step = restore.load(_WORKDIR.value, use_ema=_EMA.value, step=_STEP.value,
                                     mesh_overrides={"data": -1, "tensor": 1},
                                     config_overrides=overrides)
  result = evaluate.Evaluator(setup, split=_SPLIT.value).run(params, _BATCHES.value)
  print(evaluate.format_line(step, result))
  print(json.dumps({"step": step, "split": _SPLIT.value,
                    **{k.split("/", 1)[1]: v for k, v in result.items()}}))


if __name__ == "__main__":
  app.run(main)
