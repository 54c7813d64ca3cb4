"""Histories to replay: readings (time, equity, ...) and the transfers that really happened under them.

`ledger:ACCOUNT` reads the decision journal and the transfers table (read-only), a CSV file is
`time,equity[,balance,margin,margin_level]`, and `mt5:ACCOUNT` is the account's deal history as a balance curve.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

CSV_COLUMNS = ("time", "equity", "balance", "margin", "margin_level")
OPTIONAL_COLUMNS = CSV_COLUMNS[2:]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# decisions whose reading the engine could not use: from them on, a ledger step curve has no reading
UNUSABLE = frozenset({"stale", "no_reading", "currency", "future_reading"})


@dataclass(frozen=True)
class Reading:
    at: datetime
    equity: Decimal
    balance: Decimal | None = None
    margin: Decimal | None = None
    margin_level: Decimal | None = None


@dataclass(frozen=True)
class RecordedTransfer:
    """A transfer that really moved money: readings taken after `at` include it."""

    at: datetime
    kind: str  # top_up | sweep
    amount: Decimal


@dataclass
class History:
    label: str
    readings: list[Reading]
    transfers: list[RecordedTransfer] = field(default_factory=list)
    account: str | None = None
    currency: str | None = None
    notes: list[str] = field(default_factory=list)
    # a step curve: a value holds until the next one (or the next gap), it is read "now" at each tick
    step: bool = False
    gaps: list[datetime] = field(default_factory=list)  # step curves: from here on, no usable reading
    # ledger: policy sha256 -> the times that policy was really evaluated (its replay ticks at those times)
    evaluations: dict[str, list[datetime]] = field(default_factory=dict)


class SourceError(Exception):
    """A history that cannot be read: one line per problem (FILE:LINE: message for a CSV file)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems")
        self.problems = problems


def _moment(text: str) -> datetime:
    """UTC ISO 8601 (naive = UTC, a Z or an offset converted) or epoch seconds (an integer or a decimal)."""
    value = text.strip()
    if value.isdigit():
        return EPOCH + timedelta(seconds=int(value))
    if value and value.replace(".", "", 1).isdigit():
        seconds = Decimal(value)
        return EPOCH + timedelta(seconds=int(seconds), microseconds=int(seconds % 1 * 1_000_000))
    moment = datetime.fromisoformat(value)  # reads a trailing Z too (Python 3.11)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _number(text: str, column: str) -> Decimal:
    try:
        value = Decimal(text)  # Decimal() allows the surrounding blanks itself
    except InvalidOperation:
        raise ValueError(f"{column}: {text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{column}: {text!r} is not a finite number")
    return value


def _rows(path: Path, rows: Any, header: list[str], readings: list[Reading], problems: list[str]) -> None:
    """The lines after the header, kept lean: a year of minutes is half a million of them."""
    width = len(header)
    extras = [(index, name) for index, name in enumerate(header) if index >= 2]
    last: datetime | None = None
    while True:
        try:
            for row in rows:
                line = rows.line_num
                if len(row) != width:
                    if any(cell.strip() for cell in row):  # a blank line carries nothing
                        problems.append(f"{path}:{line}: expected {width} fields ({','.join(header)}), got {len(row)}")
                    continue
                try:
                    at = _moment(row[0])
                except (ValueError, OverflowError, InvalidOperation):
                    problems.append(f"{path}:{line}: time: {row[0]!r} is not a UTC ISO 8601 time or epoch seconds")
                    continue
                try:
                    equity = _number(row[1], "equity")
                    extra = {name: _number(row[i], name) if row[i].strip() else None for i, name in extras}
                except ValueError as exc:
                    problems.append(f"{path}:{line}: {exc}")
                    continue
                if last is not None and at <= last:
                    problems.append(f"{path}:{line}: time {row[0].strip()} is not after the line before's")
                    continue
                last = at
                readings.append(Reading(at, equity, extra.get("balance"), extra.get("margin"),
                                        extra.get("margin_level")) if extra else Reading(at, equity))
            return
        except csv.Error as exc:  # the reader goes on with the next line
            problems.append(f"{path}:{rows.line_num}: {exc}")
        except UnicodeDecodeError:
            problems.append(f"{path}:{rows.line_num + 1}: not UTF-8 text; the rest of the file was not read")
            return


