"""crash_rerun's hooks in a real two-worker pytest-xdist run: a test that kills its worker once
passes on its second run, one that kills every worker fails, a failing assertion is not
retried."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS!r})
from crash_rerun import pytest_handlecrashitem, pytest_report_teststatus, pytest_terminal_summary
"""

CASES = """
import os

def test_dies_once(tmp_path_factory):
  marker = os.path.join(os.path.dirname(__file__), "died")
  if not os.path.exists(marker):
    open(marker, "w").close()
    os.abort()

def test_dies_always():
  os.abort()

def test_fails():
  assert False, "an assertion"

def test_passes():
  pass
"""


def run_suite(root, selection):
  (root / "conftest.py").write_text(CONFTEST)
  (root / "test_cases.py").write_text(CASES)
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-k",
       selection, str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_a_dead_worker_reruns_its_test_once_and_only_that(tmp_path):
  p = run_suite(tmp_path, "dies_once or passes")
  assert p.returncode == 0, p.stdout[-2000:]
  assert "2 passed, 1 rerun" in p.stdout, p.stdout[-2000:]
  assert "test_cases.py::test_dies_once" in p.stdout.split("after their worker died")[1]
  (tmp_path / "died").unlink()
  p = run_suite(tmp_path, "dies or fails")
  assert p.returncode == 1, p.stdout[-2000:]
  assert "2 failed, 1 passed, 2 rerun" in p.stdout, p.stdout[-2000:]
  assert "FAILED test_cases.py::test_dies_always" in p.stdout
  assert "FAILED test_cases.py::test_fails - AssertionError: an assertion" in p.stdout
