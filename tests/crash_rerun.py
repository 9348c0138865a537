"""pytest-xdist hooks (imported by conftest.py): a test whose worker process dies runs once more
in a fresh worker, and fails if it kills that one too.

A backstop: suite workers used to die once they held Linux's limit of memory maps (the
compiled programs JAX kept; conftest.py now drops them after each module, docs/results.md,
"The test suite, twenty-first session"). Only a dead worker is retried: a failing assertion
or exception fails at once. The summary names every test that was run again."""

import pytest

_crashed: list[str] = []


@pytest.hookimpl(optionalhook=True)   # an xdist hook: without xdist nothing calls it
def pytest_handlecrashitem(crashitem, report, sched):
  if crashitem not in _crashed:
    _crashed.append(crashitem)
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"


def pytest_report_teststatus(report):
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN", {"yellow": True})
  return None


def pytest_terminal_summary(terminalreporter):
  if _crashed:
    terminalreporter.section("tests run again after their worker died", yellow=True)
    for nodeid in _crashed:
      terminalreporter.line(nodeid)
