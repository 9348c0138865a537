"""The command lines end to end, as a user runs them (subprocesses, tiny model)."""
import json
import os
import signal
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def tiny_flags(corpus, data_dir, **kw):
  flags = {"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
           "model.mlp_dim": 64, "model.max_seq_len": 128, "data.name": "text_files",
           "data.files": corpus, "data.data_dir": data_dir, "data.seq_len": 32,
           "train.batch_size": 8, "train.steps": 6, "train.warmup_steps": 1,
           "train.log_every_steps": 2, "checkpoint.every_steps": 3, "eval.every_steps": 3,
           "eval.batches": 2, "eval.sample_tokens": 16}
  flags.update(kw)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def run(args, check=True, timeout=900):
  p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
  return p


@pytest.mark.slow
def test_train_sample_evaluate(tmp_path, corpus, data_dir):
  wd = str(tmp_path / "wd")
  out = run(["train.py", f"--workdir={wd}", *tiny_flags(corpus, data_dir)]).stdout
  assert "step 6/6 | loss" in out and "tok/s" in out and "ETA" in out
  assert "eval @ step 6" in out and "sample @ step 6:" in out
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert any("eval/bits_per_byte" in r for r in rows)
  assert os.listdir(os.path.join(wd, "tensorboard"))
  events = [f for f in os.listdir(os.path.join(wd, "tensorboard")) if "tfevents" in f]
  assert events and b"train/loss" in open(os.path.join(wd, "tensorboard", events[0]), "rb").read()

  # the default objective is mdlm: prefix + masks + suffix, templates, every sampler
  sample = run(["tools/sample.py", f"--workdir={wd}", "--prefix=alpha ", "--suffix= omega",
                "--num_samples=2", "--max_new_tokens=8", "--top_p=0.9", "--top_k=20",
                "--min_p=0.01"]).stdout
  assert sample.count("--- sample") == 2 and "step 6" in sample
  texts = [l for l in sample.splitlines() if l.startswith("alpha ")]
  assert len(texts) == 2 and all(t.endswith(" omega") for t in texts), sample
  sample = run(["tools/sample.py", f"--workdir={wd}", "--template=def f(<mask:5>): <mask:3>",
                "--num_samples=1", "--sampler=llada", "--steps=4", "--block_length=4",
                "--cfg_scale=1.0", "--show_steps=4"]).stdout
  assert "sampler llada, 4 steps, 8 masked tokens" in sample
  shown = [l for l in sample.splitlines() if l.startswith("[")]
  assert len(shown) == 4 and shown[0].count("_") > shown[-1].count("_") == 0, sample
  assert sample.strip().splitlines()[-1].startswith("def f(")
  sample = run(["tools/sample.py", f"--workdir={wd}", "--template=def f(<mask:5>): <mask:3>",
                "--num_samples=1", "--sampler=llada", "--steps=8", "--block_length=4",
                "--prefix_cache"]).stdout
  assert sample.strip().splitlines()[-1].startswith("def f(") and "<mask" not in sample
  for bad, msg in ((["--template=<mask:40>"], "data.seq_len=32"),
                   (["--sampler=llada", "--block_length=4", "--dual_cache", "--prefix_cache"],
                    "choose one"),
                   (["--template=x", "--prefix=y"], "either --template"),
                   (["--template=no spans"], "no <mask:N>"),
                   (["--sampler=ddim"], "--sampler='ddim' is unknown"),
                   (["--steps=0"], "--steps=0")):
    p = run(["tools/sample.py", f"--workdir={wd}", "--max_new_tokens=8", *bad], check=False)
    assert p.returncode != 0 and msg in p.stderr, (bad, p.stderr[-500:])

  ev = run(["tools/evaluate.py", f"--workdir={wd}", "--time_samples=2"]).stdout
  result = json.loads(ev.strip().splitlines()[-1])
  assert result["step"] == 6 and result["tokens"] > 0
  assert 0 < result["loss_stderr"] < result["loss"] and "±" in ev
  assert abs(result["bits_per_token"] * 0.6931471805599453 - result["loss"]) < 1e-6
  assert 0 < result["bits_per_byte"] < 9

  png = str(tmp_path / "curves.png")
  out = run(["tools/plot.py", f"--output={png}", wd, wd]).stdout
  assert "wrote" in out
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  img = matplotlib.image.imread(png)
  assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05
  p = run(["tools/plot.py", f"--output={png}", str(tmp_path)], check=False)
  assert p.returncode != 0 and "no config.json" in p.stderr


