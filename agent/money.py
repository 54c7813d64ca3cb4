"""Exact money: Decimal amounts, integer minor units per currency, float-free JSON for the wire."""

from __future__ import annotations

import json
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any

# Decimal places per currency, as Deriv's website_status reports them (fractional_digits).
CURRENCY_PLACES: dict[str, int] = {
    "USD": 2, "EUR": 2, "GBP": 2, "AUD": 2, "JPY": 0, "CHF": 2, "CAD": 2,
    "USDC": 2, "UST": 2, "eUSDT": 2, "tUSDT": 2, "USDK": 2, "PAX": 2, "TUSD": 2,
    "BTC": 8, "ETH": 8, "LTC": 8, "BCH": 8, "XRP": 6, "IDK": 0,
}


class MoneyError(ValueError):
    """An amount that cannot be represented exactly, or an unknown currency."""


def places(currency: str) -> int:
    try:
        return CURRENCY_PLACES[currency]
    except KeyError:
        raise MoneyError(f"unknown currency code {currency!r}") from None


def parse_amount(value: Any, currency: str) -> Decimal:
    """Read an amount exactly: from text, int or Decimal (never a float), at most the currency's places."""
    if isinstance(value, bool) or isinstance(value, float):
        raise MoneyError(f"amount {value!r} must be given as text or Decimal, not a binary float")
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise MoneyError(f"{value!r} is not a number") from None
    if not amount.is_finite():
        raise MoneyError(f"{value!r} is not a finite amount")
    return quantize(amount, currency)


def quantize(amount: Decimal, currency: str) -> Decimal:
    """Give an exact amount the currency's scale (600 -> 600.00). Refuses to round."""
    scale = places(currency)
    try:
        q = amount.quantize(Decimal(1).scaleb(-scale))
    except InvalidOperation:
        raise MoneyError(f"{amount} is too large") from None
    if q != amount:
        raise MoneyError(f"{amount} has more decimal places than {currency} allows ({scale})")
    return q


def round_down(amount: Decimal, currency: str) -> Decimal:
    """Truncate toward zero to the currency's scale: used where a computed amount must never grow."""
    return amount.quantize(Decimal(1).scaleb(-places(currency)), rounding=ROUND_DOWN)


def to_minor(amount: Decimal, currency: str) -> int:
    return int(quantize(amount, currency).scaleb(places(currency)))


def from_minor(minor: int, currency: str) -> Decimal:
    return quantize(Decimal(minor).scaleb(-places(currency)), currency)


def fmt(amount: Decimal, currency: str) -> str:
    """The ledger's decimal string: exactly the currency's places, no exponent ("600.00")."""
    return format(quantize(amount, currency), "f")


def wire_number(amount: Decimal) -> str:
    """JSON number text for an exact Decimal: no exponent, no float round trip."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


_MARK = "\u0000decimal:"


def dumps(message: dict[str, Any]) -> str:
    """json.dumps that writes Decimal values as exact JSON numbers."""
    found: list[Decimal] = []

    def hide(obj: Any) -> Any:
        if isinstance(obj, Decimal):
            found.append(obj)
            return f"{_MARK}{len(found) - 1}"
        if isinstance(obj, float):
            raise MoneyError("refusing to put a binary float on the wire")
        if isinstance(obj, dict):
            return {k: hide(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [hide(v) for v in obj]
        return obj

    text = json.dumps(hide(message), separators=(",", ":"))
    for i, dec in enumerate(found):
        text = text.replace(json.dumps(f"{_MARK}{i}"), wire_number(dec), 1)
    return text


def loads(text: str | bytes) -> Any:
    """json.loads with every JSON number that has a fraction or exponent read as an exact Decimal."""
    return json.loads(text, parse_float=Decimal)
