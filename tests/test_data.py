"""TFDS builders and the Grain pipeline: splits, packing, determinism, resume, sharding."""
import json
import multiprocessing
import os
import signal
import threading
import time

import grain
import numpy as np
import pytest

from mdlm_jax import tokenizers
from mdlm_jax.data import builders
from mdlm_jax.data import pipeline

TOK = tokenizers.get_tokenizer("bytes")


def source(make_config, split="train"):
  cfg = make_config()
  return builders.data_source(builders.load_builder(cfg.data), split)


def batches(src, n, **kw):
  args = dict(seq_len=32, batch_size=4, seed=0, train=True, prefetch=0)
  args.update(kw)
  it = iter(pipeline.make_dataset(src, TOK, **args))
  out = [next(it) for _ in range(n)]
  return out, it


def test_text_files_builder_handles_bad_utf8_empty_files_and_blank_lines(make_config, corpus):
  train, val = source(make_config, "train"), source(make_config, "validation")
  texts = [builders.text_of(train[i]).decode() for i in range(len(train))]
  texts += [builders.text_of(val[i]).decode() for i in range(len(val))]
  assert len(texts) == 301  # 300 jsonl documents + latin1.txt; the empty file is skipped
  assert any("caf\ufffd" in t for t in texts), "undecodable bytes are replaced, not fatal"
  assert 0 < len(val) < 0.1 * len(texts)


def test_split_is_deterministic_by_document_key(make_config):
  val = source(make_config, "validation")
  keys = sorted(builders.text_of(val[i], "key").decode() for i in range(len(val)))
  assert all(builders._split_of(k) == "validation" for k in keys)
  assert builders.assign_splits(["a", "b"]) == builders.assign_splits(["b", "a"])
  assert len(builders.assign_splits(["a", "b"])) == 1


def test_packing_wraps_documents_and_tracks_segments(make_config):
  (b,), it = batches(source(make_config), 1)
  it.close()
  x, seg, pos = b["inputs"], b["segment_ids"], b["positions"]
  assert x.shape == seg.shape == pos.shape == (4, 32)
  assert (seg >= 1).all(), "training rows are fully packed"
  for r in range(4):
    for t in range(1, 32):
      if seg[r, t] == seg[r, t - 1]:
        assert pos[r, t] == pos[r, t - 1] + 1
      else:
        assert seg[r, t] == seg[r, t - 1] + 1
        assert pos[r, t] == 0 and x[r, t] == tokenizers.BOS, "a new document starts with BOS"
        assert x[r, t - 1] == tokenizers.EOS, "a finished document ends with EOS"


def test_pipeline_is_deterministic(make_config):
  src = source(make_config)
  a, it1 = batches(src, 5)
  b, it2 = batches(src, 5)
  c, it3 = batches(src, 5, seed=1)
  for it in (it1, it2, it3):
    it.close()
  for x, y in zip(a, b):
    for k in pipeline.KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert any((x["inputs"] != z["inputs"]).any() for x, z in zip(a, c)), "seed must matter"


def test_packing_lanes_share_grains_read_threads_and_keep_the_batches(make_config, monkeypatch):
  """The shuffle window's packing lanes read with Grain's default number of threads between
  them, not that many each; the batches are those of lanes read in the calling thread."""
  src = source(make_config)

  def read(**kw):
    before = set(threading.enumerate())
    got, it = batches(src, 3, shuffle_window=64, **kw)
    started = set(threading.enumerate()) - before
    it.close()
    return got, started

  got, started = read()
  assert pipeline.PACK_LANES > 1
  assert 0 < len(started) <= grain.ReadOptions().num_threads, [t.name for t in started]
  monkeypatch.setattr(pipeline, "_lane_read_options",
                      lambda lanes: grain.ReadOptions(num_threads=0))
  inline, started = read()
  assert not started
  for x, y in zip(got, inline):
    for k in pipeline.KEYS:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.slow
