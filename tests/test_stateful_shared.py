"""A stateful property test of several MT5 accounts sharing one funding account.

Concurrent evaluations of every account, a broker that answers slowly and lands second legs late (the MT5 credit
of a deposit, the funding credit of a withdrawal), injected faults, crashes between the phases of a transfer, and
an operator's `reconcile` running beside the service (another owner). The in-memory broker has Deriv's rules, so
a run of many steps takes milliseconds a step.

Invariants after every step: the funding reserve is never breached; no window or cap is exceeded counting
unresolved transfers; nothing is sent twice (each ledger row reached the broker at most once, and no broker
transaction is linked to two rows); whenever nothing is unresolved and no leg is in flight, the ledger equals the
broker's statement row for row. At the end, time runs on until every leg has landed and reconciliation ends it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from conftest import FUNDING, ledger_url
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent import money
from agent.broker.errors import BrokerError
from agent.broker.memory import MemoryBroker
from agent.engine import transfers
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.equity.base import Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.evaluate import evaluate
from agent.policy.load import parse_policy
from agent.timeutil import ManualClock

BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
ACCOUNTS = ("MTR130002534", "MTR130002535", "MTR130002536")
RESERVE = Decimal(1000)
SERVICE = "service-host:100:aaaa"


def policy(login: str, variant: int):
    text = BASE.replace("mt5: MTR130002534", f"mt5: {login}")
    if variant == 1:
        text = text.replace("target_equity: 1000", "target_equity: 1200", 1).replace("cooldown: 30m", "cooldown: 0s", 1)
    return parse_policy(text, f"{login}.yaml")


POLICIES = {(login, v): policy(login, v) for login in ACCOUNTS for v in (0, 1)}
FAULTS = [("mt5_deposit", "lost_after_apply", "ConnectionClosed"), ("mt5_withdrawal", "lost_after_apply", ""),
          ("mt5_deposit", "error_after_apply", "MT5TransferSuspension"),
          ("mt5_withdrawal", "error_after_apply", "MT5WithdrawalError"),
          ("mt5_deposit", "error", "NoMoney"), ("mt5_deposit", "error", "WrongResponse"),
          ("mt5_deposit", "malformed", ""), ("mt5_deposit", "not_sent", ""), ("mt5_deposit", "lost_before_apply", ""),
          ("mt5_deposit", "late_apply", ""), ("balance", "error", "RateLimit")]


class Terminals:
    """Each account's equity is its MT5 balance at the broker (credits land late) plus an open P/L."""

    name = "terminals"

    def __init__(self, clock: ManualClock, broker: MemoryBroker) -> None:
        self.clock = clock
        self.broker = broker
        self.floating = {login: Decimal(-1200) for login in ACCOUNTS}  # every account starts below its floor

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        equity = self.broker.balance_of(mt5_login) + self.floating[mt5_login]
        return Snapshot(login=mt5_login[3:], balance=equity, equity=equity, margin=Decimal(0), margin_free=equity,
                        margin_level=Decimal(0), currency="USD", positions=0, connected=True,
                        taken_at=self.clock.now(), source=self.name)

    def close(self) -> None:
        pass


