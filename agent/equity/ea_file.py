"""Readings from the optional status-reporter EA: <dir>/status-<LOGIN>.json (CONTRACT.md section 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import money
from agent.equity.base import NoReading, Snapshot, login_digits
from agent.policy.evaluate import MAX_CLOCK_SKEW
from agent.timeutil import Clock

_FUTURE_SLACK = MAX_CLOCK_SKEW  # one skew allowance for every source (agent.policy.evaluate)
NUMBERS = ("balance", "equity", "margin", "margin_free", "margin_level")


def parse_status(text: str | bytes, expected_digits: str, where: str = "status file",
                 allow_disconnected: bool = False) -> Snapshot:
    """Turn the EA's JSON into a Snapshot, or raise NoReading saying what is wrong with it."""
    try:
        data = money.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise NoReading(f"{where} is not valid JSON (torn or partial write?)") from None
    if not isinstance(data, dict):
        raise NoReading(f"{where} does not hold a JSON object")
    if data.get("schema") != 1:
        raise NoReading(f"{where} has schema {data.get('schema')!r}; only schema 1 is understood")
    login = data.get("login")
    if not isinstance(login, int) or isinstance(login, bool):
        raise NoReading(f"{where} has no numeric login")
    if str(login) != expected_digits:
        raise NoReading(f"{where} is for login {login}, not {expected_digits}")
    values: dict[str, Decimal] = {}
    for key in NUMBERS:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            raise NoReading(f"{where}: {key} is missing or not a number")
        values[key] = Decimal(value)
    currency = data.get("currency")
    if not isinstance(currency, str) or not currency:
        raise NoReading(f"{where}: currency is missing")
    connected = data.get("connected")
    if not isinstance(connected, bool):
        raise NoReading(f"{where}: connected is missing or not true/false")
    if not connected and not allow_disconnected:
        raise NoReading(f"{where} says the terminal is not connected to the trade server")
    stamp = data.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, int):
        raise NoReading(f"{where}: time is missing or not whole seconds since the epoch")
    positions: Any = data.get("positions")
    return Snapshot(login=str(login), balance=values["balance"], equity=values["equity"], margin=values["margin"],
                    margin_free=values["margin_free"], margin_level=values["margin_level"], currency=currency,
                    positions=positions if isinstance(positions, int) else None, connected=connected,
                    taken_at=datetime.fromtimestamp(stamp, UTC), source="ea-file")


class EaFileSource:
    name = "ea-file"

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.directory = directory
        self.clock = clock

    def path_for(self, mt5_login: str) -> Path:
        return self.directory / f"status-{login_digits(mt5_login)}.json"

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        path = self.path_for(mt5_login)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NoReading(f"status file {path} is missing (is the FundAgentStatus EA attached?)") from None
        except OSError as exc:
            raise NoReading(f"status file {path} is unreadable: {exc.strerror}") from None
        snapshot = parse_status(raw, login_digits(mt5_login), f"status file {path.name}")
        if snapshot.taken_at > self.clock.now() + _FUTURE_SLACK:
            raise NoReading(f"status file {path.name} is dated in the future ({snapshot.taken_at.isoformat()}); "
                            "check the clocks")
        return snapshot

    def close(self) -> None:
        pass

