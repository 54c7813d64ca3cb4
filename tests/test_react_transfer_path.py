"""The transfer path: the broker facts a decision needs go out together on the one connection (each reply still
checked on its own), and the decision is written in the intent's transaction: two commits before the frame."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, REPO, TOKEN, FixedSource, ledger_url
from sqlalchemy import event, select

from agent.broker.deriv import DerivClient
from agent.broker.errors import BadReply, BrokerError, NotSent
from agent.broker.fake import Fault
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger.db import Ledger
from agent.ledger.models import DecisionRow, Transfer
from agent.policy.load import parse_policy
from agent.timeutil import ManualClock


@pytest.fixture
def client(fake):
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    yield broker
    broker.close()


def test_a_top_up_commits_its_intent_and_decision_once_then_sent_before_the_frame(tmp_path, fake, client):
    clock = ManualClock(datetime.now(UTC))
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    policy = parse_policy((REPO / "policies" / "example.yaml").read_text(), "example.yaml")
    engine = Engine(ledger, client, FixedSource(clock, "450.00"), clock,
                    reconciler=Reconciler(ledger, client, clock))
    commits: list[str] = []
    at_frame: list[int] = []
    event.listen(ledger.engine, "commit", lambda conn: commits.append("commit"))
    deposit = client.mt5_deposit

    def counting_deposit(*args, **kwargs):
        at_frame.append(len(commits))
        return deposit(*args, **kwargs)

    client.mt5_deposit = counting_deposit  # type: ignore[method-assign]
    try:
        outcome = engine.tick(policy)
    finally:
        ledger.close()
    assert outcome.transfer is not None and outcome.transfer["state"] == "confirmed"
    assert at_frame == [2]  # intent + decision, then pending -> sent

    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    try:
        with ledger.reader() as session:
            transfer = session.scalars(select(Transfer)).one()
            decision = session.scalars(select(DecisionRow)).one()
        assert decision.transfer_id == transfer.id and decision.action == "top_up" and decision.amount == "550.00"
        assert transfer.amount_minor == 55000 and transfer.state == "confirmed"
    finally:
        ledger.close()

    calls = [next(k for k in r if k not in ("req_id", "account", "passthrough")) for r in fake.requests]
    # the three reads were sent back to back, before the transfer
    assert calls[calls.index("balance"):calls.index("balance") + 3] == ["balance", "get_limits", "website_status"]
    assert calls.index("mt5_deposit") > calls.index("website_status")


def test_the_website_status_is_sent_again_only_when_its_cache_is_stale(tmp_path, fake, client):
    clock = ManualClock(datetime.now(UTC))
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    policy = parse_policy((REPO / "policies" / "example.yaml").read_text().replace("cooldown: 30m", "cooldown: 0s"),
                          "example.yaml")
    source = FixedSource(clock, "450.00")
    engine = Engine(ledger, client, source, clock, reconciler=Reconciler(ledger, client, clock))
    try:
        engine.tick(policy)
        clock.advance(timedelta(seconds=10))
        engine.tick(policy)
    finally:
        ledger.close()
    names = [json.dumps(sorted(r)) for r in fake.requests]
    assert sum('"website_status"' in n for n in names) == 1
    assert sum('"get_limits"' in n for n in names) == 2


def test_call_many_gives_each_request_its_own_checked_reply_or_error(fake, client):
    fake.inject(Fault("get_limits", "malformed"))
    balance, limits, unknown, status = client.call_many(
        [{"balance": 1, "account": FUNDING}, {"get_limits": 1}, {"balance": 1, "account": "CR999999"},
         {"website_status": 1}])
    assert isinstance(balance, dict) and balance["balance"]["balance"] == Decimal("10000.00")
    assert isinstance(limits, BadReply)  # fails the receive schema: not believed, and only that one
    assert isinstance(unknown, BrokerError) and unknown.code == "PermissionDenied"
    assert isinstance(status, dict) and "currencies_config" in status["website_status"]


def test_call_many_never_sends_a_transfer(fake, client):
    with pytest.raises(NotSent):
        client.call_many([{"balance": 1, "account": FUNDING},
                          {"mt5_deposit": 1, "from_binary": FUNDING, "to_mt5": MT5, "amount": Decimal("10.00")}])
    assert not [r for r in fake.requests if "mt5_deposit" in r]


def test_balance_and_limits_keeps_a_refused_balance_apart_from_the_limits(fake, client):
    balance, limits, status = client.balance_and_limits("CR999999", website_status=False)
    assert isinstance(balance, BrokerError) and balance.code == "PermissionDenied"
    assert isinstance(limits, dict) and limits["daily_transfers"]["mt5"]["allowed"] == 6
    assert status is None
