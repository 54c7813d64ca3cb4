"""The Deriv client across reconnects, against the Deriv-protocol server over a real socket: what an error before
the frame left proves, req_ids unique in the process, and the loginid named on every read that needs it."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, TOKEN

from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError, LostReply
from agent.broker.fake import Fault


def client(fake, token=TOKEN, **kw):
    return DerivClient(fake.url, 1089, token, timeout=kw.pop("timeout", 3.0), **kw)


def wait_disconnected(c: DerivClient, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while c.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not c.connected, "the client did not notice the dropped connection"


def sent(fake, call: str) -> list[dict]:
    return [r for r in list(fake.requests) if call in r]


# ---- an error before the frame left proves nothing moved ----

def test_broker_down_after_a_first_connect_is_nothing_moved(fake):
    c = client(fake, timeout=1.0)
    c.connect()
    fake.stop()  # the broker goes away: the connection drops and reconnecting is refused
    wait_disconnected(c)
    try:
        with pytest.raises(BrokerError) as info:
            c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
        assert info.value.nothing_moved and info.value.before_send
        # the next attempt is within the backoff: refused at once, still nothing moved
        with pytest.raises(BrokerError) as info:
            c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
        assert info.value.nothing_moved and info.value.before_send
    finally:
        c.close()
        fake.start()  # same port, same accounts: the fixture stops it again
    assert sent(fake, "mt5_deposit") == []
    assert fake.balance_of(MT5) == Decimal("450.00")


def test_authorize_timeout_on_reconnect_is_nothing_moved_and_keeps_its_code(fake):
    c = client(fake, timeout=0.5)
    c.connect()
    fake.drop_connections()
    wait_disconnected(c)
    fake.inject(Fault("authorize", "delay_reply", delay=1.5))
    with pytest.raises(LostReply) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    assert info.value.code == "Timeout"  # the code is the authorize's, verbatim
    assert info.value.nothing_moved and info.value.before_send and not info.value.needs_operator
    time.sleep(1.7)  # past the delayed authorize reply: nothing came after it
    assert sent(fake, "mt5_deposit") == []
    assert fake.balance_of(FUNDING) == Decimal("10000.00") and fake.balance_of(MT5) == Decimal("450.00")
    c.close()


def test_missing_scope_is_nothing_moved_and_needs_an_operator(fake):
    c = client(fake, token="read-only-token")
    with pytest.raises(BrokerError) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    assert info.value.code == "MissingScope"
    assert info.value.nothing_moved and info.value.needs_operator and info.value.before_send
    assert sent(fake, "mt5_deposit") == []
    c.close()


def test_invalid_token_on_a_transfer_stays_an_operator_problem(fake):
    c = client(fake, token="wrong-token-value")
    with pytest.raises(BrokerError) as info:
        c.mt5_withdrawal(MT5, FUNDING, Decimal("10.00"))
    assert info.value.code == "InvalidToken" and info.value.needs_operator and info.value.nothing_moved
    assert sent(fake, "mt5_withdrawal") == []
    c.close()


def test_a_timeout_after_the_frame_left_stays_unknown(fake):
    c = client(fake, timeout=0.5)
    c.connect()
    fake.inject(Fault("mt5_deposit", "delay_reply", delay=1.0))
    with pytest.raises(LostReply) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    assert info.value.code == "Timeout"
    assert not info.value.before_send and not info.value.nothing_moved
    assert len(sent(fake, "mt5_deposit")) == 1
    time.sleep(0.7)  # let the delayed reply arrive (and be ignored) before the fixture stops the server
    c.close()


def test_a_lost_connection_after_the_frame_left_stays_unknown(fake):
    c = client(fake, timeout=3.0)
    c.connect()
    fake.inject(Fault("mt5_deposit", "drop_after_apply"))
    with pytest.raises(LostReply) as info:
        c.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    assert info.value.code == "ConnectionClosed" and not info.value.nothing_moved
    c.close()


# ---- req_ids ----

def test_req_ids_never_restart_across_reconnects(fake):
    c = client(fake)
    c.balance(FUNDING)
    for _ in range(2):
        fake.drop_connections()
        wait_disconnected(c)
        c.balance(FUNDING)
    ids = [r["req_id"] for r in list(fake.requests)]
    assert sum("authorize" in r for r in list(fake.requests)) == 3  # three connections
    assert len(ids) == 6
    assert ids == sorted(set(ids)), ids  # strictly increasing
    c.close()


def test_req_ids_are_unique_across_clients(fake):
    a, b = client(fake), client(fake)
    for _ in range(3):
        a.balance(FUNDING)
        b.balance(FUNDING)
    ids = [r["req_id"] for r in list(fake.requests)]
    assert len(ids) == 8 and len(set(ids)) == 8
    a.close()
    b.close()


# ---- the loginid is named right after a reconnect ----

SECOND = "CR4000999"


def test_balance_names_the_account_right_after_a_reconnect(fake):
    fake.add_account(SECOND, "USD", "5.00")
    fake.add_token("second-token", SECOND, ("read", "payments"))  # its default account is not FUNDING
    c = client(fake, token="second-token")
    assert c.balance(FUNDING) == (Decimal("10000.00"), "USD")
    fake.drop_connections()
    wait_disconnected(c)
    assert c.balance(FUNDING) == (Decimal("10000.00"), "USD")
    assert sent(fake, "balance")[-1]["account"] == FUNDING
    # the token's own account is named too, and the broker accepts it
    assert c.balance(SECOND) == (Decimal("5.00"), "USD")
    assert sent(fake, "balance")[-1]["account"] == SECOND
    c.close()


def test_statement_reads_the_named_account_right_after_a_reconnect(fake):
    fake.add_account(SECOND, "USD", "5.00")
    fake.add_token("second-token", SECOND, ("read", "payments"))
    payer = client(fake)
    txn = payer.mt5_deposit(FUNDING, MT5, Decimal("12.34"))  # a row on FUNDING's statement only
    payer.close()
    c = client(fake, token="second-token")
    c.connect()
    fake.drop_connections()
    wait_disconnected(c)
    rows = c.statement(0, 2**31, loginid=FUNDING)
    assert sent(fake, "statement")[-1]["loginid"] == FUNDING
    assert [r["transaction_id"] for r in rows] == [txn]
    # the token's own loginid is named too, and the broker accepts it: its statement is empty
    assert c.statement(0, 2**31, loginid=SECOND) == []
    assert sent(fake, "statement")[-1]["loginid"] == SECOND
    c.close()
