"""Orbax checkpoints: what is saved, integrity, the restore precedence, params-only restore.

A checkpoint step (`WORKDIR/checkpoints/STEP`, any epath URL) holds the items
  params      the model parameters (pure dict of arrays)
  ema         their exponential moving average (only when train.ema_decay > 0)
  opt         {'step', 'opt_state', 'skips'}
  data        the Grain iterator state, one JSON file per process
  integrity   a checksum of every array above, computed on device at save time
Saves are asynchronous.

Restore precedence, in one place (`_newest_good`, the one fallback loop): steps newest first. Before a step is
read its metadata is compared with what this run builds: a different params structure or
shape, or a different process count for the data state, is an incompatibility, reported as
an error naming the setting and the fix, and nothing is touched. An item switched on since
(the EMA) is initialised from the params; one switched off is not read. A step that then fails
to read, or whose arrays do not match their checksums, is damage: the trainer renames it
aside (`STEP.damaged`, never deleted) with a warning and tries the previous one; the tools
(read-only) skip it. When no step restores, the run stops and nothing is overwritten.
With several processes every process takes the same decision: a failure on any one (its own
data state, say) is agreed on through a collective before anything is renamed. The arrays
are read by Orbax's collective restore, where files every process shares fail alike; a
failure there on one process alone ends in Orbax's barrier timeout, not in a divergence.
"""
from __future__ import annotations

import re
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mdlm_jax import run_record
from mdlm_jax import storage


class IncompatibleCheckpoint(ValueError):
  """The workdir's checkpoint cannot be restored into this run (not damage)."""


ITEMS = ("params", "ema", "opt")


