"""The one JSON schema of fund-agent.yaml, checked against the YAML node tree so that every problem is
`FILE:LINE: key: message`.

The YAML is composed with the policy loader's guarded composer (depth, alias and size limits); this module walks
the node tree once for the line of every key and list item (and the duplicate keys, which PyYAML would silently
merge), validates the constructed value with jsonschema, and turns each validation error into one Problem at the
line of the key it concerns. Messages come from the schema's own annotations (`x-expected`: what a value must
be; `x-secret`: never echo the value), so the schema is the single description of the file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from jsonschema import Draft202012Validator, FormatChecker, ValidationError

from agent.policy.load import Problem
from agent.timeutil import DurationError, parse_duration

DEFAULT_URL = "wss://ws.derivws.com/websockets/v3"
SOURCES = ("mt5", "ea-file", "deriv", "simulated")
EVENTS = ("transfer_confirmed", "transfer_failed", "transfer_unknown", "halt", "kill_switch",
          "policy_reload_failed", "source_down")  # agent.notify.EVENTS (not imported: notify imports config)
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_ASCII_DIGITS = re.compile(r"[0-9]+")

KeyPath = tuple[str | int, ...]  # a place in the document: keys and list indexes


class _Bad(Exception):
    """A format check's verdict, carried to the message as the error's cause."""


# ---- formats: checks that JSON schema's keywords cannot say (and that must not echo a secret) ----

_formats = FormatChecker(formats=())


def _duration(value: object, zero_ok: bool) -> None:
    if zero_ok and not isinstance(value, bool) and value in (0, "0", "0s"):
        return
    try:
        seconds = parse_duration(value).total_seconds()
    except DurationError as exc:
        raise _Bad(str(exc)) from None
    if seconds <= 0 and not zero_ok:
        raise _Bad(f"must be longer than 0s, got {one_line(value, 40)}")


@_formats.checks("duration", raises=_Bad)
def _positive_duration(value: object) -> bool:
    _duration(value, zero_ok=False)
    return True


@_formats.checks("duration-or-zero", raises=_Bad)
def _duration_or_zero(value: object) -> bool:
    _duration(value, zero_ok=True)
    return True


@_formats.checks("env-name", raises=_Bad)
def _env_name(value: object) -> bool:
    if isinstance(value, str) and value.strip() and not ENV_NAME.match(value):
        # the value is not shown: a secret pasted where its variable's NAME belongs must not reach a log
        raise _Bad("is not an environment variable name (letters, digits and _; the value is not shown: write "
                   "the NAME of the variable that holds the secret, never the secret)")
    return True


@_formats.checks("websocket-url", raises=_Bad)
def _websocket_url(value: object) -> bool:
    if isinstance(value, str) and value.strip() and not value.startswith(("wss://", "ws://")):
        raise _Bad("must start with wss:// (or ws:// for a local test server)")
    return True


@_formats.checks("http-url", raises=_Bad)
def _http_url(value: object) -> bool:
    # the value is never echoed: a webhook URL may carry a credential in its path or query
    if isinstance(value, str) and not re.match(r"^https?://[^\s/?#]+", value):
        raise _Bad("must be an http:// or https:// URL")
    return True


@_formats.checks("listen", raises=_Bad)
def _listen(value: object) -> bool:
    if isinstance(value, str):
        port = value.rpartition(":")[2]
        if not (_ASCII_DIGITS.fullmatch(port) and len(port) <= 5 and 0 < int(port) < 65536):
            raise _Bad(f"must be HOST:PORT like 127.0.0.1:8787, got {one_line(repr(value), 60)}")
    return True


@_formats.checks("app-id", raises=_Bad)
def _app_id(value: object) -> bool:
    digits = value if isinstance(value, str) else str(value) if type(value) is int else ""
    if not (digits.isascii() and digits.isdigit() and 0 < len(digits) <= 12 and int(digits) > 0):
        raise _Bad(f"must be a number like 1089, got {describe(value)}")
    return True


def is_number(value: object) -> bool:
    """A finite number below 1e15, given as a YAML number or text (never a bool): what a numeric key takes."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False
        number = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return False
    return number.is_finite() and abs(number) < Decimal("1e15")


@_formats.checks("decimal", raises=_Bad)
def _decimal(value: object) -> bool:
    if not is_number(value):
        raise _Bad(f"expected a number, got {describe(value)}")
    return True


# ---- the schema ----

