"""Readings that arrive between ticks: the EA's status folder watched for rewrites, and the reactor that turns a
reading crossing a policy band into an evaluation of its account at once.

The schedule stays the heartbeat; a reading only brings an account's next evaluation forward. The reactor never
bursts: at most one extra evaluation per account per `min_interval` (a reading inside that interval is not lost:
its evaluation runs when the interval ends, and reads the newest reading then). The evaluation itself runs
through the caller's `run` (the service's, which excludes a scheduled tick of the same account).
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.policy.model import Policy

log = logging.getLogger("agent.watch")

MIN_INTERVAL = 5.0  # seconds: at most one reading-triggered evaluation per account per this (README)
POLL_EVERY = 1.0  # seconds between scans of the EA folder when file notifications are not available
_STATUS_NAME = re.compile(r"status-([0-9]{1,19})\.json")


def band_side(policy: Policy, equity: Decimal) -> int:
    """-1 below the top-up floor, 1 above the sweep ceiling (a reading that may call for a transfer), else 0."""
    if policy.top_up is not None and equity < policy.top_up.when_equity_below:
        return -1
    return 1 if policy.sweep is not None and equity > policy.sweep.when_equity_above else 0


def crosses_band(policy: Policy, equity: Decimal) -> bool:
    """Equity below the top-up floor or above the sweep ceiling: a reading that may call for a transfer."""
    return band_side(policy, equity) != 0


class Triggers:
    """Which readings bring an evaluation forward: one that crosses into a band (the account's previous reading
    seen here was in band, or a transfer of it has been confirmed since), or any reading beyond a band while the
    account's last evaluation had no usable reading (it waits for a newer one). A reading that only stays beyond
    the band brings nothing the schedule will not see (a cooldown, a limit): no evaluation every 5 s for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._side: dict[str, int] = {}  # account -> band_side of its last reading seen here
        self._waiting: set[str] = set()  # accounts whose last evaluation had no usable reading

    def reading(self, policy: Policy, equity: Decimal) -> bool:
        side = band_side(policy, equity)
        with self._lock:
            was = self._side.get(policy.mt5, 0)
            self._side[policy.mt5] = side
            waiting = policy.mt5 in self._waiting
        return side != 0 and (side != was or waiting)

    def evaluated(self, policy: Policy, equity: Decimal | None, had_reading: bool, confirmed: bool) -> None:
        """After any evaluation of the account: `equity` is the reading it used (None: it had none)."""
        with self._lock:
            if had_reading:
                self._waiting.discard(policy.mt5)
            else:
                self._waiting.add(policy.mt5)
            if confirmed:  # the transfer moved the equity back toward the band: the next reading beyond is news
                self._side[policy.mt5] = 0
            elif had_reading and equity is not None:
                # what the evaluation saw (the newest of every source), not only what came through here
                self._side[policy.mt5] = band_side(policy, equity)


class Reactor:
    """Runs `run(account)` soon after `poke(account)`, on a small pool: at most one extra evaluation per account
    per `min_interval`, and at most one waiting per account (pokes while one waits are folded into it)."""

    def __init__(self, run: Callable[[str], None], min_interval: float = MIN_INTERVAL, workers: int = 4) -> None:
        self._run = run
        self.min_interval = min_interval
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="react")
        self._cond = threading.Condition()
        self._due: list[tuple[float, str]] = []  # (monotonic time, account), a heap
        self._waiting: set[str] = set()  # poked and not started yet
        self._slot: dict[str, float] = {}  # account -> when its latest extra evaluation may start (or started)
        self._closed = False
        self.triggered = 0  # extra evaluations started (for tests and metrics)
        self.folded = 0  # pokes folded into one already waiting
        self._thread = threading.Thread(target=self._loop, name="reactor", daemon=True)
        self._thread.start()

    def poke(self, account: str) -> None:
        with self._cond:
            if self._closed:
                return
            if account in self._waiting:
                self.folded += 1
                return
            now = time.monotonic()
            due = max(now, self._slot.get(account, now - self.min_interval) + self.min_interval)
            self._slot[account] = due
            self._waiting.add(account)
            heapq.heappush(self._due, (due, account))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._due else self._due[0][0] - time.monotonic())
                if self._closed:
                    return
                _due, account = heapq.heappop(self._due)
            try:
                self._pool.submit(self._start, account)
            except RuntimeError:  # the pool is shut down: we are stopping
                return

    def _start(self, account: str) -> None:
        with self._cond:
            # from here on a new reading needs a new evaluation: this one may have read it already, or not
            self._waiting.discard(account)
            self.triggered += 1
        try:
            self._run(account)
        except Exception:  # noqa: BLE001 - the run reports its own failures; the reactor goes on
            log.exception("reading-triggered evaluation of %s failed", account)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)


class FolderWatcher:
    """Calls `changed(digits)` when `<dir>/status-<digits>.json` is written or replaced. Uses the platform's file
    notifications (watchdog: inotify, FSEvents, ReadDirectoryChangesW); when they cannot start (no watchdog, an
    exhausted inotify limit, a network share), scans the folder every `poll_every` seconds instead."""

    def __init__(self, directory: Path, changed: Callable[[str], None], *, use_notifications: bool = True,
                 poll_every: float = POLL_EVERY) -> None:
        self.directory = directory
        self.changed = changed
        self.poll_every = poll_every
        self.mode = "none"
        self._observer: Any = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._seen: dict[str, tuple[int, int, int]] = {}
        if use_notifications:
            self._observer = self._start_notifications()
        if self._observer is not None:
            self.mode = "notify"
        else:
            self._seen = self._scan()
            self._poller = threading.Thread(target=self._poll_loop, name="ea-folder-poll", daemon=True)
            self._poller.start()
            self.mode = "poll"

    def _start_notifications(self) -> Any:
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog is not installed: the EA folder %s is scanned every %gs", self.directory,
                        self.poll_every)
            return None
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in ("created", "modified", "moved", "closed"):
                    return
                path = getattr(event, "dest_path", "") or event.src_path
                watcher._notice(os.fsdecode(path))

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.directory), recursive=False)
            observer.daemon = True
            observer.start()
        except Exception as exc:  # noqa: BLE001 - OSError (inotify limit, missing folder) and the backends' own
            log.warning("file notifications for %s cannot start (%s): the folder is scanned every %gs instead",
                        self.directory, type(exc).__name__, self.poll_every)
            return None
        return observer

    def _notice(self, path: str) -> None:
        match = _STATUS_NAME.fullmatch(os.path.basename(path))
        if match is None:
            return  # the EA's temporary file, or anything else in the folder
        try:
            self.changed(match.group(1))
        except Exception:  # noqa: BLE001 - a failing callback must not stop the watcher
            log.exception("handling a change of %s failed", os.path.basename(path))

    def _scan(self) -> dict[str, tuple[int, int, int]]:
        seen: dict[str, tuple[int, int, int]] = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if _STATUS_NAME.fullmatch(entry.name):
                        try:
                            stat = entry.stat()
                        except OSError:
                            continue
                        seen[entry.name] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            pass  # a missing folder: every file in it is missing, and the decisions say so
        return seen

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_every):
            seen = self._scan()
            for name, signature in seen.items():
                if self._seen.get(name) != signature:
                    self._notice(name)
            self._seen = seen

    def close(self) -> None:
        self._stop.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        if self._poller is not None:
            self._poller.join(timeout=5)