@pytest.mark.slow
def test_ar_train_and_sample(tmp_path, corpus, data_dir):
  wd = str(tmp_path / "wd")
  run(["train.py", "--config=configs/ar.py", f"--workdir={wd}",
       *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 0})])
  sample = run(["tools/sample.py", f"--workdir={wd}", "--prompt=alpha ", "--num_samples=2",
                "--max_new_tokens=16", "--top_p=0.9", "--top_k=20", "--min_p=0.01"]).stdout
  assert sample.count("--- sample") == 2 and sample.count("alpha ") >= 2
  p = run(["tools/sample.py", f"--workdir={wd}", "--suffix=x"], check=False)
  assert p.returncode != 0 and "cannot condition on a suffix" in p.stderr
  assert "objective.fim_rate > 0" in p.stderr


@pytest.mark.slow
def test_blm_train_fill_blanks_and_evaluate(tmp_path, corpus, data_dir):
  wd = str(tmp_path / "wd")
  log = run(["train.py", "--config=configs/blm.py:tiny", f"--workdir={wd}",
             *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 2})]).stdout
  assert "eval @ step 2" in log
  out = run(["tools/sample.py", f"--workdir={wd}", "--prefix=alpha ", "--suffix= omega",
             "--num_samples=2", "--max_new_tokens=8"]).stdout
  texts = [l for l in out.splitlines() if l.startswith("alpha ")]
  assert len(texts) == 2 and all(t.endswith(" omega") for t in texts), out
  out = run(["tools/sample.py", f"--workdir={wd}", "--template=def <blank>(x): <blank>",
             "--num_samples=2", "--max_new_tokens=8"]).stdout
  texts = [l for l in out.splitlines() if l.startswith("def ")]
  assert "2 blanks" in out and len(texts) == 2 and all("(x): " in t for t in texts), out
  p = run(["tools/sample.py", f"--workdir={wd}", "--template=no blank here"], check=False)
  assert p.returncode != 0 and "no <blank>" in p.stderr
  # prefix + max_new fits 128, but the canvas (prefix, BLANK, suffix, EOS, room) does not
  p = run(["tools/sample.py", f"--workdir={wd}", "--prefix=" + "x" * 50, "--suffix=" + "y" * 50,
           "--max_new_tokens=30"], check=False)
  assert p.returncode != 0 and "blm rows of 132 positions" in p.stderr, p.stderr[-500:]
  bound = json.loads(run(["tools/evaluate.py", f"--workdir={wd}", "--batches=1"]
                         ).stdout.strip().splitlines()[-1])
  sampled = json.loads(run(["tools/evaluate.py", f"--workdir={wd}", "--batches=1", "--orders=2"]
                           ).stdout.strip().splitlines()[-1])
  assert 0 < sampled["bits_per_byte"] < bound["bits_per_byte"] + 1.0, (sampled, bound)


@pytest.mark.slow
def test_insertion_train_sample_between_prefix_and_suffix_and_evaluate(tmp_path, corpus,
                                                                        data_dir):
  wd = str(tmp_path / "wd")
  run(["train.py", "--config=configs/insertion.py:tiny", f"--workdir={wd}",
       *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 2})])
  for sampler in ("parallel", "sequential"):
    p = run(["tools/sample.py", f"--workdir={wd}", "--prefix=alpha ", "--suffix= omega",
             "--num_samples=2", "--max_new_tokens=8", f"--sampler={sampler}"])
    texts = [block.split("\n", 1)[1].rstrip("\n") for block in p.stdout.split("--- sample")[1:]]
    assert len(texts) == 2, p.stdout
    assert all(t.startswith("alpha ") and t.endswith(" omega") for t in texts), p.stdout
    # sequential decoding of a slot-finalized model follows Stern's rule: nothing to warn about
    assert "warning" not in p.stderr, p.stderr
  seq = str(tmp_path / "seq")  # sequence finalization: decodes sequentially, refuses parallel
  run(["train.py", "--config=configs/insertion.py:tiny", f"--workdir={seq}",
       *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 0,
                                        "objective.finalization": "sequence"})])
  out = run(["tools/sample.py", f"--workdir={seq}", "--prefix=alpha ", "--num_samples=1",
             "--max_new_tokens=4"]).stdout
  assert out.count("--- sample") == 1, out
  p = run(["tools/sample.py", f"--workdir={seq}", "--sampler=parallel"], check=False)
  assert p.returncode != 0 and "--sampler=sequential" in p.stderr, p.stderr
  p = run(["tools/sample.py", f"--workdir={wd}", "--sampler=llada"], check=False)
  assert p.returncode != 0 and "--sampler=parallel or --sampler=sequential" in p.stderr
  bound = json.loads(run(["tools/evaluate.py", f"--workdir={wd}", "--batches=1"]
                         ).stdout.strip().splitlines()[-1])
  assert bound["bits_per_byte"] > 0
  timing = json.loads(run(["tools/bench.py", "--config=configs/insertion.py:tiny",
                           "--sampler=insertion_parallel", "--sample_len=16", "--sample_batch=2",
                           "--sample_repeats=1"]).stdout.strip().splitlines()[-1])
  assert timing["network_calls"] >= 1 and 0 <= timing["tokens"] <= 2 * 16
  # validation rows of one document, filled between their edges (seq_len 32: 30 words each)
  timing = json.loads(run(["tools/bench.py", f"--workdir={wd}", "--sampler=insertion_parallel",
                           "--insertion_start=validation", "--sample_batch=2",
                           "--sample_repeats=1"]).stdout.strip().splitlines()[-1])
  assert timing["length"] == 30 and len(timing["per_row_tokens_and_steps"]) == 2, timing
  assert all(0 <= m <= 30 and c >= 1 for m, c in timing["per_row_tokens_and_steps"]), timing
  p = run(["tools/bench.py", "--config=configs/insertion.py:tiny",
           "--sampler=insertion_parallel", "--insertion_start=validation"], check=False)
  assert p.returncode != 0 and "--workdir=DIR" in p.stderr, p.stderr[-500:]


