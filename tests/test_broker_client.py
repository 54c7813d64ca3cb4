"""The Deriv client against the Deriv-protocol server over a real socket."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, TOKEN

from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError, LostReply, NotSent
from agent.broker.fake import Fault


def client(fake, token=TOKEN, **kw):
    return DerivClient(fake.url, 1089, token, timeout=kw.pop("timeout", 3.0), **kw)


def test_authorize_and_read_balance(fake):
    c = client(fake)
    session = c.connect()
    assert session.loginid == FUNDING and "payments" in session.scopes
    assert c.balance(FUNDING) == (Decimal("10000.00"), "USD")
    c.close()


def test_invalid_token_is_refused_without_echoing_it(fake):
    c = client(fake, token="wrong-token-value")
    with pytest.raises(BrokerError) as info:
        c.connect()
    assert info.value.code == "InvalidToken"
    assert "wrong-token-value" not in str(info.value)


def test_token_without_payments_scope_refuses_to_start(fake):
    c = client(fake, token="read-only-token")
    with pytest.raises(BrokerError) as info:
        c.connect()
    assert info.value.code == "MissingScope"
    assert "payments" in str(info.value)


def test_bad_app_id_fails_the_handshake(fake):
    c = DerivClient(fake.url.replace("127.0.0.1", "127.0.0.1"), 1089, TOKEN, timeout=2)
    c._url = fake.url + "?app_id=abc"  # a malformed app_id, as a misconfigured URL would carry
    with pytest.raises(BrokerError) as info:
        c.connect()
    assert info.value.code == "InvalidAppID" and info.value.needs_operator and info.value.nothing_moved


def test_timeout_is_a_lost_reply(fake):
    c = client(fake, timeout=0.5)
    c.connect()
    fake.inject(Fault("balance", "delay_reply", delay=1.5))
    with pytest.raises(LostReply) as info:
        c.balance(FUNDING)
    assert info.value.code == "Timeout"
    # the late reply is dropped, the connection still serves the next request
    time.sleep(1.2)
    assert c.balance(FUNDING)[0] == Decimal("10000.00")
    c.close()


def test_socket_closed_while_a_request_waits_fails_it_at_once(fake):
    c = client(fake, timeout=10)
    c.connect()
    fake.inject(Fault("mt5_deposit", "drop_after_apply"))
    started = time.monotonic()
    with pytest.raises(LostReply) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    assert info.value.code == "ConnectionClosed"
    assert time.monotonic() - started < 5
    # reconnects and re-authorizes on the next call
    assert c.balance(FUNDING)[0] == Decimal("9990.00")
    c.close()


def test_broker_errors_keep_their_code_verbatim(fake):
    c = client(fake)
    c.connect()
    with pytest.raises(BrokerError) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("5000.00"))  # above the broker max 2500
    assert info.value.code == "MT5DepositError" and info.value.nothing_moved
    fake.inject(Fault("mt5_deposit", "error_after_apply", code="MT5TransferSuspension"))
    with pytest.raises(BrokerError) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("1.00"))
    assert info.value.code == "MT5TransferSuspension" and not info.value.nothing_moved
    c.close()


def test_malformed_reply_is_not_believed(fake):
    c = client(fake)
    c.connect()
    fake.inject(Fault("mt5_deposit", "malformed"))
    with pytest.raises(BrokerError) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("1.00"))
    assert info.value.code == "MalformedReply" and not info.value.nothing_moved
    c.close()


def test_request_failing_the_send_schema_never_leaves(fake):
    c = client(fake)
    c.connect()
    before = len(fake.requests)
    with pytest.raises(NotSent):
        c.mt5_deposit(FUNDING, "not-an-mt5-login", Decimal("1.00"))
    assert len(fake.requests) == before
    c.close()


def test_concurrent_requests_are_matched_by_req_id(fake):
    c = client(fake)
    c.connect()
    results: list[object] = []

    def worker() -> None:
        results.append(c.balance(FUNDING)[0])

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [Decimal("10000.00")] * 20
    c.close()


def test_statement_rows_describe_the_transfer(fake):
    c = client(fake)
    c.connect()
    txn = c.mt5_deposit(FUNDING, MT5, Decimal("12.34"))
    rows = c.statement(0, 2**31)
    assert rows[0]["transaction_id"] == txn
    assert rows[0]["amount"] == Decimal("-12.34")
    assert rows[0]["to"]["loginid"] == MT5 and rows[0]["from"]["loginid"] == FUNDING
    assert rows[0]["longcode"] == "Transfer to MT5 account 130002534"
    assert rows[0]["app_id"] == 1089
    c.close()


def test_daily_mt5_transfer_count(fake):
    c = client(fake)
    c.connect()
    for _ in range(6):
        c.mt5_deposit(FUNDING, MT5, Decimal("1.00"))
    with pytest.raises(BrokerError) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("1.00"))
    assert info.value.code == "MaximumTransfers"
    assert c.get_limits()["daily_transfers"]["mt5"]["available"] == 0
    c.close()


def test_a_ping_without_pong_drops_a_dead_connection(fake):
    c = client(fake, timeout=0.5, ping_interval=0.3)
    c.connect()
    fake.inject(Fault("ping", "delay_reply", delay=2.0))  # a half-open connection answers nothing
    deadline = time.monotonic() + 5
    while c.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not c.connected
    assert c.balance(FUNDING)[0] == Decimal("10000.00")  # the next request opens a fresh connection
    c.close()
