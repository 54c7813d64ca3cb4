"""Several things at once: accounts sharing one funding account, a broker that applies late, readings that
predate a transfer, a late second leg, the drawdown switch beside sweeps. Real Deriv-protocol server (or the
in-memory broker with the same rules), real SQLite, real threads."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, TOKEN, ledger_url

from agent.broker.deriv import DerivClient
from agent.broker.fake import Fault
from agent.broker.memory import MemoryBroker
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.equity.base import Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import Clock, ManualClock

BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
D = Decimal


def policy_for(mt5: str, **replace: str):
    text = BASE.replace("mt5: MTR130002534", f"mt5: {mt5}")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_policy(text, f"{mt5}.yaml")


class Readings:
    """Equity per MT5 login, read 'now' (each reading newer than anything before it)."""

    name = "readings"

    def __init__(self, clock: Clock, equity: dict[str, str]) -> None:
        self.clock = clock
        self.equity = {login: D(value) for login, value in equity.items()}

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        value = self.equity[mt5_login]
        return Snapshot(login="".join(c for c in mt5_login if c.isdigit()), balance=value, equity=value,
                        margin=D(0), margin_free=value, margin_level=D(0), currency="USD", positions=0,
                        connected=True, taken_at=self.clock.now(), source=self.name)

    def close(self) -> None:
        pass


def rows(ledger: Ledger) -> list[dict]:
    with ledger.reader() as session:
        return [queries.transfer_record(t) for t in queries.list_transfers(session, queries.Filters())]


@pytest.fixture
def ledger(tmp_path):
    opened = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    yield opened
    opened.close()


def test_two_accounts_on_one_funding_account_never_breach_its_reserve(fake, ledger):
    """Both below their floor, both want 550 from a funding account of 1600 with a reserve of 1000; the broker
    replies late, so the two evaluations overlap. The second sees the first's intent as money already spent."""
    other = "MTR130002535"
    fake.add_account(other, "USD", "450.00", mt5=True)
    fake.state.accounts[FUNDING].balance = D("1600.00")
    for _ in range(2):
        fake.inject(Fault("mt5_deposit", "delay_reply", delay=0.5))
    clock = Clock()
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    broker.connect()
    source = Readings(clock, {MT5: "450", other: "450"})
    engine = Engine(ledger, broker, source, clock, reconciler=Reconciler(ledger, broker, clock), owner="test")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = list(pool.map(engine.tick, [policy_for(MT5), policy_for(other)]))
    finally:
        broker.close()
    assert fake.balance_of(FUNDING) >= D("1000.00")
    sent = [r for r in rows(ledger) if r["state"] == "confirmed"]
    assert sum(D(r["amount"]) for r in sent) <= D("600.00")
    bound = {o.decision.bound_by for o in outcomes}
    assert "limits.funding_reserve" in bound, [o.decision.reason for o in outcomes]


def test_many_accounts_concurrent_rounds_on_the_memory_broker(ledger):
    """Eight accounts, one funding account, a broker that credits MT5 late and answers slowly; rounds of
    concurrent evaluations. The reserve holds at every moment and the ledger equals the statement."""
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock, latency=0.01, deposit_credit_delay=timedelta(seconds=5), daily_transfers=100)
    broker.add_account(FUNDING, "USD", "4000.00")
    logins = [f"MTR13000{2534 + i}" for i in range(8)]
    for login in logins:
        broker.add_account(login, "USD", "300.00", mt5=True)
    source = Readings(clock, {login: "300" for login in logins})
    policies = [policy_for(login, **{"cooldown: 30m": "cooldown: 0s"}) for login in logins]
    engine = Engine(ledger, broker, source, clock, reconciler=Reconciler(ledger, broker, clock), owner="test")
    lowest = [broker.balance_of(FUNDING)]
    for _round in range(3):
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(engine.tick, policies))
        lowest.append(broker.balance_of(FUNDING))
        clock.advance(timedelta(seconds=10))  # the MT5 credits land; readings are newer than the top-ups
    assert min(lowest) >= D("1000.00"), lowest
    confirmed = [r for r in rows(ledger) if r["state"] == "confirmed"]
    assert sum(D(r["amount"]) for r in confirmed) == D("4000.00") - broker.balance_of(FUNDING)
    assert len(confirmed) == len(broker.transfers(FUNDING))
    assert not [r for r in rows(ledger) if r["state"] in ("pending", "sent", "unknown")]


def test_a_reading_that_predates_the_last_transfer_does_not_top_up_again(ledger):
    """No cooldown; the reading is not refreshed after the top-up: the second pass waits for a newer one."""
    clock = Clock()
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "450.00", mt5=True)
    policy = policy_for(MT5, **{"cooldown: 30m": "cooldown: 0s"})
    taken = clock.now()

    class OldReading(Readings):
        def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
            snapshot = super().read(mt5_login)
            return Snapshot(**{**snapshot.__dict__, "taken_at": taken})

    engine = Engine(ledger, broker, OldReading(clock, {MT5: "450"}), clock, owner="test")
    assert engine.tick(policy).decision.action == "top_up"
    second = engine.tick(policy)
    assert second.decision.action == "none" and second.decision.bound_by == "reading_predates_transfer"
    assert "waiting for a reading newer than transfer 1" in second.decision.reason
    assert not second.ok
    assert len(broker.transfers(FUNDING)) == 1 and broker.balance_of(MT5) == D("1000.00")


