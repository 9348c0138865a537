"""kill -9 a training run at random moments, restart it each time, and compare every logged
loss with an uninterrupted run's:

  python tools/kill_test.py --workdir=/tmp/kill [--kills=10] [--steps=60] [--seed=0]

Both runs use a small model on the embedded corpus with checkpoints every 5 steps and a loss
row every step. Every third kill comes at a random moment of start-up (restore, compile);
the others 0-0.3 s after a random later step was logged (inside a step, an async save or the
write of metrics), spread so that the run is not over before the last kill. Prints one JSON line: kills, rows compared, mismatches."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from absl import flags

from mdlm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (two runs go under it).",
                               required=True)
_KILLS = flags.DEFINE_integer("kills", 10, "Random SIGKILLs of the interrupted run.")
_STEPS = flags.DEFINE_integer("steps", 60, "Training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")


def command(workdir):
  over = {"train.steps": _STEPS.value, "train.log_every_steps": 1, "checkpoint.every_steps": 5,
          "eval.every_steps": 0, "eval.sample_tokens": 0, "model.num_layers": 2,
          "model.d_model": 64, "model.num_heads": 2, "model.mlp_dim": 128, "data.seq_len": 64}
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in over.items()]]


def losses(workdir) -> dict[int, list[float]]:
  out: dict[int, list[float]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  for line in open(path) if os.path.exists(path) else []:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut by the kill
      continue
    if "train/loss" in row:
      out.setdefault(row["step"], []).append(row["train/loss"])
  return out


def main(argv):
  del argv
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  ref, wd = os.path.join(_WORKDIR.value, "reference"), os.path.join(_WORKDIR.value, "killed")
  t0 = time.perf_counter()
  subprocess.run(command(ref), env=env, check=True, capture_output=True)
  wall = time.perf_counter() - t0
  rng = random.Random(_SEED.value)
  for k in range(_KILLS.value):
    done = max(losses(wd) or [0])
    proc = subprocess.Popen(command(wd), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if k % 3 == 0:  # during start-up: restore, compile, the first steps
      time.sleep(rng.uniform(0.05 * wall, 0.5 * wall))
      where = "start-up"
    else:  # a random moment of a random later step, spread so the run is not over early
      room = max(1, (_STEPS.value - 1 - done) // (_KILLS.value - k))
      target = min(done + rng.randint(1, room), _STEPS.value - 1)
      while proc.poll() is None and max(losses(wd) or [0]) < target:
        time.sleep(0.02)
      time.sleep(rng.uniform(0.0, 0.3))
      where = f"after step {target}"
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"kill {k + 1}/{_KILLS.value} ({where}): logged up to step {max(losses(wd) or [0])}",
          file=sys.stderr, flush=True)
  subprocess.run(command(wd), env=env, check=True, capture_output=True)
  a, b = losses(ref), losses(wd)
  rows = [(s, v) for s, vs in b.items() for v in vs]
  bad = [(s, v, a.get(s)) for s, v in rows if a.get(s) != [v]]
  print(json.dumps({"kills": _KILLS.value, "steps": _STEPS.value, "rows_compared": len(rows),
                    "steps_logged": sorted(b) == sorted(a), "mismatches": bad[:10]}))
  sys.exit(1 if bad or sorted(b) != sorted(a) else 0)


if __name__ == "__main__":
  cli.run(main)
