"""PostgreSQL as the ledger: types, timeouts, the password, snapshot readers, concurrent migrations. Runs in the
PostgreSQL run (FUND_AGENT_TEST_LEDGER=postgresql) against the private cluster of conftest."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import POSTGRES, REPO, ledger_url, pg_cluster, run_cli
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from agent.ledger import queries
from agent.ledger.db import (
    Ledger,
    LedgerError,
    backup_command,
    current_revision,
    describe,
    head_revision,
    make_engine,
    sqlite_path,
    upgrade,
)

pytestmark = pytest.mark.skipif(not POSTGRES, reason="PostgreSQL run only (FUND_AGENT_TEST_LEDGER=postgresql)")

NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
PASSWORD = "pg-s3cret pass/word?#"  # spaces and URL delimiters: it must never need to be in a URL


def test_an_empty_database_has_no_revision_and_upgrades_to_head(tmp_path):
    url = ledger_url(tmp_path / "ledger.db")
    assert sqlite_path(url) is None
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None  # ProgrammingError (UndefinedTable) is "no table", not a failure
    finally:
        engine.dispose()
    assert upgrade(url) == (None, head_revision(), None)
    assert upgrade(url) == (head_revision(), head_revision(), None)


def test_ids_are_bigint_and_times_timestamptz(tmp_path):
    url = ledger_url(tmp_path / "ledger.db")
    ledger = Ledger.open(url)
    with ledger.engine.connect() as conn:
        types = dict(((table, column), kind) for table, column, kind in conn.execute(text(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'")))
    ledger.close()
    for table in ("transfers", "transfer_events", "decisions", "halts", "outbox"):
        assert types[(table, "id")] == "bigint", table
    assert types[("transfer_events", "transfer_id")] == "bigint"
    assert types[("decisions", "transfer_id")] == "bigint"
    assert types[("notify_cursors", "last_id")] == "bigint"
    assert types[("transfers", "amount_minor")] == "bigint"  # money stays integer minor units
    for table, column in (("transfers", "created_at"), ("transfers", "sent_at"), ("transfer_events", "at"),
                          ("decisions", "at"), ("halts", "created_at"), ("equity_peaks", "at"),
                          ("outbox", "next_attempt_at"), ("funding_accounts", "first_seen_at")):
        assert types[(table, column)] == "timestamp with time zone", (table, column)


def test_times_round_trip_to_the_microsecond_as_utc(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    with ledger.session() as session:
        session.execute(text("SET TIME ZONE 'Asia/Kolkata'"))  # the session's zone must not leak into values
        queries.add_halt(session, "MTR1", "operator", "review", NOW, "operator:ann")
        session.commit()
    with ledger.reader() as session:
        [halt] = queries.active_halts(session, "MTR1")
    assert halt.created_at == NOW and halt.created_at.utcoffset().total_seconds() == 0
    ledger.close()


def test_readers_are_repeatable_read_and_read_only(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    with ledger.reader() as session:
        assert session.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
        assert session.execute(text("SHOW transaction_read_only")).scalar() == "on"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            session.execute(text("DELETE FROM halts"))
    with ledger.session() as session:  # the writers are not affected (the setting is not left on the pool)
        assert session.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
        assert session.execute(text("SHOW transaction_read_only")).scalar() == "off"
        assert session.execute(text("SHOW lock_timeout")).scalar() == "10s"
        assert session.execute(text("SHOW statement_timeout")).scalar() == "1min"
    ledger.close()


def test_a_reader_sees_one_snapshot(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    with ledger.reader() as reader:
        assert reader.execute(text("SELECT count(*) FROM halts")).scalar() == 0
        with ledger.session() as writer:  # a writer commits while the report is being read
            queries.add_halt(writer, "MTR1", "operator", "review", NOW, "operator:ann")
            writer.commit()
        assert reader.execute(text("SELECT count(*) FROM halts")).scalar() == 0
    with ledger.reader() as reader:
        assert reader.execute(text("SELECT count(*) FROM halts")).scalar() == 1
    ledger.close()


def test_the_password_comes_from_the_named_variable_and_is_never_shown(tmp_path, monkeypatch):
    cluster = pg_cluster()
    role = f"fa_pw_{os.getpid()}"
    cluster.admin(f"DROP ROLE IF EXISTS {role}")
    escaped = PASSWORD.replace("'", "''")
    cluster.admin(f"CREATE ROLE {role} LOGIN PASSWORD '{escaped}'")
    database = cluster.create_database()
    cluster.admin(f"ALTER DATABASE {database} OWNER TO {role}")
    url = f"postgresql+psycopg://{role}@127.0.0.1:{cluster.port}/{database}"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    try:
        with pytest.raises(LedgerError) as missing:  # the variable is named; no value to show
            Ledger.open(url, password_env="FA_DB_PASSWORD")
        assert "FA_DB_PASSWORD" in str(missing.value)
        monkeypatch.setenv("FA_DB_PASSWORD", "wrong-password")
        with pytest.raises(LedgerError) as wrong:
            Ledger.open(url, password_env="FA_DB_PASSWORD")
        assert "password authentication failed" in str(wrong.value) and "wrong-password" not in str(wrong.value)
        monkeypatch.setenv("FA_DB_PASSWORD", PASSWORD)
        ledger = Ledger.open(url, password_env="FA_DB_PASSWORD")
        with ledger.reader() as session:
            assert session.execute(text("SELECT current_user")).scalar() == role
        assert PASSWORD not in repr(ledger.engine) and PASSWORD not in str(ledger.engine.url)
        assert PASSWORD not in describe(url)
        ledger.close()
        monkeypatch.setenv("PGPASSWORD", PASSWORD)  # libpq's own variable works without database_password_env
        ledger = Ledger.open(url)
        ledger.close()
    finally:
        cluster.drop_database(database)
        cluster.admin(f"DROP ROLE IF EXISTS {role}")


def test_describe_hides_a_password_written_in_the_url():
    assert describe("postgresql+psycopg://ann:hunter22@db.example:5432/ledger") == (
        "postgresql+psycopg://ann:***@db.example:5432/ledger")


def test_two_concurrent_upgrades_of_an_empty_database_both_succeed(tmp_path):
    """Two hosts starting at once on a new ledger: the advisory lock makes the second wait, and it finds the
    schema made (before the lock, 4 tries in 5 failed with a unique violation)."""
    script = ("import sys\nfrom agent.ledger.db import upgrade\n"
              "print(upgrade(sys.argv[1]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUND_AGENT_")}
    for attempt in range(5):
        url = ledger_url(tmp_path / f"ledger-{attempt}.db")
        procs = [subprocess.Popen([sys.executable, "-c", script, url], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        for code, _out, err in results:
            assert code == 0, err
        head = head_revision()
        outcomes = sorted(out.strip() for _code, out, _err in results)
        assert outcomes == sorted([f"(None, '{head}', None)", f"('{head}', '{head}', None)"]), outcomes
        engine = make_engine(url)
        assert current_revision(engine) == head
        engine.dispose()


def test_upgrading_an_existing_ledger_says_how_to_back_it_up(tmp_path, capsys):
    from alembic import command

    from agent.ledger.db import alembic_config

    url = ledger_url(tmp_path / "ledger.db")
    command.upgrade(alembic_config(url), "0002")
    capsys.readouterr()
    assert upgrade(url)[:2] == ("0002", head_revision())
    err = capsys.readouterr().err
    assert f"from schema revision 0002 to {head_revision()}" in err
    assert backup_command(url, "0002") in err and "pg_dump --format=custom" in err
    assert backup_command("postgresql+psycopg://ann:hunter22@h:5/db", "0002") == (
        "pg_dump --format=custom --file=db-0002.dump --host=h --port=5 --username=ann db")


def test_a_ledger_from_a_newer_schema_is_refused(tmp_path, workspace):
    url = ledger_url(workspace / "ledger.db")
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    result = run_cli("ledger", cwd=workspace)
    assert result.returncode == 1
    assert "is at schema revision 0099, which this fund-agent does not know" in result.stderr


def test_equity_peaks_are_upserted_and_only_raised(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    for equity in ("450.10", "450.09", "1000000000000.01", "999"):
        with ledger.session() as session:
            queries.note_equity(session, "MTR1", Decimal(equity), NOW)
            session.commit()
    with ledger.reader() as session:
        assert queries.peak_equity(session, "MTR1") == Decimal("1000000000000.01")
    ledger.close()


def test_the_cli_reports_on_postgresql(workspace):
    assert Path(workspace / "fund-agent.yaml").read_text().startswith("database: postgresql+psycopg://")
    result = run_cli("db", "upgrade", cwd=workspace)
    assert result.returncode == 0 and f"to {head_revision()}" in result.stdout, result.stderr
    for command in ("ledger", "decisions", "status"):
        done = run_cli(command, cwd=workspace)
        assert done.returncode == 0, done.stderr


def test_a_database_error_is_one_line_without_sql_or_values(tmp_path):
    from agent.ledger.db import db_reason

    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    with ledger.session() as session, pytest.raises(DBAPIError) as failed:
        session.execute(text("SELECT secret_column FROM no_such_table WHERE x = 'v4lue'"))
    with ledger.session() as session, pytest.raises(DBAPIError) as duplicate:
        session.execute(text("INSERT INTO equity_peaks (account, peak, at) VALUES ('MTR1', '1', now()), "
                             "('MTR1', '2', now())"))
    ledger.close()
    assert db_reason(failed.value) == 'relation "no_such_table" does not exist'
    assert db_reason(duplicate.value) == 'duplicate key value violates unique constraint "pk_equity_peaks"'
