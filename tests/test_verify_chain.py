"""`fund-agent verify`: a clean ledger verifies; an edit, a deletion and an insertion behind the agent's back
(raw SQL) are each named; prune keeps verify clean; the migration chains an existing ledger."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from test_audit_fixtures import NOOP_DECISIONS, build, write_config

pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def built(tmp_path: Path) -> Path:
    write_config(tmp_path)
    build(tmp_path / "ledger.db")
    return tmp_path


def verify(cwd: Path, *args: str) -> tuple[int, str]:
    result = run_cli("verify", *args, cwd=cwd)
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout


def tamper(cwd: Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(cwd / "ledger.db")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_clean_ledger_verifies_and_prints_its_head(built: Path) -> None:
    code, out = verify(built)
    assert code == 0, out
    match = re.fullmatch(r"ok: (\d+) rows, head ([0-9a-f]{64})\n", out)
    assert match, out
    # 6 transfers, 17 events and the 17 states they left their transfer in, 2 halts + 1 clearing, 3*30 no-op and 6
    # acting decisions
    assert int(match.group(1)) == 6 + 17 + 17 + 3 + 3 * NOOP_DECISIONS + 6
    code, head = verify(built, "--print-head")
    assert code == 0 and head.strip() == match.group(2)


def test_an_edited_row_is_named(built: Path) -> None:
    tamper(built, "UPDATE transfer_events SET detail = 'nothing to see' WHERE id = 2")
    code, out = verify(built)
    assert code == 1
    assert out.startswith("transfer_events id 2: row differs from what was chained at seq"), out


def test_an_edited_amount_is_named(built: Path) -> None:
    tamper(built, "UPDATE transfers SET amount_minor = 60001 WHERE id = 1")
    code, out = verify(built, "--all")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("transfers id 1: row differs"), out
    assert any("confirmed top_up of MTR130002534 sum to" in line for line in lines) is False  # fold still holds


def test_a_deleted_row_is_named(built: Path) -> None:
    tamper(built, "DELETE FROM transfer_events WHERE id = 3")
    code, out = verify(built, "--all")
    assert code == 1
    assert out.splitlines()[0].startswith("transfer_events id 3: row chained at seq"), out
    assert "(deleted)" in out.splitlines()[0]


def test_an_inserted_row_is_named(built: Path) -> None:
    tamper(built, "INSERT INTO halts (id, account, kind, scope, reason, created_at, created_by) VALUES "
                  "(99, 'MTR130002534', 'operator', 'all', 'x', '2026-11-06T00:00:00.000000Z', 'operator:mallory')")
    code, out = verify(built)
    assert code == 1
    assert out == "halts id 99: not in the hash chain (written behind the agent's back)\n"


def test_a_cleared_halt_uncleared_is_named(built: Path) -> None:
    tamper(built, "UPDATE halts SET cleared_at = NULL, cleared_by = NULL WHERE id = 1")
    code, out = verify(built)
    assert code == 1
    assert out.startswith("halts id 1: cleared chained at seq"), out


def test_a_state_that_is_not_the_fold_of_its_events(built: Path) -> None:
    tamper(built, "UPDATE transfers SET state = 'confirmed', broker_txn_id = 7777 WHERE id = 3")
    code, out = verify(built, "--all")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("transfers id 3: row differs from its state chained at seq "), out
    assert "transfers id 3: state confirmed is not the fold of its events (failed)" in lines
    # the sum that no longer holds names the edited transfer too, after the per-row problems
    assert lines[-1].startswith("transfers id 3: confirmed top_up of MTR130002535 sum to 175.25 USD"), out


def test_a_removed_link_is_named(built: Path) -> None:
    tamper(built, "DELETE FROM audit_chain WHERE seq = 5")
    code, out = verify(built, "--all")
    assert code == 1
    assert out.splitlines()[0].startswith("audit_chain id 6: does not follow the previous"), out


def test_prune_keeps_verify_clean(built: Path) -> None:
    before = sqlite3.connect(built / "ledger.db")
    counts = {t: before.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
              for t in ("transfers", "transfer_events", "halts", "decisions")}
    before.close()
    result = run_cli("db", "prune", "--decisions-older-than", "1d", cwd=built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pruned {3 * NOOP_DECISIONS} no-op decision(s) before "), result.stdout
    after = sqlite3.connect(built / "ledger.db")
    assert after.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == counts["decisions"] - 3 * NOOP_DECISIONS
    for table in ("transfers", "transfer_events", "halts"):
        assert after.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == counts[table]  # noqa: S608
    assert after.execute("SELECT COUNT(*) FROM decisions WHERE action = 'none'").fetchone()[0] == 0
    after.close()
    code, out = verify(built)
    assert code == 0 and out.startswith("ok: "), out
    # the pruned range is gone, its head kept: a second prune is a no-op and verify stays clean
    assert run_cli("db", "prune", "--decisions-older-than", "1d", "--vacuum", cwd=built).returncode == 0
    code, out = verify(built)
    assert code == 0, out
    # a forged checkpoint is seen
    tamper(built, "UPDATE audit_checkpoints SET journal_hash = ? WHERE id = 1", "f" * 64)
    code, out = verify(built)
    assert code == 1 and out.startswith("audit_checkpoints id 1: row differs"), out


def test_backup_is_a_consistent_copy_that_verifies(built: Path) -> None:
    result = run_cli("db", "backup", "copy.db", cwd=built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backed up ")
    again = run_cli("db", "backup", "copy.db", cwd=built)
    assert again.returncode == 1 and "exists" in again.stderr
    other = built / "restored"
    other.mkdir()
    write_config(other)
    shutil.copy(built / "copy.db", other / "ledger.db")
    assert verify(other) == verify(built)


def test_the_migration_chains_an_existing_ledger(tmp_path: Path) -> None:
    """A ledger written before 0004 (no chain) is chained from its first row by the upgrade."""
    from alembic import command

    from agent.ledger.db import alembic_config, make_engine

    built = tmp_path / "new"
    built.mkdir()
    write_config(built)
    build(built / "ledger.db")
    code, fresh = verify(built)
    # the same content at revision 0003, then upgraded
    old = tmp_path / "old"
    old.mkdir()
    write_config(old)
    url = f"sqlite:///{old / 'ledger.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    engine.dispose()
    source = sqlite3.connect(built / "ledger.db")
    target = sqlite3.connect(old / "ledger.db")
    for table in ("transfers", "transfer_events", "halts", "decisions", "funding_accounts"):
        # the columns the old schema has (later revisions added some, e.g. 0007's run columns)
        columns = ",".join(r[1] for r in target.execute(f"PRAGMA table_info({table})"))
        rows = source.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()  # noqa: S608
        if rows:
            marks = ",".join("?" * len(rows[0]))
            target.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)  # noqa: S608
    target.commit()
    source.close()
    target.close()
    result = run_cli("db", "upgrade", cwd=old)
    assert result.returncode == 0, result.stderr
    code, out = verify(old)
    assert code == 0, out
    # the same rows chained, but one state per transfer (as it is now) instead of one per event: 17 - 6 fewer
    assert int(out.split()[1]) == int(fresh.split()[1]) - (17 - 6), (out, fresh)


def test_concurrent_writers_do_not_fork_the_chain(tmp_path: Path) -> None:
    """Four threads, each with its own connection, append decisions, halts and transfers at once: one chain."""
    import threading
    from datetime import UTC, datetime
    from decimal import Decimal

    from agent.engine.transfers import create_intent, settle
    from agent.ledger import queries
    from agent.ledger.db import Ledger
    from agent.ledger.models import DecisionRow

    write_config(tmp_path)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            account = f"MTR13000000{n}"
            for i in range(15):
                now = datetime.now(UTC)
                with ledger.session() as s:
                    s.add(DecisionRow(at=now, account=account, policy="p", action="none", reason=str(i)))
                    if i % 5 == 0:
                        queries.add_halt(s, account, "operator", "r", now, "operator:t")
                    s.commit()
                if i % 5 == 4:
                    with ledger.session() as s:
                        queries.clear_halts(s, account, now, "operator:t")
                        s.commit()
                    t = create_intent(ledger, at=now, account=account, funding="CR1", kind="top_up",
                                      amount=Decimal("1.00"), currency="USD", policy="p", policy_sha256="a" * 64,
                                      equity=Decimal(1), reason="r")
                    settle(ledger, t.id, "failed", now, "agent", expected="pending", error_code="NotSent")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    ledger.close()
    assert not errors, errors
    code, out = verify(tmp_path)
    assert code == 0, out
    # 60 decisions + 12 halts + 12 clearings + 12 transfers + 24 events and their 24 states
    assert out.startswith("ok: 144 rows, head "), out


def test_prune_refuses_to_erase_evidence(built: Path) -> None:
    """An old no-op decision edited behind the agent's back: prune would delete the proof, so it refuses."""
    tamper(built, "UPDATE decisions SET equity = '9999' WHERE id = 5")
    result = run_cli("db", "prune", "--decisions-older-than", "1d", cwd=built)
    assert result.returncode == 1
    assert "decisions id 5: differs from what was chained at seq" in result.stderr
    assert "nothing pruned" in result.stderr
    code, out = verify(built)
    assert code == 1 and out.startswith("decisions id 5: row differs"), out


