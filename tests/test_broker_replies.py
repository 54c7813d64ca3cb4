"""A broker reply is believed only when it is consistent: anything else is MalformedReply (the outcome unknown),
never "nothing moved" — so a deposit that happened is never recorded failed and sent again."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from decimal import Decimal
from typing import Any

import pytest
from conftest import FUNDING, MT5, TOKEN, ledger_url
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent import money
from agent.broker import schemas
from agent.broker.deriv import DerivClient, _Waiter
from agent.broker.errors import BadReply, BrokerError
from agent.engine import transfers
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.timeutil import Clock

CALL = "mt5_deposit"
REQ_ID = 7
REQUEST = {"mt5_deposit": 1, "from_binary": FUNDING, "to_mt5": MT5, "amount": Decimal("10.00")}


def success(**fields: Any) -> dict[str, Any]:
    reply = {"echo_req": {**REQUEST, "req_id": REQ_ID}, "msg_type": CALL, "req_id": REQ_ID, "mt5_deposit": 1,
             "binary_transaction_id": 1001}
    reply.update(fields)
    return reply


def error(code: Any = "NoMoney", **fields: Any) -> dict[str, Any]:
    reply = {"echo_req": {**REQUEST, "req_id": REQ_ID}, "msg_type": CALL, "req_id": REQ_ID,
             "error": {"code": code, "message": "Your account balance is insufficient for this transaction."}}
    reply.update(fields)
    return reply


def offline_client(reply: Any) -> DerivClient:
    """A client whose `call` answers with `reply`, checked exactly as a reply off the socket is."""
    client = DerivClient("ws://127.0.0.1:9/websockets/v3", 1089, TOKEN)

    def call(request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return DerivClient._check(schemas.call_of(request) or "", reply, REQ_ID, secret=TOKEN)

    client.call = call  # type: ignore[method-assign]
    return client


def deposit(reply: Any) -> int:
    return offline_client(reply)._transfer(dict(REQUEST), CALL, None)


def assert_malformed(info: pytest.ExceptionInfo[BrokerError]) -> None:
    exc = info.value
    assert isinstance(exc, BadReply) and exc.code == "MalformedReply"
    assert exc.nothing_moved is False and exc.before_send is False
    assert "\n" not in str(exc) and TOKEN not in str(exc)


# ---- the consistent replies are still believed ----

def test_a_clean_success_is_believed():
    assert deposit(success()) == 1001
    assert deposit(success(binary_transaction_id=2**63 - 1)) == 2**63 - 1


@pytest.mark.parametrize("code", ["NoMoney", "MT5DepositError", "RateLimit"])
def test_a_well_formed_nothing_moved_error_is_believed(code):
    with pytest.raises(BrokerError) as info:
        deposit(error(code))
    assert not isinstance(info.value, BadReply)
    assert info.value.code == code and info.value.nothing_moved


def test_a_well_formed_error_without_echo_req_is_believed():
    reply = error("NoMoney")
    del reply["echo_req"]
    with pytest.raises(BrokerError) as info:
        deposit(reply)
    assert info.value.code == "NoMoney" and info.value.nothing_moved


def test_a_may_have_moved_error_keeps_its_code_and_is_not_nothing_moved():
    with pytest.raises(BrokerError) as info:
        deposit(error("WrongResponse"))
    assert info.value.code == "WrongResponse" and not info.value.nothing_moved


def test_the_brokers_message_is_one_line_without_the_token():
    reply = error("NoMoney")
    reply["error"]["message"] = f"line one\nline two {TOKEN}\r\x00"
    with pytest.raises(BrokerError) as info:
        deposit(reply)
    assert "\n" not in info.value.message and "\r" not in info.value.message and TOKEN not in str(info.value)


# ---- exactly one of error or the call's result ----

@pytest.mark.parametrize("reply", [
    error("NoMoney", mt5_deposit=1, binary_transaction_id=1001),  # both: the deposit may well have happened
    error("NoMoney", mt5_deposit=1),
    error("NoMoney", binary_transaction_id=1001),  # an error carrying the success's transaction id
    error("MT5DepositError", mt5_deposit=0),
    success(error=None),
    success(error={"code": "NoMoney", "message": "x"}),
    {"echo_req": {**REQUEST, "req_id": REQ_ID}, "msg_type": CALL, "req_id": REQ_ID},  # neither
    {"echo_req": {**REQUEST, "req_id": REQ_ID}, "msg_type": CALL, "req_id": REQ_ID, "binary_transaction_id": 5},
], ids=["both", "error+result", "error+txn", "error+result0", "error-null", "success+error", "neither",
        "txn-only"])
def test_error_and_result_together_or_neither_is_malformed(reply):
    with pytest.raises(BrokerError) as info:
        deposit(reply)
    assert_malformed(info)


# ---- msg_type and echo_req name this call and this req_id, errors included ----

def _echo(**fields: Any) -> dict[str, Any]:
    return {**REQUEST, "req_id": REQ_ID, **fields}


@pytest.mark.parametrize("reply", [
    error("NoMoney", msg_type="mt5_withdrawal"),
    error("NoMoney", msg_type="balance"),
    error("NoMoney", msg_type="error"),
    error("NoMoney", msg_type=None),
    error("NoMoney", msg_type=1),
    {k: v for k, v in error("NoMoney").items() if k != "msg_type"},
    error("NoMoney", echo_req={"balance": 1, "account": FUNDING, "req_id": REQ_ID}),
    error("NoMoney", echo_req=_echo(balance=1)),  # names two calls
    error("NoMoney", echo_req={"req_id": REQ_ID}),  # names no call
    error("NoMoney", echo_req=_echo(req_id=REQ_ID + 1)),
    error("NoMoney", echo_req=_echo(req_id="7")),
    error("NoMoney", echo_req=_echo(req_id=True)),
    error("NoMoney", echo_req=[1]),
    error("NoMoney", req_id=REQ_ID + 1),
    error("NoMoney", req_id="7"),
    success(msg_type="mt5_withdrawal"),
    success(echo_req={"mt5_withdrawal": 1, "req_id": REQ_ID}),
])
def test_an_error_for_another_call_or_request_is_malformed_never_nothing_moved(reply):
    with pytest.raises(BrokerError) as info:
        deposit(reply)
    assert_malformed(info)


# ---- an error code is a plain word ----

@pytest.mark.parametrize("code", ["", "x" * 65, "No Money", "NoMoney\n", "NoMoney;", "NöMoney", None, 5, True,
                                  ["NoMoney"], {"code": "NoMoney"}, "NotSent"])
def test_an_error_code_that_is_not_a_plain_word_is_malformed(code):
    with pytest.raises(BrokerError) as info:
        deposit(error(code))
    assert_malformed(info)


@pytest.mark.parametrize("body", [None, "NoMoney", ["NoMoney"], 1, {"message": "no code"}])
def test_an_error_that_is_not_an_object_with_a_code_is_malformed(body):
    with pytest.raises(BrokerError) as info:
        deposit(error(error=body))
    assert_malformed(info)


# ---- binary_transaction_id: an int in 1..2**63-1 ----

@pytest.mark.parametrize("txn", [-1, 0, -(2**63), 2**63, 2**64 + 5, 10**30, True, False, "1001",
                                 Decimal("1001"), Decimal("NaN"), Decimal("sNaN"), 1001.0, float("nan"), None,
                                 [1001], {"id": 1001}])
def test_a_transaction_id_out_of_range_or_not_an_int_is_malformed(txn):
    with pytest.raises(BrokerError) as info:
        deposit(success(binary_transaction_id=txn))
    assert_malformed(info)


@pytest.mark.parametrize("flag", [0, 2, True, "1", Decimal("1.0"), None])
def test_a_success_flag_that_is_not_exactly_1_is_malformed(flag):
    with pytest.raises(BrokerError) as info:
        deposit(success(mt5_deposit=flag))
    assert_malformed(info)


def test_a_huge_id_off_the_wire_raises_no_overflow():
    frame = money.dumps(success(binary_transaction_id=2**64 + 5, echo_req={**REQUEST, "req_id": REQ_ID}))
    with pytest.raises(BrokerError) as info:
        deposit(money.loads(frame))
    assert_malformed(info)


# ---- balance ----

def balance_reply(**fields: Any) -> dict[str, Any]:
    body = {"balance": Decimal("10000.00"), "currency": "USD", "loginid": FUNDING}
    body.update(fields)
    return {"echo_req": {"balance": 1, "account": FUNDING, "req_id": REQ_ID}, "msg_type": "balance",
            "req_id": REQ_ID, "balance": body}


def read_balance(reply: dict[str, Any]) -> tuple[Decimal, str]:
    return offline_client(reply).balance(FUNDING)


def test_a_plausible_balance_is_believed():
    assert read_balance(balance_reply()) == (Decimal("10000.00"), "USD")
    assert read_balance(balance_reply(balance=0, currency="eUSDT")) == (Decimal(0), "eUSDT")


@pytest.mark.parametrize("fields", [
    {"balance": Decimal("NaN")}, {"balance": Decimal("sNaN")}, {"balance": Decimal("Infinity")},
    {"balance": float("nan")}, {"balance": float("inf")}, {"balance": 12.5}, {"balance": -1},
    {"balance": Decimal("-0.01")}, {"balance": 10**15}, {"balance": Decimal("1e15")}, {"balance": 10**40},
    {"balance": Decimal("1E+999999999999")}, {"balance": True}, {"balance": "100"}, {"balance": None},
    {"currency": ""}, {"currency": "US"}, {"currency": "U$D"}, {"currency": "ABCDEFGHIJKLM"}, {"currency": 840},
    {"currency": None}, {"loginid": "CR999"},
])
def test_an_implausible_balance_is_malformed(fields):
    with pytest.raises(BrokerError) as info:
        read_balance(balance_reply(**fields))
    assert_malformed(info)


def test_a_balance_reply_without_its_body_is_malformed():
    with pytest.raises(BrokerError) as info:
        read_balance({**balance_reply(), "balance": None})
    assert_malformed(info)


# ---- statement ----

def row(**fields: Any) -> dict[str, Any]:
    base = {"action_type": "transfer", "amount": Decimal("-10.00"), "balance_after": Decimal("9990.00"),
            "transaction_id": 1001, "transaction_time": 1_760_000_000, "app_id": 1089,
            "from": {"loginid": FUNDING}, "to": {"loginid": MT5}, "longcode": "Transfer to MT5 account 130002534"}
    base.update(fields)
    return base


def statement_reply(rows: list[Any]) -> dict[str, Any]:
    return {"echo_req": {"statement": 1, "description": 1, "req_id": REQ_ID}, "msg_type": "statement",
            "req_id": REQ_ID, "statement": {"count": len(rows), "transactions": rows}}


def read_statement(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return offline_client(reply).statement(0, 2_000_000_000, loginid=FUNDING)


def test_plausible_statement_rows_are_believed():
    rows = [row(), row(transaction_id=2**63 - 1, amount=5, balance_after=0, transaction_time=0)]
    assert read_statement(statement_reply(rows)) == rows
    assert read_statement(statement_reply([])) == []


@pytest.mark.parametrize("bad", [
    "not-a-row", None, [1], 5,
    row(transaction_id=0), row(transaction_id=-5), row(transaction_id=2**63), row(transaction_id=10**30),
    row(transaction_id=True), row(transaction_id="1001"), row(transaction_id=Decimal("1001")),
    {k: v for k, v in row().items() if k != "transaction_id"},
    row(amount=-10.0), row(amount=Decimal("NaN")), row(amount=Decimal("-Infinity")), row(amount=-(10**15)),
    row(amount=Decimal("1e15")), row(amount=True), row(amount="10"),
    {k: v for k, v in row().items() if k != "amount"},
    row(balance_after=None), row(balance_after=10**15), row(balance_after=Decimal("sNaN")),
    {k: v for k, v in row().items() if k != "balance_after"},
    row(transaction_time=-1), row(transaction_time=2**41), row(transaction_time=Decimal("1760000000")),
    row(transaction_time=True), row(transaction_time=None),
])
def test_one_malformed_statement_row_makes_the_whole_reply_malformed(bad):
    with pytest.raises(BrokerError) as info:
        read_statement(statement_reply([row(transaction_id=999), bad, row(transaction_id=1000)]))
    assert_malformed(info)


@pytest.mark.parametrize("body", [None, [], "x", {"count": 0}, {"transactions": None}, {"transactions": {}}])
def test_a_statement_reply_without_a_list_of_rows_is_malformed(body):
    with pytest.raises(BrokerError) as info:
        read_statement({**statement_reply([]), "statement": body})
    assert_malformed(info)


# ---- a reply's req_id that is not an int is ignored, logged once, never with the frame's content ----

@pytest.mark.parametrize("req_id", [True, "1", 1.0, None, [1], {"id": 1}])
def test_a_reply_whose_req_id_is_not_an_int_is_ignored_and_logged_once_without_content(caplog, req_id):
    client = DerivClient("ws://127.0.0.1:9/websockets/v3", 1089, TOKEN)
    ws = object()
    client._ws = ws  # type: ignore[assignment]
    waiter = _Waiter(threading.Event())
    client._waiters[1] = waiter
    frame = {"echo_req": {"authorize": TOKEN, "req_id": 1}, "msg_type": "authorize",
             "authorize": {"loginid": FUNDING, "email": "secret@example.com"}}
    if req_id is not None:
        frame["req_id"] = req_id
    text = json.dumps(frame)  # 1.0 stays 1.0 on the wire, and reads back as Decimal("1.0")
    caplog.set_level(logging.DEBUG, logger="agent.broker")
    for _ in range(3):
        client._dispatch(ws, text.encode())  # type: ignore[arg-type]
    assert not waiter.event.is_set() and client._waiters == {1: waiter}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and client.unmatched_replies == 3
    assert TOKEN not in caplog.text and "secret@example.com" not in caplog.text and FUNDING not in caplog.text


def test_an_unmatched_int_req_id_is_logged_without_the_frame(caplog):
    client = DerivClient("ws://127.0.0.1:9/websockets/v3", 1089, TOKEN)
    ws = object()
    client._ws = ws  # type: ignore[assignment]
    frame = {"echo_req": {"authorize": TOKEN, "req_id": 99}, "msg_type": "authorize", "req_id": 2**70}
    caplog.set_level(logging.DEBUG, logger="agent.broker")
    client._dispatch(ws, money.dumps(frame).encode())  # type: ignore[arg-type]
    assert TOKEN not in caplog.text and str(2**70) not in caplog.text


# ---- end to end: a crafted frame off a real socket, through the transfer path, into the ledger ----

def authorize_body() -> dict[str, Any]:
    """The shape agent.broker.fake builds in _call_authorize."""
    return {"loginid": FUNDING, "currency": "USD", "balance": Decimal("10000.00"), "scopes": ["read", "payments"],
            "account_list": [{"loginid": FUNDING, "currency": "USD", "is_virtual": 0, "is_disabled": 0,
                              "landing_company_name": "svg", "account_type": "trading",
                              "account_category": "trading"}],
            "is_virtual": 0, "landing_company_name": "svg", "email": "operator@example.com", "country": "id",
            "fullname": "Test Operator", "user_id": 1, "linked_to": [], "local_currencies": {},
            "upgradeable_landing_companies": []}


class CraftedBroker:
    """A minimal Deriv-protocol server: authorize answered as Deriv does, a transfer answered with a crafted
    frame built from the request's envelope."""

    def __init__(self, craft: Any) -> None:
        self.craft = craft
        self.requests: list[dict[str, Any]] = []
        self.bad_replies: list[str] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websockets/v3"

    def __enter__(self) -> CraftedBroker:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0, ping_interval=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handle(self, conn: ServerConnection) -> None:
        try:
            async for text in conn:
                request = money.loads(text)
                self.requests.append(request)
                call = schemas.call_of(request)
                envelope = {"echo_req": {k: ("<not shown>" if k == "authorize" else v) for k, v in request.items()},
                            "msg_type": call, "req_id": request["req_id"]}
                if call == "authorize":
                    reply = {**envelope, "authorize": authorize_body()}
                    self.bad_replies += schemas.problems("authorize", "receive", reply)
                else:
                    reply = self.craft(call, envelope)
                await conn.send(money.dumps(reply))
        except ConnectionClosed:
            pass


