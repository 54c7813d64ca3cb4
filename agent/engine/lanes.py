"""One lane per funding account.

Accounts that share a funding account share its balance and its reserve: their evaluations must never
interleave between "read the funding balance" and "commit the intent", or two of them spend the same money.
In one process a lock keyed by the funding login serializes them; accounts on different funding accounts still
run in parallel. Across processes or hosts (a shared PostgreSQL ledger) the intent's own transaction locks the
funding account's row (`transfers.lock_funding`, FOR UPDATE) and counts again what other hosts committed since
the balance was read (`Engine._intent_check`): the lane keeps one process orderly, the row lock keeps hosts so.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Lanes:
    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, funding: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(funding)
            if lock is None:
                lock = self._locks[funding] = threading.Lock()
            return lock

    @contextmanager
    def hold(self, funding: str) -> Iterator[None]:
        """Run the block alone among evaluations of accounts paid by `funding`."""
        with self._lock_for(funding):
            yield
