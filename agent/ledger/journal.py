"""The compact decision journal: a run of evaluations that did nothing, one `decisions` row.

A row holds its run's first evaluation in its ordinary columns (chained at insert, as every decision is). Each
later evaluation of the run is an entry in `run_evals`: only what differs from the first, a few bytes each:

    varint(at - previous evaluation's at, in microseconds)
    zigzag varint(at - the reading's taken_at, microseconds)      only when the first evaluation had a reading
    varint(len) + UTF-8 equity                                      len 0: the first evaluation's equity

An evaluation joins the account's newest row only when rebuilding it from that row and its entry gives back the
very record it would have had as a row of its own (`rebuild` below, compared field by field before writing):
compaction loses nothing by construction. A run also ends at `RUN_CAP` evaluations and at the end of the UTC hour
(totals by hour, day, week and month count runs exactly), and whenever anything else is decided.

A run's later evaluations are chained when it ends (`sealed`): a `decisions`/`run` link in the journal chain over
(id, run_count, run_last_at, run_evals). Until then, at most RUN_CAP evaluations of each account's newest row are
not yet in the chain; `verify` checks that they are consistent and that only the newest row of an account is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from agent import money
from agent.timeutil import iso

RUN_CAP = 240  # evaluations per run: bounds an entry list (rewritten whole at each join) to ~2 KB
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class JournalFormatError(ValueError):
    """A run's entries do not decode (a damaged or edited row)."""


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation of a run has of its own."""

    at: datetime
    taken_at: datetime | None  # the reading's time (None: the run's evaluations had no reading)
    equity: str | None  # None: the run's first evaluation's equity


def run_problem(first_at: datetime, with_reading: bool, count: int, last_at: datetime | None,
                entries: bytes | None) -> str | None:
    """What is wrong with a row's run as stored (None: nothing): entries that do not decode, an equity that is
    not a number, a count or a last time the entries do not give."""
    if count < 1:
        return f"its run counts {count} evaluations (at least 1)"
    try:
        evaluations = list(decode(entries, first_at, with_reading))
    except JournalFormatError as exc:
        return f"its run does not decode: {exc}"
    for evaluation in evaluations:
        if evaluation.equity is not None:
            try:
                Decimal(evaluation.equity)
            except InvalidOperation:
                return f"its run holds an equity that is not a number ({evaluation.equity[:20]!r})"
    if count != len(evaluations) + 1:
        return f"its run counts {count} evaluations but holds {len(evaluations) + 1}"
    expected_last = evaluations[-1].at if evaluations else None
    if (last_at if evaluations else None) != expected_last or (not evaluations and last_at not in (None, first_at)):
        return "its run's last time is not its last evaluation's"
    return None


def micros(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    seconds, micro = divmod(value, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micro)


def _varint(value: int, out: bytearray) -> None:
    if value < 0:
        raise ValueError("negative varint")
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 70:
            raise JournalFormatError("a run's entries end inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_entry(previous_at: datetime, evaluation: Evaluation, with_reading: bool) -> bytes:
    out = bytearray()
    _varint(micros(evaluation.at) - micros(previous_at), out)
    if with_reading:
        assert evaluation.taken_at is not None
        age = micros(evaluation.at) - micros(evaluation.taken_at)
        _varint(age * 2 if age >= 0 else -age * 2 - 1, out)
    equity = (evaluation.equity or "").encode("utf-8")
    _varint(len(equity), out)
    out += equity
    return bytes(out)


def decode(entries: bytes | None, first_at: datetime, with_reading: bool) -> Iterator[Evaluation]:
    """The evaluations after a run's first, in order."""
    data = bytes(entries or b"")
    pos, at = 0, micros(first_at)
    while pos < len(data):
        delta, pos = _read_varint(data, pos)
        at += delta
        taken_at = None
        if with_reading:
            zig, pos = _read_varint(data, pos)
            age = zig // 2 if zig % 2 == 0 else -(zig + 1) // 2
            taken_at = from_micros(at - age)
        size, pos = _read_varint(data, pos)
        if pos + size > len(data):
            raise JournalFormatError("a run's entries end inside an equity")
        try:
            equity = data[pos:pos + size].decode("utf-8") if size else None
        except UnicodeDecodeError as exc:
            raise JournalFormatError("a run's equity is not UTF-8") from exc
        pos += size
        yield Evaluation(from_micros(at), taken_at, equity)


def _formatted(equity: str, currency: str | None) -> str | None:
    """An equity as decision reasons print it (evaluate's formatting)."""
    if not currency:
        return None
    try:
        value = Decimal(equity)
        return money.fmt(money.round_down(value, currency), currency)
    except (InvalidOperation, money.MoneyError, ValueError):
        return None


