"""Evaluate a trained model: python tools/evaluate.py --workdir=DIR [--split=validation]

Reports the objective's NLL (or its bound) per token, bits per token, bits per byte and
perplexity over the split (all of it by default), and prints them as one JSON line. For
masked diffusion the figure is the ELBO bound estimated with --time_samples draws of t per
sequence, with two errors, named: `loss_stderr` / `bits_per_byte_stderr`, the Monte-Carlo
error of the estimate (falls as 1/sqrt(K); needs K >= 2), and `loss_between_rows_stderr`, the
spread between the rows scored (what another sample of documents would change). For `bst` it is the
forward likelihood with the empty suffix (a left-to-right factorisation). For `blm` it is the
one-pass bound, or with --orders=M the importance-sampled -log p(x) over M orders per document.
For `insertion` it is the one-pass bound over uniform insertion orders, or with --orders=M the
importance-sampled -log p(x) (M * seq_len network passes per batch).

--task=gen_ppl --scorer=AR_WORKDIR: --examples unconditional samples of --max_new_tokens
tokens at most from this workdir's sampler (--sampler, --steps, --temperature, --top_k,
--top_p, --min_p, --threshold), scored by the ar checkpoint: generative perplexity and the
samples' mean unigram entropy (nats), reported together.
--task=star_graph: exact path accuracy on the star-graph problems the model was trained on.
--task=infill: spans of --infill_span tokens cut from held-out documents between
--infill_context tokens each side, filled greedily; exact match and per-token accuracy
(ar needs objective.fim_rate > 0; mdlm fills with the confidence sampler).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from mdlm_jax import cli  # noqa: E402
from mdlm_jax import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.")
_BATCHES = flags.DEFINE_integer("batches", -1, "Batches to read (-1: the whole split).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA params when the run kept them.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override data.data_dir of the run.")
_TIME_SAMPLES = flags.DEFINE_integer("time_samples", None,
                                     "mdlm: time samples per sequence for the bound.")
_ORDERS = flags.DEFINE_integer("orders", None, "blm, insertion: orders sampled per document "
                               "for the importance-sampled likelihood (0: the one-pass bound).")
_TASK = flags.DEFINE_enum("task", "likelihood", ["likelihood", "star_graph", "infill",
                                                "gen_ppl"], "What to measure.")
_SCORER = flags.DEFINE_string("scorer", None, "gen_ppl: the ar workdir that scores the samples.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "gen_ppl: tokens per sample at most.")
_SAMPLER = flags.DEFINE_string("sampler", None, "gen_ppl: the objective's sampler (mdlm: "
                               "ancestral, confidence, llada; bd3lm: ancestral, random, "
                               "left_to_right, dilated, confidence, threshold).")
_SAMPLE_STEPS = flags.DEFINE_integer("steps", None, "gen_ppl: sampler steps (mdlm: in all; "
                                     "bd3lm: per block).")
_DRAW = cli.define_draw_flags()  # gen_ppl's
_THRESHOLD, _FALLBACK = cli.define_threshold_flags()
_SEED = flags.DEFINE_integer("seed", 0, "gen_ppl: sampling seed.")
_BLOCK = flags.DEFINE_integer("block_length", 0, "gen_ppl with --sampler=llada: its block.")
_REMASKING = flags.DEFINE_string("remasking", None, "gen_ppl with --sampler=llada: "
                                 "low_confidence (its default) or random.")
_BLOCK_CACHE = cli.define_block_cache_flags()
_EXAMPLES = flags.DEFINE_integer("examples", 200, "star_graph / infill: problems to score "
                                 "(-1: every star-graph problem of the split).")
_SPAN = flags.DEFINE_integer("infill_span", 16, "infill: tokens removed and regenerated.")
_CONTEXT = flags.DEFINE_integer("infill_context", 64, "infill: tokens kept on each side.")


def main(argv):
  del argv
  distributed.initialize(logging.ERROR)
  from mdlm_jax import evaluate, restore  # pylint: disable=g-import-not-at-top

  overrides = {"data.data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
  if _TIME_SAMPLES.value is not None:
    overrides["objective.eval_time_samples"] = _TIME_SAMPLES.value
  if _ORDERS.value is not None:
    overrides["objective.eval_orders"] = _ORDERS.value
  setup, params, step = restore.load(_WORKDIR.value, use_ema=_EMA.value, step=_STEP.value,
                                     mesh_overrides={"data": -1, "tensor": 1},
                                     config_overrides=overrides)
  if _TASK.value != "likelihood":
    from mdlm_jax import tasks  # pylint: disable=g-import-not-at-top
    if _TASK.value == "gen_ppl":
      if not _SCORER.value:
        raise flags.ValidationError("--task=gen_ppl needs --scorer=AR_WORKDIR.")
      scorer, scorer_params, _ = restore.load(_SCORER.value, use_ema=_EMA.value,
                                              mesh_overrides={"data": -1, "tensor": 1})
      options = _DRAW()
      for key, value in (("sampler", _SAMPLER.value), ("steps", _SAMPLE_STEPS.value)):
        if value is not None:
          options[key] = value
      if _BLOCK.value:
        options["block_length"] = _BLOCK.value
      if _BLOCK_CACHE():
        options["kv_cache"] = _BLOCK_CACHE()
      if _REMASKING.value:
        options["remasking"] = _REMASKING.value
      if _THRESHOLD.value > 0:
        options["threshold"] = _THRESHOLD.value
        if setup.config.objective.name == "bd3lm":
          options.setdefault("sampler", "threshold")
          options["fallback"] = _FALLBACK.value
      result = dict(tasks.gen_ppl(setup, params, scorer, scorer_params, _EXAMPLES.value,
                                  _MAX_NEW.value, _SEED.value, **options), **options)
    elif _TASK.value == "star_graph":
      result = tasks.star_graph_accuracy(setup, params, _SPLIT.value, _EXAMPLES.value)
    else:
      result = tasks.infill_scores(setup, params, _SPLIT.value, _EXAMPLES.value,
                                   _CONTEXT.value, _SPAN.value)
    print(json.dumps({"step": step, "split": _SPLIT.value, "task": _TASK.value,
                      "objective": setup.config.objective.name, **result}))
    return
  print(f"# {setup.config.objective.name} model from {_WORKDIR.value}, step {step}; "
        f"evaluating the {_SPLIT.value} split", file=sys.stderr, flush=True)
  result = evaluate.Evaluator(setup, split=_SPLIT.value).run(
      params, _BATCHES.value, progress=lambda line: print(line, file=sys.stderr, flush=True))
  print(evaluate.format_line(step, result))
  print(json.dumps({"step": step, "split": _SPLIT.value,
                    **{k.split("/", 1)[1]: v for k, v in result.items()}}))


if __name__ == "__main__":
  cli.run(main)
