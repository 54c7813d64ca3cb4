from decimal import Decimal

import pytest

from agent import money


def test_parse_keeps_exact_text():
    assert money.parse_amount("0.1", "USD") == Decimal("0.10")
    assert money.parse_amount(600, "USD") == Decimal("600.00")
    assert str(money.parse_amount("0.00000001", "BTC")) == "1E-8"


@pytest.mark.parametrize("bad", ["0.001", "1.005", "abc", "NaN", "Infinity"])
def test_parse_refuses_inexact_or_non_numbers(bad):
    with pytest.raises(money.MoneyError):
        money.parse_amount(bad, "USD")


def test_refuses_floats_and_unknown_currencies():
    with pytest.raises(money.MoneyError):
        money.parse_amount(0.1, "USD")
    with pytest.raises(money.MoneyError):
        money.places("XYZ")


def test_minor_units_round_trip():
    for text in ("0.01", "600.11", "123456789.99"):
        amount = Decimal(text)
        assert money.from_minor(money.to_minor(amount, "USD"), "USD") == amount
    assert money.to_minor(Decimal("600.11"), "USD") == 60011


def test_fmt_has_exactly_the_currency_places():
    assert money.fmt(Decimal("600"), "USD") == "600.00"
    assert money.fmt(Decimal("1E+3"), "USD") == "1000.00"


def test_wire_json_has_no_float_drift_or_exponent():
    text = money.dumps({"amount": Decimal("600.11"), "big": Decimal("1E+3"), "n": 1})
    assert text == '{"amount":600.11,"big":1000,"n":1}'
    assert money.loads(text)["amount"] == Decimal("600.11")
    with pytest.raises(money.MoneyError):
        money.dumps({"amount": 600.11})


def test_round_down_never_grows():
    assert money.round_down(Decimal("10.019"), "USD") == Decimal("10.01")
