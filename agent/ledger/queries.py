"""Reads and writes of the ledger that the engine and the CLI share."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import LargeBinary, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from agent import money
from agent.ledger import journal
from agent.ledger.db import upsert
from agent.ledger.models import (
    OPEN_RUN,
    UNRESOLVED_STATES,
    DecisionRow,
    EquityPeak,
    FundingAccount,
    Halt,
    Transfer,
    TransferEvent,
    UTCDateTime,
)
from agent.policy.evaluate import Decision, Usage
from agent.policy.usage_book import HaltRecord, TransferRecord, UsageBook
from agent.timeutil import iso

log = logging.getLogger("agent.ledger")


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


TRANSFER_FIELDS = ["id", "created_at", "account", "funding", "kind", "amount", "currency", "state", "broker_txn_id",
                   "policy", "policy_sha256", "equity", "reason", "error_code", "error_message", "updated_at",
                   "sent_at", "resolved_by"]
DECISION_FIELDS = ["id", "at", "account", "policy", "policy_sha256", "action", "amount", "currency", "equity",
                   "equity_age_s", "reason", "bound_by", "transfer_id", "details"]
RUN_FIELDS = [*DECISION_FIELDS, "run_count", "run_last_at"]


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


_PEAK_OF = select(EquityPeak.peak).where(EquityPeak.account == bindparam("account"))


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
    # Most readings are not a new peak: one plain read, in the writer's transaction, says so. Doing nothing on it
    # is what the locked path below would do too, ordered before any writer that lowers the peak later.
    current = session.execute(_PEAK_OF, {"account": account}).scalar()
    if current is not None and Decimal(current) >= equity:
        return
    # The first reading creates the row with ON CONFLICT DO NOTHING (two hosts at once: one insert wins, no
    # error); the row is then read locked (FOR UPDATE on PostgreSQL; SQLite's writer holds the database lock) and
    # raised only by a higher reading, compared as exact Decimals, never as text in SQL.
    upsert(session, EquityPeak, {"account": account, "peak": str(equity), "at": at}, ["account"])
    row = session.scalars(select(EquityPeak).where(EquityPeak.account == account).with_for_update()
                          .execution_options(populate_existing=True)).one()
    if equity > Decimal(row.peak):
        row.peak = str(equity)
        row.at = at


# What a UsageBook is built from: the account's transfers, its active halts and its cleared kill-switch halts (the
# kill switch counts from the last resume), its peak. `load_book` reads one account; `status` reads many at once.
BOOK_TRANSFER_COLUMNS = (Transfer.id, Transfer.kind, Transfer.state, Transfer.amount_minor, Transfer.currency,
                         Transfer.created_at, Transfer.updated_at, Transfer.error_code)
BOOK_HALT_COLUMNS = (Halt.id, Halt.kind, Halt.scope, Halt.reason, Halt.created_at, Halt.cleared_at)
BOOK_HALTS = Halt.cleared_at.is_(None) | (Halt.kind == "kill_switch")


def build_book(transfers: Sequence[Any], halts: Sequence[Any], peak: Decimal | None) -> UsageBook:
    """A book from rows carrying BOOK_TRANSFER_COLUMNS and BOOK_HALT_COLUMNS (by name), each in id order."""
    book = UsageBook(transfers[0].currency if transfers else "USD")
    for t in transfers:
        book.add_transfer(TransferRecord(t.id, t.kind, t.state, money.from_minor(t.amount_minor, t.currency),
                                         t.created_at, t.updated_at, t.error_code))
    for h in halts:
        book.add_halt(HaltRecord(h.id, h.kind, h.scope, h.reason, h.created_at, h.cleared_at))
    book.peak = peak
    return book


def load_book(session: Session, account: str) -> UsageBook:
    """The account's transfers, halts and peak as an in-memory book (three narrow queries, no ORM objects)."""
    transfers = session.execute(select(*BOOK_TRANSFER_COLUMNS).where(Transfer.account == account)
                                .order_by(Transfer.id)).all()
    halts = session.execute(select(*BOOK_HALT_COLUMNS).where(Halt.account == account, BOOK_HALTS)
                            .order_by(Halt.id)).all()
    return build_book(transfers, halts, peak_equity(session, account))


_VERSION_OF = text("SELECT version FROM account_versions WHERE account = :account")


def account_version(session: Session, account: str) -> int:
    """The account's change counter (migration 0007's triggers raise it on any write to its transfers, halts or
    equity peak): 0 while nothing was ever written."""
    return int(session.execute(_VERSION_OF, {"account": account}).scalar() or 0)


