"""Faults a pod run meets: damaged or tampered checkpoints, incompatible resumes, non-finite
steps, a second writer, inexact accumulation, data order."""
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdlm_jax import checkpoint
from mdlm_jax import sharding
from mdlm_jax import storage
from mdlm_jax import tokenizers
from mdlm_jax import trainer
from mdlm_jax.data import builders
from mdlm_jax.data import pipeline

quiet = lambda _: None


def losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def steps_in(wd):
  return sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, data_dir):
  """An uninterrupted 6-step run (checkpoints at 2, 4, 6) to compare fault runs with."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path_factory.mktemp("ref") / "wd")
  trainer.train(tiny_config(corpus, data_dir, {"train.steps": 6}), wd, log=quiet)
  return losses(wd)


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "params", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated manifest", "64 flipped bytes", "checksum"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_trains_to_the_end(
    tmp_path, make_config, reference, damage):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 4}), wd, log=quiet)
  assert steps_in(wd) == [2, 4]
  step4 = os.path.join(wd, "checkpoints", "4")
  if damage == "truncated manifest":  # a write cut short
    manifest = os.path.join(step4, "params", "manifest.ocdbt")
    with open(manifest, "r+b") as fh:
      fh.truncate(os.path.getsize(manifest) // 3)
  elif damage == "64 flipped bytes":  # bit rot in the array data
    data = _largest_array_file(step4)
    with open(data, "r+b") as fh:
      fh.seek(os.path.getsize(data) // 2)
      chunk = fh.read(64)
      fh.seek(os.path.getsize(data) // 2)
      fh.write(bytes(b ^ 0xFF for b in chunk))
  else:  # a recorded checksum that no longer matches its array
    meta = os.path.join(step4, "integrity", "metadata")
    sums = json.load(open(meta))
    key = sorted(k for k in sums if k.startswith("params/"))[0]
    sums[key] = (sums[key] + 1) % 2**32
    json.dump(sums, open(meta, "w"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.train(make_config({"train.steps": 6}), wd, log=quiet)
  msgs = [str(w.message) for w in caught if "set it aside" in str(w.message)]
  assert len(msgs) == 1 and "step 4" in msgs[0] and "4.damaged" in msgs[0], msgs
  if damage == "checksum":
    assert "do not match their checksums" in msgs[0] and key in msgs[0]
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4.damaged"))  # kept, not deleted
  assert steps_in(wd) == [2, 4, 6]
  got = losses(wd)  # steps 3, 4 ran twice: once before the damage, once after the fallback
  assert all(got[s] == reference[s] for s in range(1, 7)), (got, reference)
  if damage == "truncated manifest":
    trainer.train(make_config({"train.steps": 6}), wd, log=quiet)  # no crash loop
    assert steps_in(wd) == [2, 4, 6]


def test_checksum_sees_one_element_and_not_the_mesh():
  x = jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16) / 7
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spread = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "fsdp", "tensor")))
  one = checkpoint.checksums({"a": x, "n": jnp.int32(3)})
  assert one == checkpoint.checksums({"a": spread, "n": jnp.int32(3)})
  for i, j in [(0, 0), (3, 15), (2, 7)]:
    y = x.at[i, j].set(jnp.nextafter(x[i, j], jnp.inf))  # the smallest change of one element
    assert checkpoint.checksums({"a": y, "n": jnp.int32(3)})["a"] != one["a"]
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same values, other places
  assert checkpoint.checksums({"a": swapped, "n": jnp.int32(3)})["a"] != one["a"]


@pytest.mark.slow
def test_every_checkpoint_damaged_stops_with_all_kept(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2, "checkpoint.every_steps": 1}), wd, log=quiet)
  for s in (1, 2):
    manifest = os.path.join(wd, "checkpoints", str(s), "params", "manifest.ocdbt")
    open(manifest, "wb").close()
  with pytest.raises(RuntimeError, match="every one was set aside"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      trainer.train(make_config({"train.steps": 4}), wd, log=quiet)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1.damaged", "2.damaged"]


# ------------------------------------------------------------------- incompatible is not damage

@pytest.mark.slow
def test_ema_switched_on_and_off_resumes(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.train(make_config({"train.steps": 4, "train.ema_decay": 0.9}), wd, log=quiet)
  assert any("has no EMA" in str(w.message) for w in caught)
  assert not glob.glob(os.path.join(wd, "checkpoints", "*.damaged"))
  assert steps_in(wd) == [2, 4]
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4", "ema"))
  trainer.train(make_config({"train.steps": 6}), wd, log=quiet)  # and off again
  assert steps_in(wd) == [2, 4, 6] and not glob.glob(os.path.join(wd, "checkpoints", "*.damaged"))


@pytest.mark.slow
def test_another_mesh_resumes_the_same_run(tmp_path, make_config, reference):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2, "model.num_heads": 2}), wd, log=quiet)
  trainer.train(make_config({"train.steps": 6, "mesh.data": 2, "mesh.fsdp": 2,
                             "mesh.tensor": 2}), wd, log=quiet)
  got = losses(wd)
  np.testing.assert_allclose([got[s] for s in range(1, 7)],
                             [reference[s] for s in range(1, 7)], rtol=1e-5)
  history = json.load(open(os.path.join(wd, "config.json")))["_history"]
  assert history[-1]["changes"]["mesh.fsdp"] == [1, 2]


@pytest.mark.slow
def test_other_process_count_is_a_clear_error_unless_the_data_restarts(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  data = os.path.join(wd, "checkpoints", "2", "data")
  state = open(os.path.join(data, "process_0-of-1.json")).read()
  os.remove(os.path.join(data, "process_0-of-1.json"))
  for i in range(2):  # as a run of 2 processes leaves it
    open(os.path.join(data, f"process_{i}-of-2.json"), "w").write(state)
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r"(?s)data position of 2 process.*this run has 1.*restore_data=False"):
    trainer.train(make_config({"train.steps": 4}), wd, log=quiet)
  assert steps_in(wd) == [2] and not glob.glob(os.path.join(wd, "checkpoints", "*.damaged"))
  log = []
  trainer.train(make_config({"train.steps": 4, "checkpoint.restore_data": False}), wd,
                log=log.append)
  assert any("Resumed from step 2" in line for line in log)
  assert any("data order restarts" in line for line in log)
  assert steps_in(wd) == [2, 4]


@pytest.mark.slow
def test_resume_accepts_what_changes_no_array_and_records_it(tmp_path, make_config, reference):
  """remat, attention and logging changes resume; an option the workdir's run predates (absent
  from its config.json) takes its default; config.json keeps the history."""
  wd = str(tmp_path / "wd")
  trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  cfg_file = os.path.join(wd, "config.json")
  saved = json.load(open(cfg_file))
  del saved["objective"]["z_loss"]  # written by code that had no z_loss yet
  json.dump(saved, open(cfg_file, "w"))
  log = []
  trainer.train(make_config({"train.steps": 6, "model.remat": "full",
                             "model.attention": "chunked", "train.log_every_steps": 2}),
                wd, log=log.append)
  assert any("Resumed from step 2" in line for line in log)
  got = losses(wd)
  np.testing.assert_allclose([got[s] for s in (4, 6)], [reference[s] for s in (4, 6)],
                             rtol=1e-4)
  history = json.load(open(cfg_file))["_history"]
  assert history[0]["event"] == "created"
  changes = history[-1]["changes"]
  assert changes["model.remat"] == ["none", "full"]
  assert changes["model.attention"] == ["auto", "chunked"]
  assert changes["objective.z_loss"] == [None, 0.0]


# --------------------------------------------------------------------------- non-finite guard

@pytest.mark.slow
def test_a_diverging_run_skips_its_non_finite_steps_and_stops(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  cfg = make_config({"train.steps": 40, "train.learning_rate": 1e4, "train.warmup_steps": 0,
                     "train.grad_clip": 0.0, "checkpoint.every_steps": 2,
                     "checkpoint.keep": 100, "train.max_skipped_steps": 3})
  with pytest.raises(trainer.TrainingDiverged, match="train.max_skipped_steps=3"):
    trainer.train(cfg, wd, log=quiet)
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  bad = [r["step"] for r in rows
         if not np.isfinite(float(r["train/loss"])) * np.isfinite(float(r["train/grad_norm"]))]
  assert bad, "the run was expected to diverge"
  assert rows[-1]["train/consecutive_skips"] >= 3 and rows[-1]["train/skipped_steps"] >= 3
  setup = trainer.build(cfg)
  for s in steps_in(wd):  # no checkpoint holds a non-finite value
    params, _ = checkpoint.restore_params(wd, setup.abstract_params, use_ema=False, step=s)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), s


@pytest.mark.slow
def test_the_guard_keeps_the_state_of_a_non_finite_step(make_config):
  cfg = make_config({})
  setup = trainer.build(cfg)
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  step = trainer.make_train_step(setup, tx, schedule, abstract)
  state = trainer.init_train_state(setup, tx, abstract)
  batch = next(iter(pipeline.train_dataset(cfg, setup.tokenizer)))
  state, _ = step(state, pipeline.to_global(batch, setup.batch_sharding))
  before = jax.device_get(state)
  poisoned = jax.tree.map(lambda x: x, state)
  poisoned["params"] = jax.tree.map(lambda x: x, state["params"])
  poisoned["params"]["embed"] = state["params"]["embed"].at[0, 0].set(jnp.nan)
  expected = jax.device_get(poisoned["params"])
  after, m = step(poisoned, pipeline.to_global(batch, setup.batch_sharding))
  after = jax.device_get(after)
  assert not np.isfinite(float(m["train/loss"])) and int(m["train/skipped_steps"]) == 1
  chex.assert_trees_all_equal(after["opt_state"], before["opt_state"])
  chex.assert_trees_all_equal(after["params"], expected)
  assert int(after["step"]) == int(before["step"]) + 1


# ------------------------------------------------------------------------------- one writer

@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, make_config):
  wd = str(tmp_path / "wd")
  with storage.Lock(wd):  # a live holder: this process
    with pytest.raises(storage.LockHeld, match=rf"in use by another run \(host "
                       rf"{socket.gethostname()}, pid {os.getpid()}, since"):
      trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock = os.path.join(wd, storage.Lock.NAME)
  open(lock, "w").write(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                    "since": time.time(), "heartbeat": time.time(),
                                    "token": "x"}))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer.train(make_config({"train.steps": 2}), wd, log=quiet)
  assert any(f"its process {dead.pid} on this host has exited" in str(w.message)
             for w in caught)
  assert steps_in(wd) == [2] and not os.path.exists(lock)  # released at the end


def test_a_lock_without_heartbeat_is_stale_on_another_host(tmp_path):
  d = str(tmp_path)
  held = {"host": "elsewhere", "pid": 1, "since": 0, "heartbeat": time.time(), "token": "x"}
  open(os.path.join(d, storage.Lock.NAME), "w").write(json.dumps(held))
  with pytest.raises(storage.LockHeld, match="host elsewhere, pid 1"):
    storage.Lock(d, timeout_s=60).acquire()
  held["heartbeat"] = time.time() - 120
  open(os.path.join(d, storage.Lock.NAME), "w").write(json.dumps(held))
  with pytest.warns(UserWarning, match="heartbeat is 1[0-9][0-9]s old"):
    lock = storage.Lock(d, timeout_s=60, heartbeat_s=0.05).acquire()
  first = json.load(open(os.path.join(d, storage.Lock.NAME)))["heartbeat"]
  deadline = time.time() + 30  # a beat every 0.05 s; a loaded host may delay the thread
  while json.load(open(os.path.join(d, storage.Lock.NAME)))["heartbeat"] <= first:
    assert time.time() < deadline, "the heartbeat was not renewed"
    time.sleep(0.05)
  lock.release()
  assert not os.path.exists(os.path.join(d, storage.Lock.NAME))


def test_a_reader_never_sees_a_half_written_lock(tmp_path):
  """The heartbeat replaces lock.json whole: another host reading it mid-beat sees the old or
  the new record, never an empty or cut one (which it would have to treat as a dead holder)."""
  d = str(tmp_path)
  lock = storage.Lock(d, heartbeat_s=0.0002).acquire()
  f = os.path.join(d, storage.Lock.NAME)
  try:
    beats, t0 = set(), time.time()
    while time.time() - t0 < 2.0 or len(beats) < 20:
      assert time.time() - t0 < 60, "the heartbeat was not renewed"
      with open(f) as fh:
        text = fh.read()
      record = json.loads(text)
      assert record["token"] == lock.token, f"a torn read: {text!r}"
      beats.add(record["heartbeat"])
    with pytest.raises(storage.LockHeld, match="in use by another run"):
      storage.Lock(d, timeout_s=60).acquire()
  finally:
    lock.release()
  assert not os.path.exists(f) and not [n for n in os.listdir(d) if n != "lock.json"]


def test_a_lock_file_being_created_is_waited_for_and_a_dead_empty_one_taken_over(
    tmp_path, monkeypatch):
  """Another host's acquire creates lock.json (O_EXCL) and then writes it: a reader in between
  must wait for the record, not take the empty file for a dead holder's."""
  d, held = str(tmp_path), {"host": "elsewhere", "pid": 1, "since": 0,
                            "heartbeat": time.time(), "token": "x"}
  f = os.path.join(d, storage.Lock.NAME)
  open(f, "w").close()
  sleep, waits, reader = time.sleep, [], threading.get_ident()

  def writes_while_the_reader_waits(s):  # the other host's write lands in the 10th wait
    if threading.get_ident() == reader:  # (time.sleep is patched for every thread)
      waits.append(s)
      if len(waits) == 10:
        open(f, "w").write(json.dumps(held))
    sleep(s)
  monkeypatch.setattr(storage.time, "sleep", writes_while_the_reader_waits)
  with pytest.raises(storage.LockHeld, match="host elsewhere, pid 1"):
    storage.Lock(d, timeout_s=60).acquire()
  assert len(waits) == 10  # half a second
  monkeypatch.undo()
  open(f, "w").close()  # a holder that died between creating and writing: taken over
  with pytest.warns(UserWarning, match="heartbeat is [0-9]+s old"):
    storage.Lock(d, timeout_s=60).acquire().release()
  assert not os.path.exists(f)


