"""Tests run on CPU with 8 simulated devices (meshes up to data 2 x fsdp 2 x tensor 2)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # library flags (Grain's worker options) read their defaults

from helpers import tiny_config, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def pairs_glob(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  with open(root / "pairs.jsonl", "w") as f:
    for i in range(80):
      a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
      f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
  return str(root / "*.jsonl")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_config(corpus, data_dir):
  return lambda overrides=None: tiny_config(corpus, data_dir, overrides)