@pytest.mark.slow
def test_bst_train_sample_with_suffix_and_infill(tmp_path, corpus, data_dir):
  wd = str(tmp_path / "wd")
  run(["train.py", f"--workdir={wd}", "--config.objective.name=bst",
       *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 2})])
  out = run(["tools/sample.py", f"--workdir={wd}", "--prefix=alpha ", "--suffix= omega",
             "--num_samples=2", "--num_candidates=3", "--max_new_tokens=6",
             "--temperature=0.5"]).stdout
  texts = [l for l in out.splitlines() if l.startswith("alpha ")]
  assert out.count("--- sample") == 2 and len(texts) == 2
  assert all(t.endswith(" omega") for t in texts), out
  for bad, msg in ((["--suffix=" + "x" * 200], "model.max_seq_len=128"),
                   (["--prefix=" + "x" * 200], "model.max_seq_len=128"),
                   (["--num_candidates=0"], "--num_candidates=0")):
    p = run(["tools/sample.py", f"--workdir={wd}", "--max_new_tokens=4", *bad], check=False)
    assert p.returncode != 0 and msg in p.stderr, (bad, p.stderr[-500:])
  ev = run(["tools/evaluate.py", f"--workdir={wd}", "--task=infill", "--examples=4",
            "--infill_context=8", "--infill_span=4"]).stdout
  result = json.loads(ev.strip().splitlines()[-1])
  assert result["examples"] == 4 and 0 <= result["token_accuracy"] <= 1
  p = run(["train.py", f"--workdir={tmp_path / 'x'}", "--config.objective.name=bst",
           "--config.objective.pair_fraction=0"], check=False)
  assert p.returncode != 0 and "objective.pair_fraction=0" in p.stderr


@pytest.mark.slow
def test_unknown_config_key_and_bad_value_fail_fast(tmp_path, corpus, data_dir):
  wd = str(tmp_path / "wd")
  p = run(["train.py", f"--workdir={wd}", "--config.model.num_layer=2"], check=False)
  assert p.returncode != 0 and "num_layer" in p.stderr
  p = run(["train.py", f"--workdir={wd}", *tiny_flags(corpus, data_dir, **{"data.seq_len": 512})],
          check=False)
  assert p.returncode != 0 and "model.max_seq_len" in p.stderr
  assert not os.path.exists(os.path.join(wd, "checkpoints"))


