"""Engine set-up (SQLite pragmas and BEGIN IMMEDIATE; PostgreSQL timeouts, pre-ping and snapshot readers) and
migrations at start."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

# Every migration this build ships, oldest first, and the newest. Checked against migrations/ by a test; lets a
# ledger that is already current open without importing Alembic (a third of the start-up time of every command),
# and a ledger written by a newer fund-agent be refused before anything reads or copies it.
KNOWN = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")
HEAD = KNOWN[-1]
READ_ONLY_OPTION = "fund_agent_read_only"
JOURNAL_OPTION = "fund_agent_journal"
# PostgreSQL: a writer that waits this long for a row or table lock gives up (the tick retries on the next pass)
# instead of stalling its lane; no statement of ours runs for long, so one that does is stuck.
LOCK_TIMEOUT_MS = 10_000
STATEMENT_TIMEOUT_MS = 60_000
IDLE_IN_TRANSACTION_MS = 10_000  # well below the default lease (39 s): see the options below
CONNECT_TIMEOUT_S = 10
# pg_advisory_lock key of `db upgrade` (any fixed signed 64-bit number: 'fund-agt' in ASCII)
MIGRATION_LOCK_KEY = 0x66756E642D616774
MIGRATION_LOCK_TIMEOUT = "5min"  # a concurrent upgrade waits for the one running, not for LOCK_TIMEOUT_MS


class LedgerError(Exception):
    """A ledger that cannot be used: the message is one line for the operator (a path and a reason, no SQL)."""


def backend(url: str) -> str:
    """The URL's database kind: "sqlite", "postgresql"..."""
    return make_url(url).get_backend_name()


def is_postgresql(url: str) -> bool:
    return backend(url) == "postgresql"


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
    # PostgreSQL's full text adds DETAIL (the row's values) and LINE (the SQL): only its primary message is kept
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    text = primary or (str(orig) if orig is not None else (getattr(exc, "strerror", None) or type(exc).__name__))
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


def _database_password(password_env: str | None) -> str | None:
    if password_env is None:
        return None  # libpq's own PGPASSWORD / .pgpass, or no password at all
    value = os.environ.get(password_env, "")
    if not value:
        raise LedgerError(f"the database password is not set: environment variable {password_env} is empty or "
                          "missing (database_password_env)")
    from agent import logs

    logs.register_secret(value)  # whatever echoes it later (a driver error) prints *** instead
    return value


def _postgres_engine(url: str, password_env: str | None) -> Engine:
    connect_args: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": "fund-agent",
        # idle in a transaction: a frozen agent (SIGSTOP, a paused VM) must not keep the rows it locked (the
        # audit chain's head, a funding row, lease rows) and stall every other host; no transaction of ours waits
        # on the network, so a few seconds idle means the process is not running
        "options": f"-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS} "
                   f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
    }
    password = _database_password(password_env)
    if password is not None:
        # in connect_args, never in the URL: a URL is rendered in logs, errors and the engine's repr
        connect_args["password"] = password
    # pre-ping: a connection the server or a NAT dropped while idle is replaced, not handed to a money write
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_engine(url: str, readonly: bool = False, password_env: str | None = None) -> Engine:
    path = sqlite_path(url)
    if path is None:
        if is_postgresql(url):
            return _postgres_engine(url, password_env)
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
        options = conn.get_execution_options()
        reading = readonly or options.get(READ_ONLY_OPTION)
        if not reading:
            # A no-op decision's commit may skip the fsync (synchronous=NORMAL: the WAL keeps commits atomic and
            # in order; a power loss can drop the newest such commits, never half of one); every other write
            # commits FULL. The level can only change outside a transaction, so it is set here, when it differs.
            level = "NORMAL" if options.get(JOURNAL_OPTION) else "FULL"
            info = conn.connection.info
            if info.get("synchronous") != level:
                conn.exec_driver_sql(f"PRAGMA synchronous={level}")
                info["synchronous"] = level
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


