"""The deriv equity source (balance only) and its warnings."""

from __future__ import annotations

from decimal import Decimal

import pytest
from conftest import MT5, TOKEN, run_cli

from agent.broker.deriv import DerivClient
from agent.equity.base import NoReading
from agent.equity.deriv import DerivBalanceSource
from agent.timeutil import Clock


def test_reads_the_mt5_balance_and_says_it_is_balance_only(fake):
    client = DerivClient(fake.url, 1089, TOKEN, timeout=3)
    snap = DerivBalanceSource(client, Clock()).read(MT5)
    assert snap.equity == snap.balance == Decimal("450.00")
    assert snap.margin is None and snap.margin_level is None
    assert "balance only" in snap.source
    with pytest.raises(NoReading):
        DerivBalanceSource(client, Clock()).read("MTR999")
    client.close()


def test_run_once_with_the_deriv_source(workspace, fake):
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace("  source: ea-file\n  dir: status\n", "  source: deriv\n"))
    result = run_cli("run", "--once", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert "top_up 550.00" in result.stdout
    check = run_cli("check", cwd=workspace)
    assert check.returncode == 0
    assert "warning: sweep.min_margin_level" in check.stdout and "balance only" in check.stdout
