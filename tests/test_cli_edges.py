"""Edges a black-box tester found: text shown as typed (no rich markup), empty results in every format, ranges
that end before they start, secrets pasted where a variable's name belongs, database URLs checked with the
config, and commands that must not create a ledger at a mistyped path."""

from __future__ import annotations

import csv
import io
import json

import pytest
from conftest import MT5, TOKEN, run_cli

ENV = {"DERIV_API_TOKEN": TOKEN}


def test_text_with_markup_is_shown_as_typed(workspace):
    assert run_cli("halt", MT5, "--reason", "oops [/] here [red]x[/red]", cwd=workspace).returncode == 0
    shown = run_cli("halts", cwd=workspace)
    assert shown.returncode == 0, shown.stderr
    assert "oops [/] here [red]x[/red]" in shown.stdout


def test_empty_results_keep_their_shape(workspace):
    assert run_cli("halt", MT5, "--reason", "make a ledger", cwd=workspace).returncode == 0
    empty = run_cli("ledger", "--format", "jsonl", cwd=workspace)
    assert empty.returncode == 0 and empty.stdout == ""
    header = next(csv.reader(io.StringIO(run_cli("ledger", "--format", "csv", cwd=workspace).stdout)))
    assert header[:6] == ["id", "created_at", "account", "funding", "kind", "amount"] and "resolved_by" in header
    assert json.loads(run_cli("decisions", "--format", "json", cwd=workspace).stdout) == []


def test_a_range_that_ends_before_it_starts_is_a_usage_error(workspace):
    for args in (["ledger", "--since", "2026-11-27", "--until", "2026-11-26"],
                 ["report", "--since", "2026-11-27", "--until", "2026-11-26", "--output", "r.html"]):
        done = run_cli(*args, cwd=workspace)
        assert done.returncode == 2 and "must be later than --since" in done.stderr, (args, done.stderr)


def test_a_secret_where_a_variable_name_belongs_is_never_printed(workspace):
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace("token_env: DERIV_API_TOKEN", "token_env: tok-5e3cr3t-XYZ"))
    for args in (["check"], ["ledger"], ["status"]):
        done = run_cli(*args, cwd=workspace, env=ENV)
        assert done.returncode != 0
        assert "5e3cr3t" not in done.stdout + done.stderr and "broker.token_env" in done.stdout + done.stderr


def test_database_urls_are_checked_with_the_config(workspace):
    config = workspace / "fund-agent.yaml"
    original = config.read_text()
    for value, expected in (("notaurl", "not a database URL"), ("mysql://x@y/z", "mysql is not supported"),
                            ("postgresql+psycopg://u:hunter2pass@127.0.0.1/db", "a password is written")):
        lines = [line if not line.startswith("database:") else f"database: {value}" for line in original.splitlines()]
        config.write_text("\n".join(lines) + "\n")
        done = run_cli("check", cwd=workspace)
        assert done.returncode == 1 and "fund-agent.yaml:1: database" in done.stdout + done.stderr, done.stdout
        assert expected in done.stdout + done.stderr and "hunter2pass" not in done.stdout + done.stderr


@pytest.mark.sqlite_only  # a file at a mistyped path; a PostgreSQL database is created by its operator
def test_commands_on_recorded_data_never_create_a_ledger(workspace):
    assert run_cli("reconcile", cwd=workspace, env=ENV).stdout.startswith("nothing to reconcile: no ledger at")
    pruned = run_cli("db", "prune", "--decisions-older-than", "90d", cwd=workspace)
    assert pruned.returncode == 1 and "no ledger at" in pruned.stderr
    resolved = run_cli("resolve", "1", "--failed", "--reason", "x", cwd=workspace)
    assert resolved.returncode == 1 and "no ledger at" in resolved.stderr
    assert not (workspace / "ledger.db").exists()
    short = run_cli("db", "prune", "--decisions-older-than", "0s", cwd=workspace)
    assert short.returncode == 2 and "at least 1d" in short.stderr
