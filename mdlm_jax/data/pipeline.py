"""The Grain pipeline: shuffle -> tokenize -> shard by process -> concat-then-split packing into
rows of `seq_len` with segment ids and positions -> batch -> global jax.Arrays on the mesh.

Each document is wrapped as [BOS] text [EOS]. Packing continues a document across rows (no
padding is wasted). Segment ids number the documents of a row from 1 (0 is padding);
positions count from 0 at each segment's first token in the row, so a document continued from
the previous row restarts at 0 there (positions are offsets within the row's piece of a
document, not within the document). Training rows pass through a shuffle window (see
`make_dataset`), so consecutive rows of a long document are spread over many batches.

Prompt/answer data (`data.name=sft_pairs`) is not packed: each row is one pair,
[BOS] prompt answer [EOS], filled up to `seq_len` with EOS (the padding belongs to the answer,
so a model learns where to stop; LLaDA SFT) or cut at `seq_len`, plus `prompt_mask` (1 on
BOS and the prompt). Star-graph problems (`data.name=star_graph`) are one per row too, the
prompt being the graph and the query up to '=', the answer the path; their padding is
segment 0 (nothing to learn there).
"""
from __future__ import annotations

import dataclasses
import signal

import grain
import jax
import numpy as np

from mdlm_jax import objectives
from mdlm_jax import tokenizers
from mdlm_jax.data import builders
from mdlm_jax.data import star_graph

KEYS = ("inputs", "segment_ids", "positions")
PROMPT_KEYS = KEYS + ("prompt_mask",)
PACK_LANES = 8  # packing streams interleaved before the shuffle window (see make_dataset)


def batch_keys(data_cfg) -> tuple[str, ...]:
  return KEYS if builders.rows_of(data_cfg) == "documents" else PROMPT_KEYS


@dataclasses.dataclass(frozen=True)
class Tokenize:
  tokenizer: tokenizers.Tokenizer

  def __call__(self, record) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(builders.text_of(record))
    return {"inputs": np.concatenate([[tokenizers.BOS], ids, [tokenizers.EOS]]).astype(np.int32)}


