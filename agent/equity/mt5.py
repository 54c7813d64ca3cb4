"""The `mt5` equity source: one probe process per account, each with a deadline per request.

A probe that does not answer in time is killed and started again on the next reading, so a hung terminal
never freezes the agent; other accounts keep their own probes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from agent.config import ConfigError, MissingSecret
from agent.equity.base import NoReading, Snapshot, login_digits
from agent.timeutil import Clock

log = logging.getLogger("agent.equity.mt5")
PROBE_SCRIPT = Path(__file__).with_name("mt5_probe.py")


@dataclass(frozen=True)
class Terminal:
    path: str | None
    server: str | None
    password_env: str | None
    portable: bool = False


class ProbeProcess:
    """One running probe, spoken to with JSON lines and a deadline per request."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.command = command
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.replies: queue.Queue[str | None] = queue.Queue()
        self.restarts = 0
        self._next_id = 0

    def start(self) -> None:
        self.replies = queue.Queue()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1, env=self.env)
        threading.Thread(target=self._read, args=(self.proc, self.replies), daemon=True,
                         name="mt5-probe-reader").start()

    @staticmethod
    def _read(proc: subprocess.Popen[str], replies: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            replies.put(line)
        replies.put(None)  # the probe exited

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, message: dict[str, Any], deadline: float) -> dict[str, Any]:
        if not self.alive:
            raise NoReading("the MT5 probe is not running")
        assert self.proc is not None and self.proc.stdin is not None
        self._next_id += 1
        ident = self._next_id
        try:
            self.proc.stdin.write(json.dumps({**message, "id": ident}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            raise NoReading("the MT5 probe stopped taking requests; it will be restarted") from None
        end = time.monotonic() + deadline
        while True:
            left = end - time.monotonic()
            try:
                line = self.replies.get(timeout=max(0.0, left))
            except queue.Empty:
                self.kill()
                raise NoReading(f"the MT5 probe did not answer within {deadline:g}s (terminal hung?); it was "
                                "killed and will be restarted") from None
            if line is None:
                self.kill()
                raise NoReading("the MT5 probe exited; it will be restarted")
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # not ours (a stray print from the package): ignore
            if isinstance(reply, dict) and reply.get("id") in (ident, None):
                return reply

    def kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.proc = None
            self.restarts += 1


def _decimal(value: Any, digits: int, what: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise NoReading(f"the terminal reported a {what} that is not a number: {value!r}") from None
    if not number.is_finite():
        raise NoReading(f"the terminal reported a {what} that is not finite")
    # MT5 keeps money in doubles at the account's currency_digits: round the double's text to them.
    return number.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_EVEN)


def snapshot_from(reply: dict[str, Any], digits_expected: str, taken_at: datetime) -> Snapshot:
    account = reply.get("account") or {}
    terminal = reply.get("terminal") or {}
    login = str(account.get("login", ""))
    if login != digits_expected:
        raise NoReading(f"the terminal is logged in to {login or 'nothing'}, not {digits_expected}")
    try:
        digits = int(account.get("currency_digits", 2))
    except (TypeError, ValueError):
        digits = 2
    values = {k: _decimal(account.get(k), digits, k) for k in ("balance", "equity", "margin", "margin_free")}
    level = _decimal(account.get("margin_level", 0), 2, "margin_level")
    connected = terminal.get("connected") is True
    return Snapshot(login=login, balance=values["balance"], equity=values["equity"], margin=values["margin"],
                    margin_free=values["margin_free"], margin_level=level, currency=str(account.get("currency", "")),
                    positions=None, connected=connected, taken_at=taken_at, source="mt5")


class Mt5Source:
    name = "mt5"

    def __init__(self, clock: Clock, terminals: dict[str, Terminal], probe_command: list[str] | None = None,
                 deadline: float = 10.0, init_timeout_ms: int = 10000, env: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.terminals = terminals
        self.command = (probe_command or [sys.executable]) + [str(PROBE_SCRIPT)]
        self.deadline = deadline
        self.init_timeout_ms = init_timeout_ms
        self.env = env
        self.probes: dict[str, ProbeProcess] = {}
        self._locks: dict[str, threading.Lock] = {}

    def _init_message(self, mt5_login: str) -> dict[str, Any]:
        terminal = self.terminals.get(mt5_login) or Terminal(None, None, None)
        message: dict[str, Any] = {"op": "init", "login": int(login_digits(mt5_login)), "timeout": self.init_timeout_ms,
                                   "portable": terminal.portable}
        if terminal.path:
            message["path"] = terminal.path
        if terminal.server:
            message["server"] = terminal.server
        if terminal.password_env:
            password = os.environ.get(terminal.password_env, "")
            if not password:
                raise MissingSecret(terminal.password_env, f"MT5 password of {mt5_login}")
            message["password"] = password
        return message

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        lock = self._locks.setdefault(mt5_login, threading.Lock())
        with lock:  # one request at a time per probe
            probe = self.probes.get(mt5_login)
            if probe is None or not probe.alive:
                probe = probe or ProbeProcess(self.command, self.env)
                self.probes[mt5_login] = probe
                probe.start()
                reply = probe.request(self._init_message(mt5_login), self.deadline + self.init_timeout_ms / 1000)
                if not reply.get("ok"):
                    # keep the probe: it re-initializes with backoff on the next snapshot request
                    raise NoReading(_describe(reply))
            reply = probe.request({"op": "snapshot"}, self.deadline)
        if not reply.get("ok"):
            raise NoReading(_describe(reply))
        snapshot = snapshot_from(reply, login_digits(mt5_login), self.clock.now())
        if not snapshot.connected:
            raise NoReading("terminal_info().connected is False: the terminal does not reach the trade server")
        return snapshot

    def close(self) -> None:
        for probe in self.probes.values():
            if probe.alive:
                try:
                    probe.request({"op": "shutdown"}, 2.0)
                except NoReading:
                    pass
            probe.kill()


CODES = {-1: "generic failure", -2: "invalid parameters", -3: "no memory", -4: "not found", -5: "invalid version",
         -6: "authorization failed", -7: "unsupported", -8: "auto-trading disabled", -10000: "internal failure",
         -10001: "IPC send failed", -10002: "IPC receive failed", -10003: "IPC initialize failed (terminal not found)",
         -10004: "no IPC connection", -10005: "IPC timeout"}


def _describe(reply: dict[str, Any]) -> str:
    code = reply.get("code")
    meaning = CODES.get(code, "error") if isinstance(code, int) else "error"
    return f"MT5 {meaning} ({code}): {reply.get('error', '')}"


def terminals_from_options(options: dict[str, Any]) -> dict[str, Terminal]:
    raw = options.get("terminals") or {}
    if not isinstance(raw, dict):
        raise ConfigError("equity.terminals must map MT5 logins to {path, server, password_env}")
    out = {}
    for login, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"equity.terminals.{login} must be a mapping")
        out[str(login)] = Terminal(path=spec.get("path"), server=spec.get("server"),
                                   password_env=spec.get("password_env"), portable=bool(spec.get("portable")))
    return out


def probe_command_from_options(options: dict[str, Any]) -> list[str] | None:
    command = options.get("probe_command")
    if not command:
        return None
    return shlex.split(str(command), posix=os.name != "nt")