# ----------------------------------------------------------------------- exact accumulation

def _sft_rows(b=8, t=32, seed=0):
  """Prompt/answer rows whose answers differ in length (2 to 25 tokens)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(8, 200, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  prompt = np.zeros((b, t), np.int32)
  for r in range(b):
    p = int(rng.integers(4, 10))
    end = p + int(rng.integers(2, 26))
    prompt[r, :p] = 1
    seg[r, min(end, t):] = 0
  return {"inputs": x, "segment_ids": seg, "positions": np.tile(np.arange(t, dtype=np.int32),
                                                                (b, 1)), "prompt_mask": prompt}


@pytest.mark.slow
def test_accumulation_gives_the_full_batch_loss_and_gradient(make_config):
  batch = _sft_rows()
  out = {}
  for k in (1, 2, 4):
    cfg = make_config({"objective.name": "ar", "objective.z_loss": 1e-3,
                       "train.grad_accum_steps": k})
    setup = trainer.build(cfg)
    params = setup.init_params()
    fn = jax.jit(trainer.make_loss_and_grads(setup))
    loss, metrics, grads = fn(params, pipeline.to_global(batch, setup.batch_sharding),
                              jax.random.key(0))
    out[k] = (float(loss), float(metrics["ce"]), jax.device_get(grads))
  for k in (2, 4):
    np.testing.assert_allclose(out[k][0], out[1][0], rtol=2e-6)
    np.testing.assert_allclose(out[k][1], out[1][1], rtol=2e-6)
    chex.assert_trees_all_close(out[k][2], out[1][2], rtol=2e-5, atol=1e-8)


@pytest.mark.slow
def test_accumulation_keeps_gradients_sharded_under_fsdp(make_config):
  """The scan's carry holds each gradient as its fsdp shard: no parameter-sized f32 buffer
  in the compiled while loop's state."""
  cfg = make_config({"objective.name": "ar", "train.grad_accum_steps": 2,
                     "train.batch_size": 16, "model.d_model": 64, "model.mlp_dim": 128})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  setup = trainer.build(cfg, mesh)
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  hlo = trainer.make_train_step(setup, tx, schedule, abstract).lower(
      abstract, setup.abstract_batch()).compile().as_text()
  loops = [line for line in hlo.splitlines() if " while(" in line]
  assert loops, "no accumulation loop in the compiled step"
  fmt = lambda shape: f"f32[{','.join(map(str, shape))}]{{"
  leaves = [a for a in jax.tree.leaves(setup.abstract_params) if a.ndim >= 2]
  full = {fmt(a.shape) for a in leaves}
  shard = {fmt(a.sharding.shard_shape(a.shape)) for a in leaves}
  assert not full & shard  # every matrix really is split over fsdp
  for line in loops:
    carried = line.split(" while(")[0]
    assert not [s for s in full if s in carried], (sorted(s for s in full if s in carried))
  assert all(any(s in line for line in loops) for s in shard)


