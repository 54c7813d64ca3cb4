"""The auditor's questions, answered in SQL (GROUP BY): totals per period, account, kind and state; net flow per
account and per funding account; counts of decisions and halts. Only the groups come back to Python, where
their integer minor units become exact decimal strings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import and_, case, func, literal_column, or_, select
from sqlalchemy.orm import Session

from agent import money
from agent.ledger import journal
from agent.ledger.models import DecisionRow, Halt, Transfer
from agent.ledger.queries import Filters, filter_conditions

PERIODS = ("day", "week", "month")


def period_of(column: Any, by: str, dialect: str) -> Any:
    """The UTC day (YYYY-MM-DD), week (its Monday, YYYY-MM-DD) or month (YYYY-MM) of a time column."""
    if by not in PERIODS:
        raise ValueError(f"unknown period {by!r}")
    if dialect == "postgresql":
        utc = column.op("AT TIME ZONE")(literal_column("'UTC'"))
        fmt = "YYYY-MM" if by == "month" else "YYYY-MM-DD"
        return func.to_char(func.date_trunc(by, utc), fmt)
    # SQLite: the column is fixed-width ISO 8601 UTC text
    if by == "day":
        return func.substr(column, 1, 10)
    if by == "month":
        return func.substr(column, 1, 7)
    # 'weekday 0' moves forward to the Sunday ending the week (or stays on it); 6 days back is its Monday
    return func.date(func.substr(column, 1, 10), "weekday 0", "-6 days")


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _amount(minor: Any, currency: str) -> str:
    return money.fmt(money.from_minor(int(minor or 0), currency), currency)


def transfer_totals(session: Session, filters: Filters, by: str | None = None) -> list[dict[str, Any]]:
    """Count and sum per [period,] account, kind, currency and state."""
    keys = [Transfer.account, Transfer.kind, Transfer.currency, Transfer.state]
    if by:
        keys.insert(0, period_of(Transfer.created_at, by, _dialect(session)).label("period"))
    query = (select(*keys, func.count(Transfer.id), func.sum(Transfer.amount_minor))
             .where(*filter_conditions(Transfer, Transfer.created_at, Transfer.kind, Transfer.state, filters))
             .group_by(*keys).order_by(*keys))
    records = []
    for row in session.execute(query):
        *group, count, minor = row
        record = {"period": group.pop(0)} if by else {}
        account, kind, currency, state = group
        record.update({"account": account, "kind": kind, "currency": currency, "state": state, "count": int(count),
                       "amount": _amount(minor, currency)})
        records.append(record)
    return records


def net_flow(session: Session, filters: Filters, by: str | None = None) -> list[dict[str, Any]]:
    """Confirmed money per [period,] account and per funding account: top-ups in, sweeps out, net = in - out.
    Rows of scope `account` come first, then scope `funding`."""
    records = []
    conditions = filter_conditions(Transfer, Transfer.created_at, Transfer.kind, Transfer.state, filters)
    conditions.append(Transfer.state == "confirmed")
    top_up = func.sum(case((Transfer.kind == "top_up", Transfer.amount_minor), else_=0))
    sweep = func.sum(case((Transfer.kind == "sweep", Transfer.amount_minor), else_=0))
    top_ups = func.sum(case((Transfer.kind == "top_up", 1), else_=0))
    sweeps = func.sum(case((Transfer.kind == "sweep", 1), else_=0))
    for scope, login in (("account", Transfer.account), ("funding", Transfer.funding)):
        keys = [login, Transfer.currency]
        if by:
            keys.insert(0, period_of(Transfer.created_at, by, _dialect(session)).label("period"))
        query = select(*keys, top_up, sweep, top_ups, sweeps).where(*conditions).group_by(*keys).order_by(*keys)
        for row in session.execute(query):
            *group, minor_in, minor_out, count_in, count_out = row
            record = {"period": group.pop(0)} if by else {}
            name, currency = group
            record.update({"scope": scope, "login": name, "currency": currency,
                           "top_up": _amount(minor_in, currency), "sweep": _amount(minor_out, currency),
                           "net": _amount(int(minor_in or 0) - int(minor_out or 0), currency),
                           "top_up_count": int(count_in or 0), "sweep_count": int(count_out or 0)})
            records.append(record)
    return records


def decision_totals(session: Session, filters: Filters, by: str | None = None) -> list[dict[str, Any]]:
    """Count of decisions (evaluations) per [period,] account, policy and action."""
    keys = [DecisionRow.account, DecisionRow.policy, DecisionRow.action]
    if by:
        keys.insert(0, period_of(DecisionRow.at, by, _dialect(session)).label("period"))
    # A row is a run of evaluations (agent/ledger/journal.py) that never crosses a UTC hour, so a period holds
    # whole runs: summed in SQL by where each run starts. Only a run cut by --since or --until is counted
    # evaluation by evaluation (at most two an account).
    query = (select(*keys, func.sum(DecisionRow.run_count))
             .where(*filter_conditions(DecisionRow, DecisionRow.at, DecisionRow.action, DecisionRow.action, filters))
             .group_by(*keys).order_by(*keys))
    counts: dict[tuple[Any, ...], int] = {tuple(row[:-1]): int(row[-1]) for row in session.execute(query)}
    in_order = list(counts)
    cuts = [moment for moment in (filters.since, filters.until) if moment is not None]
    if cuts:
        last = func.coalesce(DecisionRow.run_last_at, DecisionRow.at)
        straddles = or_(*[and_(DecisionRow.at < moment, last >= moment) for moment in cuts])
        unbounded = replace(filters, since=None, until=None)
        cut_runs = select(*keys, DecisionRow.at, DecisionRow.equity, DecisionRow.equity_age_s, DecisionRow.run_evals,
                          DecisionRow.run_count).where(
            straddles, *filter_conditions(DecisionRow, DecisionRow.at, DecisionRow.action, DecisionRow.action,
                                          unbounded))
        width = len(keys)
        for row in session.execute(cut_runs):
            key, (first_at, equity, age, entries, run_count) = tuple(row[:width]), row[width:]
            inside = sum(1 for at, _e, _a in journal.readings(first_at, equity, age, entries)
                         if (filters.since is None or at >= filters.since)
                         and (filters.until is None or at < filters.until))
            counted = run_count if ((filters.since is None or first_at >= filters.since)
                                    and (filters.until is None or first_at < filters.until)) else 0
            counts[key] = counts.get(key, 0) + inside - counted
    if len(counts) > len(in_order):  # a group only a cut run has: placed among the others
        in_order = sorted(counts, key=lambda key: tuple("" if v is None else str(v) for v in key))
    names = (["period"] if by else []) + ["account", "policy", "action", "count"]
    return [dict(zip(names, [*key, counts[key]], strict=True)) for key in in_order if counts[key] > 0]


def halt_totals(session: Session, filters: Filters, by: str | None = None, active_only: bool = False
                ) -> list[dict[str, Any]]:
    """Count of halts per [period,] account and kind, and how many of them are still active."""
    keys = [Halt.account, Halt.kind]
    if by:
        keys.insert(0, period_of(Halt.created_at, by, _dialect(session)).label("period"))
    conditions = filter_conditions(Halt, Halt.created_at, Halt.kind, None, filters)
    if active_only:
        conditions.append(Halt.cleared_at.is_(None))
    active = func.sum(case((Halt.cleared_at.is_(None), 1), else_=0))
    query = select(*keys, func.count(Halt.id), active).where(*conditions).group_by(*keys).order_by(*keys)
    names = (["period"] if by else []) + ["account", "kind", "count", "active"]
    return [dict(zip(names, [*row[:-2], int(row[-2]), int(row[-1] or 0)], strict=True))
            for row in session.execute(query)]
