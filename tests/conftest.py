"""Shared fixtures: a real Deriv-protocol server on 127.0.0.1, real ledgers (SQLite files, or databases in a
private PostgreSQL cluster with FUND_AGENT_TEST_LEDGER=postgresql), real subprocesses."""

from __future__ import annotations

import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
LEDGER_KIND = os.environ.get("FUND_AGENT_TEST_LEDGER", "sqlite").strip().lower() or "sqlite"
if LEDGER_KIND not in ("sqlite", "postgresql"):
    raise SystemExit(f"FUND_AGENT_TEST_LEDGER must be sqlite or postgresql, not {LEDGER_KIND!r}")
POSTGRES = LEDGER_KIND == "postgresql"


# ---- the ledger every test gets ----

def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries of the machine (Debian/Ubuntu layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
                   if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust auth, no fsync: speed, not durability, is what tests
    need), run by the `postgres` OS user when the tests run as root (the server refuses to run as root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="fund-agent-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._counter = itertools.count(1)

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        # the superuser needs no password; every other role does (tests of database_password_env)
        hba = self.data / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                       "host all all 127.0.0.1/32 scram-sha-256\n")
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(hba, entry.pw_uid, entry.pw_gid)
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                   "-c shared_buffers=64MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, prefix: str = "ledger") -> str:
        name = f"{prefix}_{os.getpid()}_{next(self._counter)}"
        # STRATEGY file_copy: an empty database is a few MB; copying files beats WAL-logging every page
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY file_copy")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_CLUSTER: PgCluster | None = None


_CLUSTER_LOCK = threading.Lock()  # tests that make ledgers from several threads (the crash matrix) start one


def pg_cluster() -> PgCluster:
    """The session's private cluster, started on first use (SQLite runs use it only in tests/test_postgres*)."""
    with _CLUSTER_LOCK:
        return _pg_cluster()


def _pg_cluster() -> PgCluster:
    global _CLUSTER
    if _CLUSTER is None:
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip("no PostgreSQL server binaries on this machine (initdb)")
        cluster = PgCluster(bindir)
        cluster.start()
        _CLUSTER = cluster
    return _CLUSTER


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _CLUSTER is not None:
        _CLUSTER.stop()


def pytest_configure(config: pytest.Config) -> None:
    if POSTGRES and postgres_bin() is None:
        raise pytest.UsageError("FUND_AGENT_TEST_LEDGER=postgresql but no PostgreSQL server binaries were found "
                                "(apt-get install postgresql)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"ledger: {LEDGER_KIND} (FUND_AGENT_TEST_LEDGER)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not POSTGRES:
        return
    skip = pytest.mark.skip(reason="SQLite-only (files, pragmas or the lock file): runs in the SQLite run")
    for item in items:
        if "sqlite_only" in item.keywords:
            item.add_marker(skip)


class LedgerUrls:
    """This test's ledgers: a SQLite file per path, or on PostgreSQL one fresh empty database per path (created
    on first use, dropped after the test), so that a test that names `workspace / "ledger.db"` twice, or a CLI
    subprocess reading the workspace's config, meets the same ledger."""

    def __init__(self) -> None:
        self.databases: dict[Path, str] = {}

    def url(self, path: Path) -> str:
        if not POSTGRES:
            return f"sqlite:///{path}"
        key = Path(os.path.abspath(path))
        cluster = pg_cluster()
        with _CLUSTER_LOCK:
            if key not in self.databases:
                self.databases[key] = cluster.create_database()
            return cluster.url(self.databases[key])

    def close(self) -> None:
        for name in self.databases.values():
            try:
                pg_cluster().drop_database(name)
            except Exception:  # noqa: BLE001 - a leftover database dies with the cluster at the end
                pass
        self.databases.clear()


_URLS = LedgerUrls()


def ledger_url(path: Path) -> str:
    """The URL of the ledger the test calls `path`: `sqlite:///path`, or its PostgreSQL database."""
    return _URLS.url(path)


@pytest.fixture(autouse=True)
def _ledgers() -> Iterator[LedgerUrls]:
    yield _URLS
    _URLS.close()


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
    database = ledger_url(tmp_path / "ledger.db") if POSTGRES else "sqlite:///ledger.db"
    (tmp_path / "fund-agent.yaml").write_text(
        f"database: {database}\n"
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