class Summaries:
    """Each account's ledger summary (a UsageBook) held in memory, read again only when the account's change
    counter moved: by this process's own writes or anybody else's. Read in one snapshot with its counter, a
    summary is exactly what a fresh read would give."""

    def __init__(self) -> None:
        self.books: dict[str, tuple[int, UsageBook]] = {}

    def book(self, session: Session, account: str) -> UsageBook:
        version = account_version(session, account)
        held = self.books.get(account)
        if held is not None and held[0] == version:
            return held[1]
        book = load_book(session, account)
        self.books[account] = (version, book)
        return book


def usage(session: Session, account: str, now: datetime) -> Usage:
    """What the ledger says about this account, counting unresolved transfers as if they happened.

    The rules live in UsageBook (shared with the backtest): this loads the account's rows and folds them.
    """
    return load_book(session, account).usage(now)


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


def funding_currencies(session: Session) -> dict[str, str]:
    """Every funding account the ledger knows (from its transfers and its funding_accounts rows) -> currency."""
    currencies = {login: currency for login, currency in session.execute(
        select(Transfer.funding, func.min(Transfer.currency)).group_by(Transfer.funding))}
    currencies.update({login: currency for login, currency in session.execute(
        select(FundingAccount.login, FundingAccount.currency))})
    return currencies


def funding_confirmed_since(session: Session, funding: str, since: datetime) -> Decimal:
    """Top-ups from `funding` confirmed at or after `since`: a balance read before then may not show them."""
    row = session.execute(
        select(func.min(Transfer.currency), func.coalesce(func.sum(Transfer.amount_minor), 0))
        .where(Transfer.funding == funding, Transfer.kind == "top_up", Transfer.state == "confirmed",
               Transfer.updated_at >= since)).one()
    return money.from_minor(int(row[1]), row[0]) if row[0] is not None else Decimal(0)


def confirmed_since(session: Session, since: datetime) -> int:
    """Transfers of every account confirmed at or after `since`: a daily count read before may not show them."""
    return int(session.execute(select(func.count(Transfer.id)).where(
        Transfer.state == "confirmed", Transfer.updated_at >= since)).scalar_one())


def decision_values(at: datetime, account: str, policy: str, policy_sha256: str | None, decision: Decision,
                    currency: str | None, equity: Decimal | None, equity_age_s: int | None,
                    transfer_id: int | None = None, action: str | None = None) -> dict[str, Any]:
    """The columns of a decision row (its first evaluation's, when it becomes a run)."""
    return {"at": at, "account": account, "policy": policy, "policy_sha256": policy_sha256,
            "action": action or decision.action,
            "amount": money.fmt(decision.amount, currency) if decision.amount is not None and currency else None,
            "currency": currency, "equity": str(equity) if equity is not None else None,
            "equity_age_s": equity_age_s, "reason": decision.reason, "bound_by": decision.bound_by,
            "details": json.dumps(decision.details, sort_keys=True) if decision.details else None,
            "transfer_id": transfer_id}


@dataclass
class OpenRun:
    """An account's newest decision row, as a run that later evaluations may join."""

    row_id: int
    first: dict[str, Any]  # its first evaluation's record (decision_record)
    first_at: datetime
    count: int
    last_at: datetime
    entries: bytes
    sealed: bool


# The account's newest row by id (the (account, id) index): the row a repeated evaluation joins and the one a new
# row ends. By id, not time: a clock stepped back must not leave a newer row open behind an older one.
_NEWEST_DECISION = (select(DecisionRow).where(DecisionRow.account == bindparam("account"))
                    .order_by(DecisionRow.id.desc()).limit(1))
# Joins only the row it was meant for (its id, account and first time: an id a rolled-back insert gave up may be
# reused by another account's row), only if no other writer joined it or ended it meanwhile.
_EXTEND = text("UPDATE decisions SET run_count = :count + 1, run_last_at = :at, run_evals = :entries "
               "WHERE id = :id AND account = :account AND at = :first_at AND run_count = :count AND NOT run_sealed "
               "AND NOT EXISTS (SELECT 1 FROM decisions AS newer WHERE newer.account = :account "
               "AND newer.id > :id)").bindparams(bindparam("at", type_=UTCDateTime()),
                                                 bindparam("first_at", type_=UTCDateTime()),
                                                 bindparam("entries", type_=LargeBinary()))


