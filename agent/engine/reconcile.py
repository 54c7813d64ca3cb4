"""Resolve `pending`, `sent` and `unknown` transfers from the broker's statement.

Deriv's transfer calls have no idempotency key, so the statement is the only proof of what happened:
- a `pending` or `sent` transfer whose owner (the process that made it) is alive is in flight: left to it;
- pending, owner gone: it stopped before marking it sent, so nothing left that process -> failed;
- one statement row that matches (our app_id, or none recorded; exact amount and sign, to/from loginids,
  longcode digits, a time window around the attempt, a transaction id not linked to another row) -> confirmed;
- a deposit (its first leg is the funding account's debit) with no match once the settle window has passed, and
  a funding balance that agrees with its statement -> failed;
- a withdrawal debits MT5 first and credits the funding account later: a missing funding row proves nothing,
  so it stays unknown until the row appears or an operator resolves it;
- anything else stays unknown, and the account is halted with the reason, until `reconcile` or `resolve`.
Every change is a compare-and-set: a transfer that someone else settled meanwhile is left as they settled it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent import money
from agent.broker.base import Broker, statement_all
from agent.broker.errors import BrokerError
from agent.engine.transfers import Fence, StateError, in_flight_here, settle
from agent.equity.base import login_digits
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.leases import Fenced
from agent.ledger.models import Transfer
from agent.timeutil import Clock, iso

log = logging.getLogger("agent.reconcile")

LOOK_BEFORE = timedelta(minutes=5)  # clocks of the agent and the broker may differ a little
LOOK_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class Verdict:
    transfer_id: int
    account: str
    before: str
    after: str
    txn_id: int | None
    reason: str

    def __str__(self) -> str:
        arrow = f"{self.before} -> {self.after}" if self.before != self.after else f"stays {self.after}"
        txn = f" (broker txn {self.txn_id})" if self.txn_id else ""
        return f"transfer {self.transfer_id} {self.account}: {arrow}{txn}: {self.reason}"


def matches(row: dict[str, Any], t: Transfer, app_id: int) -> bool:
    """The row could be this transfer. A row with no app_id recorded is a candidate too (Deriv leaves it null on
    some rows); one with another app's id is not ours."""
    amount = money.from_minor(t.amount_minor, t.currency)
    signed = -amount if t.kind == "top_up" else amount
    if row.get("action_type") != "transfer" or row.get("app_id") not in (app_id, None):
        return False
    if not isinstance(row.get("amount"), (int, Decimal)) or Decimal(row["amount"]) != signed:
        return False
    source = (row.get("from") or {}).get("loginid")
    target = (row.get("to") or {}).get("loginid")
    if t.kind == "top_up" and (source != t.funding or target != t.account):
        return False
    if t.kind == "sweep" and (source != t.account or target != t.funding):
        return False
    longcode = row.get("longcode")
    if isinstance(longcode, str) and login_digits(t.account) not in longcode:
        return False
    return isinstance(row.get("transaction_id"), int)


# Given a transfer's owner, says who holds it in flight ("fund-agent pid 1234 (run) on vps1"), or None when that
# owner is gone. The wiring builds it from the instance lock: a process that holds the lock knows every other
# owner is gone; one that does not knows the holder is alive.
LiveOwner = Callable[[str | None], str | None]


