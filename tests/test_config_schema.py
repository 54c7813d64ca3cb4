"""fund-agent.yaml checked like a policy: one schema for every section and key, each problem FILE:LINE: key:
message; a broken-config corpus with the expected line and key in each file's first line."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from conftest import run_cli

from agent.config import ConfigError, load_config
from agent.config_schema import SCHEMA

HERE = Path(__file__).parent / "configs"
CORPUS = sorted((HERE / "broken").glob("*.yaml"))
GOOD = HERE / "good" / "full.yaml"


def expectation(path: Path) -> tuple[int, str]:
    match = re.match(r"# expect: (\d+) (\S+)", path.read_text())
    assert match, f"{path.name} has no '# expect: LINE KEY' header"
    return int(match.group(1)), match.group(2)


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    return [str(p) for p in info.value.problems] or [str(info.value)]


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_broken_config_reports_file_line_and_key(path: Path):
    line, key = expectation(path)
    found = problems(path)
    assert any(m.startswith(f"{path}:{line}: {key}: ") for m in found), found


def test_a_typo_under_every_section_is_reported_with_its_line():
    sections = {"top", "broker", "equity", "terminal", "http", "notify", "webhook", "telegram", "logging"}
    typos = {p.stem.removesuffix("_typo") for p in CORPUS if p.stem.endswith("_typo")}
    assert sections <= typos, sections - typos
    for path in CORPUS:
        if path.stem.endswith("_typo"):
            line, key = expectation(path)
            assert any(m.startswith(f"{path}:{line}: {key}: unknown key") for m in problems(path))


def test_every_schema_section_is_closed():
    """Unknown keys are refused everywhere: every mapping in the schema says additionalProperties."""
    def walk(node: dict, where: str) -> None:
        if node.get("type") == "object":
            assert "additionalProperties" in node, where
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{where}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.*")
    walk(SCHEMA, "config")


def test_the_full_config_loads_with_the_new_keys():
    config = load_config(GOOD)
    assert config.host_id == "vps-1" and config.database_password_env == "FUND_AGENT_PG_PASSWORD"
    assert config.logging.file == GOOD.parent / "fund-agent.log"
    assert config.logging.max_bytes == 1048576 and config.logging.backups == 3
    assert config.http["status_token_env"] == "FUND_AGENT_STATUS_TOKEN"


def test_host_id_defaults_to_the_hostname(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    path.write_text("equity:\n  source: simulated\n")
    config = load_config(path)
    assert config.host_id == socket.gethostname() and config.database_password_env is None


def test_every_problem_is_reported_in_line_order(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    path.write_text("databse: x\nbroker:\n  timeout: 5\nlogging:\n  backups: lots\n")
    found = problems(path)
    assert [m.split(": ")[0] for m in found] == [f"{path}:1", f"{path}:3", f"{path}:5"], found


def test_remote_listen_with_a_token_is_fine(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    path.write_text("http:\n  listen: 0.0.0.0:8787\n  status_token_env: FA_STATUS_TOKEN\n")
    assert load_config(path).http["listen"] == "0.0.0.0:8787"


def test_check_cli_prints_every_config_problem(tmp_path):
    path = CORPUS[0]
    result = run_cli("--config", str(path), "check", "--config-only", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    line, key = expectation(path)
    assert f"{path}:{line}: {key}: " in result.stdout
    assert "Traceback" not in result.stderr


def test_check_cli_checks_a_found_config_and_policies(tmp_path):
    (tmp_path / "policies").mkdir()
    policy = Path(__file__).parent / "policies" / "good" / "base.yaml"
    (tmp_path / "policies" / "base.yaml").write_text(policy.read_text())
    (tmp_path / "fund-agent.yaml").write_text("policies: policies/\nequity:\n  source: simulated\n")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fund-agent.yaml: ok (config)" in result.stdout
    result = run_cli("check", "--config-only", cwd=tmp_path)
    assert result.returncode == 0 and "base.yaml" not in result.stdout
    (tmp_path / "fund-agent.yaml").write_text("policies: policies/\nequity:\n  source: simulated\n  sed: 1\n")
    result = run_cli("check", str(tmp_path / "policies"), cwd=tmp_path)
    assert result.returncode == 1
    assert "fund-agent.yaml:4: equity.sed: unknown key" in result.stdout
    assert "base.yaml: ok" in result.stdout  # the policies given are still checked
