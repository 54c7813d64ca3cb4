"""What every equity source produces, and the small interface the engine uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True)
class Snapshot:
    """One reading of an MT5 account. margin_level is 0 when no margin is in use (as in MT5)."""

    login: str  # the numeric terminal login as text, e.g. "130002534"
    balance: Decimal
    equity: Decimal
    margin: Decimal | None
    margin_free: Decimal | None
    margin_level: Decimal | None
    currency: str
    positions: int | None
    connected: bool
    taken_at: datetime
    source: str


class NoReading(Exception):
    """The source could not give a usable reading; the message says why in plain words."""


class EquitySource(Protocol):
    name: str

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        """A reading for the policy's `account.mt5` (e.g. MTR130002534), or NoReading."""
        ...

    def close(self) -> None: ...


def login_digits(mt5_login: str) -> str:
    return "".join(ch for ch in mt5_login if ch.isdigit())
