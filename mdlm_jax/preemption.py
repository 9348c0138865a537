"""Preemption: a scheduler's SIGTERM becomes a save and a stop at a step every process agrees on."""
from __future__ import annotations

import signal

import jax


class StopSignal:
  """Preemption: SIGTERM becomes a stop at an agreed step. One process: a flag the loop polls.
  Several: jax's preemption sync point (its service catches SIGTERM on any process and every
  process returns True at the same step, next after the largest step any has reached)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def at(self, step: int) -> bool:
    """True (on every process alike) when the run should save `step` and stop."""
    if not self._multi:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)
