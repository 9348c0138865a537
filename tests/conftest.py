"""Tests run on CPU with 8 simulated devices (meshes up to data 2 x fsdp 2 x tensor 2)."""
import gc
import json
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole run: the pytest process that loads this first makes
# it (xdist's workers and the tests' subprocesses inherit the variable) and removes it at the
# end. Most of the suite's time is compiling the same tiny programs again in new processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mdlm_jax_test_xla_")
  os.environ["MDLM_JAX_TEST_XLA_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # library flags (Grain's worker options) read their defaults

import jax  # noqa: E402
from helpers import tiny_config, write_corpus  # noqa: E402
from crash_rerun import (pytest_handlecrashitem, pytest_report_teststatus,  # noqa: E402,F401
                         pytest_terminal_summary)


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


def pytest_unconfigure(config):
  if os.environ.get("MDLM_JAX_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Drops JAX's in-memory caches after each test module. Every XLA:CPU executable they keep
  holds its code in memory maps, about 240 a test here, and Linux allows a process 65530
  (vm.max_map_count): a worker that had run ~230 tests held 64,402 and aborted in the next
  allocation, while writing the compilation cache (docs/results.md, the twenty-first session).
  A module's programs are read back from the persistent cache when a later module needs them."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def uncached_compilation():
  """XLA compiles the test's programs itself, for tests that read what it prints while
  compiling (an executable from the run's cache was compiled, and printed, elsewhere)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", before)
  compilation_cache.reset_cache()