def manager(workdir, keep: int = 3, read_only: bool = False,
            local: bool = False) -> ocp.CheckpointManager:
  """The workdir's manager. `local` (read-only): this process alone, joining no barrier of
  the others, for the checks each process makes by itself before a run starts."""
  mp = (ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                           active_processes={jax.process_index()})
        if local else ocp.options.MultiprocessingOptions())
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep), read_only=read_only,
      enable_async_checkpointing=not read_only, create=not read_only,
      cleanup_tmp_directories=not read_only, multiprocessing_options=mp)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in ITEMS:
    registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add("integrity", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  registry.add("integrity", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  registry.add("data", grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
  registry.add("data", grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
  return ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options,
                               handler_registry=registry)


# ---------------------------------------------------------------------------------------------
# Integrity: one uint32 per array, sum_i mix(bits_i, i) mod 2^32. Changing any one element
# changes it (the mix is a bijection of the bits for each i); integer sums are exact in any
# order, so the value does not depend on the mesh the array is sharded over.

def _array_checksum(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  idx = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  mixed = (bits ^ (idx * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA77) + idx
  return jnp.sum(mixed, dtype=jnp.uint32)


def _names(tree) -> dict[str, object]:
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@jax.jit
def _checksum_tree(tree):
  return jax.tree.map(_array_checksum, tree)


def checksums(items: dict) -> dict[str, int]:
  """{'params/blocks/0/attn/wq': uint32, ...} for every array of the checkpoint items."""
  sums = jax.device_get(_checksum_tree(items))
  return {f"{k}": int(v) for k, v in _names(sums).items()}


def _items_of(state: dict) -> dict:
  items = {"params": state["params"],
           "opt": {"step": state["step"], "opt_state": state["opt_state"],
                   "skips": state["skips"]}}
  if state.get("ema") is not None:
    items["ema"] = state["ema"]
  return items


def save(mngr: ocp.CheckpointManager, state: dict, data_iterator) -> int:
  """Saves `state` asynchronously (checksums are computed first, on device); returns the step."""
  arrays = _items_of(state)
  items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
  items["integrity"] = ocp.args.JsonSave(checksums(arrays))
  items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  step = int(jax.device_get(state["step"]))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  return step


# ---------------------------------------------------------------------------------------------
# Restore.

class Damaged(Exception):
  pass


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'blocks/0/attn/wq' -> shape (integer and string dict keys compare equal)."""
  return {k: tuple(v.shape) for k, v in _names(tree).items() if hasattr(v, "shape")}


def _mismatch(saved_tree, want_tree) -> str | None:
  saved, want = _shapes(saved_tree), _shapes(want_tree)
  diffs = [f"{k}: {saved.get(k)} saved vs {want.get(k)} now"
           for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  return "; ".join(diffs[:5]) or None


def _metadata(mngr, step) -> dict:
  try:
    meta = mngr.item_metadata(step)
    out = {k: meta[k] for k in meta.keys() if meta[k] is not None}
  except Exception as e:  # pylint: disable=broad-except  (unreadable metadata: damage)
    raise Damaged(f"its metadata cannot be read ({type(e).__name__}: {str(e)[:300]})") from e
  if "params" not in out:
    raise Damaged("it has no params item")
  return out


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def _data_process_count(mngr, step) -> int | None:
  d = mngr.directory / str(step) / "data"
  try:
    counts = {int(m.group(2)) for p in d.iterdir() if (m := _DATA_FILE.search(p.name))}
  except FileNotFoundError:
    return None
  return counts.pop() if len(counts) == 1 else None


def _check_compatible(mngr, step, meta, abstract_state, changes_text, restore_data):
  mismatch = _mismatch(meta["params"], abstract_state["params"])
  if mismatch is None and "opt" in meta:
    mismatch = _mismatch(meta["opt"]["opt_state"], abstract_state["opt_state"])
  if mismatch:
    raise IncompatibleCheckpoint(
        f"checkpoint step {step} in {mngr.directory} belongs to a model of other shapes "
        f"({mismatch}); refusing to resume or overwrite it."
        + (f"\nSettings changed since the workdir's run:\n  {changes_text}" if changes_text
           else "") + "\nUse a new --workdir, or the workdir's settings (see its config.json).")
  if restore_data:
    saved = _data_process_count(mngr, step)
    if saved is not None and saved != jax.process_count():
      raise IncompatibleCheckpoint(
          f"checkpoint step {step} in {mngr.directory} holds the data position of {saved} "
          f"process(es); this run has {jax.process_count()}. Resume with {saved} processes, "
          "or set --config.checkpoint.restore_data=False to restore the model and optimizer "
          "and restart the data order (reshuffled from the restored step).")


def _verify(restored: dict, integrity: dict | None) -> None:
  if not integrity:
    return
  got = checksums(restored)
  bad = [k for k, v in integrity.items() if k in got and got[k] != v]
  missing = [k for k in integrity if k not in got]
  if bad or missing:
    raise Damaged(f"{len(bad) + len(missing)} array(s) do not match their checksums "
                  f"({', '.join((bad + missing)[:5])})")


def _restore_step(mngr, step, abstract_state, data_iterator, meta):
  want = _items_of(abstract_state)
  use_ema = "ema" in want and "ema" in meta
  saved_skips = set((meta.get("opt") or {}).get("skips") or {})
  if saved_skips != set(want["opt"]["skips"]):  # counters added since that run: start at 0
    want["opt"] = {k: v for k, v in want["opt"].items() if k != "skips"}
  items = {"params": ocp.args.StandardRestore(want["params"]),
           "opt": ocp.args.StandardRestore(want["opt"]),
           "integrity": ocp.args.JsonRestore()}
  if use_ema:
    items["ema"] = ocp.args.StandardRestore(want["ema"])
  try:
    r = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(f"{type(e).__name__}: {str(e)[:300]}") from e
  arrays = {k: r[k] for k in ("params", "opt", "ema") if k in items}
  _verify(arrays, {k: v for k, v in (r["integrity"] or {}).items()
                   if k.split("/", 1)[0] in arrays})
  if data_iterator is not None:
    # Each process reads its own data state; outside Orbax's restore, whose closing barrier a
    # process that failed alone would skip (the others would then wait in a collective it
    # never joins), so that its failure is agreed on like any other.
    try:
      grain.checkpoint.CheckpointHandler().restore(
          mngr.directory / str(step) / "data", args=grain.checkpoint.CheckpointRestore(
              data_iterator))
    except Exception as e:  # pylint: disable=broad-except
      raise Damaged(f"the data state of process {jax.process_index()}: "
                    f"{type(e).__name__}: {str(e)[:300]}") from e
  ema = None
  if "ema" in want:
    if use_ema:
      ema = r["ema"]
    else:
      warnings.warn(f"checkpoint step {step} has no EMA (train.ema_decay was 0): the EMA starts "
                    "from the restored params.")
      ema = jax.tree.map(jnp.copy, r["params"])
  skips = r["opt"].get("skips") or {
      k: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
      for k, a in abstract_state["skips"].items()}
  return {"step": r["opt"]["step"], "params": r["params"], "opt_state": r["opt"]["opt_state"],
          "skips": skips, "ema": ema}


def _agree(failed: bool) -> bool:
  """True on every process when any process failed (restore must not diverge)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([failed]))))


def set_aside(mngr, step) -> str:
  """Renames checkpoints/STEP to STEP.damaged (STEP.damaged.2, ... if taken); process 0."""
  if jax.process_count() > 1:  # every process picks the name before process 0 renames
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"name aside {step}")
  src = mngr.directory / str(step)
  dst, k = mngr.directory / f"{step}.damaged", 1
  while dst.exists():
    k += 1
    dst = mngr.directory / f"{step}.damaged.{k}"
  if jax.process_index() == 0:
    src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"set aside {step}")
  return str(dst)


