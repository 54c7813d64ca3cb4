"""Reads and writes of the ledger that the engine and the CLI share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent import money
from agent.ledger.models import (
    UNRESOLVED_STATES,
    DecisionRow,
    EquityPeak,
    Halt,
    Transfer,
    TransferEvent,
)
from agent.policy.evaluate import Decision, KindUsage, Usage
from agent.timeutil import iso

COUNTED_STATES = ("pending", "sent", "confirmed", "unknown")  # everything that may have moved money
# failed without a refusal from the broker (the agent stopped before sending, or the statement proved the
# request never executed): not a persistent broker error, so no back-off
NO_BROKER_ERROR = ("NotSent", "NotExecuted")
FAILURE_LOOKBACK = 12  # 2^11 minutes is past the 1 h cap: more failures in a row change nothing


def amount_of(t: Transfer) -> Decimal:
    return money.from_minor(t.amount_minor, t.currency)


def transfer_record(t: Transfer) -> dict[str, Any]:
    """The ledger record of CONTRACT.md section 4."""
    return {
        "id": t.id,
        "created_at": iso(t.created_at),
        "account": t.account,
        "funding": t.funding,
        "kind": t.kind,
        "amount": money.fmt(amount_of(t), t.currency),
        "currency": t.currency,
        "state": t.state,
        "broker_txn_id": t.broker_txn_id,
        "policy": t.policy,
        "policy_sha256": t.policy_sha256,
        "equity": t.equity,
        "reason": t.reason,
        "error_code": t.error_code,
        "error_message": t.error_message,
        "updated_at": iso(t.updated_at),
        "sent_at": iso(t.sent_at) if t.sent_at else None,
        "resolved_by": t.resolved_by,
    }


def decision_record(d: DecisionRow) -> dict[str, Any]:
    return {
        "id": d.id, "at": iso(d.at), "account": d.account, "policy": d.policy,
        "policy_sha256": d.policy_sha256, "action": d.action, "amount": d.amount, "currency": d.currency,
        "equity": d.equity, "equity_age_s": d.equity_age_s, "reason": d.reason, "bound_by": d.bound_by,
        "transfer_id": d.transfer_id, "details": json.loads(d.details) if d.details else {},
    }


def add_event(session: Session, transfer: Transfer, at: datetime, actor: str, detail: str | None = None) -> None:
    session.add(TransferEvent(transfer_id=transfer.id, at=at, state=transfer.state, actor=actor, detail=detail))


def unresolved(session: Session, account: str | None = None) -> list[Transfer]:
    query = select(Transfer).where(Transfer.state.in_(UNRESOLVED_STATES)).order_by(Transfer.id)
    if account is not None:
        query = query.where(Transfer.account == account)
    return list(session.scalars(query))


def active_halts(session: Session, account: str) -> list[Halt]:
    return list(session.scalars(select(Halt).where(Halt.account == account, Halt.cleared_at.is_(None))
                                .order_by(Halt.id)))


def add_halt(session: Session, account: str, kind: str, reason: str, at: datetime, by: str,
             scope: str = "top_up") -> Halt:
    halt = Halt(account=account, kind=kind, scope=scope, reason=reason, created_at=at, created_by=by)
    session.add(halt)
    return halt


def clear_halts(session: Session, account: str, at: datetime, by: str, kind: str | None = None) -> int:
    """`resume` clears every halt (kind None); a settled transfer clears only the `unresolved` ones it caused.
    After a kill-switch halt is cleared the kill switch counts afresh (see kill_switch_since)."""
    halts = [h for h in active_halts(session, account) if kind is None or h.kind == kind]
    for halt in halts:
        halt.cleared_at = at
        halt.cleared_by = by
    if any(h.kind == "kill_switch" for h in halts):
        peak = session.get(EquityPeak, account)
        if peak is not None:  # the drawdown is measured from the peak seen after the resume
            session.delete(peak)
    return len(halts)


def kill_switch_since(session: Session, account: str) -> datetime | None:
    """When an operator last resumed a kill-switch halt: the kill switch counts only what came after, or the
    same old top-ups would trip it again at once."""
    return session.execute(select(func.max(Halt.cleared_at)).where(
        Halt.account == account, Halt.kind == "kill_switch", Halt.cleared_at.is_not(None))).scalar_one()


def peak_equity(session: Session, account: str) -> Decimal | None:
    row = session.get(EquityPeak, account)
    return Decimal(row.peak) if row else None


def note_equity(session: Session, account: str, equity: Decimal, at: datetime) -> None:
    row = session.get(EquityPeak, account)
    if row is None:
        session.add(EquityPeak(account=account, peak=str(equity), at=at))
    elif equity > Decimal(row.peak):
        row.peak = str(equity)
        row.at = at


def _failure_tail(rows: Sequence[Any], kind: str) -> tuple[int, Any]:
    """Failed attempts of `kind` since its newest attempt that may have moved money; rows are newest first."""
    failures = []
    for row in rows:
        if row.kind != kind:
            continue
        if row.state != "failed":
            break
        if row.error_code not in NO_BROKER_ERROR:
            failures.append(row)
    return len(failures), (failures[0] if failures else None)


def usage(session: Session, account: str, now: datetime) -> Usage:
    """What the ledger says about this account, counting unresolved transfers as if they happened.

    A handful of narrow queries (it runs before every evaluation): totals by kind and state, the last week's
    counted rows, the newest attempts, the top-ups since the last sweep, halts, unresolved rows, the peak.
    """
    totals = session.execute(
        select(Transfer.kind, Transfer.state, func.count(Transfer.id),
               func.coalesce(func.sum(Transfer.amount_minor), 0), func.max(Transfer.created_at),
               func.max(Transfer.id), func.min(Transfer.currency))
        .where(Transfer.account == account).group_by(Transfer.kind, Transfer.state)).all()
    currency = next((row[6] for row in totals), "USD")
    week = session.execute(
        select(Transfer.kind, Transfer.created_at, Transfer.amount_minor)
        .where(Transfer.account == account, Transfer.state.in_(COUNTED_STATES),
               Transfer.created_at > now - timedelta(days=7)).order_by(Transfer.created_at)).all()
    newest = session.execute(
        select(Transfer.kind, Transfer.state, Transfer.error_code, Transfer.updated_at)
        .where(Transfer.account == account).order_by(Transfer.id.desc()).limit(FAILURE_LOOKBACK * 2)).all()

    def kind_usage(kind: str) -> KindUsage:
        counted = [row for row in totals if row[0] == kind and row[1] in COUNTED_STATES]
        count = sum(int(row[2]) for row in counted)
        minor = sum(int(row[3]) for row in counted)
        last_at = max((row[4] for row in counted), default=None)
        failures, last_failure = _failure_tail(newest, kind)
        return KindUsage(recent=tuple((at, money.from_minor(m, currency)) for k, at, m in week if k == kind),
                         total_count=count, total_amount=money.from_minor(minor, currency), last_at=last_at,
                         failures=failures, last_failure_at=last_failure.updated_at if last_failure else None,
                         last_failure=last_failure.error_code if last_failure else None)

    top_up, sweep = kind_usage("top_up"), kind_usage("sweep")
    confirmed_sweeps = [row for row in totals if row[0] == "sweep" and row[1] == "confirmed"]
    since = select(func.count(Transfer.id)).where(Transfer.account == account, Transfer.kind == "top_up",
                                                  Transfer.state.in_(COUNTED_STATES))
    if confirmed_sweeps:
        since = since.where(Transfer.id > confirmed_sweeps[0][5])
    resumed = kill_switch_since(session, account)
    net = top_up.total_amount - (money.from_minor(int(confirmed_sweeps[0][3]), currency) if confirmed_sweeps
                                 else Decimal(0))
    if resumed is not None:
        since = since.where(Transfer.created_at > resumed)
        flows = dict(session.execute(
            select(Transfer.kind, func.coalesce(func.sum(Transfer.amount_minor), 0))
            .where(Transfer.account == account, Transfer.created_at > resumed,
                   ((Transfer.kind == "top_up") & Transfer.state.in_(COUNTED_STATES))
                   | ((Transfer.kind == "sweep") & (Transfer.state == "confirmed")))
            .group_by(Transfer.kind)).all())
        net = money.from_minor(int(flows.get("top_up", 0)) - int(flows.get("sweep", 0)), currency)
    consecutive = int(session.execute(since).scalar_one())
    halts = active_halts(session, account)
    halt_reason = "; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in halts) or None
    all_reason = "; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in halts
                           if h.scope == "all") or None
    open_rows = unresolved(session, account)
    last_moved = session.execute(
        select(Transfer.id, Transfer.updated_at).where(Transfer.account == account, Transfer.state == "confirmed")
        .order_by(Transfer.updated_at.desc(), Transfer.id.desc()).limit(1)).first()
    blocked = None
    if open_rows:
        t = open_rows[0]
        blocked = (f"transfer {t.id} ({t.kind} {money.fmt(amount_of(t), t.currency)}) is {t.state}; "
                   "resolve it with `fund-agent reconcile` or `fund-agent resolve`")
    return Usage(top_up=top_up, sweep=sweep, consecutive_top_ups=consecutive, net_top_up=net,
                 peak_equity=peak_equity(session, account), top_up_halt=halt_reason, halt=all_reason,
                 unresolved=blocked, last_transfer=(int(last_moved[0]), last_moved[1]) if last_moved else None)


def funding_in_flight(session: Session, funding: str) -> Decimal:
    """The sum of every unresolved top-up paid from `funding` (pending, sent, unknown), whether or not the
    broker's balance already shows it: counted against the funding reserve. (One funding account, one currency.)"""
    row = session.execute(
        select(func.min(Transfer.currency), func.coalesce(func.sum(Transfer.amount_minor), 0))
        .where(Transfer.funding == funding, Transfer.kind == "top_up", Transfer.state.in_(UNRESOLVED_STATES))).one()
    return money.from_minor(int(row[1]), row[0]) if row[0] is not None else Decimal(0)


