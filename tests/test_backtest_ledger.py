"""Record a real ledger (the engine, the Deriv-protocol fake, SQLite) on a virtual clock, then replay it with
its own policy: the backtest must make exactly the transfers that really happened, at the same times."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, REPO, TOKEN, ledger_url, run_cli
from sqlalchemy import select

from agent.backtest.replay import Replay
from agent.backtest.sources import read_ledger
from agent.broker.deriv import DerivClient
from agent.broker.fake import FakeDeriv
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.equity.base import Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import Halt
from agent.policy.load import load_policy_file, parse_policy
from agent.timeutil import Clock, ManualClock, iso

D = Decimal
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def trading(minute: int) -> Decimal:
    """A trading path (P/L only, no transfers): down, a long profit run, a crash, a recovery."""
    if minute < 60:
        return D(900) - 20 * minute  # 900 -> -280: two top-ups, 30 minutes apart
    if minute < 180:
        return D(-300) + 45 * (minute - 60)  # a profit run: +5400, two sweeps an hour apart
    if minute < 220:
        return D(5100) - 40 * (minute - 180)  # a loss: -1600
    return D(3500) + 10 * (minute - 220)


class Account:
    """Equity = the trading path + every transfer the engine confirmed (apply_transfer), read 'now'."""

    name = "path"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.moved = D(0)
        self.rng = random.Random(14)

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        minute = int((self.clock.now() - START).total_seconds() // 60)
        equity = trading(minute) + self.moved
        # written by the terminal a moment before the agent reads it, as an EA file is
        taken = self.clock.now() - timedelta(milliseconds=self.rng.randint(0, 4000))
        return Snapshot(login="130002534", balance=equity, equity=equity, margin=D(0), margin_free=equity,
                        margin_level=D(0), currency="USD", positions=0, connected=True, taken_at=taken,
                        source=self.name)

    def apply_transfer(self, mt5_login: str, delta: Decimal) -> None:
        self.moved += delta

    def close(self) -> None:
        pass


@pytest.fixture
def recorded(tmp_path: Path):
    clock = ManualClock(START)
    fake = FakeDeriv(clock)
    fake.add_account(FUNDING, "USD", "10000.00")
    fake.add_account(MT5, "USD", "100000.00", mt5=True)  # the fake only needs room for the sweeps
    fake.add_token(TOKEN, FUNDING, ("read", "payments"))
    fake.start()
    url = ledger_url(tmp_path / "ledger.db")
    ledger = Ledger.open(url)
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    broker.connect()
    policy = load_policy_file(REPO / "policies" / "example.yaml")
    engine = Engine(ledger, broker, Account(clock), clock, reconciler=Reconciler(ledger, broker, clock),
                    owner="test")
    try:
        jitter = random.Random(7)
        for _ in range(300):
            engine.tick(policy)
            # a scheduler is never exact: the next evaluation comes 60 s later, give or take a little
            clock.advance(timedelta(seconds=60, milliseconds=jitter.randint(-1500, 1500)))
    finally:
        broker.close()
        fake.stop()
    with ledger.reader() as session:
        transfers = [queries.transfer_record(t) for t in queries.list_transfers(session, queries.Filters())]
        trips = [iso(h.created_at) for h in session.scalars(select(Halt).where(Halt.kind == "kill_switch"))]
    ledger.close()
    yield url, policy, transfers, trips


def test_replaying_a_recorded_ledger_with_its_own_policy_reproduces_its_transfers(recorded):
    url, policy, transfers, trips = recorded
    assert {t["state"] for t in transfers} == {"confirmed"}
    kinds = [t["kind"] for t in transfers]
    assert kinds == ["top_up", "sweep", "sweep"]  # then the sweeps' cooldown; the second fall trips the switch
    assert len(trips) == 1  # the drawdown switch (the peak moved by the top-up: trading losses only)
    history = read_ledger(url, MT5)
    assert len(history.readings) == 300 and len(history.transfers) == len(transfers)
    result = Replay(policy, history, funding_balance=D("10000.00")).run()
    assert [(iso(t.time), t.kind, f"{t.amount:.2f}", t.reason) for t in result.transfers] == [
        (t["created_at"], t["kind"], t["amount"], t["reason"]) for t in transfers]
    # with the transfers swapped for identical ones, the simulated equity is the recorded equity
    assert all(t.equity == D(r["equity"]) for t, r in zip(result.transfers, transfers, strict=True))
    assert result.fell_to_zero is None


def test_the_cli_replays_the_ledger_read_only(recorded, tmp_path: Path):
    url, policy, transfers, _ = recorded
    if not url.startswith("sqlite:///"):
        pytest.skip("the CLI check reads a SQLite file")
    db = Path(url.removeprefix("sqlite:///"))
    (tmp_path / "fund-agent.yaml").write_text(
        f"database: sqlite:///{db}\npolicies: {REPO / 'policies' / 'example.yaml'}\n"
        "broker:\n  url: ws://127.0.0.1:1\n  app_id: 1089\n  token_env: DERIV_API_TOKEN\n"
        "equity:\n  source: simulated\n")
    before = db.read_bytes()
    result = run_cli("backtest", str(REPO / "policies" / "example.yaml"), "--equity", f"ledger:{MT5}",
                     "--funding-balance", "10000", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)
    assert [(t["time"], t["kind"], t["amount"]) for t in obj["transfers"]] == [
        (t["created_at"], t["kind"], t["amount"]) for t in transfers]
    assert db.read_bytes() == before  # opened read-only: not a byte written


def test_another_policy_replays_the_ledger_on_its_own_schedule_with_the_readings_held(recorded):
    url, policy, transfers, _ = recorded
    other = parse_policy((REPO / "policies" / "example.yaml").read_text().replace("every: 60s", "every: 5m")
                         .replace("cooldown: 30m", "cooldown: 2h"), "other.yaml")
    result = Replay(other, read_ledger(url, MT5), funding_balance=D("10000.00")).run()
    assert result.stale_ticks == 0  # the recording's jitter does not make its readings look stale
    assert result.ticks == 60  # 300 minutes, every 5 minutes
    assert [t.kind for t in result.transfers][:1] == ["top_up"]