def fim_permute(ids, rng: np.random.Generator):
  """[BOS] t [EOS] -> [BOS, <fim_prefix>] t[:a] [<fim_suffix>] t[b:] [<fim_middle>] t[a:b] [EOS]
  with 0 <= a <= b <= len(t) uniform (prefix-suffix-middle, Bavarian et al. 2022)."""
  body = ids[1:-1]
  a, b = np.sort(rng.integers(0, len(body) + 1, 2))
  return np.concatenate([[tokenizers.BOS, tokenizers.FIM_PREFIX], body[:a],
                         [tokenizers.FIM_SUFFIX], body[b:], [tokenizers.FIM_MIDDLE], body[a:b],
                         [tokenizers.EOS]]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Fim:
  """Turns a `rate` share of tokenized documents into prefix-suffix-middle order."""
  rate: float

  def __call__(self, record, rng: np.random.Generator):
    if rng.random() >= self.rate:
      return record
    return {"inputs": fim_permute(record["inputs"], rng)}


@dataclasses.dataclass(frozen=True)
class Unpacked:
  """One document per row: [BOS] text [EOS] cut at `seq_len`, then padding (segment 0)."""
  seq_len: int

  def __call__(self, record):
    ids = record["inputs"][: self.seq_len]
    n = len(ids)
    pad = lambda x: np.pad(x, (0, self.seq_len - n)).astype(np.int32)
    return {"inputs": pad(ids), "segment_ids": pad(np.ones(n)), "positions": pad(np.arange(n))}


@dataclasses.dataclass(frozen=True)
class TokenizePair:
  """One prompt/answer pair -> a full row of `seq_len` (see the module docstring)."""
  tokenizer: tokenizers.Tokenizer
  seq_len: int

  def __call__(self, record) -> dict[str, np.ndarray]:
    prompt = np.concatenate([[tokenizers.BOS], self.tokenizer.encode(
        builders.text_of(record, "prompt"))])
    answer = np.concatenate([self.tokenizer.encode(builders.text_of(record, "answer")),
                             [tokenizers.EOS]])
    ids = np.concatenate([prompt, answer])[: self.seq_len]
    ids = np.pad(ids, (0, self.seq_len - len(ids)), constant_values=tokenizers.EOS)
    prompt_mask = (np.arange(self.seq_len) < len(prompt)).astype(np.int32)
    return {"inputs": ids.astype(np.int32), "segment_ids": np.ones(self.seq_len, np.int32),
            "positions": np.arange(self.seq_len, dtype=np.int32), "prompt_mask": prompt_mask}


@dataclasses.dataclass(frozen=True)
class TokenizeProblem:
  """One star-graph problem -> [BOS] graph and query up to '=' | path [EOS], then padding
  (segment 0), with `prompt_mask` 1 on BOS and the prompt. The row fits (config check)."""
  tokenizer: tokenizers.Tokenizer
  seq_len: int

  def __call__(self, record) -> dict[str, np.ndarray]:
    question, path = star_graph.problem_parts(builders.text_of(record))
    prompt = np.concatenate([[tokenizers.BOS], self.tokenizer.encode(question)])
    answer = np.concatenate([self.tokenizer.encode(path), [tokenizers.EOS]])
    if len(prompt) + len(answer) > self.seq_len:
      raise ValueError(f"a star-graph problem takes {len(prompt) + len(answer)} tokens, more "
                       f"than data.seq_len={self.seq_len}; raise data.seq_len.")
    row = Unpacked(self.seq_len)({"inputs": np.concatenate([prompt, answer])})
    row["prompt_mask"] = (np.arange(self.seq_len) < len(prompt)).astype(np.int32)
    return row


@dataclasses.dataclass(frozen=True)
class ReadRows:
  """Record indices -> a batch of rows. A TFDS ArrayRecord source reads a list of records in
  one call (`__getitems__`) about 14x faster than one at a time."""
  source: object
  row: object

  def __call__(self, indices) -> dict[str, np.ndarray]:
    keys = [int(i) for i in indices]
    many = getattr(self.source, "__getitems__", None)
    records = many(keys) if many is not None else [self.source[k] for k in keys]
    rows = [self.row(r) for r in records]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _rename(x):
  return {"inputs": x["inputs"], "segment_ids": x["inputs_segment_ids"].astype(np.int32),
          "positions": x["inputs_positions"].astype(np.int32)}


def _lane_read_options(lanes: int) -> grain.ReadOptions:
  """Grain's default read threads and buffer, shared by the packing lanes: each lane's
  `to_iter_dataset` would otherwise start its own pool (8 lanes: 128 threads, 4000 documents
  read ahead)."""
  default = grain.ReadOptions()
  return grain.ReadOptions(num_threads=max(1, default.num_threads // lanes),
                           prefetch_buffer_size=max(1, default.prefetch_buffer_size // lanes))


def make_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 train: bool, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 2, rows: str = "documents", pack: bool = True,
                 transforms: tuple = (), workers: int = 0,
                 shuffle_window: int = 0) -> grain.IterDataset:
  """A per-process dataset of packed batches {inputs, segment_ids, positions} (batch, seq_len).

  train: shuffled (reshuffled each epoch) and repeated forever; otherwise one ordered pass
  whose last rows are zero-padded (segment id 0 marks padding). pack=False: one document per
  row. transforms: Grain random maps applied to each tokenized training document before
  packing, as the objective declares them (`Objective.train_transforms`; `ar`'s FIM).
  shuffle_window > 0 (train, packed): documents are packed in PACK_LANES lanes whose rows are
  interleaved, then shuffled in a window of that many rows, so a long document gives a batch
  about batch_size / PACK_LANES of its rows instead of filling batch after batch.
  rows: the source's kind (`builders.rows_of`): 'documents', or the prompt/answer rows of
  'pairs' (`sft_pairs`) and 'problems' (`star_graph`), see the module docstring.
  workers > 0: that many processes each read, tokenize and batch their own slice of the
  records (Grain multiprocess prefetch; batches come round-robin from the workers), for
  accelerators that consume batches faster than one host thread makes them."""
  if rows != "documents":  # fixed rows: batches of record indices, each read in one call
    row = {"pairs": TokenizePair, "problems": TokenizeProblem}[rows](tokenizer, seq_len)
    idx = grain.MapDataset.range(len(source))
    if train:
      idx = idx.shuffle(seed=seed).repeat()
    it = idx[process_index::process_count].batch(batch_size, drop_remainder=train).map(
        ReadRows(source, row)).to_iter_dataset()
  else:
    ds = grain.MapDataset.source(source)
    if train:
      ds = ds.shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count].map(Tokenize(tokenizer))
    for i, transform in enumerate(transforms if train else ()):
      ds = ds.random_map(transform, seed=seed + 1 + i)
    if pack:
      lanes = PACK_LANES if train and shuffle_window else 1
      read = _lane_read_options(lanes)
      packed = [grain.experimental.ConcatThenSplitIterDataset(
          ds[i::lanes].to_iter_dataset(read), length_struct={"inputs": seq_len}).map(_rename)
                for i in range(lanes)]
      it = packed[0] if lanes == 1 else grain.IterDataset.mix(packed)
    else:
      it = ds.map(Unpacked(seq_len)).to_iter_dataset()
    if train and shuffle_window > 1:
      it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window,
                                                       seed=seed + 2)
    it = it.batch(batch_size, drop_remainder=train)
  if not train:
    it = it.map(lambda b: pad_batch(b, batch_size))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_leave_sigterm_to_the_trainer)
  elif prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  return _JsonState(it)