def _text(expected: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "pattern": r"\S", "x-expected": expected, **more}


def _env(expected: str = "the name of an environment variable") -> dict[str, Any]:
    return _text(expected, format="env-name")


def _events() -> dict[str, Any]:
    return {"type": "array", "x-expected": "a list of event names", "items": {"enum": list(EVENTS)}}


_DURATION = {"format": "duration"}
_NUMBER = {"format": "decimal"}
_BOOL = {"type": "boolean", "x-expected": "true or false"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fund-agent.yaml",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "database": _text("a database URL like sqlite:///ledger.db"),
        "database_password_env": _env(),
        "host_id": _text("a name for this agent like vps-1 (letters, digits, . _ : @ -)", maxLength=128,
                         **{"x-pattern": HOST_ID.pattern}),
        "policies": _text("a folder or file name"),
        "reload_every": {"format": "duration-or-zero"},
        "broker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "url": _text("a websocket URL like " + DEFAULT_URL, format="websocket-url"),
                "app_id": {"format": "app-id"},
                "token_env": _env(),
                "timeout": _DURATION,
                "settle_window": _DURATION,
            },
        },
        "equity": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "source": {"enum": list(SOURCES)},
                "dir": _text("a folder name"),
                "terminals": {
                    "type": "object",
                    "propertyNames": {"pattern": r"^MT[DR]?[0-9]+$", "x-key": True,
                                      "x-expected": "an MT5 login like MTR130002534 as the key"},
                    "additionalProperties": {
                        "type": "object",
                        "x-expected": "a mapping of path, server, password_env",
                        "additionalProperties": False,
                        "properties": {
                            "path": _text("a file name"),
                            "server": _text("a server name"),
                            "password_env": _env(),
                            "portable": _BOOL,
                        },
                    },
                },
                "probe_command": _text("a command line"),
                "probe_timeout": _DURATION,
                "seed": {"type": "integer", "x-expected": "a whole number", "minimum": -(2 ** 63) + 1,
                         "maximum": 2 ** 63 - 1},
                "start_equity": _NUMBER,
                "volatility": _NUMBER,
                "drift": _NUMBER,
            },
            "if": {"properties": {"source": {"const": "ea-file"}}, "required": ["source"]},
            "then": {"required": ["dir"], "x-why": "with the ea-file source"},
        },
        "http": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "listen": _text("HOST:PORT like 127.0.0.1:8787", format="listen"),
                "allow_remote": _BOOL,
                "intake_secret_env": _env(),
                "status_token_env": _env(),
            },
        },
        "notify": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "webhook": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "url": {"type": "string", "x-expected": "an http(s) URL", "x-secret": True,
                                "format": "http-url"},
                        "events": _events(),
                    },
                    "required": ["url"],
                },
                "telegram": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "token_env": _env(),
                        "chat_id": {"type": ["string", "integer"], "x-expected": "a chat id"},
                        "api_url": {"type": "string", "x-expected": "an http(s) URL", "format": "http-url"},
                        "events": _events(),
                    },
                },
            },
        },
        "logging": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "file": _text("a file name"),
                "max_bytes": {"type": "integer", "x-expected": "a whole number of bytes", "minimum": 1024,
                              "maximum": 2 ** 40},
                "backups": {"type": "integer", "x-expected": "a whole number", "minimum": 0, "maximum": 1000},
                "level": {"enum": list(LOG_LEVELS)},
            },
        },
    },
}

_validator = Draft202012Validator(SCHEMA, format_checker=_formats)


# ---- wording ----

def one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return f"a number ({one_line(value, 40)})"
    if value == "":
        return "empty text"
    return one_line(repr(value), 60)


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- the node walk: lines and duplicate keys ----

def node_lines(root: yaml.Node) -> tuple[dict[KeyPath, int], list[tuple[int, str]]]:
    """The line of every key (and list item) under root, by its path; and (line, message) for each duplicate or
    non-scalar key. Merge keys (`<<`) are left to PyYAML."""
    lines: dict[KeyPath, int] = {(): root.start_mark.line + 1}
    problems: list[tuple[int, str]] = []
    seen: set[int] = set()  # an alias is walked once: its lines are those of the anchor

    def walk(node: yaml.Node, where: KeyPath) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines.setdefault((*where, index), item.start_mark.line + 1)
                walk(item, (*where, index))
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append((line, f"{dotted(where) or 'the config'}: keys must be plain names"))
                    continue
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                if key in first:
                    problems.append((line, f"{dotted((*where, key))}: duplicate key (first given on line "
                                           f"{first[key]})"))
                    continue
                first[key] = line
                lines[(*where, key)] = line
                walk(value_node, (*where, key))

    walk(root, ())
    return lines, problems


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int:
    """The line of the nearest enclosing key that has one."""
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


