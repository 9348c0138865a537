"""Two local processes joined by jax.distributed reproduce the single-process run."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_workers(worker, args, nproc, after=(), timeout=900):
  """Runs `nproc` processes of `worker` with `args`, the process count, the id, a free port
  and `after`; returns their stdouts once every one exited 0."""
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, worker, *args, str(nproc), str(i), port, *after],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(nproc)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def launch(tmp_path, name, nproc, corpus, data_dir):
  out, wd = str(tmp_path / f"{name}.json"), str(tmp_path / name)
  run_workers(WORKER, (out, corpus, data_dir, wd), nproc)
  with open(out) as f:
    return json.load(f), wd


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, corpus, data_dir):
  single, _ = launch(tmp_path, "single", 1, corpus, data_dir)
  multi, wd = launch(tmp_path, "multi", 2, corpus, data_dir)
  assert multi["processes"] == 2 and single["processes"] == 1
  for a, b in zip(multi["losses"], single["losses"]):
    assert abs(a - b) <= 2e-5 * abs(b), (multi["losses"], single["losses"])
  # the multi-process trainer checkpointed, evaluated and logged from process 0 only
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
  data_files = os.listdir(os.path.join(wd, "checkpoints", "3", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)
  assert multi["train"]["eval/tokens"] > 0
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  # the straggler (process 1 waits 1.5 s more for every batch) is named at every log after
  # the first, whose window also holds each process's pipeline start-up: how long that takes
  # differs between the processes by more than 1.5 s on a loaded host
  logged = [r for r in rows if "train/loss" in r]
  assert [r["perf/slowest_host"] for r in logged[1:]] == [1, 1]
  assert all(r["perf/slowest_host_input_time_s"] >= 1.5 for r in logged)
  # process 0's own wait, after the first batch (which holds the pipeline's start-up)
  assert all(r["perf/input_time_s"] < 0.2 for r in logged[1:])


def test_fast_gpu_prng_leaves_an_explicit_setting(monkeypatch):
  import jax
  from mdlm_jax import distributed
  name = "jax_threefry_gpu_kernel_lowering"
  before = getattr(jax.config, name)
  try:
    jax.config.update(name, False)
    monkeypatch.setenv("JAX_THREEFRY_GPU_KERNEL_LOWERING", "0")
    distributed.fast_gpu_prng()
    assert getattr(jax.config, name) is False
    monkeypatch.delenv("JAX_THREEFRY_GPU_KERNEL_LOWERING")
    distributed.fast_gpu_prng()
    assert getattr(jax.config, name) is True
  finally:
    jax.config.update(name, before)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path, corpus,
                                                                      data_dir):
  """A preemption notice reaches one host only: every process stops at the same step (jax's
  preemption sync point), the step is saved once with both processes' data state, and both
  exit 0."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  worker = os.path.join(os.path.dirname(WORKER), "preempt_worker.py")
  wd, port, progress = str(tmp_path / "wd"), str(free_port()), str(tmp_path / "progress")
  procs = [subprocess.Popen([sys.executable, worker, corpus, data_dir, wd, "2", str(i), port,
                             progress], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 900
  while time.time() < deadline:
    if os.path.exists(progress) and len(open(progress).read().split()) >= 3:
      break
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = {json.loads(out.strip().splitlines()[-1])["step"] for out, _ in outs}
  assert len(stopped) == 1 and 3 <= next(iter(stopped)) < 2000, outs
  saved = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  assert saved == [str(next(iter(stopped)))], saved
  data_files = os.listdir(os.path.join(wd, "checkpoints", saved[0], "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)


@pytest.mark.slow
def test_damage_seen_by_one_of_two_processes_is_set_aside_by_both(tmp_path, corpus, data_dir):
  """The newest checkpoint fails to restore on process 1 only (its data state is garbage):
  both processes agree, it is set aside once, both resume from the previous step, repeat its
  losses exactly and train to the end."""
  worker = os.path.join(os.path.dirname(WORKER), "resume_worker.py")
  wd = str(tmp_path / "wd")
  run_workers(worker, (corpus, data_dir, wd), 2, after=("4",))
  ckpt = os.path.join(wd, "checkpoints")
  with open(os.path.join(ckpt, "4", "data", "process_1-of-2.json"), "w") as f:
    f.write("{not json")
  outs = [json.loads(o.strip().splitlines()[-1])
          for o in run_workers(worker, (corpus, data_dir, wd), 2, after=("6",))]
  assert [o["step"] for o in outs] == [6, 6]
  for pid, o in enumerate(outs):
    aside = [w for w in o["warnings"] if "set it aside" in w]
    assert len(aside) == 1 and "step 4" in aside[0] and "4.damaged" in aside[0], (pid, aside)
  assert sorted(os.listdir(ckpt)) == ["2", "4", "4.damaged", "6"]
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  logged = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  assert [s for s, _ in logged] == [1, 2, 3, 4, 3, 4, 5, 6], logged
  assert logged[2:4] == logged[4:6]  # steps 3 and 4 again, from step 2's state and data


def test_a_slurm_job_starts_through_jax_own_cluster_detection():
  """Two processes with a 2-task SLURM job's environment and no coordinator flags or
  variables: `distributed.initialize()` (auto) finds the cluster the way jax does and joins
  them; a 1-task job stays a single process without starting jax.distributed."""
  cluster = os.path.join(os.path.dirname(WORKER), "cluster_worker.py")

  def run(ntasks):
    env = {k: v for k, v in ENV.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(ntasks),
               SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, cluster], env=dict(env, SLURM_PROCID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(ntasks)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    return sorted(out.split() for out, _ in outs)

  assert run(2) == [["2", "0"], ["2", "1"]]
  assert run(1) == [["1", "0"]]


MESH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mesh_worker.py")


@pytest.mark.slow
def test_many_host_meshes_keep_tensor_inside_a_host_and_data_over_the_network(tmp_path):
  """2 processes x 4 devices: the plain mesh takes devices host by host (each tensor pair,
  and each fsdp x tensor block, on one host, whatever order jax lists them in); the hybrid
  mesh (mesh.dcn_data=2) puts one host on each half of the data axis, and a reduction over it
  is exact; sizes the hosts cannot hold are refused naming mesh.dcn_data."""
  out = str(tmp_path / "mesh.json")
  run_workers(MESH_WORKER, (out,), 2)
  with open(out) as f:
    r = json.load(f)
  assert r["listed_order_hosts_per_tensor"] == 2  # the device order given splits the pairs
  assert r["plain_hosts_per_tensor"] == 1
  assert r["plain"] == [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]
  assert r["hybrid_shape"] == {"data": 4, "fsdp": 1, "tensor": 2}
  assert r["hybrid"] == [[[0, 0]], [[0, 0]], [[1, 1]], [[1, 1]]]
  assert r["sum"] == r["want"]
  assert len(r["errors"]) == 2 and all("mesh.dcn_data=" in e for e in r["errors"])
  assert "here 2 processes (one per host) hold 8 devices" in r["errors"][0]