def read_csv(path: Path) -> History:
    """Every bad line is reported (FILE:LINE: message), not only the first."""
    problems: list[str] = []
    readings: list[Reading] = []
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise SourceError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    with handle:
        rows = csv.reader(handle)
        try:
            header = [name.strip().lower() for name in next(rows, [])]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise SourceError([f"{path}:1: {exc}"]) from None
        if not header or header[:2] != ["time", "equity"]:
            raise SourceError([f"{path}:1: the header must start with time,equity (then optional "
                               f"{','.join(OPTIONAL_COLUMNS)}); got {','.join(header) or 'nothing'}"])
        unknown = [name for name in header[2:] if name not in OPTIONAL_COLUMNS]
        if unknown or len(set(header)) != len(header):
            raise SourceError([f"{path}:1: unknown or repeated column(s) {', '.join(unknown) or 'in the header'}; "
                               f"allowed: {','.join(CSV_COLUMNS)}"])
        _rows(path, rows, header, readings, problems)
    if problems:
        raise SourceError(problems)
    if not readings:
        raise SourceError([f"{path}: no readings after the header"])
    return History(label=str(path), readings=readings)


def read_ledger(url: str, account: str, password_env: str | None = None) -> History:
    """The readings the engine recorded for `account` (decision journal: taken at `at - equity_age_s`) and its
    confirmed transfers (settled at `updated_at`). The ledger is opened read-only.

    The policy that recorded the ledger is replayed at the times it really ran, on exactly the readings it saw.
    Another policy runs on its own schedule, and the journal is a step curve for it: the terminal kept reporting
    between two evaluations, so a reading holds until the next one, except from an evaluation that had no usable
    reading (a gap) on.
    """
    from sqlalchemy import select

    from agent import money
    from agent.ledger import journal
    from agent.ledger.db import Ledger
    from agent.ledger.models import DecisionRow, Transfer

    ledger = Ledger.open_readonly(url, password_env=password_env)
    if ledger is None:
        raise SourceError([f"ledger:{account}: no ledger at {url}: nothing recorded"])
    try:
        with ledger.reader() as session:
            rows = session.execute(
                select(DecisionRow.at, DecisionRow.equity, DecisionRow.equity_age_s, DecisionRow.currency,
                       DecisionRow.bound_by, DecisionRow.policy_sha256, DecisionRow.run_evals)
                .where(DecisionRow.account == account).order_by(DecisionRow.id)).all()
            # each row is a run of evaluations (agent/ledger/journal.py): one reading per evaluation
            rows = [(at, equity, age, cur, bound_by, sha) for first_at, first_equity, first_age, cur, bound_by, sha,
                    entries in rows for at, equity, age in journal.readings(first_at, first_equity, first_age, entries)]
            moved = session.execute(
                select(Transfer.updated_at, Transfer.kind, Transfer.amount_minor, Transfer.currency)
                .where(Transfer.account == account, Transfer.state == "confirmed")
                .order_by(Transfer.updated_at, Transfer.id)).all()
    finally:
        ledger.close()
    taken: dict[datetime, Reading] = {}
    gaps: set[datetime] = set()
    evaluations: dict[str, set[datetime]] = {}
    currency = None
    for at, equity, age, cur, bound_by, sha in rows:
        if sha:
            evaluations.setdefault(sha, set()).add(at)
        if equity is None or age is None or age < 0:
            gaps.add(at)  # no reading, or one dated in the future (refused): nothing to hold
            continue
        moment = at - timedelta(seconds=age)
        taken.setdefault(moment, Reading(moment, Decimal(equity)))  # a reading evaluated twice is one reading
        if bound_by in UNUSABLE:
            gaps.add(at)
        currency = cur or currency
    if not taken:
        raise SourceError([f"ledger:{account}: the ledger has no recorded readings for {account}"])
    transfers = [RecordedTransfer(at, kind, money.from_minor(minor, cur)) for at, kind, minor, cur in moved]
    return History(label=f"ledger:{account}", readings=[taken[k] for k in sorted(taken)], transfers=transfers,
                   account=account, currency=currency or (moved[0][3] if moved else None), step=True,
                   gaps=sorted(gaps), evaluations={sha: sorted(times) for sha, times in evaluations.items()})
