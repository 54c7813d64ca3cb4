"""Engine set-up (SQLite pragmas, BEGIN IMMEDIATE) and migrations at start."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

# Every migration this build ships, oldest first, and the newest. Checked against migrations/ by a test; lets a
# ledger that is already current open without importing Alembic (a third of the start-up time of every command),
# and a ledger written by a newer fund-agent be refused before anything reads or copies it.
KNOWN = ("0001", "0002", "0003")
HEAD = KNOWN[-1]
READ_ONLY_OPTION = "fund_agent_read_only"


class LedgerError(Exception):
    """A ledger that cannot be used: the message is one line for the operator (a path and a reason, no SQL)."""


def describe(url: str) -> str:
    """The ledger as the operator knows it: the file's path, or the URL without its password."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is named by its scheme only
        return url.split(":", 1)[0] + ":..."


def db_reason(exc: BaseException) -> str:
    """The database's own one-line reason for a failure: never the SQL, its parameters or a link."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else (getattr(exc, "strerror", None) or type(exc).__name__)
    return " ".join(text.split()) or type(orig if orig is not None else exc).__name__


@contextmanager
def using(url: str) -> Iterator[None]:
    """Opening the ledger: a database or file-system failure becomes a LedgerError naming the ledger."""
    try:
        yield
    except DBAPIError as exc:
        path = sqlite_path(url)
        reason = "it is a directory, not a file" if path is not None and path.is_dir() else db_reason(exc)
        raise LedgerError(f"cannot use the ledger {describe(url)}: {reason}") from exc
    except OSError as exc:
        raise LedgerError(f"cannot use the ledger {describe(url)}: {db_reason(exc)}") from exc


def is_newer(revision: str | None) -> bool:
    """A revision this build does not know and that is not an older number: a newer fund-agent wrote it."""
    if revision is None or revision in KNOWN:
        return False
    return not (revision.isdigit() and int(revision) < int(HEAD))


def check_known(url: str, revision: str | None, backup: Path | None = None) -> None:
    """Refuse a ledger at a revision this build does not know: one migrated by a newer fund-agent (this build
    cannot know what its schema means), or an unknown older one (no migration starts from it)."""
    if revision is None or revision in KNOWN:
        return
    if is_newer(revision):
        raise LedgerError(f"the ledger {describe(url)} is at schema revision {revision}, which this fund-agent "
                          f"does not know (it knows up to {HEAD}): upgrade fund-agent")
    copy = f" (a copy of it: {backup})" if backup is not None else ""
    raise LedgerError(f"the ledger {describe(url)} is at schema revision {revision}, which no migration of this "
                      f"fund-agent starts from: repair it by hand{copy}")


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
        except OperationalError as exc:  # no alembic_version table: an empty (or foreign) database
            if "no such table" in str(exc.orig):
                return None
            raise
    if len(versions) > 1:
        raise LedgerError(f"the ledger has several migration heads ({', '.join(versions)}): repair it by hand")
    return versions[0] if versions else None


def upgrade(url: str, now: datetime | None = None) -> tuple[str | None, str | None, Path | None]:
    """Bring the ledger to the newest schema. Copies an existing SQLite file first. Returns (from, to, backup).
    A ledger at a revision this build does not know is refused (LedgerError) before anything is copied."""
    with using(url):
        engine = make_engine(url)
        try:
            return _upgrade(url, engine, now)
        finally:
            engine.dispose()


def _upgrade(url: str, engine: Engine, now: datetime | None) -> tuple[str | None, str | None, Path | None]:
    before = current_revision(engine)
    if before == HEAD:
        return before, before, None
    if is_newer(before):  # refused before anything is copied: a copy per attempt would only pile up
        check_known(url, before)
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
    check_known(url, before, backup)  # an unknown older revision: fails loudly, the copy kept, nothing rewritten
    if before != head:
        from alembic import command

        cfg = alembic_config(url)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    return before, head, backup


class Ledger:
    """The open ledger: an engine plus a session factory."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        self.url = url
        with using(url):
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
        try:
            with using(url):
                revision = current_revision(ledger.engine)
            check_known(url, revision)
        except BaseException:
            ledger.close()
            raise
        if revision is None:
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
