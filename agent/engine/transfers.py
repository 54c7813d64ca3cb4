"""The transfer aggregate: pending (intent committed) -> sent -> confirmed | failed | unknown.

Every state change is a compare-and-set (`UPDATE ... WHERE id = :id AND state = :expected`, rowcount checked)
in the transaction that appends its event: a transition that finds another state is refused and logged, never
overwrites. The intent row is committed before a byte goes to the broker; `sent` is committed just before
sending, and only by the process that owns the row. An outcome the broker may have executed is never `failed`:
it is `unknown` and is never resent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent import money
from agent.broker.base import Broker, send_guard
from agent.broker.errors import BrokerError
from agent.crash import crash_point
from agent.ledger.db import Ledger
from agent.ledger.leases import Fenced
from agent.ledger.models import EquityPeak, FundingAccount, Halt, Transfer
from agent.ledger.queries import add_event
from agent.timeutil import Clock

log = logging.getLogger("agent.transfers")

ALLOWED = {
    "pending": {"sent", "failed"},
    "sent": {"confirmed", "failed", "unknown"},
    "unknown": {"confirmed", "failed"},
}


class StateError(Exception):
    """A transition that the aggregate refuses: not allowed from the state the row is in now."""


class AccountBusy(Exception):
    """The database refused a second unresolved transfer for the account, or a halt came first."""


# The fence of a money write: called in the write's own transaction with the account, it raises
# agent.ledger.leases.Fenced when this process's claim on the account is no longer current (several hosts).
Fence = Callable[[Session, str], None]
# A last check of a decision, in the intent's transaction, after the funding account's row is locked: returns why
# the decision no longer holds (another host spent the same funding money meanwhile), or None.
IntentCheck = Callable[[Session], str | None]
# Writes what goes with the intent (its decision row) in the intent's transaction, after the row has its id.
Record = Callable[[Session, Transfer], None]


# Transfers whose broker call is running in this process right now: nobody in this process settles them.
_in_flight: set[int] = set()
_in_flight_lock = threading.Lock()


def in_flight_here(transfer_id: int) -> bool:
    with _in_flight_lock:
        return transfer_id in _in_flight


def create_intent(ledger: Ledger, *, at: datetime, account: str, funding: str, kind: str, amount: Decimal,
                  currency: str, policy: str, policy_sha256: str, equity: Decimal, reason: str,
                  owner: str | None = None, fence: Fence | None = None,
                  check: IntentCheck | None = None, record: Record | None = None) -> Transfer:
    """Write and commit the intent (state pending). Raises AccountBusy if the account already has an unresolved
    transfer or was halted since the decision was made (the halt and the intent are serialized by the write
    lock: an operator's halt is never overtaken by a decision that read the ledger before it), or if `check`
    finds that the funding money was spent meanwhile. The funding account's row is locked first (PostgreSQL:
    FOR UPDATE; SQLite: the write lock), so intents on one funding account commit one at a time on every host.
    `record` writes the decision that made the intent in the intent's own transaction (one commit, one fsync,
    before the frame instead of two)."""
    with ledger.session() as session:
        if fence is not None:
            fence(session, account)
        lock_funding(session, funding, currency, at)
        if check is not None:
            why = check(session)
            if why:
                raise AccountBusy(why)
        scopes = ("all", kind) if kind == "sweep" else ("all", "top_up")
        halted = session.scalars(select(Halt).where(Halt.account == account, Halt.cleared_at.is_(None),
                                                    Halt.scope.in_(scopes)).limit(1)).first()
        if halted is not None:
            raise AccountBusy(f"{account} was halted before the intent was written ({halted.kind}: "
                              f"{halted.reason})")
        transfer = Transfer(created_at=at, updated_at=at, account=account, funding=funding, kind=kind,
                            amount_minor=money.to_minor(amount, currency), currency=currency, state="pending",
                            policy=policy, policy_sha256=policy_sha256, equity=str(equity), reason=reason,
                            owner=owner)
        session.add(transfer)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            raise AccountBusy(f"{account} already has an unresolved transfer") from None
        add_event(session, transfer, at, "agent", reason)
        if record is not None:
            record(session, transfer)
        session.commit()
    crash_point("after_intent")
    return transfer


def lock_funding(session: Session, funding: str, currency: str, at: datetime) -> None:
    """Create the funding account's row if needed and lock it until the transaction ends."""
    query = select(FundingAccount).where(FundingAccount.login == funding)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        with session.begin_nested():  # another host may create it at the same moment: then lock theirs
            session.add(FundingAccount(login=funding, currency=currency, first_seen_at=at, last_intent_at=at))
            try:
                session.flush()
            except IntegrityError:
                pass
        row = session.scalars(query).first()
    if row is not None:
        row.last_intent_at = at


