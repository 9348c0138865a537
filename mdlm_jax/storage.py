"""The one path layer: every file the project writes or reads goes through etils `epath`, so a
workdir may be a local directory or any URL epath serves (`gs://bucket/run`, through gcsfs).

Object stores cannot append or rename atomically, so this module gives the primitives the
trainer needs in a form that works on both: `write_text` (a whole-file replace: temporary file
and `os.replace` locally, one upload on an object store), `LineFile` (appends; rewrites the
object), a create-if-absent `create_exclusive` (O_EXCL locally, a `ifGenerationMatch=0` upload
on GCS), and `Lock`, the one-writer-per-directory lock built on them.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings

from etils import epath


def path(p) -> epath.Path:
  """An epath for a local path (`~` expanded, made absolute) or a URL."""
  s = os.fspath(p)
  if is_url(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_url(p) -> bool:
  return "://" in os.fspath(p)


def read_json(p, default=None):
  p = path(p)
  if not p.exists():
    return default
  return json.loads(p.read_text())


def write_text(p, text: str) -> None:
  """Replaces `p` whole: a reader (or a restart after a kill) sees the old text or the new,
  never a cut one. Locally through a temporary file and `os.replace`; an object store's
  upload is already all or nothing."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    p.write_text(text)
    return
  tmp = os.fspath(p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.fspath(p))
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_json(p, value) -> None:
  write_text(p, json.dumps(value, indent=2, sort_keys=True))


class LineFile:
  """Appends lines to a file: a real append locally; on an object store the whole object is
  rewritten (metrics files are small: a row per logged step)."""

  def __init__(self, p):
    self.path = path(p)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(self.path):
      self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
      self._file = None
    else:
      self._file = open(os.fspath(self.path), "a")

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def create_exclusive(p, text: str) -> bool:
  """Writes `text` to `p` only if `p` does not exist; True when this call created it."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_url(p):
    try:
      fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, key = fsspec.core.url_to_fs(os.fspath(p))
  try:
    fs.pipe_file(key, text.encode(), mode="create")
  except FileExistsError:
    return False
  return True


class LockHeld(RuntimeError):
  """The directory is in use by another live run."""


class Lock:
  """One writer per directory: `lock.json` holds {host, pid, since, heartbeat, token}.

  acquire() creates it if absent. A lock whose holder is gone (same host and its pid is dead,
  or no heartbeat for `timeout_s`) is taken over with a warning; otherwise LockHeld names the
  holder. While held, a daemon thread refreshes the heartbeat every `heartbeat_s`."""

  NAME = "lock.json"

  def __init__(self, directory, *, timeout_s: float = 600.0, heartbeat_s: float = 30.0,
               what: str = "workdir"):
    self.file = path(directory) / self.NAME
    self.timeout_s, self.heartbeat_s, self.what = timeout_s, heartbeat_s, what
    self.token = uuid.uuid4().hex
    self.since = time.time()
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
            "heartbeat": time.time(), "token": self.token}

  def _stale(self, held: dict) -> str | None:
    """Why the holder is gone, or None while it may be alive."""
    if held.get("host") == socket.gethostname():
      try:
        os.kill(int(held.get("pid", -1)), 0)
      except ProcessLookupError:
        return f"its process {held.get('pid')} on this host has exited"
      except (PermissionError, ValueError, OverflowError):
        pass
    age = time.time() - float(held.get("heartbeat", 0))
    if age > self.timeout_s:
      return f"its heartbeat is {age:.0f}s old (more than {self.timeout_s:.0f}s)"
    return None

  def describe(self, held: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("since", 0))))
    return f"host {held.get('host')}, pid {held.get('pid')}, since {since}"

  def _read(self) -> dict | None:
    for _ in range(20):
      try:
        return json.loads(self.file.read_text())
      except FileNotFoundError:
        return None
      except ValueError:  # created but not yet written (O_EXCL, then write): look again
        time.sleep(0.05)
    return {"heartbeat": 0}  # still unreadable after a second: a holder that died mid-write

  def acquire(self) -> "Lock":
    for _ in range(5):
      if create_exclusive(self.file, json.dumps(self._record())):
        self._start_heartbeat()
        return self
      held = self._read()
      if held is None:
        continue  # released in between
      why = self._stale(held)
      if why is None:
        raise LockHeld(
            f"{self.what} {self.file.parent} is in use by another run ({self.describe(held)}; "
            f"lock file {self.file}). Wait for it to finish or stop it, or use another "
            f"{self.what}; a lock whose holder died is taken over once its heartbeat is "
            f"{self.timeout_s:.0f}s old.")
      self._take_over(held, why)
    raise LockHeld(f"could not acquire {self.file}: it keeps changing hands.")

  def _take_over(self, held: dict, why: str) -> None:
    """Removes a stale lock, one taker at a time (a `.takeover` marker created if absent)."""
    marker = self.file.parent / (self.NAME + ".takeover")
    if not create_exclusive(marker, self.token):
      try:
        age = time.time() - marker.stat().mtime
      except FileNotFoundError:
        return
      if age > 60:  # a taker that died half-way
        marker.unlink(missing_ok=True)
      else:
        time.sleep(1.0)
      return
    try:
      if self._read() == held:
        warnings.warn(f"taking over the lock of {self.what} {self.file.parent} from "
                      f"{self.describe(held)}: {why}.")
        self.file.unlink(missing_ok=True)
    finally:
      marker.unlink(missing_ok=True)

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self.heartbeat_s):
        try:
          if (self._read() or {}).get("token") == self.token:
            write_text(self.file, json.dumps(self._record()))
        except Exception:  # pylint: disable=broad-except  (a transient store error: retry)
          pass
    self._thread = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      if (self._read() or {}).get("token") == self.token:
        self.file.unlink(missing_ok=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
