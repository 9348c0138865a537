"""TFDS builders that need no network. Each writes ArrayRecord files so Grain reads them with
random access (`as_data_source`) and TensorFlow is never needed.

- `python_stdlib`: the running interpreter's standard-library `.py` files (the default corpus).
- `text_files`: any glob of `.txt` / `.py` / `.md` files, or `.jsonl` with a `text` field.
- `sft_pairs`: `.jsonl` files whose lines hold `prompt` and `answer` (supervised fine-tuning).
- `star_graph` (in `star_graph.py`, registered in SOURCES): generated path-finding problems.

Documents go to `validation` when a hash of their path (and line, for jsonl) falls in the
lowest VALIDATION_PERCENT, so the split is deterministic and independent of file order; a
corpus too small for that still gets one validation document. A corpus of one document (one
text file) is split the same way by chunks of CHUNK_LINES lines. A dataset is prepared once
per data_dir, under a lock beside it (`prepared`).
Undecodable bytes are replaced (U+FFFD) and empty documents are skipped.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mdlm_jax import storage

class _QuietLocalSources(logging.Filter):
  """TFDS's notices that mean nothing for these local sources: a custom config (ours are
  named by a hash of the files) and a variant folder without dataset_info.json (being
  prepared)."""

  def filter(self, record):
    return not record.getMessage().startswith(("Using custom data configuration",
                                               "Variant folder"))


logging.getLogger("absl").addFilter(_QuietLocalSources())

VALIDATION_PERCENT = 3
CHUNK_LINES = 32  # a one-document corpus is split into chunks of this many lines
TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")


def _hash(key: str) -> int:
  return int.from_bytes(hashlib.sha1(key.encode("utf-8", "replace")).digest()[:4], "little")


def _split_of(key: str) -> str:
  return "validation" if _hash(key) % 100 < VALIDATION_PERCENT else "train"


def assign_splits(keys: list[str]) -> set[str]:
  """The validation keys. Both splits must be non-empty: with few documents the one with
  the smallest hash is moved across."""
  if len(keys) < 2:
    raise ValueError(f"the corpus has {len(keys)} non-empty document(s) or line chunk(s); at "
                     "least 2 are needed (one for validation). Give more files, jsonl lines or "
                     "lines of text.")
  val = {k for k in keys if _split_of(k) == "validation"}
  by_hash = sorted(keys, key=_hash)
  if not val:
    val = {by_hash[0]}
  elif len(val) == len(keys):
    val.discard(by_hash[-1])
  return val


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", "replace")


def _pairs(paths: list[str], root: str):
  """Yields (key, {'prompt', 'answer'}) for every jsonl line with a non-empty answer."""
  for path in paths:
    if not path.endswith(".jsonl"):
      raise ValueError(f"{path}: prompt/answer pairs are read from .jsonl files only.")
    rel = os.path.relpath(path, root) if root else path
    for i, line in enumerate(_read_text(path).splitlines()):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        prompt, answer = row["prompt"], row["answer"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}:{i + 1}: not a JSON object with 'prompt' and 'answer' "
                         "fields") from None
      if isinstance(answer, str) and answer.strip() and isinstance(prompt, str):
        yield f"{rel}:{i}", {"prompt": prompt, "answer": answer}


def _documents(paths: list[str], root: str):
  """Yields (key, text) for every non-empty document of the files."""
  for path in paths:
    rel = os.path.relpath(path, root) if root else path
    if path.endswith(".jsonl"):
      for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
          continue
        try:
          text = json.loads(line).get("text", "")
        except (json.JSONDecodeError, AttributeError):
          raise ValueError(f"{path}:{i + 1}: not a JSON object with a 'text' field") from None
        if isinstance(text, str) and text.strip():
          yield f"{rel}:{i}", text
    else:
      text = _read_text(path)
      if text.strip():
        yield rel, text


class TextBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by the builders below: features {'text', 'key'}, splits train / validation."""
  # TFDS would otherwise locate this package through importlib.resources, which fails for
  # editable installs (`pip install -e .`): give it the paths directly.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
    return epath.Path(__file__)

  TEXT_FEATURES = ("text",)
  ROWS = "documents"  # how the pipeline makes rows: documents (packed), pairs, problems

  @classmethod
  def check(cls, data_cfg) -> None:
    """Raises ValueError naming a `data.` setting this source cannot serve (config time)."""

  @classmethod
  def make_config(cls, data_cfg):
    """The BuilderConfig for these settings (None: the builder's only one)."""
    return None

  def _info(self):
    names = self.TEXT_FEATURES + ("key",)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in names}),
        supervised_keys=None)

  def _paths(self) -> tuple[list[str], str]:
    raise NotImplementedError

  # TFDS's "Downloading and preparing dataset Unknown size (download: Unknown size, ...)" and
  # its closing notice: nothing is downloaded; `_prepare_locked` says what happens instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  _chunked = False

  def _items(self, paths, root):
    """(key, features) of every document, or of every chunk of CHUNK_LINES lines when the
    corpus is a single document (so both splits get a deterministic share of it)."""
    for key, text in _documents(paths, root):
      if not self._chunked:
        yield key, {"text": text}
        continue
      lines = text.splitlines(True)
      size = max(1, min(CHUNK_LINES, len(lines) // 2))
      for i in range(0, len(lines), size):
        chunk = "".join(lines[i:i + size])
        if chunk.strip():
          yield f"{key}#L{i + 1}", {"text": chunk}

  def _split_generators(self, dl_manager):
    del dl_manager
    paths, root = self._paths()
    keys = [key for key, _ in self._items(paths, root)]
    if len(keys) == 1 and type(self)._items is TextBuilder._items:
      self._chunked = True  # one document: split by chunks of its lines instead
      keys = [key for key, _ in self._items(paths, root)]
    val = assign_splits(keys)
    return {split: self._generate_examples(paths, root, val, split == "validation")
            for split in ("train", "validation")}

  def _generate_examples(self, paths, root, val, validation):  # pylint: disable=arguments-differ
    for key, features in self._items(paths, root):
      if (key in val) == validation:
        yield key, dict(features, key=key)


class PythonStdlib(TextBuilder):
  """The standard-library sources of the running Python (site-packages excluded)."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=f"py{sys.version_info.major}{sys.version_info.minor}",
      description="standard library of this Python version")]

  def _paths(self):
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
      dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages",
                                                    "__pycache__"))
      paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return paths, root


class TextFilesConfig(tfds.core.BuilderConfig):
  def __init__(self, *, files: str, **kwargs):
    super().__init__(**kwargs)
    self.files = files


def resolve_files(pattern: str) -> list[str]:
  """Files matched by a glob (or several, comma-separated) with a supported suffix."""
  paths = []
  for p in (x.strip() for x in pattern.split(",") if x.strip()):
    p = os.path.expanduser(p)
    paths += glob.glob(os.path.join(p, "**", "*"), recursive=True) if os.path.isdir(p) \
        else glob.glob(p, recursive=True)
  paths = sorted({os.path.abspath(p) for p in paths
                  if os.path.isfile(p) and p.endswith(TEXT_SUFFIXES)})
  if not paths:
    raise ValueError(f"data.files={pattern!r} matches no {'/'.join(TEXT_SUFFIXES)} file; "
                     "give an existing file, directory or glob.")
  return paths


class TextFiles(TextBuilder):
  """Local text files. The config name is a hash of the files' paths, sizes and mtimes, so
  changing the files prepares a new version instead of serving stale data."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []

  @classmethod
  def check(cls, data_cfg) -> None:
    if not data_cfg.files:
      raise ValueError(f"data.name={data_cfg.name!r} needs data.files, a glob such as "
                       "'/path/*.txt'.")

  @classmethod
  def make_config(cls, data_cfg):
    return text_files_config(data_cfg.files)

  def _paths(self):
    return resolve_files(self.builder_config.files), ""


class SftPairs(TextFiles):
  """Prompt/answer pairs from `.jsonl` files (features prompt, answer, key)."""
  TEXT_FEATURES = ("prompt", "answer")
  ROWS = "pairs"

  def _items(self, paths, root):
    return _pairs(paths, root)


def text_files_config(pattern: str) -> TextFilesConfig:
  paths = resolve_files(pattern)
  h = hashlib.sha1()
  for p in paths:
    st = os.stat(p)
    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return TextFilesConfig(name=f"g{h.hexdigest()[:16]}", files=pattern,
                         description=f"text files matching {pattern}")


def _prepare_locked(make) -> None:
  """Prepares the builder's dataset once per data_dir: independent runs that need it at the
  same time take turns on a lock beside it, and the later ones find it prepared."""
  builder = make()
  lock = storage.Lock(os.path.join(builder.data_dir_root, ".prepare", builder.name,
                                   builder.builder_config.name if builder.builder_config else "",
                                   str(builder.version)), what="dataset")
  told = False
  while True:
    try:
      lock.acquire()
      break
    except storage.LockHeld as e:
      if not told:
        print(f"Waiting for another run to prepare {builder.name}: {e}", flush=True)
        told = True
      time.sleep(1.0)
  try:
    builder = make()
    if not builder.is_prepared():
      print(f"Preparing dataset {builder.name} into {builder.data_dir} (once) ...", flush=True)
      started = time.time()
      tfds.display_progress_bar(False)  # per-split bars with temporary file names: noise here
      try:
        builder.download_and_prepare()
      finally:
        tfds.display_progress_bar(True)
      splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
      print(f"Prepared {builder.name} in {time.time() - started:.1f} s ({splits} "
            "examples).", flush=True)
  finally:
    lock.release()


def prepared(make) -> tfds.core.DatasetBuilder:
  """`make()`'s builder with its dataset prepared. With several processes, process 0 prepares
  it while the others wait; a process that still does not see it (its own local data_dir)
  then prepares its own copy."""
  import jax  # pylint: disable=g-import-not-at-top
  need = not make().is_prepared()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if bool(np.any(multihost_utils.process_allgather(np.array([need])))):
      if jax.process_index() == 0 and need:
        _prepare_locked(make)
      multihost_utils.sync_global_devices("dataset prepared")
      need = not make().is_prepared()
  if need:
    _prepare_locked(make)
  return make()


# data.name -> builder; a source module registers itself here (star_graph.py does).
SOURCES = {"python_stdlib": PythonStdlib, "text_files": TextFiles, "sft_pairs": SftPairs}


def check(data_cfg) -> None:
  """The source's own checks of the `data.` settings (none for other TFDS names)."""
  if data_cfg.name in SOURCES:
    SOURCES[data_cfg.name].check(data_cfg)


def rows_of(data_cfg) -> str:
  """'documents', 'pairs' or 'problems': the source's kind of rows."""
  return SOURCES[data_cfg.name].ROWS if data_cfg.name in SOURCES else "documents"


def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The builder for `data.name`, prepared into `data.data_dir` on first use when it is one of
  ours; any other TFDS name must already be prepared there (as array_record)."""
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if data_cfg.name in SOURCES:
    cls = SOURCES[data_cfg.name]
    config = cls.make_config(data_cfg)
    kwargs = {} if config is None else {"config": config}
    return prepared(lambda: cls(data_dir=data_dir, file_format="array_record", **kwargs))
  try:
    builder = tfds.builder(data_cfg.name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"data.name={data_cfg.name!r}: not a known TFDS dataset ({e}).") from e
  if not builder.is_prepared():
    raise ValueError(
        f"data.name={data_cfg.name!r} is not prepared in data.data_dir={data_dir!r}. Prepare it "
        f"once where the data can be downloaded:\n  tfds build {data_cfg.name} "
        f"--data_dir={data_dir} --file_format=array_record")
  return builder


def describe(builder) -> dict:
  """What plain TFDS needs to find the prepared dataset again (recorded in config.json)."""
  return {"name": builder.name, "config": builder.builder_config.name
          if builder.builder_config else None, "version": str(builder.version),
          "directory": str(builder.data_dir)}


def data_source(builder, split: str):
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"dataset {builder.name!r} split {split!r} cannot be read with random "
                     f"access ({e}); prepare it with --file_format=array_record.") from e
  if len(source) == 0:
    raise ValueError(f"dataset {builder.name!r} split {split!r} is empty; give more "
                     "documents (data.files) or another dataset.")
  return source


def text_of(record, key: str = "text") -> bytes:
  value = record[key]
  if isinstance(value, np.ndarray):
    value = value.item()
  return value if isinstance(value, bytes) else str(value).encode("utf-8")
