"""Orbax checkpoints: what is saved, the restore precedence, and params-only restore.

A checkpoint step holds the items
  params      the model parameters (pure dict of arrays)
  ema         their exponential moving average (only when train.ema_decay > 0)
  opt         {'step', 'opt_state'}
  data        the Grain iterator state, one JSON file per process
Saves are asynchronous. Restore precedence, in one place: the newest step that restores
cleanly; a damaged newer step is skipped with a warning; when every step fails the run stops
(nothing is overwritten). A workdir whose checkpoints belong to a differently shaped model is
refused before anything is restored or written.
"""
from __future__ import annotations

import json
import os
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
# Config sections that define the parameter shapes; a resume must not change them.
SHAPE_KEYS = ("objective", "model", "data.tokenizer")


def _get(cfg: dict, dotted: str):
  for part in dotted.split("."):
    cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
  return cfg


def _flat(d, prefix=""):
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def check_compatible(workdir: str, config_dict: dict) -> None:
  """Raises if workdir's saved config differs from this one in a shape-defining key."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = []
  for key in SHAPE_KEYS:
    old, new = _flat(_get(saved, key), key + "."), _flat(_get(config_dict, key), key + ".")
    diffs += [f"{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now"
              for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if diffs:
    raise ValueError(f"--workdir={workdir} holds a run of a different model; refusing to resume "
                     "or overwrite it:\n  " + "\n  ".join(diffs) +
                     "\nUse a new --workdir, or the workdir's settings (see its config.json).")


def save_config(workdir: str, config_dict: dict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)


def load_config_dict(workdir: str) -> dict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"--workdir={workdir} has no {CONFIG_FILE}: not a training workdir.")
  with open(path) as f:
    return json.load(f)


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep), read_only=read_only,
      enable_async_checkpointing=not read_only, create=not read_only)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in ("params", "ema", "opt"):
    registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add("data", grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
  registry.add("data", grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
  return ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints", options=options,
                               handler_registry=registry)


def save(mngr: ocp.CheckpointManager, state: dict, data_iterator) -> None:
  items = {"params": ocp.args.StandardSave(state["params"]),
           "opt": ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
           "data": grain.checkpoint.CheckpointSave(data_iterator)}
  if state.get("ema") is not None:
    items["ema"] = ocp.args.StandardSave(state["ema"])
  mngr.save(int(jax.device_get(state["step"])), args=ocp.args.Composite(**items), force=True)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'blocks/0/attn/wq' -> shape (integer and string dict keys compare equal)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


def _shape_mismatch(mngr, step, abstract_params) -> str | None:
  try:
    meta = mngr.item_metadata(step)["params"]
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: a damaged step)
    return None
  if meta is None:
    return None
  saved = _shapes(meta)
  want = _shapes(abstract_params)
  if not saved:
    return None
  diffs = [f"{k}: {saved.get(k)} saved vs {want.get(k)} now"
           for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  return "; ".join(diffs[:5]) or None


def restore_latest(mngr, abstract_state: dict, data_iterator):
  """Restores the newest restorable step into `abstract_state`'s shardings and the data
  iterator in place. Returns the state, or None when the workdir has no checkpoint."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    mismatch = _shape_mismatch(mngr, step, abstract_state["params"])
    if mismatch:
      raise ValueError(f"checkpoint step {step} in {mngr.directory} belongs to a model of other "
                       f"shapes ({mismatch}); refusing to resume. Use a new --workdir.")
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "opt": ocp.args.StandardRestore({"step": abstract_state["step"],
                                              "opt_state": abstract_state["opt_state"]}),
             "data": grain.checkpoint.CheckpointRestore(data_iterator)}
    if abstract_state.get("ema") is not None:
      items["ema"] = ocp.args.StandardRestore(abstract_state["ema"])
    try:
      r = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"checkpoint step {step} could not be restored ({type(e).__name__}: "
                    f"{str(e)[:300]}); falling back to the previous one.")
      errors.append(f"step {step}: {e}")
      continue
    return {"step": r["opt"]["step"], "params": r["params"], "opt_state": r["opt"]["opt_state"],
            "ema": r["ema"] if "ema" in items else None}
  raise RuntimeError(f"no checkpoint in {mngr.directory} could be restored; nothing was "
                     "overwritten. Errors:\n" + "\n".join(e[:500] for e in errors))


def restore_params(workdir: str, abstract_params, use_ema: bool = True, step: int | None = None):
  """Restores params (or their EMA) alone onto the shardings of `abstract_params`, which may
  describe any mesh. Returns (params, step)."""
  mngr = manager(workdir, read_only=True)
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise ValueError(f"--workdir={workdir} holds no checkpoint.")
  errors = []
  for s in steps:
    mismatch = _shape_mismatch(mngr, s, abstract_params)
    if mismatch:
      raise ValueError(f"checkpoint step {s} does not match the model built from "
                       f"{workdir}/{CONFIG_FILE}: {mismatch}")
    names = mngr.item_metadata(s).keys() if use_ema else ()
    item = "ema" if use_ema and "ema" in names else "params"
    try:
      r = mngr.restore(s, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(abstract_params)}))
      mngr.close()
      return r[item], s
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"checkpoint step {s} could not be restored ({e}); trying the previous one.")
      errors.append(str(e)[:300])
  mngr.close()
  raise RuntimeError(f"no checkpoint in {workdir} could be restored: {errors}")
