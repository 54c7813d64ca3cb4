"""People running commands beside an agent that moves money: real CLI subprocesses, a real Deriv-protocol
server, EA status files, the real instance lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, TOKEN, ledger_url, make_workspace, run_cli, write_status

from agent.broker.fake import Fault
from agent.engine import transfers
from agent.instance_lock import InstanceLock
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.timeutil import utcnow

ENV = {"DERIV_API_TOKEN": TOKEN}


def ledger_rows(workspace) -> list[dict]:
    ledger = Ledger(ledger_url(workspace / "ledger.db"))
    try:
        with ledger.reader() as session:
            return [queries.transfer_record(t) for t in queries.list_transfers(session, queries.Filters())]
    finally:
        ledger.close()


def deposits(fake) -> int:
    return len([r for r in list(fake.requests) if "mt5_deposit" in r])


def test_a_stale_ea_file_does_not_top_up_twice(tmp_path, fake):
    """No cooldown; the EA wrote once, before the first top-up, and the file is still young at the next pass."""
    workspace = make_workspace(tmp_path, fake)
    policy = workspace / "policies" / "example.yaml"
    policy.write_text(policy.read_text().replace("  cooldown: 30m ", "  cooldown: 0s "))
    write_status(workspace / "status", equity="450.00")
    first = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert first.returncode == 0 and "confirmed" in first.stdout, first.stdout + first.stderr
    second = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert second.returncode == 1
    assert "waiting for a reading newer than transfer 1" in second.stdout, second.stdout
    assert deposits(fake) == 1 and fake.balance_of(MT5) == Decimal("1000.00")


@pytest.mark.sqlite_only  # the lock file; on PostgreSQL: tests/test_beside_hosts.py
def test_reconcile_beside_a_transfer_in_flight_leaves_it_to_its_owner(tmp_path, fake):
    """`run --once` waits for a reply that never comes (the broker applies the deposit late); an operator's
    `reconcile` past the settle window must not fail the sent row: its owner is alive."""
    workspace = make_workspace(tmp_path, fake, extra_broker="  settle_window: 1s\n")
    write_status(workspace / "status", equity="450.00")
    fake.inject(Fault("mt5_deposit", "late_apply", delay=3.0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))} | ENV
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--once"], cwd=workspace, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while deposits(fake) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deposits(fake) == 1
        time.sleep(1.2)  # past the settle window, before the broker applies it
        beside = run_cli("reconcile", cwd=workspace, env=ENV)
        assert "left to it" in beside.stdout and f"pid {agent.pid}" in beside.stdout, beside.stdout + beside.stderr
        assert [r["state"] for r in ledger_rows(workspace)] == ["sent"]
        out, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, out + err  # timed out, then found in the statement: confirmed
    [row] = ledger_rows(workspace)
    assert row["state"] == "confirmed" and row["broker_txn_id"] == fake.transfers(FUNDING)[0]["transaction_id"]
    assert len(fake.transfers(FUNDING)) == 1


@pytest.mark.sqlite_only  # the lock file; on PostgreSQL: tests/test_beside_hosts.py
def test_run_once_beside_a_running_agent_refuses_and_names_it(tmp_path, fake):
    workspace = make_workspace(tmp_path, fake)
    write_status(workspace / "status", equity="450.00")
    with InstanceLock(workspace / "ledger.db", "run"):
        refused = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert refused.returncode == 1
    assert f"pid {os.getpid()}" in refused.stderr and '"run"' in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert deposits(fake) == 0
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0  # once it has gone


@pytest.mark.sqlite_only  # the lock file; on PostgreSQL: tests/test_beside_hosts.py
def test_resolve_refuses_a_sent_transfer_its_live_owner_is_sending(tmp_path, fake):
    workspace = make_workspace(tmp_path, fake)
    ledger = Ledger.open(ledger_url(workspace / "ledger.db"))
    lock = InstanceLock(workspace / "ledger.db", "run").acquire()
    try:
        t = transfers.create_intent(ledger, at=utcnow(), account=MT5, funding=FUNDING, kind="top_up",
                                    amount=Decimal("550.00"), currency="USD", policy="example", policy_sha256="0" * 64,
                                    equity=Decimal("450"), reason="test", owner=lock.owner)
        transfers.settle(ledger, t.id, "sent", utcnow(), "agent", expected="pending")
        refused = run_cli("resolve", str(t.id), "--failed", "--reason", "looks stuck", cwd=workspace)
        assert refused.returncode == 1 and "in flight" in refused.stderr, refused.stderr
        reconciled = run_cli("reconcile", cwd=workspace, env=ENV)
        assert "left to it" in reconciled.stdout, reconciled.stdout
        assert [r["state"] for r in ledger_rows(workspace)] == ["sent"]
    finally:
        lock.release()
        ledger.close()
    # its owner is gone: now the operator may settle it (sent -> unknown -> failed, both steps in the events)
    done = run_cli("resolve", str(t.id), "--failed", "--reason", "checked the statement by hand", cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert [r["state"] for r in ledger_rows(workspace)] == ["failed"]
    listed = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    assert listed[0]["resolved_by"].startswith("operator:")
