"""A stateful property test over equity moves, ticks, broker faults, crashes and policy edits.

Invariants after every step: no broker transfer is linked to two ledger rows; when nothing is unresolved the
ledger's confirmed sums equal the broker's statement sums; no window or cap is exceeded counting unresolved
transfers; the funding reserve holds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from conftest import FUNDING, MT5, TOKEN, FixedSource, ledger_url
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent import money
from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError
from agent.broker.fake import FakeDeriv, Fault
from agent.engine import transfers
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import ManualClock

BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
VARIANTS = [parse_policy(BASE, "a.yaml"),
            parse_policy(BASE.replace("target_equity: 1000", "target_equity: 1200", 1)
                         .replace("cooldown: 30m", "cooldown: 5m", 1), "b.yaml")]
RESERVE = Decimal(1000)
FAULTS = [Fault("mt5_deposit", "drop_after_apply"), Fault("mt5_withdrawal", "drop_after_apply"),
          Fault("mt5_deposit", "error_after_apply", code="MT5TransferSuspension"),
          Fault("mt5_withdrawal", "error_after_apply", code="MT5WithdrawalError"),
          Fault("mt5_deposit", "error", code="WrongResponse"), Fault("mt5_deposit", "error", code="NoMoney"),
          Fault("mt5_deposit", "malformed"), Fault("mt5_deposit", "drop_before_apply")]


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fund-agent-stateful-")
        self.clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
        self.fake = FakeDeriv(self.clock, max_transfer=Decimal(2500), daily_transfers=100)
        self.fake.add_account(FUNDING, "USD", "8000.00")
        self.fake.add_account(MT5, "USD", "1500.00", mt5=True)
        self.fake.add_token(TOKEN, FUNDING)
        self.fake.start()
        self.ledger = Ledger.open(ledger_url(Path(self.dir) / "ledger.db"))
        self.broker = DerivClient(self.fake.url, 1089, TOKEN, timeout=2)
        self.source = FixedSource(self.clock)
        self.policy = VARIANTS[0]
        self.evaluations = 0
        self.restart()

    def restart(self) -> None:
        self.reconciler = Reconciler(self.ledger, self.broker, self.clock, settle_window=timedelta(minutes=2))
        self.engine = Engine(self.ledger, self.broker, self.source, self.clock, reconciler=self.reconciler)

    def teardown(self) -> None:
        if os.environ.get("FUND_AGENT_STATEFUL_STATS"):
            print("transfers:", [t.state for t in self.rows()], "at the broker:", len(self.fake.transfers(FUNDING)))
        self.broker.close()
        self.ledger.close()
        self.fake.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(equity=st.sampled_from([-200, 300, 450, 499, 1500, 3001, 3500, 5200]) | st.integers(-500, 6000))
    def move_equity(self, equity: int) -> None:
        self.source.equity = Decimal(equity)

    @rule(equity=st.sampled_from([300, 450, 3500, 5200]))
    def move_equity_and_tick(self, equity: int) -> None:
        self.source.equity = Decimal(equity)
        self.engine.tick(self.policy)
        self.evaluations += 1

    @rule(minutes=st.sampled_from([1, 3, 10, 31, 61, 240, 1440]))
    def advance(self, minutes: int) -> None:
        self.clock.advance(timedelta(minutes=minutes))

    @rule()
    def tick(self) -> None:
        self.engine.tick(self.policy)
        self.evaluations += 1

    @rule(fault=st.sampled_from(FAULTS))
    def inject(self, fault: Fault) -> None:
        self.fake.faults.clear()
        self.fake.inject(Fault(fault.call, fault.mode, fault.code))

    @rule(variant=st.sampled_from([0, 1]))
    def edit_policy(self, variant: int) -> None:
        self.policy = VARIANTS[variant]

    @precondition(lambda self: self.source.equity < self.policy.top_up.when_equity_below)
    @rule(point=st.sampled_from(["after_intent", "after_sent", "after_send"]))
    def crash_then_restart(self, point: str) -> None:
        """What a SIGKILL at `point` leaves behind, then a restart that reconciles before anything else."""
        with self.ledger.session() as session:
            if queries.unresolved(session, MT5) or queries.active_halts(session, MT5):
                return
            usage = queries.usage(session, MT5, self.clock.now())
        from agent.policy.evaluate import evaluate

        balance, _ = self.broker.balance(FUNDING)
        decision = evaluate(self.policy, self.source.read(MT5), usage, self.clock.now(), funding_balance=balance)
        if not decision.transfers:
            return
        t = transfers.create_intent(self.ledger, at=self.clock.now(), account=MT5, funding=FUNDING,
                                    kind=decision.action, amount=decision.amount, currency="USD",
                                    policy=self.policy.name, policy_sha256=self.policy.sha256,
                                    equity=self.source.equity, reason=decision.reason)
        if point != "after_intent":
            transfers.settle(self.ledger, t.id, "sent", self.clock.now(), "agent")
        if point == "after_send":
            try:
                if decision.action == "top_up":
                    self.broker.mt5_deposit(FUNDING, MT5, decision.amount)
                else:
                    self.broker.mt5_withdrawal(MT5, FUNDING, decision.amount)
            except BrokerError:
                pass
        self.restart()
        self.reconciler.run()

    @rule()
    def operator_reconcile(self) -> None:
        self.reconciler.run()

    # ---- invariants ----

    def rows(self):
        with self.ledger.session() as session:
            return queries.list_transfers(session, queries.Filters())

    @invariant()
    def no_broker_transfer_linked_twice(self) -> None:
        linked = [t.broker_txn_id for t in self.rows() if t.broker_txn_id is not None]
        assert len(linked) == len(set(linked))
        statement_ids = {r["transaction_id"] for r in self.fake.transfers(FUNDING)}
        assert set(linked) <= statement_ids

    @invariant()
    def confirmed_sums_match_the_statement_when_nothing_is_open(self) -> None:
        rows = self.rows()
        if any(t.state in ("pending", "sent", "unknown") for t in rows):
            return
        ledger_net = sum((money.from_minor(t.amount_minor, "USD") * (-1 if t.kind == "top_up" else 1)
                          for t in rows if t.state == "confirmed"), Decimal(0))
        broker_net = sum((r["amount"] for r in self.fake.transfers(FUNDING)), Decimal(0))
        assert ledger_net == broker_net

    @invariant()
    def windows_and_caps_hold_counting_unresolved(self) -> None:
        now = self.clock.now()
        with self.ledger.session() as session:
            usage = queries.usage(session, MT5, now)
        for kind, limits, kind_usage in (("top_up", self.policy.limits.top_up, usage.top_up),
                                         ("sweep", self.policy.limits.sweep, usage.sweep)):
            for name, window in limits.windows.items():
                count, amount = kind_usage.window(name, now)
                assert window.count is None or count <= window.count, (kind, name)
                assert window.amount is None or amount <= window.amount, (kind, name)
        for t in self.rows():
            assert money.from_minor(t.amount_minor, "USD") <= max(v.top_up.max_amount if t.kind == "top_up"
                                                                  else v.sweep.max_amount for v in VARIANTS)

    @invariant()
    def reserve_holds(self) -> None:
        assert self.fake.balance_of(FUNDING) >= RESERVE

    @invariant()
    def summary_equals_a_fresh_read(self) -> None:
        """The engine's in-memory summary (kept while the account's change counter has not moved) is what a fresh
        read of the ledger gives, after every step."""
        now = self.clock.now()
        with self.ledger.reader() as session:
            held = self.engine.summaries.book(session, MT5)
            assert held.usage(now) == queries.usage(session, MT5, now)
            assert held.peak == queries.peak_equity(session, MT5)

    @invariant()
    def every_evaluation_is_in_the_journal(self) -> None:
        """Runs of repeated no-op evaluations are one row each, but every evaluation is there, once."""
        with self.ledger.reader() as session:
            rows = queries.list_decisions(session, queries.Filters())
            records = queries.decision_records(rows, queries.Filters())
        assert len(records) == sum(row.run_count for row in rows) == self.evaluations


TestTransfers = Machine.TestCase
TestTransfers.settings = settings(max_examples=30, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