# ------------------------------------------------------------------------------ data checks

def test_data_errors_come_before_compiling(tmp_path, make_config, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled before the data was checked")
  monkeypatch.setattr(trainer, "compile_step", no_compile)
  with pytest.raises(ValueError, match="matches no"):
    trainer.train(make_config({"data.files": str(tmp_path / "none*.txt")}),
                  str(tmp_path / "wd"), log=quiet)
  with pytest.raises(ValueError, match="is not prepared in data.data_dir"):
    trainer.train(make_config({"data.name": "lm1b", "data.data_dir": str(tmp_path)}),
                  str(tmp_path / "wd"), log=quiet)
  assert not os.path.exists(tmp_path / "wd")


PREPARE = """
import sys
sys.path.insert(0, {root!r})
from mdlm_jax import config as config_lib
from mdlm_jax.data import builders
c = config_lib.base_config()
c.data.update(name="text_files", files={files!r}, data_dir={data_dir!r})
print(len(builders.data_source(builders.load_builder(c.data), "train")))
"""


@pytest.mark.slow
def test_two_runs_preparing_one_dataset_at_once_both_use_it(tmp_path, corpus):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = PREPARE.format(root=root, files=corpus, data_dir=str(tmp_path / "tfds"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  counts = [int(out.strip().splitlines()[-1]) for out, _ in outs]
  assert counts[0] == counts[1] > 0
  assert sum("Preparing dataset" in out for out, _ in outs) == 1, outs


@pytest.mark.slow
def test_a_long_document_does_not_fill_consecutive_batches(tmp_path):
  """One document of ~500 rows among short ones: packed lanes and the shuffle window give
  each batch about batch_size / PACK_LANES of its rows; without them it fills batch after
  batch."""
  rng = np.random.default_rng(0)
  docs = [{"text": b"Z" * 16000}] + [
      {"text": bytes(rng.integers(97, 123, rng.integers(20, 120)).astype(np.uint8))}
      for _ in range(400)]
  tok = tokenizers.get_tokenizer("bytes")
  z = int(tok.encode("Z")[0])

  def longest_run(window):
    it = iter(pipeline.make_dataset(docs, tok, seq_len=32, batch_size=8, seed=0, train=True,
                                    prefetch=0, shuffle_window=window))
    run = best = 0
    for _ in range(400):
      b = next(it)["inputs"]
      from_long = ((b == z).mean(axis=1) > 0.9).sum()
      run = run + 1 if from_long > b.shape[0] // 2 else 0
      best = max(best, run)
    return best

  assert longest_run(0) > 20  # the old order: the document fills batch after batch
  assert longest_run(1024) <= 2


@pytest.mark.slow
def test_a_corpus_of_one_file_trains(tmp_path, make_config):
  one = tmp_path / "one.txt"
  one.write_text("".join(f"line {i} of the only file\n" for i in range(400)))
  cfg = make_config({"data.files": str(one), "data.data_dir": str(tmp_path / "tfds"),
                     "train.steps": 2})
  builder = builders.load_builder(cfg.data)
  n_train = len(builders.data_source(builder, "train"))
  n_val = len(builders.data_source(builder, "validation"))
  assert n_val >= 1 and n_train + n_val == 400 // builders.CHUNK_LINES + (
      400 % builders.CHUNK_LINES > 0)
  again = builders.load_builder(cfg.data)  # deterministic: the same split
  assert len(builders.data_source(again, "validation")) == n_val
  trainer.train(cfg, str(tmp_path / "wd"), log=quiet)
  assert steps_in(str(tmp_path / "wd")) == [2]
