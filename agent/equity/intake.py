"""Snapshots POSTed by the status-reporter EA (the HTTP intake), read like the status files."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.equity.base import EquitySource, NoReading, Snapshot, login_digits

log = logging.getLogger("agent.intake")


class IntakeStore:
    """The newest snapshot per numeric login, as received over HTTP."""

    def __init__(self) -> None:
        self._latest: dict[str, Snapshot] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Snapshot], None]] = []

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """`listener(snapshot)` after each snapshot that becomes the newest of its login (the service reacts)."""
        self._listeners.append(listener)

    def put(self, snapshot: Snapshot) -> None:
        with self._lock:
            current = self._latest.get(snapshot.login)
            newest = current is None or snapshot.taken_at >= current.taken_at
            if newest:
                self._latest[snapshot.login] = snapshot
        if newest:
            for listener in self._listeners:  # outside the lock: a listener may read the store
                try:
                    listener(snapshot)
                except Exception as exc:  # noqa: BLE001 - the status is stored; the schedule still sees it
                    log.warning("a listener of the EA intake failed: %s", type(exc).__name__)

    def get(self, digits: str) -> Snapshot | None:
        with self._lock:
            return self._latest.get(digits)


class WithIntake:
    """Wraps a source: the newer of its reading and the EA's last POST wins."""

    def __init__(self, inner: EquitySource | None, store: IntakeStore) -> None:
        self.inner = inner
        self.store = store
        self.name = f"{inner.name}+intake" if inner is not None else "intake"

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        posted = self.store.get(login_digits(mt5_login))
        try:
            if self.inner is None:
                raise NoReading("no status has been POSTed by the EA yet")
            from_inner = self.inner.read(mt5_login, max_age_hint)
        except NoReading:
            if posted is None:
                raise
            return posted
        if posted is not None and posted.taken_at > from_inner.taken_at:
            return posted
        return from_inner

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