class SharedFunding(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fund-agent-shared-")
        self.clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
        self.broker = MemoryBroker(self.clock, latency=0.002, daily_transfers=1000)
        self.broker.add_account(FUNDING, "USD", "3000.00")  # two top-ups fit above the reserve, not three
        for login in ACCOUNTS:
            self.broker.add_account(login, "USD", "1500.00", mt5=True)
        self.ledger = Ledger.open(ledger_url(Path(self.dir) / "ledger.db"))
        self.source = Terminals(self.clock, self.broker)
        self.variant = dict.fromkeys(ACCOUNTS, 0)
        self.lowest_funding = self.broker.balance_of(FUNDING)
        self.stats = {"ticks": 0, "concurrent": 0, "crashes": 0, "operator": 0}
        self.start(SERVICE)

    def start(self, owner: str) -> None:
        """The service (re)starts: it holds the lock, so every other owner is gone."""
        self.owner = owner
        self.reconciler = Reconciler(self.ledger, self.broker, self.clock, settle_window=timedelta(minutes=2),
                                     owner=owner)
        self.engine = Engine(self.ledger, self.broker, self.source, self.clock, reconciler=self.reconciler)

    def policies(self):
        return [POLICIES[(login, self.variant[login])] for login in ACCOUNTS]

    def teardown(self) -> None:
        try:
            for _ in range(3):  # time runs on: every late leg lands, reconciliation settles what it can prove
                self.clock.advance(timedelta(days=1))
                self.broker.settle_due()
                self.reconciler.run()
            rows = self.rows()
            if not any(t.state in ("pending", "sent", "unknown") for t in rows):
                self.ledger_equals_statement(rows)
            if os.environ.get("FUND_AGENT_STATEFUL_STATS"):
                states = [t.state for t in rows]
                print(self.stats, {s: states.count(s) for s in sorted(set(states))}, "sent to the broker",
                      len(self.broker.sent), "lowest funding", self.lowest_funding)
        finally:
            self.ledger.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the world ----

    @rule(account=st.sampled_from(ACCOUNTS), pnl=st.sampled_from([-1400, -900, -600, -200, 300, 1800, 3000]))
    def trade(self, account: str, pnl: int) -> None:
        self.source.floating[account] = Decimal(pnl)

    @rule(minutes=st.sampled_from([1, 3, 10, 31, 61, 1440]))
    def advance(self, minutes: int) -> None:
        self.clock.advance(timedelta(minutes=minutes))

    @rule(deposit=st.sampled_from([0, 1, 5]), withdrawal=st.sampled_from([0, 1, 5]))
    def second_legs_late_by(self, deposit: int, withdrawal: int) -> None:
        self.broker.deposit_credit_delay = timedelta(minutes=deposit)
        self.broker.withdrawal_credit_delay = timedelta(minutes=withdrawal)

    @rule(fault=st.sampled_from(FAULTS))
    def inject(self, fault: tuple[str, str, str]) -> None:
        call, mode, code = fault
        self.broker.clear_faults()
        # a late apply lands within the settle window: after it, absence is proof (the operator's setting)
        self.broker.inject(call, mode, code or "WrongResponse", delay=timedelta(minutes=1))

    @rule(account=st.sampled_from(ACCOUNTS), variant=st.sampled_from([0, 1]))
    def edit_policy(self, account: str, variant: int) -> None:
        self.variant[account] = variant

    # ---- the agent and the people beside it ----

    @rule(index=st.integers(0, len(ACCOUNTS) - 1))
    def tick_one(self, index: int) -> None:
        self.stats["ticks"] += 1
        self.engine.tick(self.policies()[index])

    @rule(with_operator=st.booleans())
    def tick_all_at_once(self, with_operator: bool) -> None:
        """The scheduler's thread pool runs every account at once; maybe an operator's `reconcile` too."""
        self.stats["concurrent"] += 1
        jobs = [lambda p=p: self.engine.tick(p) for p in self.policies()]
        if with_operator:
            jobs.append(self.operator_reconcile)
        barrier = threading.Barrier(len(jobs))

        def run(job):
            barrier.wait()
            return job()

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(run, job) for job in jobs]:
                future.result()

    @rule()
    def operator_reconcile(self) -> None:
        """`fund-agent reconcile` in another process: it does not hold the lock, the service does."""
        self.stats["operator"] += 1
        Reconciler(self.ledger, self.broker, self.clock, settle_window=timedelta(minutes=2), owner="operator:1",
                   live_owner=lambda owner: "the service" if owner in (None, self.owner) else None).run()

    @rule(account=st.sampled_from(ACCOUNTS), point=st.sampled_from(["after_intent", "after_sent", "after_send"]))
    def crash_then_restart(self, account: str, point: str) -> None:
        """What a SIGKILL at `point` leaves behind, then a restart (a new owner) that reconciles first."""
        self.stats["crashes"] += 1
        policy = POLICIES[(account, self.variant[account])]
        now = self.clock.now()
        with self.ledger.reader() as session:
            if queries.unresolved(session, account):
                return
            usage = queries.usage(session, account, now)
            in_flight = queries.funding_in_flight(session, FUNDING)
        try:
            balance, _ = self.broker.balance(FUNDING)
        except BrokerError:
            return
        decision = evaluate(policy, self.source.read(account), usage, now, funding_balance=balance,
                            funding_in_flight=in_flight)
        if not decision.transfers:
            return
        try:
            t = transfers.create_intent(self.ledger, at=now, account=account, funding=FUNDING, kind=decision.action,
                                        amount=decision.amount, currency="USD", policy=policy.name,
                                        policy_sha256=policy.sha256, equity=self.source.read(account).equity,
                                        reason=decision.reason, owner=self.owner)
        except transfers.AccountBusy:
            return
        if point != "after_intent":
            transfers.settle(self.ledger, t.id, "sent", now, "agent", expected="pending")
        if point == "after_send":
            try:
                if decision.action == "top_up":
                    self.broker.mt5_deposit(FUNDING, account, decision.amount)
                else:
                    self.broker.mt5_withdrawal(account, FUNDING, decision.amount)
            except BrokerError:
                pass
        self.start(f"service-host:{101 + self.stats['crashes']}:bbbb")
        self.reconciler.run()

    # ---- invariants ----

    def rows(self):
        with self.ledger.reader() as session:
            return queries.list_transfers(session, queries.Filters())

    @invariant()
    def reserve_never_breached(self) -> None:
        balance = self.broker.balance_of(FUNDING)
        self.lowest_funding = min(self.lowest_funding, balance)
        assert balance >= RESERVE, balance

    @invariant()
    def nothing_sent_twice(self) -> None:
        rows = self.rows()
        linked = [t.broker_txn_id for t in rows if t.broker_txn_id is not None]
        assert len(linked) == len(set(linked))
        reached = [t for t in rows if t.sent_at is not None]
        assert len(self.broker.sent) <= len(reached), (len(self.broker.sent), len(reached))
        for t in rows:  # a failed row never moved money: its amount is in no statement row linked to nothing
            assert t.state != "failed" or t.broker_txn_id is None

    @invariant()
    def windows_and_caps_hold(self) -> None:
        now = self.clock.now()
        with self.ledger.reader() as session:
            for login in ACCOUNTS:
                usage = queries.usage(session, login, now)
                for variant in (0, 1):  # a policy edit never lets the windows of either version overflow
                    limits = POLICIES[(login, variant)].limits
                    for kind, kind_limits, kind_usage in (("top_up", limits.top_up, usage.top_up),
                                                          ("sweep", limits.sweep, usage.sweep)):
                        for name, window in kind_limits.windows.items():
                            count, amount = kind_usage.window(name, now)
                            assert window.count is None or count <= window.count, (login, kind, name)
                            assert window.amount is None or amount <= window.amount, (login, kind, name)

    @invariant()
    def summaries_equal_a_fresh_read(self) -> None:
        """Each account's in-memory summary in the engine (re-read only when the account's change counter moved:
        reconcile, another owner, an operator) is what a fresh read of the ledger gives, after every step."""
        now = self.clock.now()
        with self.ledger.reader() as session:
            for login in ACCOUNTS:
                held = self.engine.summaries.book(session, login)
                assert held.usage(now) == queries.usage(session, login, now), login
                assert held.peak == queries.peak_equity(session, login), login

    @invariant()
    def ledger_matches_statement_when_settled(self) -> None:
        rows = self.rows()
        if any(t.state in ("pending", "sent", "unknown") for t in rows) or self.broker.in_flight():
            return
        self.ledger_equals_statement(rows)

    def ledger_equals_statement(self, rows) -> None:
        statement = {r["transaction_id"]: r for r in self.broker.transfers(FUNDING)}
        confirmed = {t.broker_txn_id: t for t in rows if t.state == "confirmed"}
        assert set(statement) == set(confirmed), (sorted(statement), sorted(confirmed))
        for txn, t in confirmed.items():
            amount = money.from_minor(t.amount_minor, "USD")
            assert statement[txn]["amount"] == (-amount if t.kind == "top_up" else amount), txn


TestSharedFunding = SharedFunding.TestCase
TestSharedFunding.settings = settings(max_examples=int(os.environ.get("FUND_AGENT_STATEFUL_EXAMPLES", "25")),
                                      stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
