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
    # 6 transfers, 17 events, 2 halts + 1 clearing, 3*30 no-op and 6 acting decisions
    assert int(match.group(1)) == 6 + 17 + 3 + 3 * NOOP_DECISIONS + 6
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
    code, out = verify(built)
    assert code == 1
    assert out == "transfers id 3: state confirmed is not the fold of its events (failed)\n"


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
        rows = source.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
        if rows:
            marks = ",".join("?" * len(rows[0]))
            target.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)  # noqa: S608
    target.commit()
    source.close()
    target.close()
    result = run_cli("db", "upgrade", cwd=old)
    assert result.returncode == 0, result.stderr
    code, out = verify(old)
    assert code == 0, out
    assert out.split(",")[0] == fresh.split(",")[0]  # the same number of rows chained


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
    # 60 decisions + 12 halts + 12 clearings + 12 transfers + 24 events
    assert out.startswith("ok: 120 rows, head "), out


def test_prune_refuses_to_erase_evidence(built: Path) -> None:
    """An old no-op decision edited behind the agent's back: prune would delete the proof, so it refuses."""
    tamper(built, "UPDATE decisions SET equity = '9999' WHERE id = 5")
    result = run_cli("db", "prune", "--decisions-older-than", "1d", cwd=built)
    assert result.returncode == 1
    assert "decisions id 5: differs from what was chained at seq" in result.stderr
    assert "nothing pruned" in result.stderr
    code, out = verify(built)
    assert code == 1 and out.startswith("decisions id 5: row differs"), out
