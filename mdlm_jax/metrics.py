"""Metric output (process 0 only): console progress, TensorBoard events, metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from mdlm_jax import storage

# Dense bf16 peak FLOP/s per device, by device_kind substring (None: unknown, MFU not shown).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for key, value in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return value
  return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _EpathRecordWriter:
  """tensorboardX record writer for URLs (gs://, ...) through epath: the event file is kept in
  memory and the object rewritten at each flush (event files of scalars are small)."""

  def __init__(self, path):
    self.path, self.buffer = storage.path(path), bytearray()

  def write(self, data):
    self.buffer += data

  def flush(self):
    self.path.write_bytes(bytes(self.buffer))

  def close(self):
    self.flush()


class _EpathRecordWriterFactory:
  def open(self, path):
    return _EpathRecordWriter(path)

  def directory_check(self, path):
    del path  # object stores need no directories


class Writer:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files; text samples to
  TensorBoard. A no-op on processes other than 0. `workdir` may be a URL (see storage)."""

  def __init__(self, workdir: str | None):
    self.enabled = workdir is not None and jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
      wd = storage.path(workdir)
      if storage.is_url(wd):
        record_writer.register_writer_factory(os.fspath(wd).split("://")[0],
                                              _EpathRecordWriterFactory())
      self._tb = SummaryWriter(os.fspath(wd / "tensorboard"))
      self._jsonl = storage.LineFile(wd / "metrics.jsonl")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in values.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      self._tb.add_scalar(k, v, int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, int(step))

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Throughput and ETA between logged steps."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int,
               flops_per_token: float, num_devices: int):
    self.total, self.tokens_per_step = total_steps, tokens_per_step
    self.flops_per_token = flops_per_token
    peak = peak_flops()
    self.peak = None if peak is None else peak * num_devices
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.origin = None  # (step, time) at the end of the first window, which holds the warm-up

  def update(self, step: int, input_s: float = 0.0) -> dict[str, float]:
    """Throughput of the window since the last call; the ETA from the mean step time since
    the first window (evaluations and saves included), so it does not swing window to
    window. `input_s`: this host's time in the window spent waiting for its batches; every
    host's is gathered (a collective: every process calls this at the same steps) and the
    slowest host, the straggler the others wait for, is named."""
    now = time.perf_counter()
    steps, dt = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    tps = steps * self.tokens_per_step / dt
    out = {"perf/tokens_per_s": tps, "perf/step_time_s": dt / max(steps, 1)}
    waits = np.asarray([input_s / max(steps, 1)])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      waits = np.asarray(multihost_utils.process_allgather(waits.astype(np.float32))).ravel()
    out.update({"perf/input_time_s": float(waits[jax.process_index()]),
                "perf/slowest_host": int(np.argmax(waits)),
                "perf/slowest_host_input_time_s": float(np.max(waits))})
    if self.peak:
      out["perf/mfu"] = tps * self.flops_per_token / self.peak
    if self.origin is None or step <= self.origin[0]:
      self.origin = (step, now)
      mean = dt / max(steps, 1)
    else:
      mean = (now - self.origin[1]) / (step - self.origin[0])
    out["perf/eta_s"] = (self.total - step) * mean
    return out

  @staticmethod
  def line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {m['train/loss']:.4f}",
             f"{m['perf/tokens_per_s'] / 1e3:.1f}k tok/s"]
    if "perf/mfu" in m:
      parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
    parts.append(f"lr {m['train/learning_rate']:.2e}")
    parts.append(f"ETA {format_duration(m['perf/eta_s'])}")
    if jax.process_count() > 1:
      parts.append(f"slowest host {m['perf/slowest_host']} "
                   f"(input {m['perf/slowest_host_input_time_s']:.3f} s/step)")
    return " | ".join(parts)


def summary(workdir, last: dict, seconds: float, saved_step) -> str:
  """What a finished (or stopped) run prints: its final figures, wall time, checkpoint, and
  the commands that use it."""
  lines = [f"run finished at step {last.get('step')} in {format_duration(seconds)}"]
  train = {k: v for k, v in last.items() if k in ("train/loss", "train/grad_norm")}
  evals = {k: v for k, v in last.items() if k.startswith("eval/") and "stderr" not in k
           and k not in ("eval/tokens", "eval/bytes", "eval/rows")}
  for name, row in (("train", train), ("eval", evals)):
    if row:
      lines.append(f"  {name}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}"
                                              for k, v in sorted(row.items())))
  if saved_step is not None:
    lines.append(f"  checkpoint: {storage.path(workdir) / 'checkpoints' / str(saved_step)}")
  lines += ["  next:", f"    python tools/sample.py --workdir={workdir}",
            f"    python tools/evaluate.py --workdir={workdir}",
            f"    tensorboard --logdir={storage.path(workdir) / 'tensorboard'}"]
  return "\n".join(lines)
