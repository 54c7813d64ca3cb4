"""Policy validation: a corpus of broken files, each a FILE:LINE: error naming the key, exit 1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from agent.policy.load import PolicyError, load_policies, load_policy_file

CORPUS = sorted((Path(__file__).parent / "policies" / "broken").glob("*.yaml"))


def expectation(path: Path) -> tuple[int, str]:
    match = re.match(r"# expect: (\d+) (\S+)", path.read_text().splitlines()[0] if path.read_text() else "")
    assert match, f"{path.name} has no '# expect: LINE KEY' header"
    return int(match.group(1)), match.group(2)


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_broken_policy_reports_file_line_and_key(path: Path):
    line, key = expectation(path)
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    messages = [str(p) for p in info.value.problems]
    wanted = f"{path}:{line}: "
    assert any(m.startswith(wanted) and key in m for m in messages), messages


def test_check_cli_on_the_whole_corpus_exits_1_without_traceback(tmp_path):
    result = run_cli("check", *[str(p) for p in CORPUS], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    for path in CORPUS:
        line, _ = expectation(path)
        assert f"{path}:{line}: " in result.stdout, path.name


def test_example_policies_pass_check(tmp_path):
    result = run_cli("check", str(REPO / "policies"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amounts_are_read_from_their_text():
    from decimal import Decimal

    policy = load_policy_file(Path(__file__).parent / "policies" / "good" / "base.yaml")
    assert policy.top_up is not None and policy.top_up.min_amount == Decimal("10.00")
    text = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
    from agent.policy.load import parse_policy

    tenth = parse_policy(text.replace("min_amount: 10\n", "min_amount: 0.1\n", 1), "x.yaml")
    assert tenth.top_up is not None and tenth.top_up.min_amount == Decimal("0.10")


def test_two_files_for_one_account_is_an_error(tmp_path):
    base = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "b.yaml").write_text(base.replace("name: base", "name: other"))
    policies, problems = load_policies([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert len(policies) == 1
    assert str(problems[0]).startswith(f"{tmp_path / 'b.yaml'}:4: account.mt5")


def test_the_packaged_example_is_the_repository_example():
    """`fund-agent demo` from an installed wheel reads agent/data/example.yaml: it must not drift."""
    assert (REPO / "agent" / "data" / "example.yaml").read_text() == (REPO / "policies" / "example.yaml").read_text()
