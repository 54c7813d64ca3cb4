"""`backtest --equity mt5:ACCOUNT`: the deal history through the real probe and the fake MetaTrader5 package."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from conftest import REPO, run_cli

from agent.backtest.mt5_deals import curve

FAKE = Path(__file__).parent / "fake_mt5"
T0 = 1793577600  # 2026-11-02T00:00:00Z
DEALS = [
    {"time": T0, "type": 2, "profit": 1000.0, "comment": "deposit"},
    {"time": T0 + 600, "type": 1, "entry": 1, "profit": -250.0, "symbol": "EURUSD"},
    {"time": T0 + 1200, "type": 0, "entry": 1, "profit": -290.0, "commission": -7.5, "swap": -2.5},
    {"time": T0 + 1260, "type": 2, "profit": 550.0, "comment": "the top-up that really happened"},
    {"time": T0 + 2400, "type": 1, "entry": 1, "profit": 2500.0},
]


def test_a_deal_history_is_a_balance_curve_with_its_balance_deals_as_transfers():
    history = curve(DEALS, Decimal("3500.00"))
    assert [str(r.equity) for r in history.readings] == ["1000.00", "750.00", "450.00", "1000.00", "3500.00"]
    assert [(t.kind, str(t.amount)) for t in history.transfers] == [("top_up", "1000.00"), ("top_up", "550.00")]
    assert history.step and "floating P/L" in history.notes[0]


def test_backtest_from_mt5_deals_end_to_end(workspace, tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"mode": "ok", "account": {"balance": 3500.0, "equity": 3500.0},
                                  "deals": DEALS}))
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace(
        "  source: ea-file\n  dir: status\n",
        "  source: mt5\n  probe_timeout: 5s\n  terminals:\n    MTR130002534:\n"
        "      path: 'C:\\MT5-1\\terminal64.exe'\n      server: DerivSVG-Server\n      password_env: MT5_PW\n"))
    env = {"MT5_PW": "pw-s3cret-9", "PYTHONPATH": str(FAKE), "FAKE_MT5_SCRIPT": str(script)}
    result = run_cli("backtest", str(REPO / "policies" / "example.yaml"), "--equity", "mt5:MTR130002534",
                     "--format", "json", cwd=workspace, env=env)
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)
    # 00:20 the balance is 450 (< 500): top up 550 where the real one came at 00:21; the real 550 is swapped
    # for the simulated 550, so 00:40 is 3500 -> sweep 1500 down to the target 2000
    assert [(t["time"], t["kind"], t["amount"]) for t in obj["transfers"]] == [
        ("2026-11-02T00:20:00Z", "top_up", "550.00"), ("2026-11-02T00:40:00Z", "sweep", "1500.00")]
    assert "floating P/L" in result.stderr
    assert "pw-s3cret-9" not in result.stdout + result.stderr


def test_mt5_source_needs_the_mt5_equity_source(workspace):
    result = run_cli("backtest", str(REPO / "policies" / "example.yaml"), "--equity", "mt5:MTR130002534",
                     cwd=workspace)
    assert result.returncode == 1
    assert "needs `equity: {source: mt5" in result.stderr and len(result.stderr.splitlines()) == 1
