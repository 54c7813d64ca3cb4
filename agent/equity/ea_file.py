"""Readings from the optional status-reporter EA: <dir>/status-<LOGIN>.json (CONTRACT.md section 5).

The file (or a POSTed body) is outsiders' input: every field is range-checked before it becomes a Decimal or a
datetime, and anything wrong with it (size, nesting, a value out of range) is a NoReading with a one-line reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import safe_io
from agent.equity.base import NoReading, Snapshot, login_digits
from agent.policy.evaluate import MAX_CLOCK_SKEW
from agent.safe_io import UnsafeInput, one_line
from agent.timeutil import Clock

_FUTURE_SLACK = MAX_CLOCK_SKEW  # one skew allowance for every source (agent.policy.evaluate)
NUMBERS = ("balance", "equity", "margin", "margin_free", "margin_level")

MAX_STATUS_BYTES = 64 * 1024
MAX_STATUS_DEPTH = 20
AMOUNT_LIMIT = 10 ** 15          # |amount| below this (so 8 places still fit Decimal's 28 digits)
AMOUNT_PLACES = 8                # at most this many significant decimal places
_AMOUNT_QUANTUM = Decimal(1).scaleb(-AMOUNT_PLACES)
TIME_LIMIT = 2 ** 33             # epoch seconds: [0, 2**33) is 1970 .. 2242
MAX_POSITIONS = 10 ** 6
LOGIN_LIMIT = 2 ** 63
_NUMBER_TEXT_LIMIT = 100         # characters of a JSON number with a fraction or exponent
_CURRENCY = re.compile(r"[A-Za-z0-9]{1,16}")


def _brief(value: Any) -> str:
    return one_line(repr(value), 40)


def _decimal(text: str) -> Decimal:
    """parse_float hook: a JSON fraction/exponent as an exact Decimal; absurd ones are refused, never raised."""
    if len(text) > _NUMBER_TEXT_LIMIT:
        raise UnsafeInput(f"holds a number of {len(text)} characters")
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.Overflow / InvalidOperation for exponents beyond the context
        raise UnsafeInput(f"holds a number out of range ({one_line(text, 40)})") from None


def load_status(text: str | bytes, where: str = "status file") -> dict[str, Any]:
    """The JSON object of a status, or NoReading (too big, too deep, not JSON, not an object)."""
    try:
        data = safe_io.loads_bounded(text, max_bytes=MAX_STATUS_BYTES, max_depth=MAX_STATUS_DEPTH,
                                     parse_float=_decimal)
    except UnsafeInput as exc:
        raise NoReading(f"{where} {exc}") from None
    except (ValueError, ArithmeticError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits
        raise NoReading(f"{where} is not valid JSON (torn or partial write?)") from None
    if not isinstance(data, dict):
        raise NoReading(f"{where} does not hold a JSON object")
    return data


def _amount(data: dict[str, Any], key: str, where: str) -> Decimal:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise NoReading(f"{where}: {key} is missing or not a number")
    if isinstance(value, int):
        if abs(value) >= AMOUNT_LIMIT:
            raise NoReading(f"{where}: {key} {_brief(value)} is out of range (|{key}| must be below 1e15)")
        return Decimal(value)
    if not value.is_finite() or value.copy_abs() >= AMOUNT_LIMIT:  # copy_abs: exact, unlike abs() (Overflow)
        raise NoReading(f"{where}: {key} {_brief(value)} is out of range (|{key}| must be below 1e15)")
    exact = value.quantize(_AMOUNT_QUANTUM)  # cannot fail: below 1e15 with 8 places is 23 digits
    if exact != value:
        raise NoReading(f"{where}: {key} {_brief(value)} has more than {AMOUNT_PLACES} decimal places")
    exponent = value.as_tuple().exponent
    return value if isinstance(exponent, int) and -AMOUNT_PLACES <= exponent <= 0 else exact


def status_from_data(data: dict[str, Any], expected_digits: str | None, where: str = "status file",
                     allow_disconnected: bool = False) -> Snapshot:
    """A Snapshot from a loaded status object, or NoReading. expected_digits None: any (valid) login."""
    schema = data.get("schema")
    if type(schema) is not int or schema != 1:
        raise NoReading(f"{where} has schema {_brief(schema)}; only schema 1 is understood")
    login = data.get("login")
    if not isinstance(login, int) or isinstance(login, bool):
        raise NoReading(f"{where} has no numeric login")
    if not 0 < login < LOGIN_LIMIT:
        raise NoReading(f"{where} has no valid numeric login ({_brief(login)} is not in 1 .. 2**63-1)")
    if expected_digits is not None and str(login) != expected_digits:
        raise NoReading(f"{where} is for login {login}, not {one_line(expected_digits, 40)}")
    values = {key: _amount(data, key, where) for key in NUMBERS}
    currency = data.get("currency")
    if not isinstance(currency, str) or not currency:
        raise NoReading(f"{where}: currency is missing")
    if not _CURRENCY.fullmatch(currency):
        raise NoReading(f"{where}: currency {_brief(currency)} is not a currency code")
    connected = data.get("connected")
    if not isinstance(connected, bool):
        raise NoReading(f"{where}: connected is missing or not true/false")
    if not connected and not allow_disconnected:
        raise NoReading(f"{where} says the terminal is not connected to the trade server")
    stamp = data.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, int):
        raise NoReading(f"{where}: time is missing or not whole seconds since the epoch")
    if not 0 <= stamp < TIME_LIMIT:
        raise NoReading(f"{where}: time {_brief(stamp)} is out of range (epoch seconds in 0 .. 2**33-1)")
    positions = data.get("positions")
    if positions is not None:
        if isinstance(positions, bool) or not isinstance(positions, int):
            raise NoReading(f"{where}: positions {_brief(positions)} is not a whole number")
        if not 0 <= positions <= MAX_POSITIONS:
            raise NoReading(f"{where}: positions {_brief(positions)} is out of range (0 .. {MAX_POSITIONS})")
    return Snapshot(login=str(login), balance=values["balance"], equity=values["equity"], margin=values["margin"],
                    margin_free=values["margin_free"], margin_level=values["margin_level"], currency=currency,
                    positions=positions, connected=connected, taken_at=datetime.fromtimestamp(stamp, UTC),
                    source="ea-file")


def parse_status(text: str | bytes, expected_digits: str, where: str = "status file",
                 allow_disconnected: bool = False) -> Snapshot:
    """Turn the EA's JSON into a Snapshot, or raise NoReading saying what is wrong with it (and nothing else)."""
    data = load_status(text, where)
    try:
        return status_from_data(data, expected_digits, where, allow_disconnected)
    except NoReading:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:  # a check above missed a case
        raise NoReading(f"{where} could not be read: {one_line(exc.__class__.__name__)}") from None


