"""The auditor's questions on a ledger of known content: every filter, format and total, exactly."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import run_cli
from test_audit_fixtures import F1, F2, NOOP_DECISIONS, TRANSFERS, A, B, C, build, write_config

pytestmark = pytest.mark.sqlite_only


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("questions")
    write_config(directory)
    build(directory / "ledger.db")
    return directory


def cli_json(cwd: Path, *args: str) -> list[dict]:
    result = run_cli(*args, "--format", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout, parse_float=Decimal)


def cli_csv(cwd: Path, *args: str) -> list[dict]:
    result = run_cli(*args, "--format", "csv", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_ledger_filters(built: Path) -> None:
    assert [r["id"] for r in cli_json(built, "ledger")] == [1, 2, 3, 4, 5, 6]
    assert [r["id"] for r in cli_json(built, "ledger", "--policy", "swing")] == [3, 4]
    assert [r["id"] for r in cli_json(built, "ledger", "--funding", F2)] == [5, 6]
    assert [r["id"] for r in cli_json(built, "ledger", "--funding", F1, "--kind", "top_up")] == [1, 3, 4]
    assert [r["id"] for r in cli_json(built, "ledger", "--account", B, "--state", "confirmed")] == [4]
    assert [r["id"] for r in cli_json(built, "ledger", "--since", "2026-11-03", "--until", "2026-11-20")] == [2, 3, 4]
    assert cli_json(built, "ledger", "--policy", "nobody") == []


def test_ledger_json_and_csv_round_trip(built: Path) -> None:
    rows = cli_json(built, "ledger")
    assert [Decimal(r["amount"]) for r in rows] == [Decimal(t[2]) for t in TRANSFERS]
    assert all(isinstance(r["amount"], str) for r in rows)  # decimal strings, never JSON numbers
    assert [r["state"] for r in rows] == [t[4] for t in TRANSFERS]
    assert [r["broker_txn_id"] for r in rows] == [t[5] for t in TRANSFERS]
    as_csv = cli_csv(built, "ledger")
    assert [r["amount"] for r in as_csv] == [r["amount"] for r in rows]
    assert [r["created_at"] for r in as_csv] == [r["created_at"] for r in rows]
    jsonl = run_cli("ledger", "--format", "jsonl", cwd=built).stdout.splitlines()
    assert [json.loads(line) for line in jsonl] == json.loads(run_cli("ledger", "--format", "json", cwd=built).stdout)


def test_totals_by_month_week_and_day(built: Path) -> None:
    month = cli_json(built, "ledger", "--totals", "--by", "month")
    assert month == [
        {"period": "2026-11", "account": A, "kind": "sweep", "currency": "USD", "state": "confirmed", "count": 1,
         "amount": "250.50"},
        {"period": "2026-11", "account": A, "kind": "top_up", "currency": "USD", "state": "confirmed", "count": 1,
         "amount": "600.00"},
        {"period": "2026-11", "account": B, "kind": "top_up", "currency": "USD", "state": "confirmed", "count": 1,
         "amount": "75.25"},
        {"period": "2026-11", "account": B, "kind": "top_up", "currency": "USD", "state": "failed", "count": 1,
         "amount": "100.00"},
        {"period": "2026-11", "account": C, "kind": "top_up", "currency": "USD", "state": "confirmed", "count": 1,
         "amount": "1000.00"},
        {"period": "2026-12", "account": C, "kind": "sweep", "currency": "USD", "state": "unknown", "count": 1,
         "amount": "40.00"},
    ]
    weeks = [(r["period"], r["account"], r["kind"]) for r in cli_json(built, "ledger", "--totals", "--by", "week")]
    assert weeks == [("2026-11-02", A, "sweep"), ("2026-11-02", A, "top_up"), ("2026-11-02", B, "top_up"),
                     ("2026-11-09", B, "top_up"), ("2026-11-16", C, "top_up"), ("2026-11-30", C, "sweep")]
    days = cli_json(built, "ledger", "--totals", "--by", "day", "--funding", F1, "--state", "confirmed")
    assert [(r["period"], r["amount"]) for r in days] == [("2026-11-02", "600.00"), ("2026-11-03", "250.50"),
                                                          ("2026-11-10", "75.25")]
    plain = cli_json(built, "ledger", "--totals", "--account", A)
    assert plain == [{"account": A, "kind": "sweep", "currency": "USD", "state": "confirmed", "count": 1,
                      "amount": "250.50"},
                     {"account": A, "kind": "top_up", "currency": "USD", "state": "confirmed", "count": 1,
                      "amount": "600.00"}]
    as_csv = cli_csv(built, "ledger", "--totals", "--by", "month")
    assert [{k: (int(v) if k == "count" else v) for k, v in r.items()} for r in as_csv] == month
    assert sum(Decimal(r["amount"]) for r in month) == sum(Decimal(t[2]) for t in TRANSFERS)


def test_totals_are_computed_in_sql(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--totals never builds the transfer rows in Python (list_transfers is not called)."""
    from click.testing import CliRunner

    from agent.cli import cli
    from agent.ledger import queries

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("rows built in Python")

    monkeypatch.setattr(queries, "list_transfers", refuse)
    monkeypatch.chdir(built)
    result = CliRunner().invoke(cli, ["ledger", "--totals", "--by", "month", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 6


def test_net_flow_per_account_and_funding_account(built: Path) -> None:
    net = cli_json(built, "ledger", "--net")
    assert net == [
        {"scope": "account", "login": A, "currency": "USD", "top_up": "600.00", "sweep": "250.50", "net": "349.50",
         "top_up_count": 1, "sweep_count": 1},
        {"scope": "account", "login": B, "currency": "USD", "top_up": "75.25", "sweep": "0.00", "net": "75.25",
         "top_up_count": 1, "sweep_count": 0},
        {"scope": "account", "login": C, "currency": "USD", "top_up": "1000.00", "sweep": "0.00", "net": "1000.00",
         "top_up_count": 1, "sweep_count": 0},
        {"scope": "funding", "login": F1, "currency": "USD", "top_up": "675.25", "sweep": "250.50", "net": "424.75",
         "top_up_count": 2, "sweep_count": 1},
        {"scope": "funding", "login": F2, "currency": "USD", "top_up": "1000.00", "sweep": "0.00", "net": "1000.00",
         "top_up_count": 1, "sweep_count": 0},
    ]
    by_month = cli_json(built, "ledger", "--net", "--by", "month", "--funding", F1)
    assert [(r["period"], r["scope"], r["login"], r["net"]) for r in by_month] == [
        ("2026-11", "account", A, "349.50"), ("2026-11", "account", B, "75.25"), ("2026-11", "funding", F1, "424.75")]


def test_decisions_filters_and_totals(built: Path) -> None:
    everything = cli_json(built, "decisions")
    assert len(everything) == 3 * NOOP_DECISIONS + len(TRANSFERS)
    assert {r["account"] for r in cli_json(built, "decisions", "--funding", F2)} == {C}
    assert len(cli_json(built, "decisions", "--funding", F2)) == NOOP_DECISIONS + 2
    assert len(cli_json(built, "decisions", "--policy", "scalper", "--kind", "none")) == NOOP_DECISIONS
    assert [r["transfer_id"] for r in cli_json(built, "decisions", "--kind", "top_up")] == [1, 3, 4, 5]
    totals = cli_json(built, "decisions", "--totals", "--by", "day", "--account", A)
    assert totals == [{"period": "2026-10-01", "account": A, "policy": "scalper", "action": "none", "count": 24},
                      {"period": "2026-10-02", "account": A, "policy": "scalper", "action": "none", "count": 6},
                      {"period": "2026-11-02", "account": A, "policy": "scalper", "action": "top_up", "count": 1},
                      {"period": "2026-11-03", "account": A, "policy": "scalper", "action": "sweep", "count": 1}]
    rows = cli_csv(built, "decisions", "--account", B, "--since", "2026-11-01")
    assert [(r["action"], r["amount"], r["transfer_id"]) for r in rows] == [("top_up", "100.00", "3"),
                                                                            ("top_up", "75.25", "4")]


def test_halts_filters_and_totals(built: Path) -> None:
    assert [r["id"] for r in cli_json(built, "halts")] == [2]
    assert [r["id"] for r in cli_json(built, "halts", "--all")] == [1, 2]
    assert [r["id"] for r in cli_json(built, "halts", "--all", "--policy", "scalper")] == [1]
    assert [r["id"] for r in cli_json(built, "halts", "--all", "--funding", F1)] == [1]
    assert [r["id"] for r in cli_json(built, "halts", "--all", "--kind", "kill_switch")] == [2]
    assert [r["id"] for r in cli_json(built, "halts", "--all", "--since", "2026-11-05")] == [2]
    assert cli_json(built, "halts", "--totals", "--all") == [
        {"account": A, "kind": "operator", "count": 1, "active": 0},
        {"account": C, "kind": "kill_switch", "count": 1, "active": 1}]
    assert cli_json(built, "halts", "--totals", "--by", "month") == [
        {"period": "2026-12", "account": C, "kind": "kill_switch", "count": 1, "active": 1}]
    [row] = cli_csv(built, "halts", "--all", "--account", A)
    assert (row["created_by"], row["cleared_by"], row["cleared_at"]) == ("operator:alice", "operator:alice",
                                                                         "2026-11-05T08:00:00Z")


def test_usage_errors(built: Path) -> None:
    assert run_cli("ledger", "--by", "month", cwd=built).returncode == 2
    assert run_cli("ledger", "--totals", "--net", cwd=built).returncode == 2
    assert run_cli("ledger", "--totals", "--by", "year", cwd=built).returncode == 2


def test_views_answer_in_sql(built: Path) -> None:
    conn = sqlite3.connect(built / "ledger.db")
    try:
        assert conn.execute("SELECT id, amount, state FROM v_transfers WHERE account = ? ORDER BY id",
                            (A,)).fetchall() == [(1, "600.00", "confirmed"), (2, "250.50", "confirmed")]
        assert conn.execute("SELECT day, account, top_up, sweep, net FROM v_net_flow_daily ORDER BY day, account"
                            ).fetchall() == [("2026-11-02", A, "600.00", "0.00", "600.00"),
                                             ("2026-11-03", A, "0.00", "250.50", "-250.50"),
                                             ("2026-11-10", B, "75.25", "0.00", "75.25"),
                                             ("2026-11-20", C, "1000.00", "0.00", "1000.00")]
        assert conn.execute("SELECT id, amount, state FROM v_unresolved").fetchall() == [(6, "40.00", "unknown")]
    finally:
        conn.close()


def test_a_later_batch_migration_of_transfers_keeps_the_views(tmp_path: Path) -> None:
    """SQLite refuses to rename a table into place under a view that names it: a later migration that
    batch-alters `transfers` drops the views first and creates them again (agent.audit.views)."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import Column, String

    from agent.audit.views import create_views, drop_views
    from agent.ledger.db import make_engine

    build(tmp_path / "ledger.db")
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn, opts={"render_as_batch": True}))
        drop_views(conn)
        with op.batch_alter_table("transfers") as batch:
            batch.add_column(Column("note", String(20), nullable=True))
        create_views(conn)
    engine.dispose()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        assert conn.execute("SELECT amount FROM v_transfers WHERE id = 1").fetchone() == ("600.00",)
    finally:
        conn.close()
