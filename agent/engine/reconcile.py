"""Resolve `pending`, `sent` and `unknown` transfers from the broker's statement.

Deriv's transfer calls have no idempotency key, so the statement is the only proof of what happened:
- pending: the agent stopped before marking it sent, so nothing left this process -> failed;
- one statement row that matches (our app_id, exact amount and sign, to/from loginids, longcode digits, a time
  window around the attempt, a transaction id not linked to another row) -> confirmed;
- no match once the settle window has passed, and the funding balance agrees with its statement -> failed;
- anything else stays unknown, and the account is halted with the reason, until `reconcile` or `resolve`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from agent import money
from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError
from agent.engine.transfers import settle
from agent.equity.base import login_digits
from agent.ledger import queries
from agent.ledger.db import Ledger
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
    amount = money.from_minor(t.amount_minor, t.currency)
    signed = -amount if t.kind == "top_up" else amount
    if row.get("action_type") != "transfer" or row.get("app_id") != app_id:
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


class Reconciler:
    def __init__(self, ledger: Ledger, broker: DerivClient, clock: Clock,
                 settle_window: timedelta = timedelta(minutes=2)) -> None:
        self.ledger = ledger
        self.broker = broker
        self.clock = clock
        self.settle_window = settle_window

    def run(self, account: str | None = None) -> list[Verdict]:
        with self.ledger.reader() as session:
            open_rows = queries.unresolved(session, account)
        return [self.resolve_one(t) for t in open_rows]

    def resolve_one(self, t: Transfer) -> Verdict:
        now = self.clock.now()
        if t.state == "pending":
            settle(self.ledger, t.id, "failed", now, "reconcile", error_code="NotSent",
                   error_message="the agent stopped after recording the intent and before sending it")
            return Verdict(t.id, t.account, "pending", "failed", None, "never sent: the agent stopped before sending")
        try:
            candidates = self._candidates(t, now)
        except BrokerError as exc:
            return self._keep(t, f"cannot read the broker's statement: {exc.code}", halt=False)
        if len(candidates) == 1:
            txn = int(candidates[0]["transaction_id"])
            settle(self.ledger, t.id, "confirmed", now, "reconcile", broker_txn_id=txn, resolved_by="reconcile",
                   detail=f"statement row {txn} matches")
            self._clear_unresolved_halts(t.account, now)
            return Verdict(t.id, t.account, t.state, "confirmed", txn, "found in the broker's statement")
        if len(candidates) > 1:
            ids = ", ".join(str(c["transaction_id"]) for c in candidates)
            return self._keep(t, f"several broker transfers match ({ids}); settle it with `fund-agent resolve`",
                              halt=True)
        sent_at = t.sent_at or t.created_at
        if now - sent_at < self.settle_window:
            return self._keep(t, f"not in the statement yet; waiting until {iso(sent_at + self.settle_window)}",
                              halt=False)
        consistent, why = self._funding_consistent(t)
        if not consistent:
            return self._keep(t, f"not in the statement, but {why}", halt=True)
        settle(self.ledger, t.id, "failed", now, "reconcile", resolved_by="reconcile",
               error_code=t.error_code or "NotExecuted",
               error_message=(t.error_message + "; " if t.error_message else "")
               + "absent from the broker's statement after the settle window")
        self._clear_unresolved_halts(t.account, now)
        return Verdict(t.id, t.account, t.state, "failed", None,
                       "absent from the broker's statement after the settle window; funding balance consistent")

    def _candidates(self, t: Transfer, now: datetime) -> list[dict[str, Any]]:
        start = (t.sent_at or t.created_at) - LOOK_BEFORE
        end = now + LOOK_AFTER
        rows: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self.broker.statement(int(start.timestamp()), int(end.timestamp()), limit=999, offset=offset,
                                         loginid=t.funding)
            rows.extend(page)
            if len(page) < 999:
                break
            offset += len(page)
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
            settle(self.ledger, t.id, "unknown", now, "reconcile", detail=reason)
        if halt:
            with self.ledger.session() as session:
                already = any(h.kind == "unresolved" for h in queries.active_halts(session, t.account))
                if not already:
                    queries.add_halt(session, t.account, "unresolved", f"transfer {t.id}: {reason}", now,
                                     "reconcile", scope="all")
                    session.commit()
        after = "unknown" if (halt or t.state == "unknown") else t.state
        return Verdict(t.id, t.account, t.state, after, None, reason + ("; account halted" if halt else ""))

    def _clear_unresolved_halts(self, account: str, now: datetime) -> None:
        with self.ledger.session() as session:
            queries.clear_halts(session, account, now, "resolved", kind="unresolved")
            session.commit()