# ---- validation ----

def _message(error: ValidationError) -> Iterable[tuple[KeyPath, str]]:
    """One validation error -> (path, message) pairs; an unknown-keys error gives one pair per key."""
    path: KeyPath = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    value = error.instance
    keyword = error.validator
    expected = schema.get("x-expected")
    shown = "" if schema.get("x-secret") else f", got {describe(value)}"
    if keyword == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        for key in value:
            if key not in allowed:
                yield (*path, key), f"unknown key (expected one of: {', '.join(allowed)})"
        return
    if keyword == "type":
        if error.validator_value == "object":
            yield path, f"must be {expected or 'a mapping of keys to values'}{shown}"
        else:
            yield path, f"expected {expected or error.validator_value}{shown}"
        return
    if keyword == "format" and isinstance(error.cause, _Bad):
        yield path, str(error.cause)
        return
    if keyword == "enum":
        yield path, f"must be one of {', '.join(map(str, error.validator_value))}{shown}"
        return
    if keyword == "required":
        why = schema.get("x-why")
        for key in error.validator_value:
            if isinstance(value, dict) and key not in value:
                yield (*path, key), "is required" + (f" {why}" if why else "")
        return
    if keyword == "pattern" and schema.get("x-key"):  # propertyNames: the error is the key's, at its line
        yield (*path, str(value)), f"expected {expected}, got {describe(value)}"
        return
    if keyword in ("pattern", "minLength") and expected:
        yield path, f"expected {expected}{shown}"
        return
    if keyword == "maxLength" and expected:
        yield path, f"expected {expected}, got text of {len(value)} characters"
        return
    if keyword == "minimum":
        yield path, f"must be at least {error.validator_value}{shown}"
        return
    if keyword == "maximum":
        yield path, f"must be at most {error.validator_value}{shown}"
        return
    yield path, one_line(error.message)


def _leaves(errors: Iterable[ValidationError]) -> Iterable[ValidationError]:
    """`then` and the like wrap their errors: report what is inside."""
    for error in errors:
        if error.context:
            yield from _leaves(error.context)
        else:
            yield error


def _semantic(raw: dict[str, Any]) -> Iterable[tuple[KeyPath, str]]:
    """Rules that tie keys together or need more than a schema can say."""
    host_id = raw.get("host_id")
    if isinstance(host_id, str) and host_id.strip() and not HOST_ID.match(host_id):
        yield ("host_id",), (f"{one_line(repr(host_id), 60)} is not a usable agent name (letters, digits and "
                             ". _ : @ -, at most 128)")
    notify = raw.get("notify")
    telegram = notify.get("telegram") if isinstance(notify, dict) else None
    if isinstance(telegram, dict) and telegram and telegram.get("chat_id") in (None, ""):
        yield ("notify", "telegram", "chat_id"), "is required: the chat the messages go to"
    http = raw.get("http")
    if isinstance(http, dict) and isinstance(http.get("listen"), str):
        host = http["listen"].rpartition(":")[0].strip("[]") or "127.0.0.1"
        if not is_loopback(host) and not http.get("status_token_env"):
            yield ("http", "listen"), (f"{one_line(repr(http['listen']), 60)} is not a loopback address: anyone "
                                       "who can reach it would see the status page and metrics; set "
                                       "http.status_token_env to the name of an environment variable holding a "
                                       "bearer token (or listen on 127.0.0.1)")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def problems_of(raw: object, lines: dict[KeyPath, int], file: str) -> list[Problem]:
    """Every problem of a constructed config, at its line, in line order."""
    found: list[tuple[int, str]] = []
    for error in _leaves(_validator.iter_errors(raw)):
        for path, message in _message(error):
            found.append((line_of(lines, path), f"{dotted(path) or 'config'}: {message}"))
    if isinstance(raw, dict) and not found:
        for path, message in _semantic(raw):
            found.append((line_of(lines, path), f"{dotted(path)}: {message}"))
    return [Problem(file, line, message) for line, message in sorted(set(found))]
