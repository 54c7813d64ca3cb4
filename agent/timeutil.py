"""Durations, UTC timestamps and the injectable clock."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_DAYS = 3650  # ten years: anything longer is a typo, and a far longer one overflows timedelta


class DurationError(ValueError):
    pass


def parse_duration(text: object) -> timedelta:
    """'30s', '15m', '2h', '1d' -> timedelta, at most 3650d. Anything else is a DurationError (never
    OverflowError), including bare numbers."""
    if not isinstance(text, str):
        raise DurationError(f"bad duration {text!r}: write it as a string like 30s, 15m, 2h or 1d")
    if len(text) > 40:
        raise DurationError(f"bad duration {text[:20]!r}...: expected a number and a unit s, m, h or d (e.g. 30s)")
    match = _DURATION.match(text.strip())
    if not match:
        raise DurationError(f"bad duration {text!r}: expected a number and a unit s, m, h or d (e.g. 30s)")
    digits = match.group(1).lstrip("0") or "0"
    seconds = int(digits) * _UNIT[match.group(2)] if len(digits) <= 12 else None
    if seconds is None or seconds > MAX_DURATION_DAYS * 86400:
        raise DurationError(f"duration {text.strip()!r} is too long: at most {MAX_DURATION_DAYS}d")
    return timedelta(seconds=seconds)


def fmt_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with a Z, second precision plus microseconds when present."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def parse_iso(text: str) -> datetime:
    """ISO 8601 date or date-time; naive values are UTC."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Clock:
    """The real clock. Everything that needs 'now' takes a Clock, so tests and the demo can speed time up."""

    def now(self) -> datetime:
        return utcnow()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FastClock(Clock):
    """Virtual time that runs `speed` times faster than the wall clock (the demo's clock)."""

    def __init__(self, start: datetime, speed: float) -> None:
        self._start = start
        self._wall0 = time.monotonic()
        self._speed = speed
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=(time.monotonic() - self._wall0) * self._speed)


class ManualClock(Clock):
    """Time that moves only when told to (tests)."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def sleep(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
