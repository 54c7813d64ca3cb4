"""Deriv's official JSON schemas (shipped as package data) and validators built from them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft4Validator

KNOWN_CALLS = ("authorize", "balance", "forget", "forget_all", "get_limits", "logout", "mt5_deposit",
               "mt5_get_settings", "mt5_login_list", "mt5_withdrawal", "ping", "statement", "time",
               "transaction", "transfer_between_accounts", "website_status")


@cache
def validator(call: str, direction: str) -> Draft4Validator:
    """direction: 'send' or 'receive'."""
    if call not in KNOWN_CALLS or direction not in ("send", "receive"):
        raise KeyError(f"no schema for {call}/{direction}")
    text = resources.files("agent.broker").joinpath("schemas", call, f"{direction}.json").read_text("utf-8")
    return Draft4Validator(json.loads(text))


def problems(call: str, direction: str, message: Any) -> list[str]:
    """Schema violations as short texts (empty when valid). Never echoes values: they may hold a token."""
    out = []
    for error in validator(call, direction).iter_errors(message):
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        out.append(f"{where}: {error.validator} {error.validator_value!r}"[:200])
    return out


def call_of(request: dict[str, Any]) -> str | None:
    """Which API call a request is: Deriv routes on the known call name among its keys."""
    for key in request:
        if key in KNOWN_CALLS:
            return key
    return None
