"""Account leases with fencing across agents that share one ledger: claims, renewals, expiry, takeover, fenced
writes, the last check before a frame leaves, and caps that hold across hosts. Each `host` here is its own
Engine, Leases, Lanes and owner id on one ledger (a real SQLite file, or PostgreSQL when the suite runs there)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, ledger_url
from test_shared_funding import Readings, policy_for, rows

from agent.broker.memory import MemoryBroker
from agent.engine import transfers
from agent.engine.lanes import Lanes
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger import leases as leases_mod
from agent.ledger.db import Ledger
from agent.ledger.leases import Fenced, Leases
from agent.timeutil import ManualClock

D = Decimal
OTHER = "MTR130002999"


class Mono:
    """A monotonic clock the test moves (a frozen host's clock keeps running: so does this one)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def mono() -> Mono:
    return Mono()


@pytest.fixture
def ledger(tmp_path):
    opened = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    yield opened
    opened.close()


def host(ledger, name: str, mono: Mono, ttl: float = 10.0) -> Leases:
    return Leases(ledger, f"{name}:1:x", name, ttl=ttl, renew_every=2.0, monotonic=mono)


def world() -> tuple[ManualClock, MemoryBroker]:
    """A clock and an in-memory broker with the funding account (10000) and MT5 (450)."""
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "450.00", mt5=True)
    return clock, broker


def expire(ledger, account: str) -> None:
    """The database's clock passes the lease's end (the test cannot wait ttl seconds of real time)."""
    from sqlalchemy import update

    from agent.ledger.models import AccountLease, AgentHost

    with ledger.session() as session:
        past = datetime.now(UTC) - timedelta(hours=1)
        session.execute(update(AccountLease).where(AccountLease.account == account).values(expires_at=past))
        session.execute(update(AgentHost).values(seen_at=past))
        session.commit()


def test_one_holder_per_account_and_takeover_after_expiry(ledger, mono):
    a, b = host(ledger, "vps-a", mono), host(ledger, "vps-b", mono)
    claimed, _ = a.sync([MT5, OTHER])
    assert claimed == {MT5, OTHER} and a.holds(MT5)
    claimed, _ = b.sync([MT5, OTHER])
    assert claimed == set() and not b.holds(MT5)
    a.sync([MT5, OTHER])  # renewal keeps them
    assert a.holds(MT5, margin=5)
    expire(ledger, MT5)  # a froze: its lease on MT5 ran out
    claimed, _ = b.sync([MT5, OTHER])
    assert claimed == {MT5}
    with ledger.reader() as session:
        info = leases_mod.holders(session)
    assert info[MT5].holder == b.holder and info[MT5].token == 2 and info[OTHER].holder == a.holder
    _, lost = a.sync([MT5, OTHER])  # a wakes up: told at once that MT5 is gone
    assert lost == {MT5} and not a.holds(MT5) and a.holds(OTHER)


def test_a_host_that_cannot_renew_stops_acting_locally(ledger, mono):
    a = host(ledger, "vps-a", mono, ttl=10)
    a.sync([MT5])
    assert a.holds(MT5, margin=5)
    mono.t += 6  # no renewal for 6 s: less than 5 s left
    assert a.holds(MT5) and not a.holds(MT5, margin=5)
    mono.t += 5
    assert not a.holds(MT5)


def test_a_fenced_host_writes_nothing_and_sends_nothing(ledger, mono):
    """a made an intent, froze past its lease; b took the account over. a wakes up: its pending -> sent is refused
    by the fence, so it never sends; b fails the intent as never sent and evaluates afresh."""
    clock, broker = world()
    a, b = host(ledger, "vps-a", mono), host(ledger, "vps-b", mono)
    a.sync([MT5])
    intent = transfers.create_intent(ledger, at=clock.now(), account=MT5, funding=FUNDING, kind="top_up",
                                     amount=D("550.00"), currency="USD", policy="p", policy_sha256="0" * 64,
                                     equity=D("450"), reason="test", owner=a.holder, fence=a.check)
    expire(ledger, MT5)
    b.sync([MT5])
    done = transfers.execute(ledger, broker, intent, clock, fence=a.check)
    assert done.state == "pending" and broker.sent == []
    assert a.fenced_writes == 1
    reconciler_b = Reconciler(ledger, broker, clock, owner=b.holder, fence=b.check, lease_holds=b.holds)
    [verdict] = reconciler_b.run(MT5)
    assert verdict.after == "failed" and "never sent" in verdict.reason
    with pytest.raises(Fenced):
        with ledger.session() as session:
            a.check(session, MT5)


