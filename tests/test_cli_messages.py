"""What the operator reads when something is wrong: one line on stderr, exit 1 (failure) or 2 (usage)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, REPO, TOKEN, make_workspace, run_cli, write_status

from agent.ledger.db import HEAD, KNOWN, alembic_config, upgrade

ENV = {"DERIV_API_TOKEN": TOKEN}
OTHER = "MTR130002535"


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "[SQL" not in stderr and "sqlalche.me" not in stderr
    return lines[0]


def without_service_log(stderr: str) -> str:
    """`run` (the service) writes its JSON log to stderr too: the error line is the rest."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith('{"time": '))


def add_policy(workspace: Path, fake, account: str, file: str, name: str) -> None:
    if account != MT5:
        fake.add_account(account, "USD", "450.00", mt5=True)
    text = (REPO / "policies" / "example.yaml").read_text()
    text = text.replace(MT5, account).replace("name: example", f"name: {name}")
    (workspace / "policies" / file).write_text(text)


# ---- a ledger from a newer fund-agent ----

def test_the_known_revisions_are_the_migration_scripts():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert [s.revision for s in reversed(list(scripts.walk_revisions()))] == list(KNOWN)
    assert HEAD == KNOWN[-1] == scripts.get_current_head()


NEWER_COMMANDS = [
    ("run",), ("run", "--once"), ("ledger",), ("decisions",), ("status",), ("halts",),
    ("halt", MT5, "--reason", "review"), ("resume", MT5), ("reconcile",),
    ("resolve", "1", "--failed", "--reason", "checked"), ("plan",), ("db", "upgrade"),
]


@pytest.mark.sqlite_only
@pytest.mark.parametrize("args", NEWER_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_ledger_from_a_newer_schema_is_refused_by_every_command(workspace, args):
    write_status(workspace / "status", equity="450.00")
    path = (workspace / "ledger.db").resolve()
    upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    result = run_cli(*args, cwd=workspace, env=ENV, timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert one_line(without_service_log(result.stderr)) == (
        f"fund-agent: error: the ledger {path} is at schema revision 0099, which this fund-agent does not know "
        f"(it knows up to {HEAD}): upgrade fund-agent")
    assert not [p for p in os.listdir(workspace) if ".bak-" in p]  # no copy made, on this or any attempt
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]


# ---- a ledger sqlite cannot use ----

@pytest.mark.sqlite_only
@pytest.mark.parametrize("args", [("ledger",), ("status",), ("halts",), ("halt", MT5, "--reason", "review"),
                                  ("run", "--once"), ("plan",), ("db", "upgrade"), ("reconcile",)],
                         ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("kind", ["random bytes", "a directory"])
def test_a_ledger_that_is_not_a_database_is_named_with_the_reason(workspace, args, kind):
    write_status(workspace / "status", equity="450.00")
    path = (workspace / "ledger.db").resolve()
    if kind == "a directory":
        path.mkdir()
        reason = "it is a directory, not a file"
    else:
        path.write_bytes(os.urandom(8192))
        reason = "file is not a database"
    result = run_cli(*args, cwd=workspace, env=ENV)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert one_line(result.stderr) == f"fund-agent: error: cannot use the ledger {path}: {reason}"
    assert not [p for p in os.listdir(workspace) if ".bak-" in p]


@pytest.mark.sqlite_only
def test_a_ledger_that_refuses_a_write_is_one_line_without_sql(workspace):
    path = (workspace / "ledger.db").resolve()
    upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:  # stands in for a read-only file (the tests run as root)
        conn.execute("CREATE TRIGGER no_halts BEFORE INSERT ON halts BEGIN "
                     "SELECT RAISE(ABORT, 'attempt to write a readonly database'); END")
    result = run_cli("halt", MT5, "--reason", "secret-reason-text", cwd=workspace)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line == f"fund-agent: error: the ledger {path} failed: attempt to write a readonly database"
    assert "secret-reason-text" not in line  # the parameters are never printed


# ---- usage errors: dates and ids ----

@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "yesterday",
                                   "2026-13-01", "2026-11-25T25:00"])
@pytest.mark.parametrize("command", ["ledger", "decisions"])
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_bad_date_is_a_usage_error_in_one_line(workspace, value, command, option):
    result = run_cli(command, option, value, cwd=workspace)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("fund-agent: error: ") and option in line and repr(value) in line


def test_good_dates_still_filter(workspace):
    for value in ("2026-11-25", "2026-11-25T09:00:00Z", "2026-11-25T09:00:00+14:00", "0001-01-01"):
        result = run_cli("ledger", "--format", "json", "--since", value, "--until", "9999-12-31", cwd=workspace)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args", [
    ("resolve", "1", "--confirmed", str(2**70)),
    ("resolve", "1", "--confirmed", "-5"),
    ("resolve", "1", "--confirmed", "0"),
    ("resolve", "1", "--confirmed", str(2**63)),
    ("resolve", "1", "--confirmed", "12x"),
    ("resolve", str(2**70), "--failed", "--reason", "checked"),
    ("resolve", "--failed", "--reason", "checked", "--", "-5"),
    ("resolve", "0", "--failed", "--reason", "checked"),
], ids=lambda a: " ".join(a[1:4]))
def test_ids_out_of_the_64_bit_positive_range_are_usage_errors(workspace, args):
    result = run_cli(*args, cwd=workspace)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert one_line(result.stderr).startswith("fund-agent: error: ")
    assert not (workspace / "ledger.db").exists()  # refused before the ledger is touched