# ---- a transfer's whole row is chained (its mutable columns too) ----

@pytest.mark.parametrize("assignment", [
    "error_code = 'Forged', error_message = 'forged', resolved_by = 'operator:alice'",
    "sent_at = '2026-11-03T11:00:09.000000Z'",
    "updated_at = '2026-11-03T11:00:09.000000Z'",
    "owner = 'host:1:forged'",
    "state = 'failed'",
])
def test_an_edited_mutable_column_of_a_transfer_is_named(built: Path, assignment: str) -> None:
    tamper(built, f"UPDATE transfers SET {assignment} WHERE id = 2")  # noqa: S608 - the test's own text
    code, out = verify(built)
    assert code == 1
    assert re.fullmatch(r"transfers id 2: row differs from its state chained at seq \d+ after transfer_events id 6 "
                        r"\(edited\)\n", out), out


def test_every_column_of_transfers_is_in_the_state_link() -> None:
    from agent.audit.chain import STATE_FIELDS
    from agent.ledger.models import Transfer

    columns = {c.name for c in Transfer.__table__.columns} - {"amount_minor"} | {"amount"}
    assert set(STATE_FIELDS) == (columns - {"id"}) | {"transfer_id"}
    assert len(STATE_FIELDS) == len(set(STATE_FIELDS))


