"""What a person sees: user errors in one line with exit code 2, the run's summary and saves,
a smoothed ETA, the dataset recorded in config.json, evaluation hooks, samplers listed by the
objective."""
import json
import os
import subprocess
import sys

import pytest

from mdlm_jax.objectives import mdlm_sampling
from mdlm_jax import metrics
from mdlm_jax import objectives
from mdlm_jax import tasks
from mdlm_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run_elsewhere(tmp_path, *args, env=None):
  """A command run from another directory than the repository's."""
  return subprocess.run([sys.executable, *args], cwd=tmp_path, env={**ENV, **(env or {})},
                        capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args,says", [
    (["--config.train.step=3"], "--config.train.step: no such config key 'step' (Did you "
                                "mean \"steps\" instead of \"step\"?)"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.data.seq_len=100000"], "data.seq_len=100000 exceeds the model's limit"),
    (["--no_such_flag=1"], "no_such_flag"),
])
@pytest.mark.slow
def test_a_user_error_is_one_line_with_exit_code_2(tmp_path, args, says):
  p = run_elsewhere(tmp_path, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path / 'w'}",
                    *args)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
  assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.slow
def test_the_traceback_is_there_when_asked_for(tmp_path):
  p = run_elsewhere(tmp_path, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path / 'w'}",
                    "--config.data.seq_len=100000", env={"MDLM_JAX_VERBOSE": "1"})
  assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


@pytest.mark.slow
def test_tools_report_a_missing_workdir_and_bad_flags_in_one_line(tmp_path):
  for tool, extra, says in (("sample.py", [], "does not exist"),
                            ("evaluate.py", [], "does not exist"),
                            ("sample.py", ["--num_samples=0"], "--num_samples")):
    p = run_elsewhere(tmp_path, os.path.join(ROOT, "tools", tool),
                      f"--workdir={tmp_path / 'none'}", *extra)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and says in lines[0], (tool, p.stderr[-1000:])


@pytest.mark.slow
def test_the_run_logs_its_saves_and_ends_with_a_summary(tmp_path, make_config):
  lines = []
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 4, "eval.every_steps": 4, "eval.batches": 1}), wd,
                log=lines.append)
  saves = [l for l in lines if l.startswith("saving step")]
  assert saves == [f"saving step {s} to {os.path.join(wd, 'checkpoints', str(s))} "
                   "(asynchronously)" for s in (2, 4)], lines
  summary = lines[-1].splitlines()
  assert summary[0].startswith("run finished at step 4 in ")
  assert any(l.strip().startswith("eval: ") and "bits_per_byte" in l for l in summary)
  assert f"  checkpoint: {os.path.join(wd, 'checkpoints', '4')}" in summary
  assert f"    python tools/sample.py --workdir={wd}" in summary
  assert f"    python tools/evaluate.py --workdir={wd}" in summary
  saved = json.load(open(os.path.join(wd, "config.json")))
  ds = saved["_dataset"]
  assert ds["name"] == "text_files" and os.path.isdir(ds["directory"])
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(ds["directory"]).as_data_source(split="validation")
  assert len(source) > 0  # plain TFDS finds the prepared data from config.json alone
  trainer.train(make_config({"train.steps": 5}), wd, log=lines.append)
  resumed = json.load(open(os.path.join(wd, "config.json")))
  assert resumed["_dataset"] == ds  # not a config change
  assert all("_dataset" not in str(h.get("changes", {})) for h in resumed["_history"])


def test_the_eta_is_the_mean_step_time_since_the_first_window(monkeypatch):
  clock = iter([0.0, 50.0, 51.0, 53.0, 54.0])  # a slow first window (compilation), then 1 s
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  p = metrics.Progress(total_steps=100, start_step=0, tokens_per_step=10, flops_per_token=1.0,
                       num_devices=1)
  assert p.update(10)["perf/eta_s"] == pytest.approx(90 * 5.0)  # only the first window known
  assert p.update(11)["perf/eta_s"] == pytest.approx(89 * 1.0)
  assert p.update(12)["perf/eta_s"] == pytest.approx(88 * 1.5)  # a 2 s step: mean of 1 and 2
  assert p.update(13)["perf/eta_s"] == pytest.approx(87 * (4.0 / 3))


@pytest.mark.slow
def test_eval_hooks_run_at_each_evaluation_without_the_trainer_naming_them(
    tmp_path, make_config, monkeypatch):
  seen = []

  def maker(setup):
    def hook(params, step):
      seen.append(step)
      return {"eval/hooked": float(step)}, {"hooked/text": f"at {step}"}, f"hooked @ {step}"
    return hook if setup.config.eval.every_steps else None

  monkeypatch.setattr(tasks, "_HOOKS", [*tasks._HOOKS, maker])  # pylint: disable=protected-access
  lines = []
  wd = str(tmp_path / "wd")
  last = trainer.train(make_config({"train.steps": 4, "eval.every_steps": 2,
                                    "eval.batches": 1}), wd, log=lines.append)
  assert seen == [2, 4] and "hooked @ 4" in lines and last["eval/hooked"] == 4.0
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["eval/hooked"] for r in rows if "eval/hooked" in r] == [2.0, 4.0]


