"""One evaluation of one account: read, decide (pure), record, and execute what was decided."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from agent import logs, money
from agent.broker.base import Broker
from agent.broker.errors import NEEDS_OPERATOR, BrokerError, LostReply, NotSent
from agent.engine import transfers
from agent.engine.lanes import Lanes
from agent.engine.reconcile import Reconciler
from agent.equity.base import EquitySource, NoReading, Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.leases import Fenced, Leases
from agent.ledger.models import Transfer
from agent.policy.evaluate import BrokerLimits, Decision, evaluate
from agent.policy.model import Policy
from agent.policy.usage_book import UsageBook
from agent.timeutil import Clock

log = logging.getLogger("agent.engine")

STATUS_TTL = 3600.0  # website_status limits change rarely: re-read hourly
# How far the clocks of hosts that share a ledger may differ (they run NTP): a transfer another host confirmed
# up to this long before our balance read is counted as possibly missing from it.
HOST_CLOCK_SKEW = timedelta(seconds=1)
# Decisions whose reading must not move the recorded equity peak: no usable reading, or one that may or may not
# show a transfer (an unresolved one, or one it predates).
NOT_A_PEAK = frozenset({"stale", "no_reading", "currency", "future_reading", "reading_predates_transfer",
                        "unresolved"})


def _limits_of(mt5: dict[str, Any], daily: dict[str, Any]) -> BrokerLimits:
    def dec(value: Any) -> Decimal | None:
        return Decimal(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else None

    def whole(value: Any) -> int | None:
        return int(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else None

    return BrokerLimits(min_amount=dec(mt5.get("min")), max_amount=dec(mt5.get("max")),
                        daily_count=whole(daily.get("allowed")), daily_available=whole(daily.get("available")))


def _refusal_or(read: Callable[[], Any]) -> Any:
    """The call's result, or the broker's refusal (a BrokerError) as a value; a lost reply or an unsent request
    raises at once."""
    try:
        return read()
    except (NotSent, LostReply):
        raise
    except BrokerError as exc:
        return exc


def leases_send_margin(engine: Engine) -> float:
    """Lease time that must be left when a transfer's frame leaves: the longest wait for its reply."""
    timeout = getattr(engine.broker, "timeout", None)
    return float(timeout) + 1.0 if isinstance(timeout, (int, float)) else 5.0


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
                 lanes: Lanes | None = None, leases: Leases | None = None,
                 lease_margin: float | None = None) -> None:
        self.reconciler = reconciler
        self.owner = owner or (reconciler.owner if reconciler is not None else None)
        self.lanes = lanes or Lanes()
        self.ledger = ledger
        self.broker = broker
        self.source = source
        self.clock = clock
        self.on_outcome = on_outcome
        self._status: tuple[float, dict[str, Any]] | None = None
        # Several hosts on one ledger: act on an account only while holding its lease with at least
        # `lease_margin` seconds left (more than a transfer can take), and fence every money write.
        self.leases = leases
        self.lease_margin = lease_margin if lease_margin is not None else leases_send_margin(self)
        self.fence = leases.check if leases is not None else None
        # The ledger as this engine last read it: each account's summary (re-read only when its change counter
        # moved) and its newest decision row (which a repeated no-op evaluation joins).
        self.summaries = queries.Summaries()
        self.runs: dict[str, queries.OpenRun | None] = {}

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
        return _limits_of(mt5, daily)

    def _limits_and_balance(self, policy: Policy) -> tuple[BrokerLimits, tuple[Decimal, str]]:
        """What a transfer decision reads from the broker: the live limits (`broker_limits`' rules) and the
        funding balance. A client that can (DerivClient.balance_and_limits) sends the calls together on its one
        connection: one round trip. A lost reply or an unsent request of any of them raises, as before."""
        assert self.broker is not None
        broker = self.broker
        stale = self._status is None or time.monotonic() - self._status[0] > STATUS_TTL
        together = getattr(broker, "balance_and_limits", None)
        status: dict[str, Any] | BrokerError | None
        daily_body: dict[str, Any] | BrokerError
        balance: tuple[Decimal, str] | BrokerError
        if together is not None:
            balance, daily_body, status = together(policy.funding, website_status=stale)
        else:  # one call after the other, stopping at the first transport failure
            status = _refusal_or(broker.website_status) if stale else None
            daily_body = _refusal_or(broker.get_limits)
            balance = _refusal_or(lambda: broker.balance(policy.funding))
        for result in (status, daily_body, balance):
            if isinstance(result, (NotSent, LostReply)):
                raise result
        mt5: dict[str, Any] = {}
        if isinstance(status, BrokerError):
            log.warning("website_status refused (%s): per-transfer limits unknown, the broker enforces them",
                        status.code)
        else:
            if status is not None:
                self._status = (time.monotonic(), status)
            if self._status is not None:
                config = (self._status[1].get("currencies_config") or {}).get(policy.currency) or {}
                mt5 = (config.get("transfer_between_accounts") or {}).get("limits_mt5") or {}
        daily: dict[str, Any] = {}
        if isinstance(daily_body, BrokerError):
            log.warning("get_limits refused (%s): daily transfer count unknown, the broker enforces it",
                        daily_body.code)
        else:
            daily = (daily_body.get("daily_transfers") or {}).get("mt5") or {}
        if isinstance(balance, BrokerError):
            raise balance
        return _limits_of(mt5, daily), balance

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
                                                decision, policy.currency, None, None, action="error",
                                                runs=self.runs)
                        session.commit()
                except Exception as journal_error:  # noqa: BLE001 - the log line above still says it
                    log.error("the decision journal could not record it: %s", type(journal_error).__name__)
            outcome = TickOutcome(policy, decision, None)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            return outcome

    def tick(self, policy: Policy, execute: bool = True) -> TickOutcome:
        """execute=False is `plan`: the same reads and decision, no writes, nothing sent."""
        if execute and self.leases is not None and not self.leases.holds(policy.mt5, self.lease_margin):
            # another agent acts on it (or our claim is too close to its end to start anything): not ours to
            # evaluate; nothing is written
            return TickOutcome(policy, Decision("none", None, "not evaluated here: this agent holds no current "
                                                "lease on the account", bound_by="lease"), None)
        snapshot: Snapshot | None = None
        no_reading = None
        try:
            snapshot = self.source.read(policy.mt5, policy.schedule.max_equity_age.total_seconds())
        except NoReading as exc:
            no_reading = str(exc)
        book = None
        if self.ledger is not None and execute:
            # the account's summary: held in memory, one counter read unless something changed (queries.Summaries)
            with self.ledger.reader() as session:
                book = self.summaries.book(session, policy.mt5)
            if self.reconciler is not None and book.blocked() is not None:
                # reconcile before deciding: an unproven outcome must not be decided over
                for verdict in self.reconciler.run(policy.mt5):
                    log.warning("%s", verdict)
                book = None  # read again: reconcile wrote
        # From reading the ledger and the funding balance to committing the intent, accounts paid by the same
        # funding account go one at a time: the next one sees this one's intent as money already spent.
        with self.lanes.hold(policy.funding):
            now = self.clock.now()
            outcome, transfer = self._decide(policy, snapshot, no_reading, now, execute, book)
        if transfer is not None:
            self._execute(policy, outcome, transfer)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _decide(self, policy: Policy, snapshot: Snapshot | None, no_reading: str | None, now: datetime,
                execute: bool, book: UsageBook | None = None) -> tuple[TickOutcome, Transfer | None]:
        usage = queries.Usage()
        in_flight = Decimal(0)
        unresolved_anywhere = 0
        needs_broker = snapshot is not None and self.broker is not None and self._needs_broker(policy, snapshot)
        if book is not None and not needs_broker:
            usage = book.usage(now)  # read by this tick a moment ago: an idle tick reads the ledger once
        elif self.ledger is not None:
            with self.ledger.reader() as session:
                # `plan` may read a ledger of an older revision (no change counters): it reads afresh
                usage = (self.summaries.book(session, policy.mt5).usage(now) if execute
                         else queries.usage(session, policy.mt5, now))
                if needs_broker and not usage.unresolved:  # an idle tick reads none of this
                    in_flight = queries.funding_in_flight(session, policy.funding)
                    unresolved_anywhere = queries.unresolved_count(session)
        funding_balance = None
        limits = BrokerLimits()
        broker_error = None
        read_at = now
        if needs_broker and not usage.unresolved:
            assert self.broker is not None
            try:
                read_at = self.clock.now()
                limits, (balance, currency) = self._limits_and_balance(policy)
                if limits.daily_available is not None and unresolved_anywhere:
                    # an unresolved transfer may already count at the broker, or may still: count it as used
                    limits = replace(limits, daily_available=limits.daily_available - unresolved_anywhere)
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
            check = None
            if self.leases is not None and decision.transfers:
                check = self._intent_check(policy, decision, funding_balance, limits, unresolved_anywhere, read_at)
            transfer = self._record(policy, snapshot, outcome, now, check)
        return outcome, transfer

    def _intent_check(self, policy: Policy, decision: Decision, funding_balance: Decimal | None,
                      limits: BrokerLimits, counted: int, read_at: datetime) -> transfers.IntentCheck:
        """Several hosts: the decision was made on a funding balance and a daily count read before the funding
        account's row was locked. Under the lock, count again what other hosts committed since: every unresolved
        top-up from this funding account, and those confirmed since the balance was read (the balance may not
        show them yet), against the reserve; every unresolved transfer and every one confirmed since against
        the daily count (one token, one Deriv user: counted over the whole ledger, never under)."""
        amount = decision.amount or Decimal(0)
        since = read_at - HOST_CLOCK_SKEW
        reserve = policy.limits.funding_reserve or Decimal(0)
        raw_available = None if limits.daily_available is None else limits.daily_available + counted

        def check(session: Any) -> str | None:
            if decision.action == "top_up" and funding_balance is not None:
                spent = (queries.funding_in_flight(session, policy.funding)
                         + queries.funding_confirmed_since(session, policy.funding, since))
                if funding_balance - spent - amount < reserve:
                    return (f"funding account {policy.funding}: other transfers took its money meanwhile "
                            f"(balance {funding_balance}, {spent} in flight or just moved, reserve {reserve}): "
                            "decided again at the next evaluation")
            if raw_available is not None:
                used = queries.unresolved_count(session) + queries.confirmed_since(session, since)
                if raw_available - used < 1:
                    return ("the broker's daily transfer count was used up by other transfers meanwhile: "
                            "decided again at the next evaluation")
            return None

        return check

    def _record(self, policy: Policy, snapshot: Snapshot | None, outcome: TickOutcome,
                now: datetime, check: transfers.IntentCheck | None = None) -> Transfer | None:
        """Commit the intent (if any) together with its decision, the equity peak and a kill-switch halt: one
        transaction, so a top-up costs one commit before `pending -> sent`. A decision without an intent (or
        whose intent was refused) is committed on its own."""
        assert self.ledger is not None
        decision = outcome.decision
        equity = snapshot.equity if snapshot is not None else None
        age = int((now - snapshot.taken_at).total_seconds()) if snapshot is not None else None

        def journal(session: Session, transfer: Transfer | None) -> None:
            if decision.kill_switch and self.fence is not None:
                # first (lock order: the lease row before the audit chain's head, taken at the first flush);
                # raises Fenced: the whole transaction is dropped
                self.fence(session, policy.mt5)
            # the peak and the halt before the decision: the rows of the account first, then the audit chain's head
            # (taken at the decision's flush), the order other writers (resume, reconcile, an intent) take them in
            if snapshot is not None and decision.bound_by not in NOT_A_PEAK:
                queries.note_equity(session, policy.mt5, snapshot.equity, now)
            if decision.kill_switch:
                queries.add_halt(session, policy.mt5, "kill_switch", decision.kill_switch, now, "agent")
                session.flush()
            queries.record_decision(session, now, policy.mt5, policy.name, policy.sha256, decision,
                                    policy.currency, equity, age, transfer_id=transfer.id if transfer else None,
                                    taken_at=snapshot.taken_at if snapshot is not None else None, runs=self.runs)

        if decision.transfers and self.broker is not None and equity is not None:
            assert decision.amount is not None
            try:
                return transfers.create_intent(
                    self.ledger, at=now, account=policy.mt5, funding=policy.funding, kind=decision.action,
                    amount=decision.amount, currency=policy.currency, policy=policy.name,
                    policy_sha256=policy.sha256, equity=equity, reason=decision.reason, owner=self.owner,
                    fence=self.fence, check=check, record=journal)
            except BaseException as exc:
                self.runs.pop(policy.mt5, None)  # the intent's transaction (and its decision) did not commit
                if not isinstance(exc, transfers.AccountBusy | Fenced):
                    raise
                if isinstance(exc, Fenced):
                    outcome.decision = Decision("none", None, f"not sent: {exc}", bound_by="lease",
                                                details=decision.details)
                    return None  # not ours any more: the holder records its own decisions
                decision = Decision("none", None, f"blocked: {exc}", bound_by="unresolved",
                                    details=decision.details)
                outcome.decision = decision
        # a decision that did nothing commits without waiting for the disk; a kill-switch halt does wait
        relaxed = decision.action == "none" and not decision.kill_switch
        with (self.ledger.journal_session() if relaxed else self.ledger.session()) as session:
            try:
                journal(session, None)
                session.commit()
            except Fenced as exc:
                session.rollback()
                self.runs.pop(policy.mt5, None)
                outcome.decision = Decision("none", None, f"not recorded: {exc}", bound_by="lease")
                return None
            except BaseException:
                self.runs.pop(policy.mt5, None)  # what it remembered of the row may not have been committed
                raise
        return None

    def _execute(self, policy: Policy, outcome: TickOutcome, transfer: Transfer) -> None:
        assert self.ledger is not None
        assert self.broker is not None
        may_send = None
        send_fence = None
        if self.leases is not None:
            leases, account, margin = self.leases, policy.mt5, leases_send_margin(self)

            def may_send() -> str | None:
                # a transfer that may still be waiting for its reply when the lease ends is not started
                return None if leases.holds(account, margin) else "this agent's lease on the account ends too soon"

            def send_fence(session: Any, account: str) -> None:
                leases.check(session, account, margin)  # `sent` is committed only with time enough to finish
        done = transfers.execute(self.ledger, self.broker, transfer, self.clock, fence=send_fence,
                                 may_send=may_send)
        if done.state == "unknown" and self.reconciler is not None:
            # The broker may have executed it (e.g. MT5TransferSuspension debits first): look it up now.
            log.warning("%s", self.reconciler.resolve_one(done))
            with self.ledger.session() as session:
                done = session.get(Transfer, done.id) or done
        outcome.transfer = queries.transfer_record(done)
        if done.state == "failed" and done.error_code in NEEDS_OPERATOR:
            # the token or the account set-up is wrong: retrying cannot help; stop and tell a person
            with self.ledger.session() as session:  # a fact from the broker, and a halt only restricts: unfenced
                queries.add_halt(session, policy.mt5, "operator_needed", f"transfer {done.id} refused: "
                                 f"{done.error_code}: {done.error_message}", self.clock.now(), "agent",
                                 scope="all")
                session.commit()
        if done.state == "confirmed":
            apply = getattr(self.source, "apply_transfer", None)
            if apply is not None:
                sign = 1 if done.kind == "top_up" else -1
                apply(policy.mt5, sign * money.from_minor(done.amount_minor, done.currency))
