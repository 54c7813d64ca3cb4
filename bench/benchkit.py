"""Shared pieces of the benchmarks: a Deriv-protocol server that timestamps transfer frames, policy texts,
equity sources, workspaces for `fund-agent run` subprocesses, and bulk seeding of ledgers."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.broker.fake import FakeDeriv
from agent.equity.base import NoReading, Snapshot, login_digits
from agent.timeutil import Clock

ROOT = Path(__file__).resolve().parents[1]
FUNDING = "CR4000128"
TOKEN = "bench-token-0123456789abcdef"
INTAKE_SECRET = "bench-intake-secret"


class TimedFake(FakeDeriv):
    """The tests' Deriv-protocol server, noting when each `mt5_deposit` frame arrives (perf_counter, which the
    bench process shares with its server thread)."""

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock, max_transfer=Decimal(10**9), daily_transfers=10**9)
        self.deposit_arrivals: list[float] = []
        self.requests = deque(maxlen=100)  # the request log is for tests; a long bench must not grow it

    async def _on_message(self, conn: Any, session: dict[str, Any], text: str | bytes) -> None:
        if (b'"mt5_deposit"' if isinstance(text, bytes) else '"mt5_deposit"') in text:
            self.deposit_arrivals.append(time.perf_counter())
        await super()._on_message(conn, session, text)

    def wait_deposit(self, after: int, timeout: float) -> float | None:
        """The arrival time of deposit frame number `after` (0-based), or None if none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.deposit_arrivals) > after:
                return self.deposit_arrivals[after]
            time.sleep(0.0005)
        return None


def start_fake(clock: Clock | None = None, accounts: list[str] = ()) -> TimedFake:  # type: ignore[assignment]
    fake = TimedFake(clock)
    fake.add_account(FUNDING, "USD", "1000000000.00")
    for mt5 in accounts:
        fake.add_account(mt5, "USD", "1500.00", mt5=True)
    fake.add_token(TOKEN, FUNDING)
    fake.start()
    return fake


def mt5_login(i: int) -> str:
    return f"MTR{130000000 + i}"


def policy_text(mt5: str, every: str = "60s", full: bool = True) -> str:
    """`full`: the example policy's limits and kill switch (an idle tick reads them all); otherwise a top-up
    band only, so that one account can be topped up again and again (the transfer-path benchmarks)."""
    if full:
        text = (ROOT / "policies" / "example.yaml").read_text()
        return text.replace("MTR130002534", mt5).replace("name: example", f"name: p{mt5}").replace(
            "every: 60s", f"every: {every}")
    return (f"version: 1\nname: p{mt5}\naccount:\n  mt5: {mt5}\n  funding: {FUNDING}\n  currency: USD\n"
            f"schedule:\n  every: {every}\n  max_equity_age: 30s\n"
            "top_up:\n  when_equity_below: 500\n  target_equity: 1000\n  min_amount: 10\n  max_amount: 1000\n")


class TableSource:
    """Equity per account set by the bench; readings are taken 'now' on the clock."""

    name = "bench"

    def __init__(self, clock: Clock, equity: str = "1500.00") -> None:
        self.clock = clock
        self.default = Decimal(equity)
        self.equity: dict[str, Decimal] = {}

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        equity = self.equity.get(mt5_login, self.default)
        if equity < 0:
            raise NoReading("no reading")
        return Snapshot(login=login_digits(mt5_login), balance=equity, equity=equity, margin=Decimal(0),
                        margin_free=equity, margin_level=Decimal(0), currency="USD", positions=0, connected=True,
                        taken_at=self.clock.now(), source=self.name)

    def close(self) -> None:
        pass


def status_json(mt5: str, equity: str, at: float | None = None) -> bytes:
    body = {"schema": 1, "login": int(login_digits(mt5)), "server": "DerivSVG-Server", "currency": "USD",
            "balance": "EQUITY", "equity": "EQUITY", "margin": 0, "margin_free": "EQUITY", "margin_level": 0,
            "positions": 0, "connected": True, "time": int(time.time() if at is None else at)}
    return json.dumps(body).replace('"EQUITY"', equity).encode()


