"""Property: whatever a broker frame holds, the client returns a valid transaction id or raises BrokerError — never
another exception — and only a well-formed error for this very call, with a nothing-moved code, is believed as
"nothing moved"."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from conftest import FUNDING, MT5, TOKEN
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.broker import schemas
from agent.broker.deriv import DerivClient
from agent.broker.errors import NOTHING_MOVED, BadReply, BrokerError

REQ_ID = 7
CALLS = ("mt5_deposit", "mt5_withdrawal")
REQUESTS = {
    "mt5_deposit": {"mt5_deposit": 1, "from_binary": FUNDING, "to_mt5": MT5, "amount": Decimal("10.00")},
    "mt5_withdrawal": {"mt5_withdrawal": 1, "from_mt5": MT5, "to_binary": FUNDING, "amount": Decimal("10.00")},
}
KEYS = ("error", "msg_type", "echo_req", "req_id", "mt5_deposit", "mt5_withdrawal", "binary_transaction_id",
        "passthrough", "balance", "code", "message")
CODES = sorted(NOTHING_MOVED) + ["WrongResponse", "MT5TransferSuspension", "", "No Money", "x" * 65]

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**200)
           | st.integers(max_value=0) | st.floats() | st.decimals() | st.text(max_size=12)
           | st.sampled_from(KEYS + CALLS) | st.sampled_from(CODES) | st.sampled_from([1, 0, REQ_ID, 2**63 - 1]))
json_ish = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4),
                        max_leaves=16)
amounts = st.decimals(min_value=-(10**15), max_value=10**15, places=2) | st.integers(-(10**15), 10**15)
arbitrary_replies = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_ish, max_size=6)


def valid_success(call: str) -> dict[str, Any]:
    return {"echo_req": {**REQUESTS[call], "req_id": REQ_ID}, "msg_type": call, "req_id": REQ_ID, call: 1,
            "binary_transaction_id": 1001}


def valid_error(call: str, code: str) -> dict[str, Any]:
    return {"echo_req": {**REQUESTS[call], "req_id": REQ_ID}, "msg_type": call, "req_id": REQ_ID,
            "error": {"code": code, "message": "Injected."}}


@st.composite
def mutated_replies(draw: st.DrawFn) -> tuple[str, Any]:
    call = draw(st.sampled_from(CALLS))
    reply = valid_success(call) if draw(st.booleans()) else valid_error(call, draw(st.sampled_from(CODES)))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "echo_req", "error"]))
        target = reply if where == "top" else reply.get(where)
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(KEYS + CALLS + ("req_id",)))
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_ish)
    return call, reply


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def well_formed_nothing_moved_error(call: str, reply: Any) -> bool:
    """An independent, looser oracle: the least a reply must be for "nothing moved" to be believed."""
    if not isinstance(reply, dict) or "error" not in reply or call in reply or "binary_transaction_id" in reply:
        return False
    error = reply["error"]
    msg_type = reply.get("msg_type")
    echo = reply.get("echo_req", {call: 1})  # echo_req may be absent from an error
    return (isinstance(msg_type, str) and msg_type == call and isinstance(error, dict)
            and isinstance(error.get("code"), str) and error["code"] in NOTHING_MOVED and error["code"] != "NotSent"
            and isinstance(echo, dict) and [k for k in echo if k in schemas.KNOWN_CALLS] == [call])


def transfer(call: str, reply: Any) -> int:
    client = DerivClient("ws://127.0.0.1:9/websockets/v3", 1089, TOKEN)
    client.call = lambda request, timeout=None: DerivClient._check(call, reply, REQ_ID, secret=TOKEN)  # type: ignore[method-assign]
    return client._transfer(dict(REQUESTS[call]), call, None)


def check_property(call: str, reply: Any) -> None:
    try:
        txn = transfer(call, reply)
    except BrokerError as exc:
        assert "\n" not in str(exc) and TOKEN not in str(exc)
        event("nothing moved" if exc.nothing_moved else "malformed" if isinstance(exc, BadReply)
              else "may have moved")
        if exc.nothing_moved:
            assert not isinstance(exc, BadReply) and not exc.before_send
            assert well_formed_nothing_moved_error(call, reply), (exc.code, reply)
        return
    # believed as a success: it must be a clean one
    event("success")
    assert is_int(txn) and 1 <= txn <= 2**63 - 1
    assert isinstance(reply, dict) and "error" not in reply
    assert reply.get("msg_type") == call and is_int(reply.get(call)) and reply[call] == 1
    assert reply.get("binary_transaction_id") == txn and reply.get("req_id") == REQ_ID


@SETTINGS
@given(st.sampled_from(CALLS), arbitrary_replies | json_ish)
def test_arbitrary_replies_give_a_valid_id_or_a_broker_error(call, reply):
    check_property(call, reply)


@SETTINGS
@given(mutated_replies())
def test_mutated_transfer_replies_give_a_valid_id_or_a_broker_error(case):
    check_property(*case)


@settings(max_examples=150, deadline=None)
@given(json_ish)
def test_arbitrary_balance_bodies_give_a_plausible_balance_or_a_broker_error(body):
    reply = {"echo_req": {"balance": 1, "account": FUNDING, "req_id": REQ_ID}, "msg_type": "balance",
             "req_id": REQ_ID, "balance": body}
    try:
        value, currency = DerivClient._balance_of(DerivClient._check("balance", reply, REQ_ID), FUNDING)
    except BrokerError as exc:
        assert not exc.nothing_moved
        return
    assert isinstance(value, Decimal) and value.is_finite() and 0 <= value < 10**15
    assert isinstance(currency, str) and 3 <= len(currency) <= 12


@settings(max_examples=150, deadline=None)
@given(st.lists(json_ish | st.fixed_dictionaries({
    "transaction_id": json_ish | st.integers(1, 2**63 - 1), "amount": json_ish | amounts,
    "balance_after": json_ish | amounts, "transaction_time": json_ish | st.integers(0, 2**41 - 1)}),
    max_size=4))
def test_arbitrary_statement_rows_are_all_plausible_or_a_broker_error(rows):
    reply = {"echo_req": {"statement": 1, "req_id": REQ_ID}, "msg_type": "statement", "req_id": REQ_ID,
             "statement": {"transactions": rows}}
    try:
        checked = DerivClient._rows_of(DerivClient._check("statement", reply, REQ_ID))
    except BrokerError as exc:
        assert not exc.nothing_moved
        return
    for row in checked:
        assert is_int(row["transaction_id"]) and 1 <= row["transaction_id"] <= 2**63 - 1
        assert is_int(row["transaction_time"]) and 0 <= row["transaction_time"] < 2**41
        for key in ("amount", "balance_after"):
            assert isinstance(row[key], (int, Decimal)) and not isinstance(row[key], bool)
            assert Decimal(row[key]).is_finite() and -(10**15) < row[key] < 10**15
