"""The operator's commands through the real CLI: halt/resume, status, reconcile, resolve, ledger filters."""

from __future__ import annotations

import csv
import io
import json
import time

from conftest import FUNDING, MT5, TOKEN, run_cli, write_status

from agent.broker.fake import Fault

ENV = {"DERIV_API_TOKEN": TOKEN}


def test_halt_blocks_top_ups_survives_restarts_and_resume_clears_it(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    halted = run_cli("halt", MT5, "--reason", "strategy review", cwd=workspace)
    assert halted.returncode == 0, halted.stderr
    first = run_cli("run", "--once", cwd=workspace, env=ENV)
    second = run_cli("run", "--once", cwd=workspace, env=ENV)  # a restart never clears a halt
    for result in (first, second):
        assert "top-ups halted: operator halt" in result.stdout and "strategy review" in result.stdout
    assert not [r for r in fake.requests if "mt5_deposit" in r]
    listing = json.loads(run_cli("halts", "--format", "json", cwd=workspace).stdout)
    assert listing[0]["kind"] == "operator" and listing[0]["created_by"].startswith("operator:")
    status = run_cli("status", "--format", "json", cwd=workspace)
    assert json.loads(status.stdout)[0]["halted"] is True
    resumed = run_cli("resume", MT5, cwd=workspace)
    assert "1 halt(s) cleared" in resumed.stdout
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0
    assert len([r for r in fake.requests if "mt5_deposit" in r]) == 1
    history = json.loads(run_cli("halts", "--all", "--format", "json", cwd=workspace).stdout)
    assert history[0]["cleared_at"] is not None


def test_halt_refuses_a_bad_login_with_usage_exit(workspace):
    result = run_cli("halt", "not-a-login", "--reason", "x", cwd=workspace)
    assert result.returncode == 2 and "MT5 login" in result.stderr


def test_unknown_transfer_reconcile_and_resolve(workspace, fake):
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace("  timeout: 5s\n", "  timeout: 1s\n"))
    write_status(workspace / "status", equity="450.00")
    fake.inject(Fault("mt5_deposit", "error", code="WrongResponse"))  # nothing moved, but nothing proven
    run = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert run.returncode == 1
    assert "unknown" in run.stdout
    [row] = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    assert (row["state"], row["error_code"]) == ("unknown", "WrongResponse")

    pending = run_cli("reconcile", cwd=workspace, env=ENV)  # inside the settle window: still unknown
    assert pending.returncode == 1 and "stays unknown" in pending.stdout

    status = json.loads(run_cli("status", "--format", "json", cwd=workspace).stdout)[0]
    assert status["unresolved"][0]["id"] == row["id"]

    bad = run_cli("resolve", str(row["id"]), cwd=workspace)
    assert bad.returncode == 2
    done = run_cli("resolve", str(row["id"]), "--failed", "--reason", "checked the Deriv cashier", cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert "failed (by operator:" in done.stdout
    [row] = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    assert row["state"] == "failed" and row["resolved_by"].startswith("operator:")
    assert row["error_code"] == "WrongResponse"  # the broker's code stays verbatim; the reason joins the message
    assert "checked the Deriv cashier" in row["error_message"]
    again = run_cli("resolve", str(row["id"]), "--confirmed", "1", cwd=workspace)
    assert again.returncode == 1 and "only sent or unknown" in again.stderr


def test_resolve_confirmed_links_the_broker_transaction(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    fake.inject(Fault("mt5_deposit", "error", code="WrongResponse"))
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace("  timeout: 5s\n", "  timeout: 1s\n"))
    run_cli("run", "--once", cwd=workspace, env=ENV)
    [row] = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    done = run_cli("resolve", str(row["id"]), "--confirmed", "987654", cwd=workspace)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    assert (row["state"], row["broker_txn_id"]) == ("confirmed", 987654)


def test_ledger_filters_formats_and_totals(workspace, fake):
    write_status(workspace / "status", equity="450.00")
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0
    for fmt in ("table", "json", "jsonl", "csv"):
        result = run_cli("ledger", "--format", fmt, cwd=workspace)
        assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(run_cli("ledger", "--format", "csv", cwd=workspace).stdout)))
    assert rows[0]["amount"] == "550.00" and rows[0]["state"] == "confirmed"
    jsonl = run_cli("ledger", "--format", "jsonl", cwd=workspace).stdout.splitlines()
    assert json.loads(jsonl[0])["kind"] == "top_up"
    assert json.loads(run_cli("ledger", "--format", "json", "--kind", "sweep", cwd=workspace).stdout) == []
    assert json.loads(run_cli("ledger", "--format", "json", "--since", "2999-01-01", cwd=workspace).stdout) == []
    assert len(json.loads(run_cli("ledger", "--format", "json", "--account", MT5, "--state", "confirmed",
                                  cwd=workspace).stdout)) == 1
    totals = json.loads(run_cli("ledger", "--totals", "--format", "json", cwd=workspace).stdout)
    assert totals == [{"account": MT5, "kind": "top_up", "currency": "USD", "state": "confirmed", "count": 1,
                       "amount": "550.00"}]
    bad = run_cli("ledger", "--since", "yesterday", cwd=workspace)
    assert bad.returncode == 2
    assert fake.transfers(FUNDING)


def test_audit_commands_on_a_fresh_config_show_nothing_and_create_nothing(workspace):
    assert json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout) == []
    assert json.loads(run_cli("decisions", "--format", "json", cwd=workspace).stdout) == []
    assert not (workspace / "ledger.db").exists()


def test_db_upgrade_and_usage_errors(workspace):
    first = run_cli("db", "upgrade", cwd=workspace)
    assert first.returncode == 0 and "upgraded from empty" in first.stdout
    assert "already at revision" in run_cli("db", "upgrade", cwd=workspace).stdout
    assert run_cli("no-such-command", cwd=workspace).returncode == 2
    missing = run_cli("--config", "nope.yaml", "ledger", cwd=workspace)
    assert missing.returncode == 1 and "config file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_resume_after_a_kill_switch_counts_afresh(workspace, fake):
    policy = workspace / "policies" / "example.yaml"
    policy.write_text(policy.read_text().replace("consecutive_top_ups: 5", "consecutive_top_ups: 1")
                      .replace("cooldown: 30m", "cooldown: 1s"))
    write_status(workspace / "status", equity="450.00")
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0  # the one top-up allowed
    # the EA writes again after the top-up: stamped later than it by more than the clock skew allowed
    time.sleep(1.1)
    write_status(workspace / "status", equity="450.00", age=-5)
    tripped = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert "kill switch: 1 top-ups with no sweep between them" in tripped.stdout
    kinds = [h["kind"] for h in json.loads(run_cli("halts", "--format", "json", cwd=workspace).stdout)]
    assert kinds == ["kill_switch"]
    assert "1 halt(s) cleared" in run_cli("resume", MT5, cwd=workspace).stdout
    time.sleep(1.1)
    write_status(workspace / "status", equity="450.00", age=-5)
    again = run_cli("run", "--once", cwd=workspace, env=ENV)  # counts from the resume: one more is allowed
    assert "confirmed" in again.stdout, again.stdout
    assert len(fake.transfers(FUNDING)) == 2
