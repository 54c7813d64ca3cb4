"""Shared fixtures: a real Deriv-protocol server on 127.0.0.1, real SQLite files, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.broker.fake import FakeDeriv
from agent.equity.base import Snapshot
from agent.timeutil import Clock

TOKEN = "test-token-5e3cr3t-value"
FUNDING = "CR4000128"
MT5 = "MTR130002534"
REPO = Path(__file__).resolve().parents[1]


def make_fake() -> FakeDeriv:
    server = FakeDeriv()
    server.add_account(FUNDING, "USD", "10000.00")
    server.add_account(MT5, "USD", "450.00", mt5=True)
    server.add_token(TOKEN, FUNDING, ("read", "payments"))
    server.add_token("read-only-token", FUNDING, ("read",))
    server.start()
    return server


@pytest.fixture
def fake():
    server = make_fake()
    yield server
    server.stop()
    assert not server.bad_replies, server.bad_replies


def write_status(directory: Path, login: int = 130002534, equity: str = "450.00", *, age: float = 0.0,
                 connected: bool = True, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    body = {"schema": 1, "login": login, "server": "DerivSVG-Server", "currency": "USD", "balance": 450.00,
            "equity": "EQUITY", "margin": 0, "margin_free": 450.00, "margin_level": 0, "positions": 0,
            "connected": connected, "time": int(time.time() - age)}
    body.update(extra)
    text = json.dumps(body).replace('"EQUITY"', equity)
    path = directory / f"status-{login}.json"
    path.write_text(text)
    return path


@pytest.fixture
def workspace(tmp_path: Path, fake: FakeDeriv):
    """A config dir with the ea-file source, one policy and the fake broker's URL."""
    return make_workspace(tmp_path, fake)


def make_workspace(tmp_path: Path, fake: FakeDeriv, extra_broker: str = "") -> Path:
    (tmp_path / "policies").mkdir(parents=True)
    policy = (REPO / "policies" / "example.yaml").read_text()
    (tmp_path / "policies" / "example.yaml").write_text(policy)
    (tmp_path / "fund-agent.yaml").write_text(
        "database: sqlite:///ledger.db\n"
        "policies: policies/\n"
        f"broker:\n  url: {fake.url}\n  app_id: 1089\n  token_env: DERIV_API_TOKEN\n  timeout: 5s\n{extra_broker}"
        "equity:\n  source: ea-file\n  dir: status\n")
    return tmp_path


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@contextmanager
def deadline(seconds: int = 10):
    """Fail (instead of hanging the suite) if the body blocks: a FIFO read, a /dev/zero read."""

    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class FixedSource:
    """An equity source whose equity the test sets; readings are taken 'now' on the given clock."""

    name = "fixed"

    def __init__(self, clock: Clock, equity: str = "1500") -> None:
        self.clock = clock
        self.equity = Decimal(equity)

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        return Snapshot(login="130002534", balance=self.equity, equity=self.equity, margin=Decimal(0),
                        margin_free=self.equity, margin_level=Decimal(0), currency="USD", positions=0,
                        connected=True, taken_at=self.clock.now(), source=self.name)

    def close(self) -> None:
        pass


class Receiver:
    """A local HTTP receiver (webhook sink, Telegram API stand-in) that records every POST as (path, body)."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[str, dict]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.posts.append((self.path, body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def received(self) -> list[dict]:
        return [body for _path, body in self.posts]

    def events(self) -> list[str]:
        return [body["event"] for body in self.received]

    def stop(self) -> None:
        self.server.shutdown()
