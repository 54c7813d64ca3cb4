"""`fund-agent demo`: the whole system on the embedded default, offline.

A simulated MT5 account, the Deriv-protocol server on loopback, a temporary SQLite ledger, the example policy
and a fast clock. Every evaluation is printed as it happens; the ledger is printed at the end.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import click

from agent import money, output
from agent.broker.deriv import DerivClient
from agent.broker.fake import FakeDeriv
from agent.engine.tick import Engine, TickOutcome
from agent.equity.simulated import SimulatedSource
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import FastClock, iso, utcnow

DEMO_APP_ID = 1089
START_EQUITY = Decimal("450.00")
FUNDING_BALANCE = Decimal("10000.00")


def example_policy_path() -> Path:
    """The repository's policies/example.yaml; an installed wheel carries the same file as package data."""
    repo_copy = Path(__file__).resolve().parents[1] / "policies" / "example.yaml"
    return repo_copy if repo_copy.exists() else Path(__file__).resolve().parent / "data" / "example.yaml"


def run_demo(seconds: float = 20.0, speed: float = 600.0, seed: int = 7, policy_path: Path | None = None,
             start_equity: Decimal = START_EQUITY, drift: Decimal = Decimal("-25")) -> None:
    path = policy_path or example_policy_path()
    policy = parse_policy(path.read_text("utf-8"), str(path))
    start_equity = money.round_down(start_equity, policy.currency)
    clock = FastClock(utcnow(), speed)
    workdir = Path(tempfile.mkdtemp(prefix="fund-agent-demo-"))
    fake = FakeDeriv(clock)
    fake.add_account(policy.funding, policy.currency, FUNDING_BALANCE)
    fake.add_account(policy.mt5, policy.currency, start_equity, mt5=True)
    token = secrets.token_urlsafe(16)  # lives only in this process: never printed
    fake.add_token(token, policy.funding, ("read", "payments"))
    url = fake.start()
    ledger = Ledger.open(f"sqlite:///{workdir / 'ledger.db'}")
    broker = DerivClient(url, DEMO_APP_ID, token, timeout=5.0)
    source = SimulatedSource(clock, seed=seed, start_equity=start_equity, volatility=Decimal("60"),
                             drift=drift, currency=policy.currency, pnl_sink=fake.adjust)

    def show(outcome: TickOutcome) -> None:
        snap = outcome.snapshot
        equity = f"{snap.equity:>9}" if snap else "     n/a"
        action = outcome.decision.action
        if outcome.transfer:
            t = outcome.transfer
            action = f"{t['kind']} {t['amount']} {t['state']}" + (
                f" (txn {t['broker_txn_id']})" if t["broker_txn_id"] else "")
        click.echo(f"{iso(clock.now())[:19]}  equity {equity}  {action:<34}  {outcome.decision.reason}")

    click.echo(f"fund-agent demo: policy {path.name} on {policy.mt5} (funding {policy.funding}), "
               f"simulated equity, Deriv-protocol server at {url}, ledger {workdir / 'ledger.db'}")
    click.echo(f"virtual clock at {speed:g}x: one real second is {speed / 60:g} minutes; running {seconds:g}s\n")
    engine = Engine(ledger, broker, source, clock, on_outcome=show)
    try:
        broker.connect()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            engine.tick(policy)
            time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        with ledger.session() as session:
            records = [queries.transfer_record(t) for t in queries.list_transfers(session, queries.Filters())]
        click.echo("\nThe ledger:")
        click.echo(output.render(records, "table", ["id", "created_at", "account", "kind", "amount", "currency",
                                                      "state", "broker_txn_id", "equity"]))
        confirmed = sum(1 for r in records if r["state"] == "confirmed")
        click.echo(f"\n{confirmed} confirmed transfer(s). Broker balances now: {policy.funding} "
                   f"{fake.balance_of(policy.funding)} {policy.currency}, {policy.mt5} "
                   f"{fake.balance_of(policy.mt5)} {policy.currency}.")
    finally:
        broker.close()
        ledger.close()
        fake.stop()
