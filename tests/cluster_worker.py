"""One process of the cluster start-up test (tests/test_distributed.py): started with a SLURM
job's environment and no coordinator flags, it joins the others through jax's own cluster
detection and prints `process_count process_index`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mdlm_jax import distributed  # noqa: E402


def main():
  flags.FLAGS(sys.argv[:1])
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  print(jax.process_count(), jax.process_index(), flush=True)


if __name__ == "__main__":
  main()
