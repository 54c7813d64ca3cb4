"""The ledger through a real SQLite file and real Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from conftest import ledger_url
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from agent.engine import transfers
from agent.ledger import queries
from agent.ledger.db import Ledger, current_revision, head_revision, upgrade
from agent.ledger.models import Transfer

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def intent(ledger, account="MTR1", amount="600.11"):
    return transfers.create_intent(ledger, at=NOW, account=account, funding="CR1", kind="top_up",
                                   amount=Decimal(amount), currency="USD", policy="p", policy_sha256="0" * 64,
                                   equity=Decimal("399.89"), reason="test")


@pytest.mark.sqlite_only
def test_migrations_from_empty_create_the_file_with_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'ledger.db'}"
    before, after, backup = upgrade(url)
    assert before is None and after == head_revision() and backup is None
    ledger = Ledger(url)
    assert current_revision(ledger.engine) == head_revision()
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    ledger.close()
    assert upgrade(url)[0] == head_revision()  # idempotent


def test_amounts_round_trip_exactly(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    t = intent(ledger)
    with ledger.session() as s:
        row = s.get(Transfer, t.id)
        assert row.amount_minor == 60011
        record = queries.transfer_record(row)
    assert record["amount"] == "600.11" and record["equity"] == "399.89"
    assert record["created_at"] == "2026-11-25T12:00:00Z"
    ledger.close()


def test_one_unresolved_transfer_per_account_is_enforced_by_the_database(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    first = intent(ledger)
    with pytest.raises(transfers.AccountBusy):
        intent(ledger)
    intent(ledger, account="MTR2")  # another account is fine
    transfers.settle(ledger, first.id, "sent", NOW, "test")
    transfers.settle(ledger, first.id, "confirmed", NOW, "test", broker_txn_id=77)
    intent(ledger)  # resolved: the next one may start
    ledger.close()


def test_a_broker_txn_id_confirms_at_most_one_row(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    a = intent(ledger, account="MTR1")
    b = intent(ledger, account="MTR2")
    for t in (a, b):
        transfers.settle(ledger, t.id, "sent", NOW, "test")
    transfers.settle(ledger, a.id, "confirmed", NOW, "test", broker_txn_id=5)
    with pytest.raises(IntegrityError):
        transfers.settle(ledger, b.id, "confirmed", NOW, "test", broker_txn_id=5)
    ledger.close()


def test_state_machine_refuses_illegal_moves_and_logs_every_change(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    t = intent(ledger)
    with pytest.raises(transfers.StateError):
        transfers.settle(ledger, t.id, "confirmed", NOW, "test")  # pending -> confirmed skips sent
    transfers.settle(ledger, t.id, "sent", NOW, "test")
    transfers.settle(ledger, t.id, "unknown", NOW, "test", error_code="Timeout", error_message="no reply")
    with pytest.raises(transfers.StateError):
        transfers.settle(ledger, t.id, "sent", NOW, "test")  # an unknown transfer is never resent
    with ledger.engine.connect() as conn:
        states = [r[0] for r in conn.execute(text("SELECT state FROM transfer_events ORDER BY id"))]
    assert states == ["pending", "sent", "unknown"]
    ledger.close()


@pytest.mark.sqlite_only
def test_upgrading_an_old_ledger_keeps_a_copy(tmp_path):
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    ledger = Ledger(url)
    with ledger.engine.begin() as conn:  # pretend the file was made by an older release
        conn.exec_driver_sql("UPDATE alembic_version SET version_num='0000'")
    ledger.close()
    # 0000 is unknown to Alembic: upgrading must fail loudly, never silently rewrite the ledger
    with pytest.raises(Exception):
        upgrade(url)
    assert any(p.name.startswith("old.db.bak-0000-") for p in tmp_path.iterdir())


def test_head_constant_matches_the_migration_scripts():
    from agent.ledger.db import HEAD

    assert HEAD == head_revision()


def test_readers_do_not_wait_for_a_writer(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    intent(ledger)
    with ledger.session() as writer:
        writer.execute(text("UPDATE transfers SET reason = 'held'"))  # the write lock is held from here
        with ledger.reader() as reader:  # a reader still sees the last committed state at once
            assert reader.execute(text("SELECT reason FROM transfers")).scalar_one() == "test"
        writer.commit()
    ledger.close()


@pytest.mark.sqlite_only
def test_migration_0003_adds_owners_and_funding_accounts_to_a_ledger_with_rows(tmp_path):
    from alembic import command

    from agent.ledger.db import alembic_config

    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    command.upgrade(alembic_config(url), "0002")  # a ledger made by the previous release
    ledger = Ledger(url)
    with ledger.engine.begin() as conn:
        for i, funding in enumerate(["CR4000128", "CR4000128", "CR9"], start=1):
            conn.exec_driver_sql(
                "INSERT INTO transfers (created_at, updated_at, account, funding, kind, amount_minor, currency, "
                "state, policy, policy_sha256, equity, reason) VALUES (?, ?, ?, ?, 'top_up', 55000, 'USD', "
                "'confirmed', 'p', 'x', '450', 'r')",
                (f"2026-11-2{i}T00:00:00.000000Z", f"2026-11-2{i}T00:00:00.000000Z", f"MTR13000253{i}", funding))
    ledger.close()
    before, after, backup = upgrade(url)
    from agent.ledger.db import HEAD

    assert (before, after) == ("0002", HEAD) and backup is not None and backup.exists()  # 0003 and every later one
    ledger = Ledger(url)
    with ledger.engine.connect() as conn:
        funding = conn.execute(text("SELECT login, first_seen_at, last_intent_at FROM funding_accounts "
                                    "ORDER BY login")).all()
        owners = conn.execute(text("SELECT owner FROM transfers")).scalars().all()
    ledger.close()
    assert funding == [("CR4000128", "2026-11-21T00:00:00.000000Z", "2026-11-22T00:00:00.000000Z"),
                       ("CR9", "2026-11-23T00:00:00.000000Z", "2026-11-23T00:00:00.000000Z")]
    assert owners == [None, None, None]  # made before owners existed: nobody holds them in flight


@pytest.mark.sqlite_only
def test_one_ledger_file_has_one_lock_whichever_path_names_it(tmp_path):
    from agent.instance_lock import InstanceLock, LockHeld
    from agent.ledger.db import sqlite_path

    (tmp_path / "a").mkdir()
    real = tmp_path / "a" / "ledger.db"
    real.touch()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    via_link = sqlite_path(f"sqlite:///{tmp_path / 'b' / 'ledger.db'}")
    assert via_link == sqlite_path(f"sqlite:///{real}")
    with InstanceLock(sqlite_path(f"sqlite:///{real}"), "run"), pytest.raises(LockHeld):
        InstanceLock(via_link, "run --once").acquire()