def test_the_largest_id_is_accepted(workspace):
    assert run_cli("db", "upgrade", cwd=workspace).returncode == 0  # a ledger, with no such transfer in it
    result = run_cli("resolve", str(2**63 - 1), "--confirmed", str(2**63 - 1), cwd=workspace)
    assert result.returncode == 1
    assert one_line(result.stderr) == f"fund-agent: error: no transfer {2**63 - 1} in the ledger"


# ---- two files for one account ----

def test_an_account_two_files_manage_is_skipped_and_the_others_go_on(workspace, fake):
    add_policy(workspace, fake, MT5, "zz-second.yaml", "second")
    add_policy(workspace, fake, OTHER, "other.yaml", "other")
    write_status(workspace / "status", login=130002534, equity="450.00")
    write_status(workspace / "status", login=130002535, equity="450.00")

    plan = run_cli("plan", "--format", "json", cwd=workspace, env=ENV)
    assert plan.returncode == 1, plan.stderr
    assert [row["account"] for row in json.loads(plan.stdout)] == [OTHER]
    assert "is already managed by" in plan.stderr and f"{MT5}: skipped" in plan.stderr

    status = run_cli("status", "--format", "json", cwd=workspace)
    assert status.returncode == 1
    assert [row["account"] for row in json.loads(status.stdout)] == [OTHER]
    assert f"{MT5}: skipped" in status.stderr

    run = run_cli("run", "--once", cwd=workspace, env=ENV)
    assert run.returncode == 1, run.stderr
    assert f"{MT5}: skipped" in run.stderr and "example.yaml" in run.stderr and "zz-second.yaml" in run.stderr
    assert MT5 not in run.stdout and f"{OTHER} [other] top_up" in run.stdout
    deposits = [r for r in fake.requests if "mt5_deposit" in r]
    assert [r["to_mt5"] for r in deposits] == [OTHER]
    decisions = json.loads(run_cli("decisions", "--format", "json", cwd=workspace).stdout)
    assert {d["account"] for d in decisions} == {OTHER}
    assert fake.transfers(FUNDING)


# ---- halt of an account no policy manages ----

def test_halt_of_an_unmanaged_login_is_recorded_with_a_warning(workspace):
    result = run_cli("halt", OTHER, "--reason", "ahead of its policy", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{OTHER}: halted (ahead of its policy)\n"
    line = one_line(result.stderr)
    assert line.startswith("warning: no policy in ") and line.endswith(f"policies manages {OTHER}")
    listing = json.loads(run_cli("halts", "--format", "json", cwd=workspace).stdout)
    assert [h["account"] for h in listing] == [OTHER]

    managed = run_cli("halt", MT5, "--reason", "review", cwd=workspace)
    assert managed.returncode == 0 and managed.stderr == ""


# ---- one account's unexpected error ----

def test_run_once_and_plan_go_on_past_an_accounts_unexpected_error(workspace, fake, monkeypatch, capsys):
    from agent.cli import main
    from agent.engine.tick import Engine

    add_policy(workspace, fake, OTHER, "other.yaml", "other")
    write_status(workspace / "status", login=130002534, equity="450.00")
    write_status(workspace / "status", login=130002535, equity="450.00")
    tick = Engine.tick

    def broken_for_mt5(self, policy, execute=True):
        if policy.mt5 == MT5:
            raise ArithmeticError("a bug deep in an evaluation")
        return tick(self, policy, execute)

    monkeypatch.setattr(Engine, "tick", broken_for_mt5)
    monkeypatch.setenv("DERIV_API_TOKEN", TOKEN)
    monkeypatch.chdir(workspace)

    with pytest.raises(SystemExit) as plan_exit:
        main(["plan", "--format", "json"])
    rows = {row["account"]: row for row in json.loads(capsys.readouterr().out)}
    assert plan_exit.value.code == 1
    assert "evaluation failed: ArithmeticError" in rows[MT5]["reason"] and rows[OTHER]["action"] == "top_up"

    with pytest.raises(SystemExit) as run_exit:
        main(["run", "--once"])
    out = capsys.readouterr().out
    assert run_exit.value.code == 1
    assert f"{MT5} [example] none: evaluation failed: ArithmeticError" in out
    assert f"{OTHER} [other] top_up" in out and "confirmed" in out
    assert [r["to_mt5"] for r in fake.requests if "mt5_deposit" in r] == [OTHER]
    decisions = json.loads(run_cli("decisions", "--format", "json", "--account", MT5, cwd=workspace).stdout)
    assert [d["action"] for d in decisions] == ["error"]


# ---- no policy at all ----

@pytest.mark.parametrize("args", [("plan",), ("run", "--once"), ("run",)], ids=" ".join)
def test_an_empty_policies_folder_is_a_failure_that_says_so(tmp_path, fake, args):
    workspace = make_workspace(tmp_path, fake)
    (workspace / "policies" / "example.yaml").unlink()
    result = run_cli(*args, cwd=workspace, env=ENV, timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("fund-agent: error: no policy found in ") and "policies" in line
    assert result.stdout == ""


@pytest.mark.sqlite_only
def test_an_unknown_older_revision_is_refused_after_a_copy(workspace):
    path = (workspace / "ledger.db").resolve()
    upgrade(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0000'")
    result = run_cli("db", "upgrade", cwd=workspace)
    assert result.returncode == 1
    [copy] = [p for p in os.listdir(workspace) if p.startswith("ledger.db.bak-0000-")]
    assert one_line(result.stderr) == (
        f"fund-agent: error: the ledger {path} is at schema revision 0000, which no migration of this fund-agent "
        f"starts from: repair it by hand (a copy of it: {path.parent / copy})")
    readonly = run_cli("ledger", cwd=workspace)  # never read as if it were current
    assert readonly.returncode == 1 and "schema revision 0000" in one_line(readonly.stderr)