def unresolved_count(session: Session) -> int:
    """Unresolved transfers of every account: each may already count against the broker's daily MT5 count."""
    return int(session.execute(select(func.count(Transfer.id))
                               .where(Transfer.state.in_(UNRESOLVED_STATES))).scalar_one())


def record_decision(session: Session, at: datetime, account: str, policy: str, policy_sha256: str | None,
                    decision: Decision, currency: str | None, equity: Decimal | None, equity_age_s: int | None,
                    transfer_id: int | None = None, action: str | None = None) -> DecisionRow:
    row = DecisionRow(at=at, account=account, policy=policy, policy_sha256=policy_sha256,
                      action=action or decision.action,
                      amount=money.fmt(decision.amount, currency) if decision.amount is not None and currency
                      else None,
                      currency=currency, equity=str(equity) if equity is not None else None,
                      equity_age_s=equity_age_s, reason=decision.reason, bound_by=decision.bound_by,
                      details=json.dumps(decision.details, sort_keys=True) if decision.details else None,
                      transfer_id=transfer_id)
    session.add(row)
    return row


@dataclass(frozen=True)
class Filters:
    account: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    kind: str | None = None
    state: str | None = None


def _filtered(model: Any, at: Any, kind: Any, state: Any, filters: Filters) -> Any:
    """The audit commands' shared filters: account, [since, until) on `at`, and equality on kind and state."""
    conditions = [column == value for column, value in ((model.account, filters.account), (kind, filters.kind),
                                                        (state, filters.state)) if value]
    if filters.since:
        conditions.append(at >= filters.since)
    if filters.until:
        conditions.append(at < filters.until)
    return select(model).where(*conditions).order_by(model.id)


def list_transfers(session: Session, filters: Filters) -> list[Transfer]:
    return list(session.scalars(_filtered(Transfer, Transfer.created_at, Transfer.kind, Transfer.state, filters)))


def list_decisions(session: Session, filters: Filters) -> list[DecisionRow]:
    """Decisions have an action (top_up, sweep, none, error): --kind and --state both filter on it."""
    return list(session.scalars(_filtered(DecisionRow, DecisionRow.at, DecisionRow.action, DecisionRow.action,
                                          filters)))