def write_status(directory: Path, mt5: str, equity: str) -> None:
    """Atomically, as the EA does (write a temporary file, then rename it over the old one)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"status-{login_digits(mt5)}.json"
    tmp = directory / f".status-{login_digits(mt5)}.tmp"
    tmp.write_bytes(status_json(mt5, equity))
    os.replace(tmp, final)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workspace(base: Path, fake: FakeDeriv | None, accounts: list[str], every: str, full: bool = True,
              http_port: int | None = None) -> Path:
    """A config folder for `fund-agent run`/`ledger`/`status`: one policy per account, the ea-file source."""
    (base / "policies").mkdir(parents=True, exist_ok=True)
    for mt5 in accounts:
        (base / "policies" / f"{mt5}.yaml").write_text(policy_text(mt5, every, full))
    url = fake.url if fake is not None else "ws://127.0.0.1:9/websockets/v3"
    text = (f"database: sqlite:///ledger.db\npolicies: policies/\nreload_every: 0s\n"
            f"broker:\n  url: {url}\n  app_id: 1089\n  token_env: DERIV_API_TOKEN\n  timeout: 5s\n"
            "equity:\n  source: ea-file\n  dir: status\n")
    if http_port is not None:
        text += f"http:\n  listen: 127.0.0.1:{http_port}\n  intake_secret_env: FUND_AGENT_BENCH_INTAKE\n"
    (base / "fund-agent.yaml").write_text(text)
    (base / "status").mkdir(exist_ok=True)
    return base


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    env.update({"DERIV_API_TOKEN": TOKEN, "FUND_AGENT_BENCH_INTAKE": INTAKE_SECRET})
    return env


def start_agent(base: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=base, env=agent_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def count_rows(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - our names
    except sqlite3.Error:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(args: list[str], cwd: Path) -> tuple[float, float, int, str]:
    """Run a command to its end: (wall seconds, peak RSS MiB of that child alone, exit code, stderr tail)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    _pid, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace")[-300:]
    proc.returncode = os.waitstatus_to_exitcode(status)
    return took, usage.ru_maxrss / 1024, proc.returncode, err


def median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 2) if values else None


def p95_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000, 2)


# ---- seeding (plain sqlite3: the bench needs volume, not the agent's write path) ----

def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seed_transfers(db: Path, accounts: list[str], per_account: int, now: datetime, txn_base: int = 10**9) -> int:
    """`per_account` confirmed top-ups and sweeps per account, the newest a day before `now`, one a day back."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    txn = txn_base
    rows = []
    total = 0
    for mt5 in accounts:
        for k in range(per_account):
            at = _stamp(now - timedelta(days=1 + k, minutes=k % 60))
            txn += 1
            kind = "top_up" if k % 2 else "sweep"
            rows.append((at, at, mt5, FUNDING, kind, 10000 + k, "USD", "confirmed", txn, f"p{mt5}", "0" * 64,
                         "450.00", "bench history", at))
            if len(rows) >= 50_000:
                total += _insert_transfers(conn, rows)
                rows = []
    total += _insert_transfers(conn, rows)
    conn.close()
    return total


def _insert_transfers(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    with conn:
        conn.executemany(
            "INSERT INTO transfers (created_at, updated_at, account, funding, kind, amount_minor, currency, state,"
            " broker_txn_id, policy, policy_sha256, equity, reason, sent_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows)
    return len(rows)


def seed_decisions(db: Path, accounts: list[str], per_account: int, now: datetime) -> int:
    """`per_account` no-op decisions per account, one a minute back from `now`, interleaved across accounts as
    a running agent writes them."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    total = 0
    rows = []
    details = json.dumps({"equity": "1500.00", "band": "in band"})
    for k in range(per_account - 1, -1, -1):
        at = _stamp(now - timedelta(minutes=k))
        for mt5 in accounts:
            rows.append((at, mt5, f"p{mt5}", "0" * 64, "none", None, "USD", "1500.00", 3,
                         "equity 1500.00 is within the band", None, details, None))
            if len(rows) >= 100_000:
                total += _insert_decisions(conn, rows)
                rows = []
    total += _insert_decisions(conn, rows)
    conn.close()
    return total


def _insert_decisions(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    with conn:
        conn.executemany(
            "INSERT INTO decisions (at, account, policy, policy_sha256, action, amount, currency, equity, "
            "equity_age_s, reason, bound_by, details, transfer_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    return len(rows)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
