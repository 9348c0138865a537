"""One process of the 2-process preemption test (tests/test_distributed.py).

  python tests/preempt_worker.py CORPUS DATA_DIR WORKDIR NUM_PROCESSES PROCESS_ID PORT PROGRESS

Trains a long tiny run; process 0 writes each logged step to PROGRESS. Prints the step it
stopped at as JSON."""
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import join_processes, tiny_config  # noqa: E402


def main():
  corpus, data_dir, workdir, nproc, pid, port, progress = sys.argv[1:]
  join_processes(nproc, pid, port)
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(corpus, data_dir, {"mesh.data": -1, "train.steps": 2000,
                                       "train.log_every_steps": 1, "checkpoint.every_steps": 10**6,
                                       "eval.every_steps": 0})

  def log(line):
    if line.startswith("step "):
      with open(progress, "a") as f:
        f.write(line.split()[1].split("/")[0] + "\n")

  last = trainer.train(cfg, workdir, log=log)
  print(json.dumps({"process": jax.process_index(), "step": last["step"]}), flush=True)


if __name__ == "__main__":
  main()
