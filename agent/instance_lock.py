"""One agent per ledger: an exclusive, non-blocking lock file beside the SQLite ledger.

The lock is `<ledger>.lock`, taken with `filelock` (LockFileEx on Windows, flock on POSIX): the operating system
drops it when the holding process dies, so a crash never leaves a stale lock. Nothing is written inside the locked
file (on Windows the locked byte cannot be read by anyone else); who holds it is written, after the lock is taken,
to a separate `<ledger>.lock.json` (pid, host, command, start time, owner id) so that a refused second agent can say
which process to stop.

Two InstanceLock objects for the same path in one process also exclude each other: the operating system already
does so (separate open files), and an in-process registry makes it so whatever the filelock version or platform.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import filelock

from agent.timeutil import iso, utcnow

log = logging.getLogger("agent.instance_lock")

_held: set[str] = set()  # lock files held by InstanceLock objects of this process
_held_guard = threading.Lock()


def lock_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".lock")


def info_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".lock.json")


def new_owner_id() -> str:
    """An id unique to this process run: host, pid and a random suffix (a pid may be reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def holder(ledger_path: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the ledger lock, from `<ledger>.lock.json`; None when missing, torn or unreadable."""
    try:
        data = json.loads(info_path(Path(ledger_path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(info: dict[str, Any] | None) -> str:
    """'pid 1234 on host vps1, "run" since 2026-11-25T21:00:00Z' (the parts that are known)."""
    if not info:
        return ""
    who, what = [], []
    if info.get("pid") is not None:
        who.append(f"pid {info['pid']}")
    if info.get("host"):
        who.append(f"on host {info['host']}")
    if info.get("command"):
        what.append(f'"{info["command"]}"')
    if info.get("started"):
        what.append(f"since {info['started']}")
    return ", ".join(" ".join(words) for words in (who, what) if words)


class LockHeld(Exception):
    """Another fund-agent (another process, or another InstanceLock in this one) holds the ledger lock."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        self.path = path
        self.holder = holder
        details = describe(holder)
        super().__init__(f"another fund-agent is already running on this ledger and holds its lock {path}"
                         f"{': ' + details if details else ''}; stop it first")


def _file_lock(path: Path) -> filelock.BaseFileLock:
    # thread_local=False: the service may release from another thread than the one that acquired. Never a
    # singleton (the default): each InstanceLock opens its own file, so the OS makes them exclude each other.
    return filelock.FileLock(str(path), timeout=0, thread_local=False)


class InstanceLock:
    """An exclusive lock beside the ledger: a second agent on the same ledger refuses to start."""

    def __init__(self, ledger_path: Path, command: str) -> None:
        self.ledger_path = Path(ledger_path)
        self.command = command
        self.path = lock_path(self.ledger_path)
        self.info_path = info_path(self.ledger_path)
        self.owner = new_owner_id()
        self.info: dict[str, Any] | None = None  # what we wrote to the holder file, while held
        self._lock: filelock.BaseFileLock | None = None
        self._key = _key(self.path)

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> InstanceLock:
        if self._lock is not None:
            return self
        with _held_guard:
            if self._key in _held:
                raise LockHeld(self.path, holder(self.ledger_path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = _file_lock(self.path)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise LockHeld(self.path, holder(self.ledger_path)) from None
            _held.add(self._key)
            self._lock = lock
        self._write_info()
        return self

    def _write_info(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        started = iso(utcnow().replace(microsecond=0))
        self.info = {"pid": pid, "host": host, "command": self.command, "started": started, "owner": self.owner}
        temp = self.info_path.with_name(f"{self.info_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            temp.write_text(json.dumps(self.info) + "\n", encoding="utf-8")
            os.replace(temp, self.info_path)
        except OSError as exc:  # informative only: the lock is what keeps a second agent out
            log.warning("could not write the lock holder file %s: %s", self.info_path, exc)
            for stale in (temp, self.info_path):  # never leave a previous holder's details to mislead
                try:
                    stale.unlink()
                except OSError:
                    pass

    def release(self) -> None:
        lock = self._lock
        if lock is None:
            return
        # Remove our holder file while still holding the lock, so we never delete the next holder's.
        current = holder(self.ledger_path)
        if current is not None and current.get("owner") == self.owner:
            try:
                self.info_path.unlink()
            except OSError:
                pass
        with _held_guard:
            try:
                lock.release(force=True)
            finally:
                self._lock = None
                self.info = None
                _held.discard(self._key)

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"InstanceLock({str(self.path)!r}, {self.command!r}, owner={self.owner!r}, held={self.held})"


def is_held(ledger_path: Path) -> bool:
    """True when a fund-agent (another process, or another InstanceLock of this one) holds the ledger lock."""
    path = lock_path(Path(ledger_path))
    with _held_guard:
        if _key(path) in _held:
            return True
        if not path.exists():  # a holder always has the file open; do not create files (or folders) just to look
            return False
        lock = _file_lock(path)
        try:
            lock.acquire()
        except filelock.Timeout:
            return True
        lock.release(force=True)
        return False