def _slices_as_tuples(state):
  """Grain's concat-then-split compares its `remainder_slices` with a tuple, but its state
  comes back from the checkpoint's JSON with lists: restored as they are, an empty remainder
  reads as a real one and the restored order is shifted by a row."""
  if isinstance(state, dict):
    return {k: ({n: tuple(v) for n, v in val.items()} if k == "remainder_slices"
                else _slices_as_tuples(val)) for k, val in state.items()}
  if isinstance(state, list):
    return [_slices_as_tuples(v) for v in state]
  return state


class _JsonStateIterator(grain.DatasetIterator):
  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_slices_as_tuples(state))


class _JsonState(grain.IterDataset):
  """The pipeline's last stage: restores a state that went through JSON exactly."""

  def __iter__(self):
    return _JsonStateIterator(self._parent.__iter__())


def synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int,
                    doc_len: int = 128) -> dict[str, np.ndarray]:
  """Random tokens in packed rows whose documents average `doc_len` tokens (0: one document
  per row), for benchmarks and checks that must not depend on a dataset."""
  inputs = rng.integers(tokenizers.NUM_SPECIAL, vocab, (batch, seq_len), dtype=np.int32)
  starts = rng.random((batch, seq_len)) < (1.0 / doc_len if doc_len else 0.0)
  starts[:, 0] = True
  idx = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
  begin = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return {"inputs": inputs, "segment_ids": np.cumsum(starts, axis=1).astype(np.int32),
          "positions": (idx - begin).astype(np.int32)}


def _leave_sigterm_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """Schedulers (and `timeout`) signal the whole process group: a worker that died of it would
  break the trainer's last batch before it saves. Workers ignore SIGTERM; the trainer closes
  them after its checkpoint."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pad_batch(batch, batch_size: int):
  n = batch["inputs"].shape[0]
  if n == batch_size:
    return batch
  return {k: np.pad(v, ((0, batch_size - n), (0, 0))) for k, v in batch.items()}


def empty_batch(batch_size: int, seq_len: int, keys=KEYS):
  return {k: np.zeros((batch_size, seq_len), np.int32) for k in keys}


def to_global(local_batch, sharding) -> dict[str, jax.Array]:
  """Assembles the processes' local rows into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of "
                     f"processes ({jax.process_count()}).")
  return global_batch // jax.process_count()


def train_dataset(config, tokenizer, seed_offset: int = 0) -> grain.IterDataset:
  """The training batches of this process. Loads (prepares once) the dataset and checks the
  batch against the process count, so it is the first thing a run does."""
  builder = builders.load_builder(config.data)
  return make_dataset(
      builders.data_source(builder, "train"), tokenizer, seq_len=config.data.seq_len,
      batch_size=local_batch_size(config.train.batch_size), seed=config.seed + seed_offset,
      train=True, shuffle_window=config.data.shuffle_window,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch=config.data.prefetch, rows=builders.rows_of(config.data),
      pack=config.data.pack, workers=config.data.workers,
      transforms=tuple(objectives.get(config.objective.name).train_transforms(
          config.objective)))


def check_split(config, split: str) -> None:
  """Raises ValueError naming the fix when `split` of the configured dataset cannot be read."""
  builders.data_source(builders.load_builder(config.data), split)


def eval_dataset(config, tokenizer, split: str = "validation") -> grain.IterDataset:
  builder = builders.load_builder(config.data)
  return make_dataset(
      builders.data_source(builder, split), tokenizer, seq_len=config.data.seq_len,
      batch_size=local_batch_size(config.train.batch_size), seed=config.seed, train=False,
      process_index=jax.process_index(), process_count=jax.process_count(), prefetch=0,
      rows=builders.rows_of(config.data), pack=config.data.pack)
