"""Train a model: python train.py --workdir=DIR [--config=configs/NAME.py] [--config.KEY=VALUE]

Multi-process runs (GPU/CPU clusters) pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); TPU pods and
SLURM jobs are detected by jax.distributed.initialize() itself with --distributed=auto.
"""
from absl import app
from absl import flags

from mdlm_jax import cli
from mdlm_jax import distributed

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  from mdlm_jax import trainer  # pylint: disable=g-import-not-at-top  (after distributed init)
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