class Reconciler:
    def __init__(self, ledger: Ledger, broker: Broker, clock: Clock,
                 settle_window: timedelta = timedelta(minutes=2), *, owner: str | None = None,
                 live_owner: LiveOwner | None = None, fence: Fence | None = None,
                 lease_holds: Callable[[str], bool] | None = None,
                 foreign_send: LiveOwner | None = None) -> None:
        self.ledger = ledger
        self.broker = broker
        self.clock = clock
        self.settle_window = settle_window
        self.owner = owner  # this process's owner id: the transfers it creates carry it
        self.live_owner = live_owner
        # Several hosts: this process settles an account's rows only under its lease (fence), and an account whose
        # lease it holds has no other live owner of in-flight rows (the old holder can no longer write them).
        self.fence = fence
        self.lease_holds = lease_holds
        # A shared ledger: another agent that made a `sent` row may be frozen, not gone, and send it when it wakes:
        # says why its absence from the statement proves nothing yet (None: it cannot send it any more).
        self.foreign_send = foreign_send

    def run(self, account: str | None = None) -> list[Verdict]:
        with self.ledger.reader() as session:
            open_rows = queries.unresolved(session, account)
        return [self.resolve_one(t) for t in open_rows]

    def held_by(self, t: Transfer) -> str | None:
        """Who holds this pending/sent transfer in flight, or None when nobody does (its owner is gone)."""
        if t.state not in ("pending", "sent"):
            return None
        if in_flight_here(t.id):
            return "this process"
        if t.owner is not None and t.owner == self.owner:
            return None  # ours, and not in flight here: left behind by an error in this process
        if self.lease_holds is not None and self.lease_holds(t.account):
            return None  # its owner lost the lease to us: fenced, it can neither send it nor settle it
        return self.live_owner(t.owner) if self.live_owner is not None else None

    def resolve_one(self, t: Transfer) -> Verdict:
        holder = self.held_by(t)
        if holder is not None:
            return Verdict(t.id, t.account, t.state, t.state, None, f"in flight in {holder}: left to it")
        try:
            return self._resolve(t)
        except Fenced as exc:
            return Verdict(t.id, t.account, t.state, t.state, None, f"not settled here: {exc}")
        except StateError as exc:
            with self.ledger.reader() as session:
                current = session.get(Transfer, t.id)
            after = current.state if current is not None else t.state
            return Verdict(t.id, t.account, t.state, after, None, f"settled by someone else meanwhile ({exc})")

    def _resolve(self, t: Transfer) -> Verdict:
        now = self.clock.now()
        if t.state == "pending":
            settle(self.ledger, t.id, "failed", now, "reconcile", expected="pending", fence=self.fence,
                   error_code="NotSent",
                   error_message="the agent stopped after recording the intent and before sending it")
            return Verdict(t.id, t.account, "pending", "failed", None, "never sent: the agent stopped before sending")
        try:
            candidates = self._candidates(t, now)
        except BrokerError as exc:
            return self._keep(t, f"cannot read the broker's statement: {exc.code}", halt=False)
        ours = [c for c in candidates if c.get("app_id") == self.broker.app_id]
        chosen = ours if len(ours) == 1 else candidates
        if len(chosen) == 1:
            txn = int(chosen[0]["transaction_id"])
            how = "" if chosen[0].get("app_id") is not None else " (the row records no app_id)"
            try:
                settle(self.ledger, t.id, "confirmed", now, "reconcile", expected=t.state, fence=self.fence,
                       broker_txn_id=txn,
                       resolved_by="reconcile", detail=f"statement row {txn} matches{how}")
            except IntegrityError:
                return self._keep(t, f"statement row {txn} matches, but another transfer links it now", halt=True)
            except StateError:
                self._failed_but_moved(t, txn, now)
                raise
            self._clear_unresolved_halts(t.account, now)
            return Verdict(t.id, t.account, t.state, "confirmed", txn, f"found in the broker's statement{how}")
        if len(candidates) > 1:
            ids = ", ".join(str(c["transaction_id"]) for c in candidates)
            return self._keep(t, f"several broker transfers match ({ids}); settle it with `fund-agent resolve`",
                              halt=True)
        sent_at = t.sent_at or t.created_at
        if now - sent_at < self.settle_window:
            return self._keep(t, f"not in the statement yet; waiting until {iso(sent_at + self.settle_window)}",
                              halt=False)
        if t.kind == "sweep":
            return self._keep(t, "the funding account shows no credit, which proves nothing for a withdrawal (MT5 "
                              "is debited first, the funding credit may come later); it stays unknown until the "
                              f"credit appears, or settle it with `fund-agent resolve {t.id}`", halt=True)
        if self.foreign_send is not None and t.owner != self.owner and not in_flight_here(t.id):
            waiting = self.foreign_send(t.owner)
            if waiting:
                return self._keep(t, f"not in the statement yet, but {waiting}", halt=False)
        consistent, why = self._funding_consistent(t)
        if not consistent:
            return self._keep(t, f"not in the statement, but {why}", halt=True)
        settle(self.ledger, t.id, "failed", now, "reconcile", expected=t.state, fence=self.fence,
               resolved_by="reconcile",
               error_code=t.error_code or "NotExecuted",
               error_message=(t.error_message + "; " if t.error_message else "")
               + "absent from the broker's statement after the settle window")
        self._clear_unresolved_halts(t.account, now)
        return Verdict(t.id, t.account, t.state, "failed", None,
                       "absent from the broker's statement after the settle window; funding balance consistent")

    def _candidates(self, t: Transfer, now: datetime) -> list[dict[str, Any]]:
        start = (t.sent_at or t.created_at) - LOOK_BEFORE
        end = now + LOOK_AFTER
        rows = statement_all(self.broker, start, end, t.funding)
        found = [r for r in rows if matches(r, t, self.broker.app_id)]
        if not found:
            return []
        with self.ledger.reader() as session:
            linked = set(session.scalars(select(Transfer.broker_txn_id).where(
                Transfer.broker_txn_id.in_([r["transaction_id"] for r in found]), Transfer.id != t.id)))
        return [r for r in found if r["transaction_id"] not in linked]

    def _funding_consistent(self, t: Transfer) -> tuple[bool, str]:
        """The funding balance equals the balance after its newest statement row: no movement is unlisted."""
        try:
            balance, _ = self.broker.balance(t.funding)
            newest = self.broker.statement(0, int(self.clock.now().timestamp()) + 3600, limit=1,
                                           loginid=t.funding, action_type=None)
        except BrokerError as exc:
            return False, f"the funding balance could not be checked ({exc.code})"
        if not newest:
            return True, "no statement rows"
        after = newest[0].get("balance_after")
        if not isinstance(after, (int, Decimal)) or Decimal(after) != balance:
            return False, (f"the funding balance {balance} differs from its statement ({after}): a movement may "
                           "be missing from the statement")
        return True, "consistent"

    def _keep(self, t: Transfer, reason: str, halt: bool) -> Verdict:
        now = self.clock.now()
        if t.state == "sent" and halt:
            settle(self.ledger, t.id, "unknown", now, "reconcile", expected="sent", detail=reason,
                   fence=self.fence)
        if halt:
            with self.ledger.session() as session:
                if self.fence is not None:
                    self.fence(session, t.account)
                already = any(h.kind == "unresolved" for h in queries.active_halts(session, t.account))
                if not already:
                    queries.add_halt(session, t.account, "unresolved", f"transfer {t.id}: {reason}", now,
                                     "reconcile", scope="all")
                    session.commit()
        after = "unknown" if (halt or t.state == "unknown") else t.state
        return Verdict(t.id, t.account, t.state, after, None, reason + ("; account halted" if halt else ""))

    def _failed_but_moved(self, t: Transfer, txn: int, now: datetime) -> None:
        """Someone settled the transfer `failed` while the statement shows it moved (statement row `txn`): the
        account must not go on as if nothing had been sent. Halt it for a person; never rewrite the row."""
        with self.ledger.session() as session:
            current = session.get(Transfer, t.id)
            if current is None or current.state != "failed":
                return
            if self.fence is not None:
                self.fence(session, t.account)
            message = (f"transfer {t.id} is failed, but the broker's statement row {txn} matches it: money moved; "
                       "check it and settle the ledger by hand")
            log.error("%s", message)
            queries.add_halt(session, t.account, "operator_needed", message, now, "reconcile", scope="all")
            session.commit()

    def _clear_unresolved_halts(self, account: str, now: datetime) -> None:
        with self.ledger.session() as session:
            queries.clear_halts(session, account, now, "resolved", kind="unresolved")
            session.commit()