def rebuild(first: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
    """The record (as `queries.decision_record` gives it, id aside) of a later evaluation of the run whose first
    evaluation is `first`."""
    record = dict(first)
    record["at"] = iso(evaluation.at)
    details = dict(first.get("details") or {})
    if evaluation.equity is not None and first.get("equity") is not None:
        old, new = _formatted(first["equity"], first.get("currency")), _formatted(evaluation.equity,
                                                                                  first.get("currency"))
        if old is not None and new is not None:
            record["reason"] = first["reason"].replace(f"equity {old} ", f"equity {new} ", 1)
        record["equity"] = evaluation.equity
        if "equity" in details:
            details["equity"] = evaluation.equity
    if first.get("equity_age_s") is not None and evaluation.taken_at is not None:
        age = int((evaluation.at - evaluation.taken_at).total_seconds())
        record["equity_age_s"] = age
        if "equity_age_s" in details:
            details["equity_age_s"] = str(age)
        if "equity_taken_at" in details:
            details["equity_taken_at"] = iso(evaluation.taken_at)
    record["details"] = details
    return record


def joinable(first: dict[str, Any], first_at: datetime, count: int, last_at: datetime,
             record: dict[str, Any], at: datetime, taken_at: datetime | None) -> bytes | None:
    """The entry that adds `record` (a no-op decision at `at`, reading taken at `taken_at`) to the run, or None
    when it must be a row of its own: another kind of decision, a full run, another UTC hour, a clock that went
    back, or anything that the entry could not give back exactly."""
    if record.get("action") != "none" or first.get("action") != "none" or record.get("transfer_id") is not None:
        return None
    if count >= RUN_CAP or at < last_at or at.replace(minute=0, second=0, microsecond=0) != first_at.replace(
            minute=0, second=0, microsecond=0):
        return None
    with_reading = first.get("equity_age_s") is not None
    if with_reading != (taken_at is not None):
        return None
    equity = record.get("equity")
    evaluation = Evaluation(at, taken_at, None if equity == first.get("equity") else equity)
    if evaluation.equity == "":
        return None
    rebuilt = rebuild(first, evaluation)
    if {k: v for k, v in rebuilt.items() if k != "id"} != {k: v for k, v in record.items() if k != "id"}:
        return None
    return encode_entry(last_at, evaluation, with_reading)


def expand(first: dict[str, Any], first_at: datetime, entries: bytes | None) -> Iterator[dict[str, Any]]:
    """Every evaluation of a row's run as a record of its own (the row's id on each), the first one first."""
    yield first
    with_reading = first.get("equity_age_s") is not None
    for evaluation in decode(entries, first_at, with_reading):
        yield rebuild(first, evaluation)


def last(first: dict[str, Any], first_at: datetime, entries: bytes | None) -> dict[str, Any]:
    """The run's newest evaluation as a record."""
    records = expand(first, first_at, entries)
    newest = next(records)
    for newest in records:  # noqa: B007 - the loop keeps the last one
        pass
    return newest


def readings(first_at: datetime, equity: str | None, equity_age_s: int | None,
             entries: bytes | None) -> Iterator[tuple[datetime, str | None, int | None]]:
    """(time, equity, equity_age_s) of every evaluation of a row's run, for charts, `status` and replays that read
    only these columns."""
    yield first_at, equity, equity_age_s
    if entries:
        for evaluation in decode(entries, first_at, equity_age_s is not None):
            age = (int((evaluation.at - evaluation.taken_at).total_seconds()) if evaluation.taken_at is not None
                   else None)
            yield evaluation.at, evaluation.equity or equity, age


def last_reading(first_at: datetime, equity: str | None, equity_age_s: int | None,
                 entries: bytes | None) -> tuple[datetime, str | None, int | None]:
    """(time, equity, equity_age_s) of a run's newest evaluation."""
    newest = (first_at, equity, equity_age_s)
    for newest in readings(first_at, equity, equity_age_s, entries):  # noqa: B007 - the loop keeps the last one
        pass
    return newest


def expand_between(first: dict[str, Any], first_at: datetime, entries: bytes | None,
                   since: datetime | None = None, until: datetime | None = None) -> Iterator[dict[str, Any]]:
    """`expand`, keeping the evaluations at or after `since` and before `until`."""
    def inside(at: datetime) -> bool:
        return (since is None or at >= since) and (until is None or at < until)

    if inside(first_at):
        yield first
    with_reading = first.get("equity_age_s") is not None
    for evaluation in decode(entries, first_at, with_reading):
        if inside(evaluation.at):
            yield rebuild(first, evaluation)