@pytest.mark.parametrize("prefetch,workers", [(0, 0), (2, 0), (0, 2)])
def test_mid_epoch_resume_continues_the_same_stream(make_config, prefetch, workers):
  src = source(make_config)
  kw = dict(prefetch=prefetch, workers=workers)
  reference, it = batches(src, 120, **kw)  # > 1 epoch: crosses a reshuffle
  it.close()
  _, it = batches(src, 37, **kw)
  state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
  it.close()
  fresh = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=4, seed=0, train=True,
                                     **kw))
  fresh.set_state(state)
  for i in range(37, 120):
    got = next(fresh)
    for k in pipeline.KEYS:
      np.testing.assert_array_equal(got[k], reference[i][k], err_msg=f"batch {i} key {k}")
  fresh.close()


@pytest.mark.slow
def test_worker_processes_serve_every_document_once_per_epoch(make_config):
  """data.workers > 0: each worker batches its own slice; over one epoch the rows are the same
  documents as with the single-thread pipeline, each exactly once."""
  src = source(make_config)
  n = len(src)
  kw = dict(batch_size=1, seq_len=4096, pack=False)
  single, it = batches(src, n, **kw)
  it.close()
  multi, it = batches(src, n, workers=2, **kw)
  it.close()
  rows = lambda bs: sorted(b["inputs"][0][b["segment_ids"][0] > 0].tobytes() for b in bs)
  assert rows(multi) == rows(single)
  assert len(set(rows(single))) == n


@pytest.mark.slow
def test_worker_processes_survive_sigterm(make_config):
  """A scheduler's SIGTERM reaches the whole process group; the workers must keep serving
  so that the trainer can read its last batch and save."""
  src = source(make_config)
  reference, it = batches(src, 30, workers=2)
  it.close()
  got, it = batches(src, 2, workers=2)
  children = multiprocessing.active_children()
  assert children, "expected worker processes"
  for child in children:
    os.kill(child.pid, signal.SIGTERM)
  time.sleep(1.0)
  got += [next(it) for _ in range(28)]
  it.close()
  for a, b in zip(got, reference):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_processes_read_disjoint_documents(make_config):
  src = source(make_config)

  def docs(index, count):
    it = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=4, seed=0, train=False,
                                    process_index=index, process_count=count, prefetch=0))
    rows = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in it])
    text = bytes((rows[rows >= tokenizers.NUM_SPECIAL] - tokenizers.NUM_SPECIAL).tolist())
    return rows, text

  all_rows, _ = docs(0, 1)
  r0, t0 = docs(0, 2)
  r1, t1 = docs(1, 2)
  n_docs = (all_rows == tokenizers.BOS).sum()
  assert (r0 == tokenizers.BOS).sum() + (r1 == tokenizers.BOS).sum() == n_docs
  assert len(r0) + len(r1) == len(all_rows)
  assert t0 != t1


def test_eval_pass_pads_its_last_batch(make_config):
  src = source(make_config, "validation")
  it = iter(pipeline.make_dataset(src, TOK, seq_len=32, batch_size=4, seed=0, train=False,
                                  prefetch=0))
  out = list(it)
  assert all(b["inputs"].shape == (4, 32) for b in out)
  n_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in out)
  expected = sum(len(TOK.encode(builders.text_of(src[i]))) + 2 for i in range(len(src)))
  assert n_tokens == expected, "every validation token appears exactly once"


def test_missing_or_empty_data_is_a_clear_error(tmp_path, make_config):
  cfg = make_config({"data.files": str(tmp_path / "nothing*.txt")})
  with pytest.raises(ValueError, match="data.files=.*matches no"):
    builders.load_builder(cfg.data)
  (tmp_path / "blank.txt").write_text("   \n")
  cfg = make_config({"data.files": str(tmp_path / "blank.txt"),
                     "data.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(ValueError, match="0 non-empty document"):
    builders.load_builder(cfg.data)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path, make_config):
  cfg = make_config({"data.name": "lm1b", "data.data_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="tfds build lm1b"):
    builders.load_builder(cfg.data)


def test_python_stdlib_builder_prepares_offline(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(name="python_stdlib", data_dir=str(tmp_path), files=""))
  b = builders.load_builder(cfg)
  train = builders.data_source(b, "train")
  val = builders.data_source(b, "validation")
  assert len(train) > 500 and len(val) > 10
  keys = {builders.text_of(val[i], "key").decode() for i in range(len(val))}
  assert all(k.endswith(".py") and builders._split_of(k) == "validation" for k in keys)
  assert os.path.isdir(os.path.join(str(tmp_path), "python_stdlib"))
