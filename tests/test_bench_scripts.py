"""The benchmark scripts run and report (their numbers are never asserted: timings are for bench/, not tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FUNDING, MT5, REPO, TOKEN

sys.path.append(str(REPO / "bench"))  # last: its modules never shadow another name

import benchkit  # noqa: E402
import idle  # noqa: E402
import ledger_cli  # noqa: E402

pytestmark = pytest.mark.sqlite_only  # the benchmarks measure the embedded SQLite ledger


def test_the_per_process_script_sends_one_deposit(fake):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "per_process.py"), fake.url, TOKEN, FUNDING, MT5,
                           "600.00"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [row["amount"] for row in fake.transfers(FUNDING)] == [-600]


def test_the_idle_figures_are_reported():
    tick, growth = idle.idle(accounts_count=5, passes=1)
    assert tick["figure"] == "idle_tick" and tick["ms_per_account"] > 0 and "met" in tick
    assert growth["figure"] == "journal_growth" and growth["evaluations"] == 5


def test_the_audit_figures_read_a_seeded_ledger():
    row = ledger_cli.ledger_totals(scale=0.001)
    assert row["exit"] == 0, row["error"]
    assert row["transfers"] == 1000 and row["peak_rss_mib"] > 0


def test_every_figure_of_the_issue_has_a_producer():
    figures = {"reading_to_frame_engine", "reading_to_frame_service", "idle_tick", "idle_tick_history",
               "ledger_totals", "status_big", "journal_growth", "cpu_per_evaluation"}
    sources = "".join((REPO / "bench" / name).read_text()
                      for name in ("transfer_path.py", "service.py", "idle.py", "ledger_cli.py"))
    assert all(f'"{figure}"' in sources for figure in figures)
    assert benchkit.median_ms([0.001, 0.003, 0.002]) == 2.0