def test_each_objective_lists_the_samplers_the_tools_offer():
  assert objectives.get("mdlm").samplers == tuple(mdlm_sampling.SAMPLERS)
  assert objectives.get("insertion").samplers == ("parallel", "sequential")
  for name in ("ar", "bst", "blm", "mlm"):
    assert objectives.get(name).samplers == ()


def test_the_pipeline_applies_what_the_objective_declares():
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ar = objectives.get("ar")
  opts = objectives.default_options("ar")
  assert ar.train_transforms(opts) == ()
  opts.fim_rate = 0.5
  (fim,) = ar.train_transforms(opts)
  assert isinstance(fim, pipeline.Fim) and fim.rate == 0.5
  assert objectives.get("mdlm").train_transforms(objectives.default_options("mdlm")) == ()


@pytest.mark.slow
def test_evaluation_tells_how_far_it_got(make_config):
  from mdlm_jax import evaluate  # pylint: disable=g-import-not-at-top
  setup = trainer.build(make_config())
  tx, _ = trainer.make_optimizer(setup.config.train)
  state = trainer.init_train_state(setup, tx, trainer.abstract_train_state(setup, tx))
  lines = []
  result = evaluate.Evaluator(setup).run(state["params"], 2, progress=lines.append, every_s=0)
  assert [l.split(",")[0] for l in lines] == ["evaluating validation: batch 1/2",
                                              "evaluating validation: batch 2/2"]
  assert f"{int(result['eval/tokens'])} tokens" in lines[-1]


@pytest.mark.slow
def test_infilling_runs_at_each_evaluation_and_scores_what_the_filler_writes(
    tmp_path, make_config, monkeypatch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mdlm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  cfg = make_config({"objective.name": "mdlm", "train.steps": 4, "eval.every_steps": 4,
                     "eval.batches": 1, "eval.infill_examples": 6, "eval.infill_context": 8,
                     "eval.infill_span": 4})
  lines = []
  last = trainer.train(cfg, str(tmp_path / "wd"), log=lines.append)
  setup = trainer.build(cfg)
  (hook,) = [h for h in tasks.eval_hooks(setup) if h.__qualname__.startswith("_infill")]
  trained, _ = checkpoint.restore_params(str(tmp_path / "wd"), setup.abstract_params)
  scalars, _, line = hook(trained, 4)
  assert line in lines and {k: last[k] for k in scalars} == scalars
  # the figures: a filler that writes the true middle of every row, with its first token
  # wrong on the odd rows, scores exact match 1/2 and token accuracy 1 - 1/8
  pre, mid, suf = tasks.infill_examples(setup, "validation", 6, 8, 4, cfg.seed)
  assert len({tuple(r) for r in pre}) == 6

  def oracle(setup_, model, prefix_BxP, suffix_BxS, length, rng, **_):
    del setup_, model, suffix_BxS, length, rng
    row = jnp.argmax(jnp.all(prefix_BxP[:, None] == pre[None], -1), 1)
    return jnp.asarray(mid)[row].at[:, 0].add(row % 2)
  monkeypatch.setattr(tasks, "fill_middle", oracle)
  (hook,) = [h for h in tasks.eval_hooks(setup) if h.__qualname__.startswith("_infill")]
  scalars, _, _ = hook(trained, 0)
  assert scalars == {"eval/infill_exact_match": 0.5, "eval/infill_token_accuracy": 1 - 1 / 8}


def test_an_infilling_setting_the_objective_cannot_run_fails_before_anything_is_written(
    tmp_path, make_config):
  wd = tmp_path / "wd"
  for overrides, says in (({"objective.name": "ar"}, "cannot fill a middle"),
                          ({"objective.name": "mdlm", "eval.infill_span": 20}, "seq_len")):
    cfg = make_config({"eval.every_steps": 2, "eval.infill_examples": 2, **overrides})
    with pytest.raises(ValueError, match=says):
      trainer.train(cfg, str(wd))
    assert not wd.exists()


def test_preparing_a_local_source_prints_two_lines_and_no_tfds_noise(tmp_path, corpus, capfd):
  import logging  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from mdlm_jax.data import builders  # pylint: disable=g-import-not-at-top
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger("absl").addHandler(handler)
  try:
    cfg = tiny_config(corpus, str(tmp_path / "tfds"))
    builder = builders.load_builder(cfg.data)
    builders.load_builder(cfg.data)  # found prepared: silent
  finally:
    logging.getLogger("absl").removeHandler(handler)
  out, err = capfd.readouterr()
  sizes = {s: len(builders.data_source(builder, s)) for s in ("train", "validation")}
  assert out.splitlines()[0].startswith("Preparing dataset text_files into ")
  assert out.splitlines()[1].startswith("Prepared text_files in ")
  assert out.splitlines()[1].endswith(f"(train {sizes['train']}, validation "
                                      f"{sizes['validation']} examples).")
  assert len(out.splitlines()) == 2 and "\r" not in err and "examples/s" not in err
  said = [r.getMessage() for r in records if r.levelno >= logging.INFO]
  assert not [m for m in said if "Unknown size" in m or "custom data configuration" in m], said
