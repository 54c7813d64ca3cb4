"""Engine set-up (SQLite pragmas, BEGIN IMMEDIATE) and migrations at start."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration. Checked against migrations/ by a test; lets a ledger that is already current open
# without importing Alembic (a third of the start-up time of every command).
HEAD = "0003"
READ_ONLY_OPTION = "fund_agent_read_only"


class LedgerError(Exception):
    pass


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the repository's migrations/."""
    try:
        import agent.migrations as shipped

        return Path(shipped.__file__).parent
    except ImportError:  # running from a source tree without an install
        return Path(__file__).resolve().parents[2] / "migrations"


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    # resolved (symlinks too): the lock beside the ledger must be the same file whichever path names the ledger
    return Path(parsed.database).resolve()


def make_engine(url: str, readonly: bool = False) -> Engine:
    path = sqlite_path(url)
    if path is None:
        return create_engine(url)
    if readonly:
        engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's begin event decide how a transaction starts (pysqlite's own BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if not readonly:
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: the intent row must survive a power loss before a byte goes to the broker.
            cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # type: ignore[no-untyped-def]
        # Writers take the write lock up front (IMMEDIATE): two writers never deadlock half-way through.
        # Readers (Ledger.reader) begin deferred and never wait for, or block, a writer under WAL.
        reading = readonly or conn.get_execution_options().get(READ_ONLY_OPTION)
        conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            versions = [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
        except OperationalError:  # no alembic_version table: an empty (or foreign) database
            return None
    if len(versions) > 1:
        raise LedgerError(f"the ledger has several migration heads ({', '.join(versions)}): repair it by hand")
    return versions[0] if versions else None


def upgrade(url: str, now: datetime | None = None) -> tuple[str | None, str | None, Path | None]:
    """Bring the ledger to the newest schema. Copies an existing SQLite file first. Returns (from, to, backup)."""
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        if before == HEAD:
            return before, before, None
        head = head_revision()
        backup = None
        path = sqlite_path(url)
        if before is not None and before != head and path is not None and path.exists():
            stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
            backup = path.with_name(f"{path.name}.bak-{before}-{stamp}")
            raw = engine.raw_connection()  # checkpoint (outside a transaction) so the copy holds everything
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
            shutil.copy2(path, backup)
        if before != head:
            from alembic import command

            cfg = alembic_config(url)
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        return before, head, backup
    finally:
        engine.dispose()


class Ledger:
    """The open ledger: an engine plus a session factory."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, readonly=readonly)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.readers = sessionmaker(self.engine.execution_options(**{READ_ONLY_OPTION: True}),
                                    expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Ledger:
        upgrade(url)
        return cls(url)

    @classmethod
    def open_readonly(cls, url: str) -> Ledger | None:
        """For audit commands; None when no ledger file exists yet (nothing recorded)."""
        path = sqlite_path(url)
        if path is not None and not path.exists():
            return None
        ledger = cls(url, readonly=path is not None)
        if current_revision(ledger.engine) is None:
            ledger.close()
            return None
        return ledger

    def session(self) -> Session:
        """A session for writing: its transaction begins IMMEDIATE."""
        return self.sessions()

    def reader(self) -> Session:
        """A session that only reads: deferred BEGIN, a consistent snapshot, no write lock."""
        return self.readers()

    def close(self) -> None:
        self.engine.dispose()