class EaFileSource:
    name = "ea-file"

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.directory = directory
        self.clock = clock
        # the last bytes read per file and what they said: the EA rewrites its file every few seconds, the
        # scheduler may read it more often; the same bytes need no second parse
        self._parsed: dict[Path, tuple[bytes, Snapshot]] = {}

    def path_for(self, mt5_login: str) -> Path:
        return self.directory / f"status-{login_digits(mt5_login)}.json"

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        path = self.path_for(mt5_login)
        try:
            raw = safe_io.read_small_file(path, MAX_STATUS_BYTES)
        except FileNotFoundError:
            raise NoReading(f"status file {path} is missing (is the FundAgentStatus EA attached?)") from None
        except UnsafeInput as exc:  # a FIFO, a device, a link to /dev/zero, a runaway file
            raise NoReading(f"status file {path} {exc}") from None
        except OSError as exc:
            raise NoReading(f"status file {path} is unreadable: {exc.strerror or exc}") from None
        held = self._parsed.get(path)
        if held is not None and held[0] == raw:
            snapshot = held[1]
        else:
            snapshot = parse_status(raw, login_digits(mt5_login), f"status file {path.name}")
            self._parsed[path] = (bytes(raw), snapshot)
        if snapshot.taken_at > self.clock.now() + _FUTURE_SLACK:
            raise NoReading(f"status file {path.name} is dated in the future ({snapshot.taken_at.isoformat()}); "
                            "check the clocks")
        return snapshot

    def close(self) -> None:
        pass
