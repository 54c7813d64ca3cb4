"""People running commands beside agents on a shared (PostgreSQL) ledger: no lock file there; the agents'
leases and heartbeats say who acts on what. Real CLI subprocesses, a real Deriv-protocol server."""

from __future__ import annotations

import socket
from decimal import Decimal

import pytest
from conftest import FUNDING, MT5, POSTGRES, TOKEN, ledger_url, make_workspace, run_cli, write_status

from agent.engine import transfers
from agent.ledger.db import Ledger
from agent.ledger.leases import Leases
from agent.timeutil import utcnow

ENV = {"DERIV_API_TOKEN": TOKEN}
pytestmark = pytest.mark.skipif(not POSTGRES, reason="a shared ledger: runs in the PostgreSQL run")


def deposits(fake) -> int:
    return len([r for r in fake.transfers(FUNDING) if r["action_type"] == "transfer"])


def test_run_once_leaves_an_account_another_host_holds(tmp_path, fake):
    workspace = make_workspace(tmp_path, fake)
    write_status(workspace / "status", equity="450.00")
    ledger = Ledger.open(ledger_url(workspace / "ledger.db"))
    other = Leases(ledger, f"vps-b:{socket.gethostname()}:1:x", "vps-b", ttl=60, renew_every=5)
    try:
        other.sync([MT5])
        done = run_cli("run", "--once", cwd=workspace, env=ENV)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "not evaluated here" in done.stdout and deposits(fake) == 0
        other.release_all()
        done = run_cli("run", "--once", cwd=workspace, env=ENV)  # handed back: now it is ours
        assert done.returncode == 0, done.stdout + done.stderr
        assert deposits(fake) == 1
    finally:
        ledger.close()


def test_resolve_and_reconcile_leave_a_live_agents_transfer_in_flight_to_it(tmp_path, fake):
    workspace = make_workspace(tmp_path, fake)
    ledger = Ledger.open(ledger_url(workspace / "ledger.db"))
    agent = Leases(ledger, "vps-b:4242:x", "vps-b", ttl=60, renew_every=5)
    try:
        agent.sync([MT5])
        t = transfers.create_intent(ledger, at=utcnow(), account=MT5, funding=FUNDING, kind="top_up",
                                    amount=Decimal("550.00"), currency="USD", policy="example",
                                    policy_sha256="0" * 64, equity=Decimal("450"), reason="test",
                                    owner=agent.holder, fence=agent.check)
        transfers.settle(ledger, t.id, "sent", utcnow(), "agent", expected="pending", fence=agent.check)
        refused = run_cli("resolve", str(t.id), "--failed", "--reason", "looks stuck", cwd=workspace)
        assert refused.returncode == 1 and "in flight" in refused.stderr and "vps-b" in refused.stderr, \
            refused.stderr
        reconciled = run_cli("reconcile", cwd=workspace, env=ENV)
        assert "left to it" in reconciled.stdout, reconciled.stdout
        agent.release_all()  # it stopped: its heartbeat is gone
        done = run_cli("resolve", str(t.id), "--failed", "--reason", "checked by hand", cwd=workspace)
        assert done.returncode == 0, done.stderr
    finally:
        ledger.close()


def test_status_names_the_host_that_holds_each_account(tmp_path, fake):
    import json

    workspace = make_workspace(tmp_path, fake)
    ledger = Ledger.open(ledger_url(workspace / "ledger.db"))
    other = Leases(ledger, "vps-b:77:x", "vps-b", ttl=60, renew_every=5)
    try:
        other.sync([MT5])
        done = run_cli("status", "--format", "json", cwd=workspace, env=ENV)
        assert done.returncode == 0, done.stderr
        [row] = json.loads(done.stdout)
        assert row["held_by"] == "vps-b (vps-b:77:x)"
        text = run_cli("status", cwd=workspace, env=ENV)
        assert "held by vps-b" in text.stdout
        other.release_all()
        [row] = json.loads(run_cli("status", "--format", "json", cwd=workspace, env=ENV).stdout)
        assert row["held_by"] is None
    finally:
        ledger.close()
