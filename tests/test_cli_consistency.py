"""One CLI: the same --format choices wherever rows are printed, `status --check` as a monitoring probe, one
logging set-up (the redacting formatter, --log-level, the config's rotating file)."""

from __future__ import annotations

import csv
import io
import json
import logging

import pytest
from conftest import MT5, TOKEN, run_cli, write_status

from agent import logs

ENV = {"DERIV_API_TOKEN": TOKEN}


def test_status_check_is_a_monitoring_probe(workspace, fake):
    never = run_cli("status", "--check", cwd=workspace)
    assert never.returncode == 1 and f"check failed: {MT5}: no equity reading recorded" in never.stderr
    write_status(workspace / "status", equity="700.00")
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0
    fine = run_cli("status", "--check", cwd=workspace)
    assert fine.returncode == 0, fine.stderr
    assert "check ok" in fine.stderr
    assert run_cli("halt", MT5, "--reason", "review <b>", cwd=workspace).returncode == 0
    halted = run_cli("status", "--check", "--format", "json", cwd=workspace)
    assert halted.returncode == 1 and "halted (operator" in halted.stderr and "review <b>" in halted.stderr
    row = json.loads(halted.stdout)[0]  # stdout stays the chosen format
    assert row["halted"] is True and row["problems"] and row["currency"] == "USD"


@pytest.mark.parametrize("command", [("status",), ("plan",)])
def test_rows_print_in_every_format(workspace, fake, command):
    write_status(workspace / "status", equity="700.00")
    results = {fmt: run_cli(*command, "--format", fmt, cwd=workspace, env=ENV) for fmt in
               ("table", "json", "jsonl", "csv")}
    for fmt, result in results.items():
        assert result.returncode == 0, (fmt, result.stderr)
    rows = json.loads(results["json"].stdout)
    assert [json.loads(line) for line in results["jsonl"].stdout.splitlines()] == rows
    table = list(csv.DictReader(io.StringIO(results["csv"].stdout)))
    assert [r["account"] for r in table] == [r["account"] for r in rows] == [MT5]
    assert MT5 in results["table"].stdout


@pytest.mark.parametrize("command", ["status", "plan", "ledger", "decisions", "halts"])
def test_a_bad_format_is_the_same_usage_error_everywhere(workspace, command):
    result = run_cli(command, "--format", "xml", cwd=workspace)
    assert result.returncode == 2
    assert "'xml' is not one of 'table', 'json', 'jsonl', 'csv'" in result.stderr, result.stderr


def test_log_level_is_global_and_logs_are_json_when_not_a_terminal(workspace):
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + "logging:\n  file: missing-dir/agent.log\n")
    result = run_cli("--log-level", "debug", "status", cwd=workspace)  # the file cannot open: one warning
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(line["level"] == "warning" and "cannot be opened" in line["message"] for line in lines), lines
    quiet = run_cli("--log-level", "error", "status", cwd=workspace)
    assert "cannot be opened" not in quiet.stderr
    assert run_cli("--log-level", "loud", "status", cwd=workspace).returncode == 2


def test_the_rotating_file_is_json_and_redacted(tmp_path):
    secret = "file-secret-Q1w2e3r4"
    logs.register_secret(secret)
    target = tmp_path / "fund-agent.log"
    try:
        logs.use_file(str(target), max_bytes=2048, backups=2)
        logging.getLogger().setLevel(logging.INFO)
        for n in range(100):
            logging.getLogger("agent.test").warning("line %d token %s", n, secret)
    finally:
        logs.use_file(None)
        logs.setup(logging.WARNING)
    files = sorted(tmp_path.glob("fund-agent.log*"))
    assert len(files) == 3  # the file and its two backups: rotated, bounded
    text = "".join(f.read_text() for f in files)
    assert secret not in text and "***" in text
    assert all(json.loads(line)["logger"] == "agent.test" for line in target.read_text().splitlines())


def test_the_config_logging_section_opens_the_file(workspace):
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + "logging:\n  file: agent.log\n  level: info\n")
    result = run_cli("--log-level", "debug", "status", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert (workspace / "agent.log").exists()


class _Terminal:
    """A stand-in stderr that says it is a terminal, keeping what is written."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass


def test_progress_is_shown_on_a_terminal_and_silent_otherwise(monkeypatch):
    import sys

    from agent import output

    rows = [{"id": n, "amount": f"{n}.00"} for n in range(output.PROGRESS_FROM + 1)]
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    text = output.render(rows, "csv", ["id", "amount"])
    assert piped.getvalue() == "" and len(text.splitlines()) == len(rows) + 1
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert output.render(rows, "jsonl", ["id"]).count("\n") == len(rows) - 1
    assert terminal.buffer.getvalue(), "no progress drawn on a terminal"
    small = _Terminal()
    monkeypatch.setattr(sys, "stderr", small)
    output.render(rows[:10], "csv", ["id"])
    assert small.buffer.getvalue() == ""  # short work: no bar
