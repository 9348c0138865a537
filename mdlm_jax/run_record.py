"""A workdir's `config.json`: the config it was trained with, what changed between runs
(`_history`), and the prepared TFDS dataset it read (`_dataset`)."""
from __future__ import annotations

import time

import jax

from mdlm_jax import storage

CONFIG_FILE = "config.json"
HISTORY_KEY = "_history"
DATASET_KEY = "_dataset"  # the prepared TFDS dataset: name, config, version, directory
_META = (HISTORY_KEY, DATASET_KEY)


def _flat(d, prefix=""):
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_changes(saved: dict, config_dict: dict) -> dict[str, list]:
  """{dotted key: [value in the workdir, value now]} for every key that differs."""
  old = _flat({k: v for k, v in saved.items() if k not in _META})
  new = _flat(config_dict)
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def describe_changes(changes: dict[str, list]) -> str:
  return "\n  ".join(f"{k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in changes.items())


def load_saved_config(workdir) -> dict | None:
  return storage.read_json(storage.path(workdir) / CONFIG_FILE)


def record_config(workdir, config_dict: dict, step: int,
                  dataset: dict | None = None) -> dict[str, list]:
  """Writes config.json (process 0), appending to its history what changed since the run
  that wrote it, and the prepared dataset's TFDS name (`_dataset`); returns the changes."""
  saved = load_saved_config(workdir)
  history = list((saved or {}).get(HISTORY_KEY, []))
  changes = config_changes(saved, config_dict) if saved is not None else {}
  if saved is None:
    history.append({"time": time.time(), "step": step, "event": "created"})
  elif changes:
    history.append({"time": time.time(), "step": step, "changes": changes})
  dataset = dataset if dataset is not None else (saved or {}).get(DATASET_KEY)
  moved = dataset != (saved or {}).get(DATASET_KEY)
  if jax.process_index() == 0 and (saved is None or changes or moved):
    meta = {HISTORY_KEY: history, **({DATASET_KEY: dataset} if dataset else {})}
    storage.write_json(storage.path(workdir) / CONFIG_FILE, dict(config_dict, **meta))
  return changes


def load_config_dict(workdir) -> dict:
  wd = storage.path(workdir)
  if not wd.exists():
    raise ValueError(f"--workdir={workdir} does not exist; give the --workdir of a training run.")
  saved = load_saved_config(workdir)
  if saved is None:
    raise ValueError(f"--workdir={workdir} has no {CONFIG_FILE}: not a training workdir.")
  for key in _META:
    saved.pop(key, None)
  return saved
