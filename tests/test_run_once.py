"""`fund-agent run --once` end to end: ea-file reading, real broker socket, real SQLite ledger."""

from __future__ import annotations

import json
from decimal import Decimal

from conftest import FUNDING, MT5, TOKEN, run_cli, write_status


def test_run_once_sends_exactly_one_deposit_and_records_it(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    result = run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr + result.stdout
    deposits = [r for r in fake.requests if "mt5_deposit" in r]
    assert len(deposits) == 1
    assert deposits[0]["from_binary"] == FUNDING
    assert deposits[0]["to_mt5"] == MT5
    assert deposits[0]["amount"] == Decimal("550")  # target 1000 - equity 450
    assert fake.balance_of(MT5) == Decimal("1000.00")
    assert fake.balance_of(FUNDING) == Decimal("9450.00")

    ledger = run_cli("ledger", "--format", "json", cwd=workspace)
    assert ledger.returncode == 0, ledger.stderr
    records = json.loads(ledger.stdout)
    assert len(records) == 1
    record = records[0]
    txn = fake.transfers(FUNDING)[0]["transaction_id"]
    assert record["state"] == "confirmed"
    assert record["broker_txn_id"] == txn
    assert record["amount"] == "550.00"
    assert record["kind"] == "top_up" and record["account"] == MT5 and record["funding"] == FUNDING
    assert record["equity"] == "450.00"
    for key in ("id", "created_at", "currency", "policy", "policy_sha256", "reason", "error_code",
                "error_message", "updated_at"):
        assert key in record
    assert record["created_at"].endswith("Z")

    # nothing secret anywhere the user or an auditor sees
    texts = [result.stdout, result.stderr, ledger.stdout, ledger.stderr]
    if (workspace / "ledger.db").exists():  # a SQLite ledger: its every byte (PostgreSQL's: the report above)
        texts.append((workspace / "ledger.db").read_bytes().decode("latin-1"))
    for text in texts:
        assert TOKEN not in text


def test_every_request_sent_validates_against_the_official_schema(workspace, fake):
    from agent.broker import schemas

    write_status(workspace / "status", equity="450.00")
    run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert fake.requests
    for request in fake.requests:
        call = schemas.call_of(request)
        assert call is not None
        assert schemas.problems(call, "send", request) == [], request.get("req_id")
        assert isinstance(request["req_id"], int)
    ids = [r["req_id"] for r in fake.requests]
    assert len(ids) == len(set(ids))


def test_missing_token_names_the_variable(workspace):
    write_status(workspace / "status")
    result = run_cli("run", "--once", cwd=workspace)
    assert result.returncode == 1
    assert "DERIV_API_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_stale_reading_sends_nothing_and_exits_1(workspace, fake):
    write_status(workspace / "status", equity="450.00", age=120)
    result = run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 1
    assert not [r for r in fake.requests if "mt5_deposit" in r]
    assert "older than max_equity_age" in result.stdout
    decisions = json.loads(run_cli("decisions", "--format", "json", cwd=workspace).stdout)
    assert decisions[-1]["action"] == "none" and "max_equity_age" in decisions[-1]["reason"]


def test_equity_in_band_does_nothing_and_exits_0(workspace, fake):
    write_status(workspace / "status", equity="1500.00")
    result = run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert not [r for r in fake.requests if "mt5_deposit" in r or "mt5_withdrawal" in r]
    assert json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout) == []