def newest_run(session: Session, account: str) -> OpenRun | None:
    row = session.scalars(_NEWEST_DECISION, {"account": account}).first()
    if row is None:
        return None
    return OpenRun(row.id, decision_record(row), row.at, row.run_count, row.run_last_at or row.at,
                   bytes(row.run_evals or b""), bool(row.run_sealed))


def seal_run(session: Session, row_id: int, at: datetime) -> None:
    """End a row's run: no evaluation joins it any more, and its later evaluations (if any) go into the hash chain
    (one `decisions`/`run` link), as the row is when the flag is set (another writer may have just joined it)."""
    conn = session.connection()
    stored = conn.execute(select(DecisionRow.at, DecisionRow.equity_age_s, DecisionRow.run_count,
                                 DecisionRow.run_last_at, DecisionRow.run_evals)
                          .where(DecisionRow.id == row_id, DecisionRow.run_sealed.is_(False))).first()
    if stored is None:
        return
    wrong = journal.run_problem(stored[0], stored[1] is not None, int(stored[2]), stored[3], stored[4])
    if wrong is not None:
        # never chain what the agent did not write: the row stays open, and `verify` names it (exit 1)
        log.error("decisions id %s: %s: left out of the hash chain; run `fund-agent verify`", row_id, wrong)
        return
    done = conn.execute(update(DecisionRow).where(DecisionRow.id == row_id, DecisionRow.run_sealed.is_(False))
                        .values(run_sealed=True)).rowcount
    if done and conn.execute(select(DecisionRow.run_count).where(DecisionRow.id == row_id)).scalar_one() > 1:
        from agent.audit import chain  # the chain imports the models; imported late, as the ledger does

        chain.seal(conn, row_id, at)