def _no_version_table(exc: DBAPIError) -> bool:
    """A missing alembic_version table: SQLite's OperationalError, PostgreSQL's UndefinedTable (42P01)."""
    if isinstance(exc, OperationalError) and "no such table" in str(exc.orig):
        return True
    return isinstance(exc, ProgrammingError) and getattr(exc.orig, "sqlstate", None) == "42P01"


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: Connection) -> str | None:
    if conn.dialect.name == "postgresql":
        # probe first: a failed SELECT would abort the transaction the migration runs in
        if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
            return None
    try:
        versions = [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
    except (OperationalError, ProgrammingError) as exc:  # no alembic_version table: an empty (or foreign) database
        if _no_version_table(exc):
            return None
        raise
    if len(versions) > 1:
        raise LedgerError(f"the ledger has several migration heads ({', '.join(versions)}): repair it by hand")
    return versions[0] if versions else None


def upgrade(url: str, now: datetime | None = None, password_env: str | None = None
            ) -> tuple[str | None, str | None, Path | None]:
    """Bring the ledger to the newest schema. Copies an existing SQLite file first; on PostgreSQL prints how to
    back the database up. Returns (from, to, backup). A ledger at a revision this build does not know is refused
    (LedgerError) before anything is copied."""
    with using(url):
        engine = make_engine(url, password_env=password_env)
        try:
            if engine.dialect.name == "postgresql":
                return _upgrade_postgresql(url, engine)
            return _upgrade(url, engine, now)
        finally:
            engine.dispose()


def backup_command(url: str, revision: str | None) -> str:
    """The pg_dump command line that backs up a PostgreSQL ledger (the password comes from libpq's PGPASSWORD
    or .pgpass, never from this line)."""
    parsed = make_url(url)
    args = ["pg_dump", "--format=custom", f"--file={parsed.database or 'ledger'}-{revision or 'empty'}.dump"]
    if parsed.host:
        args.append(f"--host={parsed.host}")
    if parsed.port:
        args.append(f"--port={parsed.port}")
    if parsed.username:
        args.append(f"--username={parsed.username}")
    args.append(parsed.database or "")
    return shlex.join(args)


def _upgrade_postgresql(url: str, engine: Engine) -> tuple[str | None, str | None, Path | None]:
    before = current_revision(engine)
    if before == HEAD:
        return before, before, None
    check_known(url, before)
    head = head_revision()
    from alembic import command

    # The session advisory lock makes a concurrent upgrade (two hosts starting at once) wait for this one. The
    # revision is read again after it, in a transaction begun after the lock was granted (a transaction that was
    # already open may not see the other's new tables in the catalog), so the second finds the work done
    # instead of creating the tables twice. One transaction: PostgreSQL's DDL is transactional, so a failed step
    # leaves the old schema whole.
    with engine.connect() as conn:
        conn.execute(text(f"SET lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"))
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        conn.commit()
        try:
            with conn.begin():
                conn.execute(text("SET LOCAL statement_timeout = 0"))  # a rewrite of a large table may take long
                before = _revision(conn)
                check_known(url, before)
                if before == head:
                    return before, head, None
                if before is not None:
                    print(f"upgrading the ledger {describe(url)} from schema revision {before} to {head}; to keep "
                          f"a copy of it first, stop and run: {backup_command(url, before)}", file=sys.stderr)
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                conn.commit()
            except DBAPIError:  # a broken connection: the lock ended with its session; keep the first error
                pass
    return before, head, None


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

    def __init__(self, url: str, readonly: bool = False, password_env: str | None = None) -> None:
        self.url = url
        with using(url):
            self.engine = make_engine(url, readonly=readonly, password_env=password_env)
        self.dialect = self.engine.dialect.name
        import agent.audit.chain  # noqa: F401 - registers the hash-chain listener on every writing session

        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        from agent.ledger import outbox  # imported here: it needs the models, which need nothing of this module

        outbox.install(self.sessions)  # notifications are staged in the transaction of their event
        reading: dict[str, Any] = {READ_ONLY_OPTION: True}
        if self.dialect == "postgresql":
            # one snapshot for the whole read (a report's totals agree with its rows), and the server refuses a
            # write from a reader: the same guarantees as SQLite's deferred read transaction under WAL
            reading.update(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        self.readers = sessionmaker(self.engine.execution_options(**reading), expire_on_commit=False)
        self.journals = sessionmaker(self.engine.execution_options(**{JOURNAL_OPTION: True}), expire_on_commit=False)
        if self.dialect == "postgresql":
            event.listen(self.journals, "after_begin", _relaxed_commit)

    @classmethod
    def open(cls, url: str, password_env: str | None = None) -> Ledger:
        upgrade(url, password_env=password_env)
        return cls(url, password_env=password_env)

    @classmethod
    def open_readonly(cls, url: str, password_env: str | None = None, current: bool = True) -> Ledger | None:
        """For audit commands; None when no ledger file exists yet (nothing recorded)."""
        path = sqlite_path(url)
        if path is not None and not path.exists():
            return None
        ledger = cls(url, readonly=path is not None, password_env=password_env)
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
        if current and revision != HEAD:  # the reading code expects this build's tables and columns
            ledger.close()
            raise LedgerError(f"the ledger {describe(url)} is at schema revision {revision}; this fund-agent reads "
                              f"revision {HEAD}: run `fund-agent db upgrade` (the service upgrades it when it "
                              "starts)")
        return ledger

    def session(self) -> Session:
        """A session for writing: its transaction begins IMMEDIATE."""
        return self.sessions()

    def journal_session(self) -> Session:
        """A writing session for decisions that did nothing (and what goes with them: the equity peak, the end
        of a run): committed without waiting for the disk (SQLite synchronous=NORMAL, PostgreSQL
        synchronous_commit off). Money rows never go through it."""
        return self.journals()

    def reader(self) -> Session:
        """A session that only reads: deferred BEGIN, a consistent snapshot, no write lock (on PostgreSQL:
        REPEATABLE READ, READ ONLY)."""
        return self.readers()

    def close(self) -> None:
        self.engine.dispose()


def _relaxed_commit(_session: Session, _transaction: Any, connection: Connection) -> None:
    connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def upsert(session: Session, model: Any, values: dict[str, Any], keys: Sequence[str],
           update: Sequence[str] = ()) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET <update> (DO NOTHING without `update`), in the session's
    transaction: one statement, so two writers never both see "no row" and both insert."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported ledgers
        raise LedgerError(f"no upsert for the {dialect} database")
    stmt = insert(model).values(**values)
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={name: stmt.excluded[name]
                                                                           for name in update})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)
