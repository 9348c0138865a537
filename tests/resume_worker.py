"""One process of the 2-process damaged-checkpoint test (tests/test_distributed.py).

  python tests/resume_worker.py CORPUS DATA_DIR WORKDIR NUM_PROCESSES PROCESS_ID PORT STEPS

Trains (or resumes) a tiny run to STEPS, checkpointing every 2 steps, and prints the last
step and the warnings it raised as JSON."""
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import join_processes, tiny_config  # noqa: E402


def main():
  corpus, data_dir, workdir, nproc, pid, port, steps = sys.argv[1:]
  join_processes(nproc, pid, port)
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(corpus, data_dir, {"mesh.data": -1, "train.steps": int(steps)})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    last = trainer.train(cfg, workdir, log=lambda _: None)
  print(json.dumps({"step": last["step"], "warnings": [str(w.message) for w in caught]}),
        flush=True)


if __name__ == "__main__":
  main()