def test_a_reply_that_arrives_after_the_lease_moved_is_not_recorded_by_the_old_holder(ledger, mono):
    clock, broker = world()
    a, b = host(ledger, "vps-a", mono), host(ledger, "vps-b", mono)
    a.sync([MT5])
    intent = transfers.create_intent(ledger, at=clock.now(), account=MT5, funding=FUNDING, kind="top_up",
                                     amount=D("550.00"), currency="USD", policy="p", policy_sha256="0" * 64,
                                     equity=D("450"), reason="test", owner=a.holder, fence=a.check)
    transfers.settle(ledger, intent.id, "sent", clock.now(), "agent", expected="pending", fence=a.check)
    broker.mt5_deposit(FUNDING, MT5, D("550.00"))  # the frame left and executed; a froze before the reply
    expire(ledger, MT5)
    b.sync([MT5])
    with pytest.raises(Fenced):
        transfers.settle(ledger, intent.id, "confirmed", clock.now(), "agent", expected="sent",
                         broker_txn_id=1, fence=a.check)
    reconciler_b = Reconciler(ledger, broker, clock, owner=b.holder, fence=b.check, lease_holds=b.holds)
    [verdict] = reconciler_b.run(MT5)
    assert verdict.after == "confirmed", verdict
    [row] = rows(ledger)
    assert row["state"] == "confirmed" and row["broker_txn_id"] == broker.transfers(FUNDING)[0]["transaction_id"]


def test_no_frame_leaves_when_the_lease_ends_too_soon(ledger, mono):
    clock, broker = world()
    a = host(ledger, "vps-a", mono, ttl=10)
    a.sync([MT5])
    engine = Engine(ledger, broker, Readings(clock, {MT5: "450"}), clock, owner=a.holder, leases=a,
                    lease_margin=3)
    mono.t += 6.5  # 3.5 s left: enough to decide (margin 3), not to send (the guard wants the broker timeout + 1)
    outcome = engine.tick(policy_for(MT5))
    assert broker.sent == []
    assert outcome.transfer is not None and outcome.transfer["state"] == "failed"
    assert outcome.transfer["error_code"] == "NotSent"


def test_an_account_held_elsewhere_is_not_evaluated_and_nothing_is_written(ledger, mono):
    clock, broker = world()
    a, b = host(ledger, "vps-a", mono), host(ledger, "vps-b", mono)
    a.sync([MT5])
    b.sync([MT5])
    engine_b = Engine(ledger, broker, Readings(clock, {MT5: "450"}), clock, owner=b.holder, leases=b,
                      lease_margin=1)
    outcome = engine_b.tick(policy_for(MT5))
    assert outcome.decision.bound_by == "lease" and not outcome.ok
    assert rows(ledger) == [] and broker.sent == []


