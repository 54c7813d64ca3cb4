"""Broker faults: each ends in the outcome it proves, and nothing is ever resent."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, TOKEN, FixedSource, ledger_url

from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError
from agent.broker.fake import Fault
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import Clock

POLICY = parse_policy((Path(__file__).parent / "policies" / "good" / "base.yaml").read_text(), "base.yaml")


@pytest.fixture
def rig(tmp_path, fake):
    clock = Clock()
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=0.5)
    broker.connect()

    def make(settle: float = 0.0, equity: str = "450.00") -> Engine:
        reconciler = Reconciler(ledger, broker, clock, settle_window=timedelta(seconds=settle))
        return Engine(ledger, broker, FixedSource(clock, equity), clock, reconciler=reconciler)

    yield make, ledger
    broker.close()
    ledger.close()


def transfers(ledger):
    with ledger.session() as s:
        return [queries.transfer_record(t) for t in queries.list_transfers(s, queries.Filters())]


@pytest.mark.parametrize("fault", [
    Fault("mt5_deposit", "drop_after_apply"),
    Fault("mt5_deposit", "error_after_apply", code="WrongResponse"),
    Fault("mt5_deposit", "error_after_apply", code="MT5TransferSuspension"),
    Fault("mt5_deposit", "malformed"),
    # 0.7 s: past the client's 0.5 s timeout, yet the fake (one message at a time per connection) answers the
    # reconciler's statement request well within its own 0.5 s (1.0 s raced it on a loaded machine)
    Fault("mt5_deposit", "delay_reply", delay=0.7),
], ids=lambda f: f"{f.mode}-{f.code}")
def test_applied_but_unproven_is_unknown_then_confirmed_from_the_statement(rig, fake, fault):
    make, ledger = rig
    fake.inject(fault)
    outcome = make(settle=60).tick(POLICY)
    [row] = transfers(ledger)
    assert row["state"] == "confirmed" and row["resolved_by"] == "reconcile"
    assert row["broker_txn_id"] == fake.transfers(FUNDING)[0]["transaction_id"]
    assert row["error_code"] is None or row["error_code"] in (fault.code, "ConnectionClosed", "Timeout",
                                                             "MalformedReply")
    assert outcome.transfer["state"] == "confirmed"
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1


@pytest.mark.parametrize("code", ["MT5DepositError", "NoMoney", "RateLimit", "PermissionDenied"])
def test_errors_that_prove_nothing_moved_fail_at_once(rig, fake, code):
    make, ledger = rig
    fake.inject(Fault("mt5_deposit", "error", code=code))
    make().tick(POLICY)
    [row] = transfers(ledger)
    assert (row["state"], row["error_code"]) == ("failed", code)
    assert fake.transfers(FUNDING) == []


def test_may_have_moved_error_without_a_trace_stays_unknown_then_fails_after_the_settle_window(rig, fake):
    make, ledger = rig
    fake.inject(Fault("mt5_deposit", "error", code="WrongResponse"))  # nothing applied, but nothing proven
    engine = make(settle=1.0)
    engine.tick(POLICY)
    [row] = transfers(ledger)
    assert row["state"] == "unknown" and row["error_code"] == "WrongResponse"
    blocked = engine.tick(POLICY)  # still inside the settle window: blocked, never resent
    assert blocked.decision.bound_by == "unresolved"
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1
    time.sleep(1.1)
    after = engine.tick(POLICY)  # reconciles (proven absent, funding consistent), then backs off a minute
    assert [r["state"] for r in transfers(ledger)] == ["failed"]
    assert after.decision.bound_by == "failure_backoff", after.decision.reason
    assert fake.transfers(FUNDING) == []


def test_late_apply_after_a_timeout_is_found_not_duplicated(rig, fake):
    make, ledger = rig
    fake.inject(Fault("mt5_deposit", "late_apply", delay=1.0))
    engine = make(settle=5.0)
    engine.tick(POLICY)
    assert transfers(ledger)[0]["state"] == "unknown"
    time.sleep(1.3)
    engine.tick(POLICY)
    rows = transfers(ledger)
    assert [r["state"] for r in rows] == ["confirmed"]
    assert len(fake.transfers(FUNDING)) == 1


def test_a_statement_with_two_matching_rows_halts_the_account(rig, fake):
    make, ledger = rig
    other = DerivClient(fake.url, 1089, TOKEN, timeout=2)
    other.mt5_deposit(FUNDING, MT5, Decimal("550.00"))  # a twin made by someone else, same app
    fake.inject(Fault("mt5_deposit", "drop_after_apply"))
    make(settle=60).tick(POLICY)
    other.close()
    [row] = transfers(ledger)
    assert row["state"] == "unknown"
    with ledger.session() as s:
        halts = queries.active_halts(s, MT5)
    assert halts and halts[0].kind == "unresolved" and "several broker transfers match" in halts[0].reason


def test_inconsistent_funding_balance_keeps_it_unknown(rig, fake):
    make, ledger = rig
    fake.inject(Fault("mt5_deposit", "error", code="WrongResponse"))
    engine = make(settle=0)
    with fake.lock:  # money left the funding account without a statement row: never conclude "failed"
        fake.state.accounts[FUNDING].balance -= Decimal("550.00")
    fake.state.statement.setdefault(FUNDING, []).append({
        "action_type": "deposit", "amount": Decimal("1.00"), "balance_after": Decimal("10000.00"),
        "transaction_id": 1, "transaction_time": int(time.time()) - 10, "app_id": 1})
    engine.tick(POLICY)
    [row] = transfers(ledger)
    assert row["state"] == "unknown"


def test_out_of_order_replies_are_matched_by_req_id(fake):
    client = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    client.connect()
    fake.inject(Fault("balance", "delay_reply", delay=0.5))
    results: dict[str, object] = {}
    slow = threading.Thread(target=lambda: results.setdefault("slow", client.balance(FUNDING)))
    slow.start()
    time.sleep(0.1)
    results["fast"] = client.get_limits()  # answered while the balance reply is still held back
    slow.join()
    assert results["slow"] == (Decimal("10000.00"), "USD")
    assert results["fast"]["daily_transfers"]["mt5"]["allowed"] == 6
    client.close()


def test_idle_connection_closed_by_the_server_is_reopened(fake):
    fake.idle_timeout = 0.3
    client = DerivClient(fake.url, 1089, TOKEN, timeout=2)
    client.connect()
    time.sleep(0.8)
    assert client.balance(FUNDING)[0] == Decimal("10000.00")
    assert client.reconnects >= 1
    client.close()


def test_rate_limit_is_a_plain_error(fake):
    client = DerivClient(fake.url, 1089, TOKEN, timeout=2)
    fake.inject(Fault("balance", "error", code="RateLimit"))
    with pytest.raises(BrokerError) as info:
        client.balance(FUNDING)
    assert info.value.code == "RateLimit" and info.value.nothing_moved
    assert client.balance(FUNDING)[0] == Decimal("10000.00")
    client.close()


def test_a_refusal_that_needs_an_operator_halts_the_account(rig, fake):
    make, ledger = rig
    fake.inject(Fault("mt5_deposit", "error", code="PermissionDenied"))
    engine = make()
    engine.tick(POLICY)
    again = engine.tick(POLICY)
    assert again.decision.bound_by == "halt" and "PermissionDenied" in again.decision.reason
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1


def test_a_persistent_error_backs_off_instead_of_retrying_every_tick(rig, fake):
    make, ledger = rig
    for _ in range(3):
        fake.inject(Fault("mt5_deposit", "error", code="NoMoney"))
    engine = make()
    outcomes = [engine.tick(POLICY) for _ in range(3)]
    assert outcomes[1].decision.bound_by == "failure_backoff"
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1


def test_a_broker_that_refuses_the_limit_calls_still_gets_the_transfer(rig, fake):
    make, ledger = rig
    fake.inject(Fault("website_status", "error", code="UnrecognisedRequest"))
    fake.inject(Fault("get_limits", "error", code="PermissionDenied"))
    outcome = make().tick(POLICY)
    assert outcome.transfer is not None and outcome.transfer["state"] == "confirmed"
