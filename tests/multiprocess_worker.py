"""One process of the multi-process test (tests/test_distributed.py).

  python tests/multiprocess_worker.py OUT CORPUS DATA_DIR WORKDIR NUM_PROCESSES PROCESS_ID PORT

With NUM_PROCESSES > 1 the processes join through jax.distributed (one CPU device each);
with 1 the single process simulates the same number of devices locally. Both run the same
train steps on the same global batches (each process feeding its own rows), then a short
trainer.train run with checkpoints and evaluation, process 1 a straggler (slow input).
Process 0 writes OUT as JSON.
"""
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import join_processes, tiny_config  # noqa: E402

DEVICES = 2


def synthetic_batches(n, b, t):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    out.append({"inputs": rng.integers(8, 264, (b, t)).astype(np.int32), "segment_ids": seg,
                "positions": pos.astype(np.int32)})
  return out


def main():
  out, corpus, data_dir, workdir, nproc, pid, port = sys.argv[1:]
  nproc, pid = int(nproc), int(pid)
  if nproc > 1:
    join_processes(nproc, pid, port)
  else:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", DEVICES)
  assert jax.device_count() == DEVICES, jax.devices()
  from mdlm_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  from mdlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = tiny_config(corpus, data_dir, {"mesh.data": -1, "train.steps": 3,
                                       "checkpoint.every_steps": 2, "eval.every_steps": 3})
  setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh))
  tx, schedule = trainer.make_optimizer(cfg.train)
  abstract = trainer.abstract_train_state(setup, tx)
  step = trainer.make_train_step(setup, tx, schedule, abstract)
  state = trainer.init_train_state(setup, tx, abstract)
  b = cfg.train.batch_size
  rows = slice(pid * b // nproc, (pid + 1) * b // nproc)
  losses = []
  for batch in synthetic_batches(3, b, cfg.data.seq_len):
    local = {k: v[rows] for k, v in batch.items()}
    state, m = step(state, pipeline.to_global(local, setup.batch_sharding))
    losses.append(float(m["train/loss"]))
  # a straggler: process 1's input takes 1.5 s longer per batch, far more than a warm
  # pipeline's wait (the first batch's also holds the pipeline's start-up, which can differ
  # between the processes by as much)
  if pid == 1:
    to_global = pipeline.to_global
    pipeline.to_global = lambda *a: (time.sleep(1.5), to_global(*a))[1]
  last = trainer.train(cfg, workdir, log=lambda _: None)
  if pid == 0:
    with open(out, "w") as f:
      json.dump({"losses": losses, "train": last, "processes": jax.process_count()}, f)


if __name__ == "__main__":
  main()
