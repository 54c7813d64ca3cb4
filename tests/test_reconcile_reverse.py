"""The reverse check of `reconcile`: a transfer made with our app_id that no ledger row records is reported
(money moved that the ledger does not know), and `reconcile` exits 1; transfers the ledger knows are not."""

from __future__ import annotations

from decimal import Decimal

from conftest import FUNDING, MT5, TOKEN, run_cli, write_status

from agent.broker.deriv import DerivClient

ENV = {"DERIV_API_TOKEN": TOKEN}


def test_a_transfer_the_ledger_does_not_know_is_reported(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    done = run_cli("run", "--once", cwd=workspace, env=ENV)  # one top-up the ledger records
    assert done.returncode == 0, done.stderr
    quiet = run_cli("reconcile", cwd=workspace, env=ENV)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "not in ledger" not in quiet.stdout

    client = DerivClient(fake.url, 1089, TOKEN, timeout=5)  # someone moves money with our app's token
    try:
        txn = client.mt5_deposit(FUNDING, MT5, Decimal("12.34"))
    finally:
        client.close()
    loud = run_cli("reconcile", cwd=workspace, env=ENV)
    assert loud.returncode == 1
    [line] = [x for x in loud.stdout.splitlines() if x.startswith("not in ledger")]
    assert f"txn {txn} amount -12.34 account {MT5}" in line and FUNDING in line, line