def settle(ledger: Ledger, transfer_id: int, to: str, at: datetime, actor: str, *,
           expected: str | tuple[str, ...] | None = None, detail: str | None = None,
           broker_txn_id: int | None = None, error_code: str | None = None, error_message: str | None = None,
           resolved_by: str | None = None, fence: Fence | None = None) -> Transfer:
    """Compare-and-set the transfer from `expected` (a state or several; default: any state that may move to
    `to`) to `to`, and append its event, in one transaction. Raises StateError when the row is in another state
    (someone else settled it first): nothing is overwritten."""
    allowed_from = tuple(state for state, targets in ALLOWED.items() if to in targets)
    if expected is None:
        expected = allowed_from
    elif isinstance(expected, str):
        expected = (expected,)
    bad = [state for state in expected if state not in allowed_from]
    if bad:
        raise StateError(f"transfer {transfer_id}: {bad[0]} -> {to} is not allowed")
    values: dict[str, Any] = {"state": to, "updated_at": at}
    if to == "sent":
        values["sent_at"] = at
    if broker_txn_id is not None:
        values["broker_txn_id"] = broker_txn_id
    if error_code is not None:
        values["error_code"] = error_code
        values["error_message"] = error_message
    elif to == "confirmed":
        values["error_code"] = None
        values["error_message"] = None
    if resolved_by is not None:
        values["resolved_by"] = resolved_by
    with ledger.session() as session:
        if fence is not None:
            account = session.execute(select(Transfer.account).where(Transfer.id == transfer_id)).scalar()
            if account is not None:
                fence(session, account)
        result = session.execute(update(Transfer).where(Transfer.id == transfer_id, Transfer.state.in_(expected))
                                 .values(**values).execution_options(synchronize_session=False))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            current = session.get(Transfer, transfer_id)
            if current is None:
                raise StateError(f"no transfer {transfer_id}")
            message = (f"transfer {transfer_id}: {actor} wanted {'|'.join(expected)} -> {to}, but it is "
                       f"{current.state} now: refused")
            log.warning("%s", message)
            raise StateError(message)
        transfer = session.get(Transfer, transfer_id, populate_existing=True)
        assert transfer is not None
        add_event(session, transfer, at, actor, detail)
        if to == "confirmed":
            _shift_peak(session, transfer)
        session.commit()
        return transfer


def _shift_peak(session: Session, t: Transfer) -> None:
    """The drawdown kill switch measures trading results, not the agent's own transfers: a sweep lowers the
    recorded peak by its amount, a top-up raises it by its amount (a top-up is not a gain)."""
    peak = session.get(EquityPeak, t.account)
    if peak is None:
        return
    amount = money.from_minor(t.amount_minor, t.currency)
    peak.peak = str(Decimal(peak.peak) + (amount if t.kind == "top_up" else -amount))


def _send(broker: Broker, transfer: Transfer) -> int:
    amount = money.from_minor(transfer.amount_minor, transfer.currency)
    if transfer.kind == "top_up":
        return broker.mt5_deposit(transfer.funding, transfer.account, amount)
    return broker.mt5_withdrawal(transfer.account, transfer.funding, amount)


def execute(ledger: Ledger, broker: Broker, transfer: Transfer, clock: Clock, *, fence: Fence | None = None,
            may_send: Callable[[], str | None] | None = None) -> Transfer:
    """Send one pending transfer that this process owns, and record what is proven about its outcome.
    `fence` guards `pending -> sent` (a decision to send: only under a current lease, which the caller's fence
    may require to have time left); the outcome is a fact from the broker and is recorded without it (a
    compare-and-set from `sent`: a row someone else settled meanwhile is never overwritten, and a confirmation of
    a row already failed halts the account). `may_send` is asked immediately before the frame leaves (see
    agent.broker.base.send_guard)."""
    with _in_flight_lock:
        _in_flight.add(transfer.id)
    try:
        with send_guard(may_send):
            return _execute(ledger, broker, transfer, clock, fence)
    finally:
        with _in_flight_lock:
            _in_flight.discard(transfer.id)


def _execute(ledger: Ledger, broker: Broker, transfer: Transfer, clock: Clock, fence: Fence | None) -> Transfer:
    try:
        settle(ledger, transfer.id, "sent", clock.now(), "agent", expected="pending", fence=fence)
    except (StateError, Fenced):
        # Someone settled the intent before it was sent, or our lease moved (it cannot have moved money): never
        # send it now.
        with ledger.reader() as session:
            current = session.get(Transfer, transfer.id)
        assert current is not None
        return current
    crash_point("after_sent")
    try:
        txn = _send(broker, transfer)
    except BrokerError as exc:
        crash_point("after_reply")
        state = "failed" if exc.nothing_moved else "unknown"
        log.warning("transfer %s %s: %s", transfer.id, state, exc.code)
        return _record(ledger, transfer, state, clock, error_code=exc.code, error_message=exc.message)
    except BaseException as exc:
        # A bug or an interrupt after the frame may have left: the outcome is unknown, never lost as `sent`.
        _record(ledger, transfer, "unknown", clock, error_code="AgentError",
                error_message=f"the agent failed while waiting for the reply: {type(exc).__name__}")
        raise
    crash_point("after_reply")
    try:
        return _record(ledger, transfer, "confirmed", clock, broker_txn_id=txn,
                       detail=f"binary_transaction_id {txn}")
    except IntegrityError:
        # The broker's id already confirms another row: something is badly wrong; never guess.
        return _record(ledger, transfer, "unknown", clock, error_code="DuplicateTxnId",
                       error_message=f"binary_transaction_id {txn} already confirms another transfer")


def _record(ledger: Ledger, transfer: Transfer, to: str, clock: Clock, **fields: Any) -> Transfer:
    """The broker's answer to our own request. The row is ours and `sent`; if another process moved it to
    `unknown` meanwhile (a new lease holder after ours ran out), the answer still settles it: it is the broker's
    word. A row already `failed` by someone else while the broker executed it is the one thing that must never
    pass quietly."""
    expected: str | tuple[str, ...] = "sent" if to == "unknown" else ("sent", "unknown")
    try:
        return settle(ledger, transfer.id, to, clock.now(), "agent", expected=expected, **fields)
    except StateError:
        with ledger.session() as session:
            current = session.get(Transfer, transfer.id)
            assert current is not None
            if to == "confirmed" and current.state == "failed":
                message = (f"transfer {transfer.id} was settled failed by someone else, but the broker confirmed it "
                           f"(txn {fields.get('broker_txn_id')}): fix the ledger with an operator")
                log.error("%s", message)
                session.add(Halt(account=transfer.account, kind="operator_needed", scope="all", reason=message,
                                 created_at=clock.now(), created_by="agent"))
                session.commit()
            return current