def _nothing_moved_error(code: str = "NoMoney") -> dict[str, Any]:
    return {"code": code, "message": "Your account balance is insufficient for this transaction."}


CRAFTED = {
    "error-and-success": lambda call, env: {**env, "error": _nothing_moved_error(), call: 1,
                                            "binary_transaction_id": 5001},
    "error-for-another-call": lambda call, env: {**env, "msg_type": "balance", "error": _nothing_moved_error()},
    "error-echoing-another-req_id": lambda call, env: {
        **env, "echo_req": {**env["echo_req"], "req_id": env["req_id"] + 1}, "error": _nothing_moved_error()},
    "negative-txn-id": lambda call, env: {**env, call: 1, "binary_transaction_id": -5001},
    "txn-id-beyond-64-bits": lambda call, env: {**env, call: 1, "binary_transaction_id": 2**64 + 5001},
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_an_inconsistent_deposit_reply_leaves_the_transfer_unknown_never_failed(tmp_path, name):
    clock = Clock()
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    with CraftedBroker(CRAFTED[name]) as server:
        broker = DerivClient(server.url, 1089, TOKEN, timeout=3.0)
        try:
            intent = transfers.create_intent(ledger, at=clock.now(), account=MT5, funding=FUNDING, kind="top_up",
                                             amount=Decimal("10.00"), currency="USD", policy="p",
                                             policy_sha256="0" * 64, equity=Decimal("450"), reason="test")
            result = transfers.execute(ledger, broker, intent, clock)
        finally:
            broker.close()
    assert not server.bad_replies, server.bad_replies
    with ledger.reader() as session:
        [record] = [queries.transfer_record(t) for t in queries.list_transfers(session, queries.Filters())]
    ledger.close()
    assert result.state == "unknown" and record["state"] == "unknown"
    assert record["error_code"] == "MalformedReply" and record["broker_txn_id"] is None
    assert TOKEN not in (record["error_message"] or "") and "\n" not in (record["error_message"] or "")
    assert len([r for r in server.requests if "mt5_deposit" in r]) == 1