def _newest_good(steps, attempt, on_damaged):
  """The one fallback loop: `attempt(step)` on `steps` newest first; a step whose attempt
  raises Damaged goes to `on_damaged(step, message)` and the previous one is tried.
  IncompatibleCheckpoint (and any other error) ends the loop. Returns (step, value), or
  (None, None) when every step was damaged."""
  for step in sorted(steps, reverse=True):
    try:
      return step, attempt(step)
    except Damaged as e:
      on_damaged(step, str(e))
  return None, None


def check_resumable(workdir, abstract_state: dict, *, changes: dict | None = None,
                    restore_data: bool = True) -> None:
  """Read-only: raises IncompatibleCheckpoint when the newest readable step cannot be restored
  into `abstract_state`, before a run takes the workdir's lock or writes anything."""
  if not (storage.path(workdir) / "checkpoints").exists():
    return
  mngr = manager(workdir, read_only=True, local=True)
  text = run_record.describe_changes(changes or {})
  try:  # an unreadable step is skipped here; resume() sets it aside
    _newest_good(mngr.all_steps(), lambda step: _check_compatible(
        mngr, step, _metadata(mngr, step), abstract_state, text, restore_data),
                 lambda step, message: None)
  finally:
    mngr.close()


def resume(workdir, abstract_state: dict, data_iterator, *, keep: int = 3,
           changes: dict | None = None, restore_data: bool = True):
  """Opens the workdir's manager and restores the newest good step into `abstract_state`'s
  shardings (and `data_iterator` in place). Damaged steps are set aside. Returns (manager,
  state or None when there is no checkpoint)."""
  text = run_record.describe_changes(changes or {})
  mngr = manager(workdir, keep=keep)

  def attempt(step):
    failed = None
    try:  # what each process reads alone: agreed on before Orbax's collective restore
      meta = _metadata(mngr, step)
      _check_compatible(mngr, step, meta, abstract_state, text, restore_data)
    except Damaged as e:
      failed = str(e)
    if not _agree(failed is not None):
      try:
        state = _restore_step(mngr, step, abstract_state,
                              data_iterator if restore_data else None, meta)
      except Damaged as e:
        failed = str(e)
      if not _agree(failed is not None):
        return state
    raise Damaged(failed or "it failed on another process")

  aside = []

  def on_damaged(step, message):
    aside.append(set_aside(mngr, step))
    warnings.warn(f"checkpoint step {step} could not be restored ({message}); set it aside "
                  f"as {aside[-1]} and falling back to the previous one.")

  step, state = _newest_good(mngr.all_steps(), attempt, on_damaged)
  if aside:
    mngr.reload()  # the steps set aside are gone from the manager's view
    if step is None:
      mngr.close()
      raise RuntimeError(f"no checkpoint in {mngr.directory} could be restored; every one was "
                         f"set aside (nothing was deleted): {', '.join(aside)}. Run again to "
                         "start from step 0, or move a copy back.")
  return mngr, state


def restore_params(workdir, abstract_params, use_ema: bool = True, step: int | None = None):
  """Restores params (or their EMA) alone onto the shardings of `abstract_params`, which may
  describe any mesh; a damaged step is skipped (read-only: nothing is renamed). Returns
  (params, step)."""
  mngr = manager(workdir, read_only=True)
  steps = mngr.all_steps() if step is None else [step]
  if not steps:
    raise ValueError(f"--workdir={workdir} holds no checkpoint.")

  def attempt(s):
    meta = _metadata(mngr, s)
    mismatch = _mismatch(meta["params"], abstract_params)
    if mismatch:
      raise IncompatibleCheckpoint(f"checkpoint step {s} does not match the model built "
                                   f"from {workdir}/{run_record.CONFIG_FILE}: {mismatch}")
    item = "ema" if use_ema and "ema" in meta else "params"
    try:
      r = mngr.restore(s, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(abstract_params),
             "integrity": ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise Damaged(f"{type(e).__name__}: {str(e)[:300]}") from e
    _verify({item: r[item]}, {k: v for k, v in (r["integrity"] or {}).items()
                              if k.split("/", 1)[0] == item})
    return r[item]

  errors = []

  def on_damaged(s, message):
    warnings.warn(f"checkpoint step {s} could not be restored ({message}); trying the "
                  "previous one.")
    errors.append(f"step {s}: {message}")

  try:
    found, params = _newest_good(steps, attempt, on_damaged)
  finally:
    mngr.close()
  if found is None:
    raise RuntimeError(f"no checkpoint in {workdir} could be restored:\n" + "\n".join(errors))
  return params, found
