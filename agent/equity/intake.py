"""Snapshots POSTed by the status-reporter EA (the HTTP intake), read like the status files."""

from __future__ import annotations

import threading

from agent.equity.base import EquitySource, NoReading, Snapshot, login_digits


class IntakeStore:
    """The newest snapshot per numeric login, as received over HTTP."""

    def __init__(self) -> None:
        self._latest: dict[str, Snapshot] = {}
        self._lock = threading.Lock()

    def put(self, snapshot: Snapshot) -> None:
        with self._lock:
            current = self._latest.get(snapshot.login)
            if current is None or snapshot.taken_at >= current.taken_at:
                self._latest[snapshot.login] = snapshot

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
