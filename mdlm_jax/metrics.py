"""Metric output (process 0 only): console progress, TensorBoard events, metrics.jsonl."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import time

import jax

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


TRACE_KINDS = (("attention", re.compile(r"fmha|sdpa|flash|cudnn|attention", re.I)),
         ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|convolution|dot", re.I)))


def summarize_trace(trace_dir: str, steps: int, top: int = 12) -> dict:
  """Device time per step from the newest Perfetto trace under `trace_dir`: complete events on
  device tracks (`/device:...`) summed by op, then by kind (attention kernels, matmuls, the
  rest). Where the device has kernel lines (threads named `Stream ...`, as on GPUs), only those
  are summed: the trace's derived lines (`XLA Modules`, `XLA Ops`, ...) span the same kernels
  again. `lines` gives each device line's total. A trace with no device track (XLA:CPU)
  reports only its path."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = [e for e in events if e.get("ph") == "M"]
  devices = {e["pid"] for e in meta if e.get("name") == "process_name"
             and str(e.get("args", {}).get("name", "")).startswith("/device:")}
  threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in meta
             if e.get("name") == "thread_name" and e["pid"] in devices}
  streams = {k for k, name in threads.items() if name.startswith("Stream")}
  lines, per_op, kinds = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in devices:
      continue
    key, ms = (e["pid"], e.get("tid")), e.get("dur", 0.0) / 1e3 / steps
    lines[threads.get(key, str(key))] += ms
    if streams and key not in streams:
      continue
    op = (e.get("args") or {}).get("hlo_op") or e["name"]
    if op.startswith("command_buffer"):  # XLA:GPU replays fused ops as one CUDA graph
      op = e["name"]
    per_op[op] += ms
    kinds[next((k for k, rx in TRACE_KINDS if rx.search(f"{e['name']} {op}")), "other")] += ms
  total = sum(per_op.values())
  out = {"trace": files[-1], "device_ms_per_step": total,
         "lines": {k: round(v, 3) for k, v in lines.most_common()}}
  if total > 0:
    out["share"] = {k: v / total for k, v in kinds.items()}
    out["top_ops_ms"] = [[name, round(ms, 3)] for name, ms in per_op.most_common(top)]
  return out


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

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, dt = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    tps = steps * self.tokens_per_step / dt
    out = {"perf/tokens_per_s": tps, "perf/step_time_s": dt / max(steps, 1)}
    if self.peak:
      out["perf/mfu"] = tps * self.flops_per_token / self.peak
    out["perf/eta_s"] = (self.total - step) * dt / max(steps, 1)
    return out

  @staticmethod
  def line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {m['train/loss']:.4f}",
             f"{m['perf/tokens_per_s'] / 1e3:.1f}k tok/s"]
    if "perf/mfu" in m:
      parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
    parts.append(f"lr {m['train/learning_rate']:.2e}")
    parts.append(f"ETA {format_duration(m['perf/eta_s'])}")
    return " | ".join(parts)
