"""`fund-agent demo` (what `make demo` runs): offline, a confirmed top-up, the ledger at the end."""

from __future__ import annotations

from conftest import REPO, run_cli


def test_demo_shows_a_confirmed_top_up_and_the_ledger(tmp_path):
    result = run_cli("demo", "--seconds", "3", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "top_up 550.00 confirmed" in result.stdout
    assert "The ledger:" in result.stdout and "confirmed" in result.stdout.split("The ledger:")[1]
    assert "Traceback" not in result.stderr


def test_demo_with_another_policy_shows_a_sweep(tmp_path):
    result = run_cli("demo", "--seconds", "3", "--policy", str(REPO / "policies" / "top-up-and-sweep.yaml"),
                     "--start-equity", "5600", "--drift", "0", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sweep 1600.00 confirmed" in result.stdout  # 5600 down to the target 4000
