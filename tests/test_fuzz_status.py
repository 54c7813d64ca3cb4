"""Fuzzing the status parser and the intake: a Snapshot or NoReading, a known HTTP status, nothing else."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.equity.base import NoReading, Snapshot
from agent.equity.ea_file import parse_status
from agent.equity.intake import IntakeStore
from agent.http_api import HttpApi

LOGIN = "130002534"
SECRET = "s3cret-intake"
BASE = {"schema": 1, "login": 130002534, "server": "DerivSVG-Server", "currency": "USD", "balance": 1000.00,
        "equity": 950.12, "margin": 10.00, "margin_free": 940.12, "margin_level": 9501.20, "positions": 2,
        "connected": True, "time": int(time.time())}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

extreme_ints = st.one_of(
    st.integers(), st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 33, 2 ** 63, -2 ** 63, 10 ** 12, 10 ** 15, 10 ** 20,
                                    -10 ** 20, 10 ** 26, 10 ** 300]),
    st.integers(min_value=-10 ** 40, max_value=10 ** 40))
extreme_number_text = st.sampled_from([
    "1e26", "-1e26", "1e12", "1e20", "-1e20", "1e999999999", "1e-999999999", "1e9999999999999999999", "-0.0",
    "0e999999", "950.123456789", "NaN", "Infinity", "-Infinity", "1" * 5000, "0." + "0" * 120 + "1",
    "123456789012345678901234567890.5", "1E+15", "999999999999999.99999999"])
leaves = st.one_of(
    st.none(), st.booleans(), extreme_ints, st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False), st.text(max_size=50),
    st.text(alphabet=st.characters(), min_size=0, max_size=2000))
json_values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)


def deep(levels: int, kind: str) -> str:
    return "[" * levels + "1" + "]" * levels if kind == "list" else '{"a":' * levels + "1" + "}" * levels


@st.composite
def status_texts(draw) -> str:
    """The good status mutated: keys replaced, dropped or added; values extreme; nesting deep."""
    body: dict[object, object] = dict(BASE)
    raw_numbers: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(sorted(BASE)), st.text(max_size=10)))
        action = draw(st.sampled_from(["value", "number-text", "drop", "deep"]))
        if action == "drop":
            body.pop(key, None)
        elif action == "number-text":
            raw_numbers[key] = draw(extreme_number_text)
            body[key] = f"@@{key}@@"
        elif action == "deep":
            raw_numbers[key] = deep(draw(st.sampled_from([1, 19, 20, 21, 100, 5000])),
                                    draw(st.sampled_from(["list", "dict"])))
            body[key] = f"@@{key}@@"
        else:
            body[key] = draw(json_values)
    text = json.dumps(body, default=str)
    for key, raw in raw_numbers.items():
        text = text.replace(json.dumps(f"@@{key}@@"), raw)
    return text


def check_parse(text: str | bytes) -> Snapshot | None:
    try:
        snap = parse_status(text, LOGIN)
    except NoReading as exc:
        reason = str(exc)
        assert reason and "\n" not in reason and len(reason) < 400, reason
        return None
    assert isinstance(snap, Snapshot) and snap.login == LOGIN
    for amount in (snap.balance, snap.equity, snap.margin, snap.margin_free, snap.margin_level):
        assert isinstance(amount, Decimal) and amount.is_finite() and abs(amount) < 10 ** 15
        amount.quantize(Decimal("0.00000001"))  # usable downstream without InvalidOperation
    assert 1970 <= snap.taken_at.year < 2300
    return snap


@FUZZ
@given(status_texts())
def test_parse_status_only_gives_a_snapshot_or_no_reading(text):
    check_parse(text)
    check_parse(text.encode())


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_status_on_raw_bytes(raw):
    check_parse(raw)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"[" * 30 + b)),
       st.sampled_from(["", "[", "{", '{"a":']), st.integers(0, 70_000))
def test_parse_status_on_deep_and_big_prefixes(tail, opener, count):
    check_parse(opener * count + tail.decode("latin-1"))


API = HttpApi(("127.0.0.1", 0), lambda: (True, {}), lambda: "", IntakeStore(), SECRET,
              managed=lambda: {LOGIN, "130009999"})
API.server.server_close()  # take_status is called directly: no listener needed

lengths = st.one_of(st.none(), st.sampled_from(["²", "¹²", "-1", "+5", " 12 ", "1e3", "0x10", "65536", "65537",
                                                "9" * 5000, "", "٣"]),
                    st.text(max_size=8))


@FUZZ
@given(st.one_of(status_texts().map(str.encode), st.binary(max_size=2048)), st.one_of(st.none(), lengths),
       st.booleans())
def test_take_status_only_answers_known_statuses(body, length, true_length):
    if true_length or length is None:
        length = str(len(body)) if true_length else None
    status, message = API.take_status(SECRET, length, io.BytesIO(body))
    assert status in {200, 400, 404, 411, 413}, (status, message)
    assert isinstance(message, str) and "\n" not in message and len(message) < 400
