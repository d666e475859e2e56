"""One run per workdir: a lock file, WORKDIR/lock.json, held while a run trains.

It records the holder (host, pid, start time, command) and a heartbeat that a daemon
thread refreshes every HEARTBEAT_SECONDS. A second `imgcls train` (or sweep variant) on the
workdir is refused at once, naming the holder. A lock left by a killed run is taken over
with a warning, so SIGKILL-and-rerun still resumes by itself: on this host, when its pid is
dead; elsewhere, when its heartbeat is older than STALE_SECONDS.

Local paths get an atomic create (O_CREAT | O_EXCL): two launches cannot both win. On an
object store (gs://) there is no exclusive create through etils: the lock is written after
a check, so two launches within the same second could both start; the heartbeat and the
check still catch every later launch. Orbax's own atomic renames keep each checkpoint whole.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from imgcls.errors import UserError

LOCK_FILE = 'lock.json'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # a heartbeat older than this (another host) means the holder is gone


class LockError(UserError):
  """The workdir is in use by another run; the message names it and how to clear the lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _is_local(path: epath.Path) -> bool:
  return '://' not in os.fspath(path)


class WorkdirLock:
  """`with WorkdirLock(workdir):` or acquire() / release(); process 0 of a run holds it."""

  def __init__(self, workdir: str | os.PathLike, *, heartbeat: float = HEARTBEAT_SECONDS,
               stale: float = STALE_SECONDS):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.heartbeat, self.stale = heartbeat, stale
    self.token = uuid.uuid4().hex
    self.record: dict[str, Any] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ state

  def holder(self) -> dict[str, Any] | None:
    """The lock's record, or None when there is no (readable) lock."""
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
      return None

  def is_stale(self, record: dict[str, Any]) -> str | None:
    """Why a record's holder is gone (a dead pid here, an old heartbeat), else None."""
    if record.get('host') == socket.gethostname():
      return None if _pid_alive(int(record.get('pid', -1))) else (
          f'its process {record.get("pid")} on this host is gone')
    age = time.time() - float(record.get('heartbeat', 0))
    return f'its heartbeat is {age:.0f} s old' if age > self.stale else None

  def check_free(self) -> None:
    """LockError if a live run holds the workdir (a cheap check before any set-up)."""
    record = self.holder()
    if record and self.is_stale(record) is None:
      raise LockError(self._busy_message(record))

  # -------------------------------------------------------------- acquiring

  def acquire(self) -> 'WorkdirLock':
    self.path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.record = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': now,
                   'heartbeat': now, 'token': self.token, 'command': ' '.join(sys.argv)}
    if not self._create():
      record = self.holder() or {}
      why = self.is_stale(record) if record else 'it is unreadable'
      if why is None:
        raise LockError(self._busy_message(record))
      logging.warning('workdir %s: taking over the lock of a run that ended without releasing '
                      'it (%s): %s', self.path.parent, why, record)
      self._write(self.record)
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name='imgcls-lock-heartbeat',
                                    daemon=True)
    self._thread.start()
    return self

  def _create(self) -> bool:
    """Writes the record if no lock exists; False if one does."""
    data = json.dumps(self.record)
    if _is_local(self.path):
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w') as f:
        f.write(data)
      return True
    if self.path.exists():  # object stores: check, then write (see the module doc)
      return False
    self.path.write_text(data)
    return True

  def _write(self, record: dict[str, Any]) -> None:
    """Replaces the lock's content at once (write a temporary file, then rename)."""
    tmp = self.path.parent / f'.{LOCK_FILE}.{self.token}'
    tmp.write_text(json.dumps(record))
    tmp.replace(self.path)

  def _busy_message(self, record: dict[str, Any]) -> str:
    age = time.time() - float(record.get('heartbeat', 0))
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.get('started', 0)))
    return (f'workdir {self.path.parent} is in use by another run: pid {record.get("pid")} on '
            f'host {record.get("host")}, started {started}, last heartbeat {age:.0f} s ago '
            f'({record.get("command", "")}). Wait for it to finish or stop it; if it is no '
            f'longer running, delete {self.path} and rerun (a dead run on this host, or one '
            f'silent for {self.stale:.0f} s, is taken over by itself).')

  # ----------------------------------------------------------- heartbeat

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat):
      try:
        if (self.holder() or {}).get('token') != self.token:
          logging.error('workdir %s: the lock was taken by another run.', self.path.parent)
          return
        self._write(dict(self.record, heartbeat=time.time()))
      except OSError as e:  # a full or unreachable disk must not kill training
        logging.warning('workdir lock heartbeat failed: %s', e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    try:
      if (self.holder() or {}).get('token') == self.token:
        self.path.unlink()
    except OSError as e:
      logging.warning('workdir %s: could not remove the lock: %s', self.path.parent, e)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
