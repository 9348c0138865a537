"""pytest-xdist hooks (imported by conftest.py): a test whose worker process dies runs once more
in a fresh worker, and fails if it kills that one too.

XLA:CPU has killed suite workers while serialising a compiled program for the run's
compilation cache (`executable.serialize()`, a segmentation fault or an abort; never
reproduced outside a long-lived worker; docs/results.md, "The test suite, twentieth
session"). Only a dead worker is retried: a failing assertion or exception fails at once. The
summary names every test that was run again."""

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
