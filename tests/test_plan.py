"""`fund-agent plan` through the real CLI against the Deriv-protocol server: it sends and writes nothing."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from conftest import TOKEN, run_cli, write_status


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_plan_says_what_it_would_do_and_sends_nothing(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    result = run_cli("plan", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert "would top_up 550.00" in result.stdout
    assert "why: equity 450.00 below 500.00" in result.stdout
    assert not [r for r in fake.requests if "mt5_deposit" in r or "mt5_withdrawal" in r]
    assert not (workspace / "ledger.db").exists()  # no ledger yet: plan does not create one

    detailed = run_cli("plan", "--detailed-exitcode", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert detailed.returncode == 2


@pytest.mark.sqlite_only
def test_plan_leaves_an_existing_ledger_byte_for_byte(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    assert run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN}).returncode == 0
    time.sleep(1.1)  # the EA writes again, stamped later than the top-up by more than the clock skew allowed
    write_status(workspace / "status", equity="450.00", age=-5)
    before = digest(workspace / "ledger.db")
    result = run_cli("plan", "--format", "json", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["action"] == "none" and rows[0]["bound_by"] == "top_up.cooldown"
    assert rows[0]["windows"]["top_up.per_24h"].startswith("1 transfers, 550.00")
    assert digest(workspace / "ledger.db") == before
    wal = workspace / "ledger.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # a read-only open may leave an empty WAL, no frames
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1


def test_plan_warns_when_a_policy_exceeds_the_broker_limits(workspace, fake):
    fake.max_transfer = 500
    write_status(workspace / "status", equity="1500.00")
    result = run_cli("plan", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0
    assert "warning: top_up.max_amount: 1000.00 is above the broker's live per-transfer maximum 500" in result.stdout


def test_plan_needs_only_the_read_scope(workspace, fake):
    write_status(workspace / "status", equity="1500.00")
    result = run_cli("plan", cwd=workspace, env={"DERIV_API_TOKEN": "read-only-token"})
    assert result.returncode == 0, result.stderr
    refused = run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": "read-only-token"})
    assert refused.returncode == 1 and "payments" in refused.stderr