def test_the_reserve_holds_across_hosts_that_decided_on_the_same_balance(ledger, mono):
    """Two hosts, two accounts, one funding account with room for one top-up above its reserve. Both read the
    funding balance before either commits (separate lanes: separate processes); the intent transaction of the
    second, under the funding row's lock, sees the first one's intent and refuses."""
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "1600.00")
    broker.add_account(MT5, "USD", "450.00", mt5=True)
    broker.add_account(OTHER, "USD", "450.00", mt5=True)
    a, b = host(ledger, "vps-a", mono), host(ledger, "vps-b", mono)
    a.sync([MT5])
    b.sync([OTHER])
    assert a.holds(MT5) and b.holds(OTHER)
    source = Readings(clock, {MT5: "450", OTHER: "450"})
    engine_a = Engine(ledger, broker, source, clock, owner=a.holder, leases=a, lanes=Lanes(), lease_margin=1)
    engine_b = Engine(ledger, broker, source, clock, owner=b.holder, leases=b, lanes=Lanes(), lease_margin=1)
    policy_a, policy_b = policy_for(MT5), policy_for(OTHER)  # funding_reserve: 1000

    # b reads the balance (1600) first, then a decides, commits, sends and confirms; then b commits its intent.
    real_balance = broker.balance
    reads = []

    def balance_then_let_a_go(loginid=None):
        value = real_balance(loginid)
        if not reads:
            reads.append(value)
            assert engine_a.tick(policy_a).transfer["state"] == "confirmed"
        return value

    broker.balance = balance_then_let_a_go  # type: ignore[method-assign]
    outcome_b = engine_b.tick(policy_b)
    assert outcome_b.transfer is None, outcome_b.decision.reason
    assert "other transfers took its money meanwhile" in outcome_b.decision.reason
    assert broker.balance_of(FUNDING) >= D("1000.00")
    assert len(broker.transfers(FUNDING)) == 1


def test_a_host_frozen_between_its_last_check_and_the_send_is_never_failed_under_it(ledger, mono):
    """a passes every check, then freezes just before its frame leaves; its lease runs out and b takes the
    account. b must not fail a's `sent` top-up by its absence (a may still send it when it wakes), so b sends
    nothing new; a wakes, sends, and the reply confirms the row (a broker fact, recorded without the fence)."""
    from sqlalchemy import update

    from agent.broker.base import check_send_guard, send_guard
    from agent.ledger.models import AccountLease

    clock, broker = world()
    a, b = host(ledger, "vps-a", mono, ttl=40), host(ledger, "vps-b", mono, ttl=40)
    a.sync([MT5])
    policy = policy_for(MT5, **{"cooldown: 30m": "cooldown: 0s"})
    source = Readings(clock, {MT5: "450"})

    def foreign(owner):
        return leases_mod.foreign_send_possible(ledger, owner, ttl=40, idle_close=120)

    engine_b = Engine(ledger, broker, source, clock, owner=b.holder, leases=b, lease_margin=16,
                      reconciler=Reconciler(ledger, broker, clock, timedelta(minutes=2), owner=b.holder,
                                            fence=b.check, lease_holds=b.holds, foreign_send=foreign))

    class FreezesAfterGuard:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def mt5_deposit(self, frm, to, amount, timeout=None):
            check_send_guard("mt5_deposit")
            mono.t += 300  # frozen for 5 minutes, right before the frame leaves
            clock.advance(timedelta(minutes=3))
            with ledger.session() as session:
                session.execute(update(AccountLease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
                session.commit()
            b.sync([MT5])
            import agent.engine.reconcile as reconcile_mod

            real, reconcile_mod.in_flight_here = reconcile_mod.in_flight_here, lambda _id: False  # b: another process
            try:
                outcome = engine_b.tick(policy)
            finally:
                reconcile_mod.in_flight_here = real
            assert outcome.transfer is None, outcome.decision.reason
            with send_guard(None):
                return self.real.mt5_deposit(frm, to, amount, timeout)

    engine_a = Engine(ledger, FreezesAfterGuard(broker), source, clock, owner=a.holder, leases=a, lease_margin=16)
    engine_a.tick(policy)
    assert len(broker.transfers(FUNDING)) == 1
    [row] = rows(ledger)
    assert row["state"] == "confirmed", row


def test_a_host_whose_clock_is_off_acts_on_nothing(ledger, mono, monkeypatch):
    a = host(ledger, "vps-a", mono)
    real = leases_mod.db_now
    monkeypatch.setattr(leases_mod, "db_now", lambda session: real(session) + timedelta(seconds=3))
    with pytest.raises(leases_mod.ClockSkew):
        a.sync([MT5])
    assert not a.holds(MT5)
    monkeypatch.setattr(leases_mod, "db_now", real)
    a.sync([MT5])
    assert a.holds(MT5)
