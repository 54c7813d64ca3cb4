"""Logging: JSON lines when stderr is not a terminal, readable lines otherwise; secrets redacted; the
account, policy and transfer of the work in hand on every line (from a context variable)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import re
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_context: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar("fund_agent_log_context",
                                                                                   default=None)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """Any log line containing this value shows *** instead. Short values are ignored (too many false hits).

    The value is also recognised URL-encoded (quote / quote_plus, any hex case, any mix of raw and escaped
    characters) and in its repr / JSON-escaped forms, so that a secret with spaces or special characters is
    redacted wherever a URL, an exception message or a repr carried it."""
    global _pattern
    if value and len(value) >= 6:
        with _secrets_lock:
            if value not in _secrets:
                _secrets.add(value)
                _pattern = None


def _char_pattern(char: str) -> str:
    """A character, raw or percent-encoded (UTF-8, either hex case); a space may also be '+'."""
    escaped = "".join(f"(?i:%{b:02X})" for b in char.encode("utf-8", "surrogatepass"))
    options = [re.escape(char), escaped]
    if char == " ":
        options.append(r"\+")
    return "(?:" + "|".join(options) + ")"


def _secret_pattern(secret: str) -> str:
    forms = ["".join(_char_pattern(c) for c in secret)]
    for escaped in (repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        if escaped != secret:
            forms.append(re.escape(escaped))
    return "|".join(forms)


def _compiled() -> re.Pattern[str] | None:
    global _pattern
    with _secrets_lock:
        if _pattern is None and _secrets:
            # longest first: a secret that contains another is replaced whole
            ordered = sorted(_secrets, key=len, reverse=True)
            _pattern = re.compile("|".join(f"(?:{_secret_pattern(s)})" for s in ordered))
        return _pattern


def redact(text: str) -> str:
    pattern = _compiled()
    if pattern is None or not text:
        return text
    return pattern.sub("***", text)


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def add_context(**fields: object) -> None:
    _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            **{k: redact(v) if isinstance(v, str) else v for k, v in (_context.get() or {}).items()},
        }
        if record.exc_info:
            body["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            body["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = redact(" ".join(f"{k}={v}" for k, v in (_context.get() or {}).items()))
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        if ctx:
            line += f"  [{ctx}]"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + redact(self.formatStack(record.stack_info))
        return line


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (as logging.lastResort does): click's runner and
    pytest swap it, and a handler holding the old one would write to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


LEVELS = ("debug", "info", "warning", "error")
_chosen_level: int | None = None  # --log-level: wins over each command's default
_file: tuple[str, int, int] | None = None  # (path, max_bytes, backups) of the rotating file, once configured


def choose_level(name: str | None) -> None:
    """The operator's --log-level, kept for every later setup() of this process."""
    global _chosen_level
    _chosen_level = logging.getLevelName(name.upper()) if name else None


def use_file(path: str | None, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Also write the log to a rotating file (the config's `logging` section), for hosts with no journal."""
    global _file
    _file = (path, max_bytes, backups) if path else None
    root = logging.getLogger()
    setup(root.level or logging.WARNING, _json=_last_json)


_last_json: bool | None = None


def setup(level: int = logging.INFO, json_lines: bool | None = None, *, _json: bool | None = None) -> None:
    """The one logging set-up of every command: the redacting formatter on stderr (JSON lines when stderr is
    not a terminal), plus the rotating file when the config asks for one. Calling it again replaces the
    handlers (the level chosen with --log-level stays)."""
    global _last_json
    if json_lines is None:
        json_lines = _json if _json is not None else not sys.stderr.isatty()
    _last_json = json_lines
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
    root.addHandler(handler)
    if _file is not None:
        path, max_bytes, backups = _file
        try:
            rotating = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                            encoding="utf-8")
        except OSError as exc:  # a log file that cannot be opened must not stop the agent: say so on stderr
            root.warning("log file %s cannot be opened: %s", path, exc)
        else:
            rotating.setFormatter(JsonFormatter())  # a file is read by tools: always JSON lines
            root.addHandler(rotating)
    root.setLevel(_chosen_level if _chosen_level is not None else level)
    for noisy in ("apscheduler.executors.default", "apscheduler.scheduler", "websockets", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