def test_the_edited_transfer_is_named_first_not_its_events_or_sums(built: Path) -> None:
    tamper(built, "UPDATE transfers SET broker_txn_id = 5555 WHERE id = 4")  # confirmed: its event reads it
    code, out = verify(built, "--all")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("transfers id 4: row differs from its state chained at seq"), out
    assert any(line.startswith("transfer_events id ") for line in lines[1:]), out


def test_a_state_edited_on_a_failed_transfer_is_named_before_the_sums(built: Path) -> None:
    tamper(built, "UPDATE transfers SET state = 'confirmed', broker_txn_id = 5555 WHERE id = 3")
    code, out = verify(built)
    assert code == 1
    assert out.startswith("transfers id 3: row differs from its state chained at seq"), out


def test_settle_chains_the_row_it_leaves(tmp_path: Path) -> None:
    """The agent's own changes (settle) keep verify clean, and each event chains the row as it left it."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from agent.engine.transfers import create_intent, settle
    from agent.ledger.db import Ledger

    write_config(tmp_path)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    now = datetime(2026, 11, 2, 10, tzinfo=UTC)
    t = create_intent(ledger, at=now, account="MTR1", funding="CR1", kind="top_up", amount=Decimal("1.00"),
                      currency="USD", policy="p", policy_sha256="a" * 64, equity=Decimal(1), reason="r",
                      owner="host:1:run")
    settle(ledger, t.id, "sent", now, "agent", expected="pending")
    settle(ledger, t.id, "unknown", now, "agent", error_code="Timeout", error_message="no reply")
    settle(ledger, t.id, "failed", now, "operator:bob", resolved_by="operator:bob", error_code="NotExecuted",
           error_message="checked by hand")
    ledger.close()
    code, out = verify(tmp_path)
    assert code == 0 and out.startswith("ok: 9 rows, "), out  # 1 intent + 4 events + 4 states
    tamper(tmp_path, "UPDATE transfers SET resolved_by = 'operator:mallory' WHERE id = 1")
    code, out = verify(tmp_path)
    assert code == 1 and out.startswith("transfers id 1: row differs from its state chained at seq 9 after "
                                        "transfer_events id 4"), out


def test_migration_0006_chains_the_transfers_of_an_existing_ledger(built: Path) -> None:
    """A ledger chained before 0006 (no state links) gets one per transfer, its row as it is now."""
    from sqlalchemy import delete, update

    from agent.audit.chain import GENESIS, KINDS, STATE, backfill
    from agent.ledger.db import make_engine
    from agent.ledger.models import AuditChainEntry, AuditHead

    engine = make_engine(f"sqlite:///{built / 'ledger.db'}")
    with engine.begin() as conn:  # the chain as 0004/0005 wrote it
        conn.execute(delete(AuditChainEntry))
        conn.execute(update(AuditHead).values(seq=0, hash=GENESIS))
        backfill(conn, kinds=[k for k in KINDS if k is not STATE])
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0005'")
    engine.dispose()
    code, out = verify(built)  # before the upgrade: clean (verify does not ask 0005 for state links)
    assert code == 0 and out.startswith(f"ok: {6 + 17 + 3 + 3 * NOOP_DECISIONS + 6} rows, "), out
    # migration 0006 alone (the later ones already ran on this file), then the revision it really has
    from alembic import command

    from agent.ledger.db import HEAD, alembic_config

    engine = make_engine(f"sqlite:///{built / 'ledger.db'}")
    with engine.begin() as conn:
        cfg = alembic_config(f"sqlite:///{built / 'ledger.db'}")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{HEAD}'")
    engine.dispose()
    code, out = verify(built)
    assert code == 0 and out.startswith(f"ok: {6 + 17 + 6 + 3 + 3 * NOOP_DECISIONS + 6} rows, "), out
    tamper(built, "UPDATE transfers SET error_code = 'Forged' WHERE id = 6")
    code, out = verify(built)
    assert code == 1 and out.startswith("transfers id 6: row differs from its state chained at seq"), out


# ---- a removed chain, and the head ----

def test_a_dropped_chain_is_tampering_not_an_old_ledger(built: Path) -> None:
    tamper(built, "DROP TABLE audit_chain")
    code, out = verify(built)
    assert code == 1
    assert out == ("transfers id 1: not in the hash chain: the audit_chain table is missing (dropped), behind the "
                   "agent's back\n"), out


def test_an_emptied_chain_is_named(built: Path) -> None:
    tamper(built, "DELETE FROM audit_chain")
    code, out = verify(built)
    assert code == 1
    assert out.startswith("transfers id 1: not in the hash chain: the audit_chain table was emptied"), out


def test_a_dropped_head_table_is_named(built: Path) -> None:
    tamper(built, "DROP TABLE audit_head")
    code, out = verify(built)
    assert code == 1
    assert out.startswith("audit_chain id 139: the audit_head table is missing (dropped)"), out


def test_an_old_ledger_without_a_chain_is_told_to_upgrade(built: Path) -> None:
    tamper(built, "DROP TABLE audit_chain")
    tamper(built, "UPDATE alembic_version SET version_num = '0003'")
    result = run_cli("verify", cwd=built)
    assert result.returncode == 1
    assert "no hash chain yet" in result.stderr and "db upgrade" in result.stderr


def test_links_removed_at_the_end_name_a_real_link(built: Path) -> None:
    tamper(built, "DELETE FROM audit_chain WHERE seq >= 138")
    code, out = verify(built, "--all")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == ("audit_chain id 138: missing: the ledger chain ends at seq 137, but its head (audit_head) "
                        "was written at seq 139 (links removed at the end)"), out
    assert not any(line.startswith("audit_head id") for line in lines), out


def test_an_edited_head_names_the_last_link(built: Path) -> None:
    tamper(built, "UPDATE audit_head SET hash = ? WHERE chain = 'ledger'", "e" * 64)
    code, out = verify(built)
    assert code == 1
    assert out == ("audit_chain id 139: the last ledger link, but the ledger head (audit_head) does not match it "
                   "(the head was edited)\n"), out


def test_a_revision_set_back_does_not_hide_an_edit(built: Path) -> None:
    """Setting alembic_version back to 0005 does not stop the comparison of the transfers that have state links."""
    tamper(built, "UPDATE alembic_version SET version_num = '0005'")
    tamper(built, "UPDATE transfers SET owner = 'host:9:forged' WHERE id = 5")
    code, out = verify(built)
    assert code == 1 and out.startswith("transfers id 5: row differs from its state chained at seq"), out
