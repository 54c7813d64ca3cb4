"""The transfer state machine: pending (intent committed) -> sent -> confirmed | failed | unknown.

The intent row is committed before a byte goes to the broker; `sent` is committed just before sending.
An outcome the broker may have executed is never `failed`: it is `unknown` and is never resent.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from sqlalchemy.exc import IntegrityError

from agent import money
from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError
from agent.crash import crash_point
from agent.ledger.db import Ledger
from agent.ledger.models import Transfer
from agent.ledger.queries import add_event
from agent.timeutil import Clock

log = logging.getLogger("agent.transfers")

ALLOWED = {
    "pending": {"sent", "failed"},
    "sent": {"confirmed", "failed", "unknown"},
    "unknown": {"confirmed", "failed"},
}


class StateError(Exception):
    pass


class AccountBusy(Exception):
    """The database refused a second unresolved transfer for the account."""


def transition(transfer: Transfer, to: str, at: datetime) -> None:
    if to not in ALLOWED.get(transfer.state, set()):
        raise StateError(f"transfer {transfer.id}: {transfer.state} -> {to} is not allowed")
    transfer.state = to
    transfer.updated_at = at


def create_intent(ledger: Ledger, *, at: datetime, account: str, funding: str, kind: str, amount: Decimal,
                  currency: str, policy: str, policy_sha256: str, equity: Decimal, reason: str) -> Transfer:
    """Write and commit the intent (state pending). Raises AccountBusy if one is already unresolved."""
    with ledger.session() as session:
        transfer = Transfer(created_at=at, updated_at=at, account=account, funding=funding, kind=kind,
                            amount_minor=money.to_minor(amount, currency), currency=currency, state="pending",
                            policy=policy, policy_sha256=policy_sha256, equity=str(equity), reason=reason)
        session.add(transfer)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            raise AccountBusy(f"{account} already has an unresolved transfer") from None
        add_event(session, transfer, at, "agent", reason)
        session.commit()
    crash_point("after_intent")
    return transfer


def settle(ledger: Ledger, transfer_id: int, to: str, at: datetime, actor: str, *, detail: str | None = None,
           broker_txn_id: int | None = None, error_code: str | None = None, error_message: str | None = None,
           resolved_by: str | None = None) -> Transfer:
    """Move a transfer to its next state and append the event, in one transaction."""
    with ledger.session() as session:
        transfer = session.get(Transfer, transfer_id)
        if transfer is None:
            raise StateError(f"no transfer {transfer_id}")
        transition(transfer, to, at)
        if to == "sent":
            transfer.sent_at = at
        if broker_txn_id is not None:
            transfer.broker_txn_id = broker_txn_id
        if error_code is not None:
            transfer.error_code = error_code
            transfer.error_message = error_message
        elif to == "confirmed":
            transfer.error_code = None
            transfer.error_message = None
        if resolved_by is not None:
            transfer.resolved_by = resolved_by
        add_event(session, transfer, at, actor, detail)
        session.commit()
        return transfer


def execute(ledger: Ledger, broker: DerivClient, transfer: Transfer, clock: Clock) -> Transfer:
    """Send one pending transfer and record what is proven about its outcome."""
    settle(ledger, transfer.id, "sent", clock.now(), "agent")
    crash_point("after_sent")
    amount = money.from_minor(transfer.amount_minor, transfer.currency)
    try:
        if transfer.kind == "top_up":
            txn = broker.mt5_deposit(transfer.funding, transfer.account, amount)
        else:
            txn = broker.mt5_withdrawal(transfer.account, transfer.funding, amount)
    except BrokerError as exc:
        crash_point("after_reply")
        state = "failed" if exc.nothing_moved else "unknown"
        log.warning("transfer %s %s: %s", transfer.id, state, exc.code)
        return settle(ledger, transfer.id, state, clock.now(), "agent", error_code=exc.code,
                      error_message=exc.message)
    crash_point("after_reply")
    try:
        return settle(ledger, transfer.id, "confirmed", clock.now(), "agent", broker_txn_id=txn,
                      detail=f"binary_transaction_id {txn}")
    except IntegrityError:
        # The broker's id already confirms another row: something is badly wrong; never guess.
        return settle(ledger, transfer.id, "unknown", clock.now(), "agent", error_code="DuplicateTxnId",
                      error_message=f"binary_transaction_id {txn} already confirms another transfer")