def test_a_withdrawal_whose_funding_credit_is_late_stays_unknown_never_failed(fake, ledger):
    """MT5 is debited, the reply is MT5WithdrawalError, the funding credit comes after the settle window."""
    fake.state.accounts[MT5].balance = D("3500.00")
    fake.inject(Fault("mt5_withdrawal", "late_leg_error", code="MT5WithdrawalError", delay=1.5))
    clock = Clock()
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    broker.connect()
    reconciler = Reconciler(ledger, broker, clock, settle_window=timedelta(0))
    engine = Engine(ledger, broker, Readings(clock, {MT5: "3500"}), clock, reconciler=reconciler, owner="test")
    try:
        outcome = engine.tick(policy_for(MT5))
        [row] = rows(ledger)
        assert row["kind"] == "sweep" and row["state"] == "unknown", row
        assert outcome.transfer["state"] == "unknown"
        with ledger.reader() as session:
            assert [h.kind for h in queries.active_halts(session, MT5)] == ["unresolved"]
        [verdict] = reconciler.run()  # past the settle window, still no credit: a missing row proves nothing
        assert verdict.after == "unknown" and "proves nothing for a withdrawal" in verdict.reason
        assert fake.balance_of(MT5) == D("2000.00")  # MT5 was debited
        time.sleep(1.7)  # the second leg lands
        [verdict] = reconciler.run()
        assert verdict.after == "confirmed", verdict
        with ledger.reader() as session:
            assert queries.active_halts(session, MT5) == []
    finally:
        broker.close()
    [row] = rows(ledger)
    assert row["state"] == "confirmed" and row["broker_txn_id"] == fake.transfers(FUNDING)[0]["transaction_id"]


def test_the_drawdown_switch_does_not_count_the_agents_own_sweeps(ledger):
    """Equity 5800 swept to 5200 is not a 10% drawdown; a 10% trading loss after it is."""
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "5800.00", mt5=True)
    policy = policy_for(MT5, **{"when_equity_above: 3000": "when_equity_above: 5500",
                                "target_equity: 2000": "target_equity: 5200",
                                "equity_drawdown_pct: 60": "equity_drawdown_pct: 10",
                                "min_margin_level: 300": "min_margin_level: 100"})
    source = Readings(clock, {MT5: "5800"})
    engine = Engine(ledger, broker, source, clock, owner="test")
    first = engine.tick(policy)
    assert first.decision.action == "sweep" and first.transfer["state"] == "confirmed"
    assert first.decision.amount == D("600.00")
    source.equity[MT5] = D("5200")
    clock.advance(timedelta(seconds=10))
    after = engine.tick(policy)
    assert after.decision.kill_switch is None and after.decision.bound_by != "halt", after.decision.reason
    source.equity[MT5] = D("4680")  # 10% below 5200: a real trading loss
    clock.advance(timedelta(seconds=10))
    assert engine.tick(policy).decision.kill_switch


def test_top_ups_raise_the_peak_so_they_do_not_hide_a_loss(ledger):
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "700.00", mt5=True)
    policy = policy_for(MT5, **{"equity_drawdown_pct: 60": "equity_drawdown_pct: 50",
                                "cooldown: 30m": "cooldown: 0s"})
    source = Readings(clock, {MT5: "700"})
    engine = Engine(ledger, broker, source, clock, owner="test")
    engine.tick(policy)  # peak 700
    source.equity[MT5] = D("450")
    clock.advance(timedelta(seconds=10))
    assert engine.tick(policy).transfer["state"] == "confirmed"  # top-up 550: the peak is now 1250
    source.equity[MT5] = D("600")
    clock.advance(timedelta(seconds=10))  # 650 lost since the top-up: 52% of 1250; without the shift it looked like 0%
    assert engine.tick(policy).decision.kill_switch


def test_a_transfer_failed_by_someone_else_that_the_statement_shows_moved_halts_the_account(ledger):
    """The service's reconciler finds the row, but an operator's reconcile (or resolve) failed it meanwhile: the
    ledger is not rewritten, and the account stops for a person instead of topping up again."""
    from agent.engine import transfers

    clock = Clock()
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "450.00", mt5=True)
    t = transfers.create_intent(ledger, at=clock.now(), account=MT5, funding=FUNDING, kind="top_up",
                                amount=D("550.00"), currency="USD", policy="p", policy_sha256="0" * 64,
                                equity=D("450"), reason="test", owner="gone")
    t = transfers.settle(ledger, t.id, "sent", clock.now(), "agent", expected="pending")
    t = transfers.settle(ledger, t.id, "unknown", clock.now(), "agent", expected="sent")
    broker.mt5_deposit(FUNDING, MT5, D("550.00"))  # it did move
    transfers.settle(ledger, t.id, "failed", clock.now(), "operator:x", expected="unknown")  # someone says not
    verdict = Reconciler(ledger, broker, clock).resolve_one(t)  # still holding the row as it was: unknown
    assert verdict.after == "failed" and "someone else" in verdict.reason
    with ledger.reader() as session:
        [halt] = queries.active_halts(session, MT5)
    assert halt.kind == "operator_needed" and halt.scope == "all" and "money moved" in halt.reason
