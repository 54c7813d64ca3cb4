"""One evaluation of one account: read, decide (pure), record, and execute what was decided."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from agent import logs, money
from agent.broker.base import Broker
from agent.broker.errors import NEEDS_OPERATOR, BrokerError, LostReply, NotSent
from agent.engine import transfers
from agent.engine.lanes import Lanes
from agent.engine.reconcile import Reconciler
from agent.equity.base import EquitySource, NoReading, Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import Transfer
from agent.policy.evaluate import BrokerLimits, Decision, evaluate
from agent.policy.model import Policy
from agent.timeutil import Clock

log = logging.getLogger("agent.engine")

STATUS_TTL = 3600.0  # website_status limits change rarely: re-read hourly
# Decisions whose reading must not move the recorded equity peak: no usable reading, or one that may or may not
# show a transfer (an unresolved one, or one it predates).
NOT_A_PEAK = frozenset({"stale", "no_reading", "currency", "future_reading", "reading_predates_transfer",
                        "unresolved"})


@dataclass
class TickOutcome:
    policy: Policy
    decision: Decision
    snapshot: Snapshot | None
    transfer: dict[str, Any] | None = None

    @property
    def had_reading(self) -> bool:
        return self.snapshot is not None and self.decision.bound_by not in (
            "stale", "no_reading", "currency", "future_reading", "reading_predates_transfer")

    @property
    def ok(self) -> bool:
        """A usable reading, an evaluation, and any transfer started ended confirmed."""
        if not self.had_reading or self.decision.bound_by in ("unresolved", "broker", "funding_balance", "error"):
            return False  # a needed transfer that could not be decided for want of the broker is not a success
        return self.transfer is None or self.transfer["state"] == "confirmed"


class Engine:
    def __init__(self, ledger: Ledger | None, broker: Broker | None, source: EquitySource, clock: Clock,
                 on_outcome: Callable[[TickOutcome], None] | None = None,
                 reconciler: Reconciler | None = None, owner: str | None = None,
                 lanes: Lanes | None = None) -> None:
        self.reconciler = reconciler
        self.owner = owner or (reconciler.owner if reconciler is not None else None)
        self.lanes = lanes or Lanes()
        self.ledger = ledger
        self.broker = broker
        self.source = source
        self.clock = clock
        self.on_outcome = on_outcome
        self._status: tuple[float, dict[str, Any]] | None = None

    # ---- broker facts ----

    def broker_limits(self, currency: str) -> BrokerLimits:
        """The broker's live per-transfer min/max and daily MT5 count. A broker that refuses one of these calls
        (an API error, not a lost connection) leaves that limit unknown: it still enforces it itself, and its
        refusal proves nothing moved."""
        if self.broker is None:
            return BrokerLimits()
        mt5: dict[str, Any] = {}
        daily: dict[str, Any] = {}
        try:
            if self._status is None or time.monotonic() - self._status[0] > STATUS_TTL:
                self._status = (time.monotonic(), self.broker.website_status())
            config = (self._status[1].get("currencies_config") or {}).get(currency) or {}
            mt5 = (config.get("transfer_between_accounts") or {}).get("limits_mt5") or {}
        except (NotSent, LostReply):
            raise
        except BrokerError as exc:
            log.warning("website_status refused (%s): per-transfer limits unknown, the broker enforces them", exc.code)
        try:
            daily = (self.broker.get_limits().get("daily_transfers") or {}).get("mt5") or {}
        except (NotSent, LostReply):
            raise
        except BrokerError as exc:
            log.warning("get_limits refused (%s): daily transfer count unknown, the broker enforces it", exc.code)

        def dec(value: Any) -> Decimal | None:
            return Decimal(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else None

        def whole(value: Any) -> int | None:
            return int(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else None

        return BrokerLimits(min_amount=dec(mt5.get("min")), max_amount=dec(mt5.get("max")),
                            daily_count=whole(daily.get("allowed")), daily_available=whole(daily.get("available")))

    def _needs_broker(self, policy: Policy, snapshot: Snapshot) -> bool:
        if policy.top_up is not None and snapshot.equity < policy.top_up.when_equity_below:
            return True
        return policy.sweep is not None and snapshot.equity > policy.sweep.when_equity_above

    # ---- one evaluation ----

    def tick_safely(self, policy: Policy, execute: bool = True) -> TickOutcome:
        """`tick`, but an unexpected error stays with its account: one log line, a decision row that says why,
        and the other accounts are evaluated as usual."""
        try:
            return self.tick(policy, execute)
        except Exception as exc:  # noqa: BLE001 - isolation: one account's failure must not stop the others
            reason = f"evaluation failed: {type(exc).__name__}: {logs.redact(str(exc))[:300]}"
            log.error("%s", reason)
            decision = Decision("none", None, reason, bound_by="error")
            if execute and self.ledger is not None:
                try:
                    with self.ledger.session() as session:
                        queries.record_decision(session, self.clock.now(), policy.mt5, policy.name, policy.sha256,
                                                decision, policy.currency, None, None, action="error")
                        session.commit()
                except Exception as journal_error:  # noqa: BLE001 - the log line above still says it
                    log.error("the decision journal could not record it: %s", type(journal_error).__name__)
            outcome = TickOutcome(policy, decision, None)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            return outcome

    def tick(self, policy: Policy, execute: bool = True) -> TickOutcome:
        """execute=False is `plan`: the same reads and decision, no writes, nothing sent."""
        snapshot: Snapshot | None = None
        no_reading = None
        try:
            snapshot = self.source.read(policy.mt5, policy.schedule.max_equity_age.total_seconds())
        except NoReading as exc:
            no_reading = str(exc)
        if self.ledger is not None and execute and self.reconciler is not None:
            with self.ledger.reader() as session:
                open_rows = bool(queries.unresolved(session, policy.mt5))
            if open_rows:  # reconcile before deciding: an unproven outcome must not be decided over
                for verdict in self.reconciler.run(policy.mt5):
                    log.warning("%s", verdict)
        # From reading the ledger and the funding balance to committing the intent, accounts paid by the same
        # funding account go one at a time: the next one sees this one's intent as money already spent.
        with self.lanes.hold(policy.funding):
            now = self.clock.now()
            outcome, transfer = self._decide(policy, snapshot, no_reading, now, execute)
        if transfer is not None:
            self._execute(policy, outcome, transfer)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _decide(self, policy: Policy, snapshot: Snapshot | None, no_reading: str | None, now: datetime,
                execute: bool) -> tuple[TickOutcome, Transfer | None]:
        usage = queries.Usage()
        in_flight = Decimal(0)
        unresolved_anywhere = 0
        needs_broker = snapshot is not None and self.broker is not None and self._needs_broker(policy, snapshot)
        if self.ledger is not None:
            with self.ledger.reader() as session:
                usage = queries.usage(session, policy.mt5, now)
                if needs_broker and not usage.unresolved:  # an idle tick reads none of this
                    in_flight = queries.funding_in_flight(session, policy.funding)
                    unresolved_anywhere = queries.unresolved_count(session)
        funding_balance = None
        limits = BrokerLimits()
        broker_error = None
        if needs_broker and not usage.unresolved:
            assert self.broker is not None
            try:
                limits = self.broker_limits(policy.currency)
                if limits.daily_available is not None and unresolved_anywhere:
                    # an unresolved transfer may already count at the broker, or may still: count it as used
                    limits = replace(limits, daily_available=limits.daily_available - unresolved_anywhere)
                balance, currency = self.broker.balance(policy.funding)
                if currency == policy.currency:
                    funding_balance = balance
                else:
                    broker_error = f"funding account {policy.funding} is in {currency}, not {policy.currency}"
            except BrokerError as exc:
                broker_error = f"broker error reading limits and balance: {exc.code}: {exc.message}"
        decision = evaluate(policy, snapshot, usage, now, no_reading=no_reading, funding_balance=funding_balance,
                            funding_in_flight=in_flight, broker=limits)
        if broker_error and (decision.transfers or decision.bound_by == "funding_balance"):
            decision = Decision("none", None, broker_error, bound_by="broker", details=decision.details)
        outcome = TickOutcome(policy, decision, snapshot)
        transfer = None
        if execute and self.ledger is not None:
            transfer = self._record(policy, snapshot, outcome, now)
        return outcome, transfer

    def _record(self, policy: Policy, snapshot: Snapshot | None, outcome: TickOutcome,
                now: datetime) -> Transfer | None:
        """Commit the intent (if any), the decision, the equity peak and a kill-switch halt."""
        assert self.ledger is not None
        decision = outcome.decision
        equity = snapshot.equity if snapshot is not None else None
        age = int((now - snapshot.taken_at).total_seconds()) if snapshot is not None else None
        transfer = None
        if decision.transfers and self.broker is not None and equity is not None:
            assert decision.amount is not None
            try:
                transfer = transfers.create_intent(
                    self.ledger, at=now, account=policy.mt5, funding=policy.funding, kind=decision.action,
                    amount=decision.amount, currency=policy.currency, policy=policy.name,
                    policy_sha256=policy.sha256, equity=equity, reason=decision.reason, owner=self.owner)
            except transfers.AccountBusy as exc:
                decision = Decision("none", None, f"blocked: {exc}", bound_by="unresolved",
                                    details=decision.details)
                outcome.decision = decision
        with self.ledger.session() as session:
            queries.record_decision(session, now, policy.mt5, policy.name, policy.sha256, decision,
                                    policy.currency, equity, age, transfer_id=transfer.id if transfer else None)
            if snapshot is not None and decision.bound_by not in NOT_A_PEAK:
                queries.note_equity(session, policy.mt5, snapshot.equity, now)
            if decision.kill_switch:
                queries.add_halt(session, policy.mt5, "kill_switch", decision.kill_switch, now, "agent")
            session.commit()
        return transfer

    def _execute(self, policy: Policy, outcome: TickOutcome, transfer: Transfer) -> None:
        assert self.ledger is not None
        assert self.broker is not None
        done = transfers.execute(self.ledger, self.broker, transfer, self.clock)
        if done.state == "unknown" and self.reconciler is not None:
            # The broker may have executed it (e.g. MT5TransferSuspension debits first): look it up now.
            log.warning("%s", self.reconciler.resolve_one(done))
            with self.ledger.session() as session:
                done = session.get(Transfer, done.id) or done
        outcome.transfer = queries.transfer_record(done)
        if done.state == "failed" and done.error_code in NEEDS_OPERATOR:
            # the token or the account set-up is wrong: retrying cannot help; stop and tell a person
            with self.ledger.session() as session:
                queries.add_halt(session, policy.mt5, "operator_needed", f"transfer {done.id} refused: "
                                 f"{done.error_code}: {done.error_message}", self.clock.now(), "agent",
                                 scope="all")
                session.commit()
        if done.state == "confirmed":
            apply = getattr(self.source, "apply_transfer", None)
            if apply is not None:
                sign = 1 if done.kind == "top_up" else -1
                apply(policy.mt5, sign * money.from_minor(done.amount_minor, done.currency))