def seal_ended_runs(session: Session, now: datetime) -> int:
    """End every run whose UTC hour is over (no evaluation can join it any more): chained now rather than at the
    account's next evaluation, which may be months away (a paused account), so `db prune` is not held back."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    ended = session.scalars(select(DecisionRow.id).where(text(OPEN_RUN), DecisionRow.at < hour)
                            .order_by(DecisionRow.id)).all()  # OPEN_RUN as written: the partial index answers
    for row_id in ended:
        seal_run(session, row_id, now)
    return len(ended)


def record_decision(session: Session, at: datetime, account: str, policy: str, policy_sha256: str | None,
                    decision: Decision, currency: str | None, equity: Decimal | None, equity_age_s: int | None,
                    transfer_id: int | None = None, action: str | None = None, taken_at: datetime | None = None,
                    runs: dict[str, OpenRun | None] | None = None) -> DecisionRow | None:
    """Write one evaluation. A no-op evaluation that repeats the account's newest row joins its run (an update:
    the journal grows a few bytes, agent/ledger/journal.py); anything else is a row of its own, and ends the row
    before it. `taken_at`: the reading's time (None without a reading). `runs`: the caller's memory of each
    account's newest row (saves a read; checked by the update itself; the caller drops it when the transaction
    fails). Returns the new row, or None when the evaluation joined a run."""
    row = DecisionRow(**decision_values(at, account, policy, policy_sha256, decision, currency, equity,
                                       equity_age_s, transfer_id, action))
    record = decision_record(row)  # as the row would read back (id aside); added to the session only if not joined
    run = runs.get(account) if runs is not None else None
    for attempt in range(2):
        if run is None or attempt:
            run = newest_run(session, account)
        if run is None or run.sealed:
            break
        entry = journal.joinable(run.first, run.first_at, run.count, run.last_at, record, at, taken_at)
        if entry is None:
            break
        if session.execute(_EXTEND, {"count": run.count, "at": at, "entries": run.entries + entry, "id": run.row_id,
                                     "account": account, "first_at": run.first_at}).rowcount == 1:
            run.count, run.last_at, run.entries = run.count + 1, at, run.entries + entry
            if run.count >= journal.RUN_CAP:
                seal_run(session, run.row_id, at)
                run.sealed = True
            if runs is not None:
                runs[account] = run
            return None
    # a row of its own: the newest row before it (read from the database, whatever was remembered) ends here
    previous = newest_run(session, account)
    if previous is not None and not previous.sealed:
        seal_run(session, previous.row_id, at)
    session.add(row)
    session.flush()
    if runs is not None:
        runs[account] = OpenRun(row.id, decision_record(row), at, 1, at, b"", False)
    return row


@dataclass(frozen=True)
class Filters:
    account: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    kind: str | None = None
    state: str | None = None
    policy: str | None = None
    funding: str | None = None  # the funding account that pays the account's top-ups and receives its sweeps


def accounts_of(policy: str | None, funding: str | None) -> Any:
    """The accounts a --policy / --funding filter names, for tables that do not record them (halts; decisions
    for --funding): the accounts whose transfers or decisions carry that policy, or whose transfers that funding
    account paid or received. None when neither filter is given."""
    selects = []
    if policy:
        selects.append(select(Transfer.account).where(Transfer.policy == policy)
                       .union(select(DecisionRow.account).where(DecisionRow.policy == policy)))
    if funding:
        selects.append(select(Transfer.account).where(Transfer.funding == funding))
    return selects or None


def filter_conditions(model: Any, at: Any, kind: Any, state: Any, filters: Filters) -> list[Any]:
    """The audit commands' shared filters: account, [since, until) on `at`, equality on kind and state, and the
    policy and funding account (by column where the table has one, else by the accounts they name)."""
    conditions = [column == value for column, value in ((model.account, filters.account), (kind, filters.kind),
                                                        (state, filters.state)) if value and column is not None]
    if filters.since:
        conditions.append(at >= filters.since)
    if filters.until:
        conditions.append(at < filters.until)
    own_policy = getattr(model, "policy", None)
    own_funding = getattr(model, "funding", None)
    if filters.policy and own_policy is not None:
        conditions.append(own_policy == filters.policy)
    if filters.funding and own_funding is not None:
        conditions.append(own_funding == filters.funding)
    for account_select in accounts_of(None if own_policy is not None else filters.policy,
                                      None if own_funding is not None else filters.funding) or []:
        conditions.append(model.account.in_(account_select))
    return conditions


def _filtered(model: Any, at: Any, kind: Any, state: Any, filters: Filters) -> Any:
    return select(model).where(*filter_conditions(model, at, kind, state, filters)).order_by(model.id)


def list_transfers(session: Session, filters: Filters) -> list[Transfer]:
    return list(session.scalars(_filtered(Transfer, Transfer.created_at, Transfer.kind, Transfer.state, filters)))


def list_decisions(session: Session, filters: Filters) -> list[DecisionRow]:
    """Decision rows (each a run of one or more evaluations) with an evaluation in [since, until). Decisions have
    an action (top_up, sweep, none, error): --kind and --state both filter on it."""
    query = _filtered(DecisionRow, DecisionRow.at, DecisionRow.action, DecisionRow.action,
                      replace(filters, since=None))
    if filters.since is not None:
        # a run ends at or after its first evaluation and never crosses a UTC hour: the index narrows it
        query = query.where(DecisionRow.at >= filters.since.replace(minute=0, second=0, microsecond=0),
                            func.coalesce(DecisionRow.run_last_at, DecisionRow.at) >= filters.since)
    return list(session.scalars(query))


def decision_records(rows: list[DecisionRow], filters: Filters, runs: bool = False) -> list[dict[str, Any]]:
    """The records of `decisions`: one per evaluation, each run expanded, within [since, until); `runs`: one per
    row, with its run's count and last time."""
    records: list[dict[str, Any]] = []
    for row in rows:
        first = decision_record(row)
        if runs:
            first.update(run_count=row.run_count, run_last_at=iso(row.run_last_at or row.at))
            records.append(first)
        elif row.run_count <= 1 and not row.run_evals:
            records.append(first)
        else:
            try:
                records.extend(journal.expand_between(first, row.at, row.run_evals, filters.since, filters.until))
            except journal.JournalFormatError as exc:
                raise journal.JournalFormatError(f"decisions id {row.id}: {exc} (edited?): run `fund-agent verify`"
                                                 ) from None
    return records


def list_halts(session: Session, filters: Filters, active_only: bool = False) -> list[Halt]:
    """Halts by account, kind (operator, kill_switch, unresolved, operator_needed), [since, until) on when they
    were made, policy and funding account; `active_only`: not cleared yet."""
    query = _filtered(Halt, Halt.created_at, Halt.kind, None, filters)
    if active_only:
        query = query.where(Halt.cleared_at.is_(None))
    return list(session.scalars(query))


HALT_FIELDS = ["id", "account", "kind", "scope", "reason", "created_at", "created_by", "cleared_at", "cleared_by"]


def halt_record(h: Halt) -> dict[str, Any]:
    return {"id": h.id, "account": h.account, "kind": h.kind, "scope": h.scope, "reason": h.reason,
            "created_at": iso(h.created_at), "created_by": h.created_by,
            "cleared_at": iso(h.cleared_at) if h.cleared_at else None, "cleared_by": h.cleared_by}