@pytest.mark.slow
def test_sampling_a_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  p = run(["tools/sample.py", f"--workdir={tmp_path}"], check=False)
  assert p.returncode != 0 and "no config.json" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_and_the_resumed_run_matches(tmp_path, corpus, data_dir, workers):
  """SIGTERM to the whole process group (as schedulers and `timeout` send it), Grain worker
  processes included."""
  over = {"train.steps": 40, "train.log_every_steps": 1, "train.schedule": "constant",
          "checkpoint.every_steps": 1000, "eval.every_steps": 0, "data.workers": workers}
  ref = str(tmp_path / "ref")
  run(["train.py", f"--workdir={ref}", *tiny_flags(corpus, data_dir, **over)])
  wd = str(tmp_path / "wd")
  proc = subprocess.Popen([sys.executable, "train.py", f"--workdir={wd}",
                           *tiny_flags(corpus, data_dir, **over)], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  for line in proc.stdout:
    if line.startswith("step 3/"):
      os.killpg(proc.pid, signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in out
  saved = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 40
  run(["train.py", f"--workdir={wd}", *tiny_flags(corpus, data_dir, **over)])
  loss = lambda d: {r["step"]: r["train/loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl"))
                    if "train/loss" in r}
  a, b = loss(ref), loss(wd)
  assert all(a[s] == b[s] for s in range(1, 41)), "the resumed run diverged"


@pytest.mark.slow
def test_bd3lm_train_sample_gen_ppl_and_frontier(tmp_path, corpus, data_dir):
  """bd3lm end to end: train, sample with the cached threshold sampler, score its samples with
  an ar run (gen-PPL with entropy), draw the frontier, time the sampler."""
  bd, ar = str(tmp_path / "bd3lm"), str(tmp_path / "ar")
  out = run(["train.py", "--config=configs/bd3lm.py:tiny", f"--workdir={bd}",
             "--config.objective.block_size=8",
             *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 2})]).stdout
  assert "eval @ step 2" in out and "sample @ step 2:" in out
  run(["train.py", "--config=configs/ar.py", f"--workdir={ar}",
       *tiny_flags(corpus, data_dir, **{"train.steps": 2, "eval.every_steps": 0})])
  sample = run(["tools/sample.py", f"--workdir={bd}", "--prefix=def ", "--num_samples=2",
                "--max_new_tokens=20", "--sampler=bd3lm", "--threshold=0.5"]).stdout
  assert sample.count("--- sample") == 2 and sample.count("def ") >= 2
  lines, rows = [], []
  # top-k 1 draws each position's argmax, whatever the seed: the two last rows are equal
  for flags in (["--temperature=1.0"], ["--temperature=0.5", "--top_k=1"],
                ["--temperature=0.5", "--top_k=1", "--seed=1"]):
    ev = run(["tools/evaluate.py", f"--workdir={bd}", "--task=gen_ppl", f"--scorer={ar}",
              "--examples=4", "--max_new_tokens=24", "--threshold=0.3", *flags]).stdout
    row = json.loads(ev.strip().splitlines()[-1])
    assert row["samples"] == 4 and row["gen_ppl"] > 1 and 0 <= row["entropy"] <= 3.2
    assert row["sampler"] == "threshold" and row["objective"] == "bd3lm"
    lines.append(ev.strip().splitlines()[-1])
    rows.append(row)
  assert rows[1]["top_k"] == 1 and rows[1]["temperature"] == 0.5
  assert {k: rows[1][k] for k in ("gen_ppl", "entropy", "mean_length")} == {
      k: rows[2][k] for k in ("gen_ppl", "entropy", "mean_length")}, rows
  results = tmp_path / "bd3lm.jsonl"
  results.write_text("\n".join(lines[:2]) + "\n")
  png = str(tmp_path / "frontier.png")
  assert "wrote" in run(["tools/plot.py", "--frontier", f"--output={png}", str(results)]).stdout
  p = run(["tools/evaluate.py", f"--workdir={bd}", "--task=gen_ppl", f"--scorer={bd}",
           "--examples=2"], check=False)
  assert p.returncode != 0 and "--scorer must be an ar workdir" in p.stderr
  # top-k 1 keeps one token of probability 1: the gate passes every masked position, so each
  # block of 16 takes one call (16 new tokens after BOS's padded block: one block)
  timing = json.loads(run(["tools/bench.py", "--config=configs/bd3lm.py:tiny",
                           "--sampler=bd3lm", "--sample_len=16", "--sample_batch=2",
                           "--sample_repeats=1", "--threshold=0.5", "--top_k=1"]).stdout
                      .strip().splitlines()[-1])
  assert timing["network_calls"] == 1 and timing["tokens_per_s"] > 0, timing
  assert timing["top_k"] == 1 and timing["temperature"] == 1.0
  calls = json.loads(run(["tools/bench.py", "--config=configs/bd3lm.py:tiny",
                          "--call_positions=1,8", "--steps=2", "--sample_len=16",
                          "--sample_batch=2", "--sample_repeats=1"]).stdout
                     .strip().splitlines()[-1])
  assert calls["call_positions"] == [1, 8] and len(calls["ms_per_call"]) == 2, calls
  assert all(ms > 0 for ms in calls["ms_per_call"]) and calls["cache"] == 16, calls
  p = run(["tools/bench.py", "--config=configs/bd3lm.py:tiny", "--call_positions=17",
           "--sample_len=16"], check=False)
  assert p.returncode != 0 and "--call_positions=17 must be in [1, --sample_len=16]" in p.stderr
  p = run(["tools/bench.py", "--config=configs/bd3lm.py:tiny", "--sampler=bd3lm",
           "--min_p=1"], check=False)
  assert p.returncode != 0 and "0 <= --min_p < 1" in p.stderr, p.stderr[-500:]
