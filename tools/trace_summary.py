"""Summaries of `jax.profiler` traces for tools/bench.py --profile_dir."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

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
