"""Hostile policy files and folders: huge durations and amounts, deep nesting, alias bombs, files that are not
regular files, and policies/ entries that used to be skipped without a word. Each is a problem naming the file
(and the line and key when there is one), never an exception, a hang or memory exhaustion."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import deadline, run_cli

from agent.policy.load import PolicyError, Problem, load_policies, load_policy_file, parse_policy, policy_files
from agent.timeutil import DurationError, parse_duration

BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()



def problems_of(text: str, path: str = "p.yaml") -> list[str]:
    with deadline(), pytest.raises(PolicyError) as info:
        parse_policy(text, path)
    return [str(p) for p in info.value.problems]


# ---- durations ----

@pytest.mark.parametrize("text", ["3651d", "99999999999999d", "9" * 30 + "s", "87601h", "315360001s"])
def test_parse_duration_refuses_more_than_3650_days(text):
    with pytest.raises(DurationError, match="at most 3650d"):
        parse_duration(text)


def test_parse_duration_keeps_its_range():
    assert parse_duration("3650d") == timedelta(days=3650)
    assert parse_duration("0s") == timedelta(0)
    with pytest.raises(DurationError):
        parse_duration("x" * 100_000)


def test_a_huge_cooldown_is_file_line_key():
    text = BASE.replace("cooldown: 30m", "cooldown: 99999999999999d")
    assert problems_of(text) == ["p.yaml:15: top_up.cooldown: duration '99999999999999d' is too long: at most 3650d"]


def test_a_huge_schedule_is_file_line_key():
    (problem,) = problems_of(BASE.replace("every: 60s", "every: 4000d"))
    assert problem.startswith("p.yaml:8: schedule.every: ") and "3650d" in problem


# ---- amounts ----

@pytest.mark.parametrize(("old", "new", "line", "key"), [
    ("when_equity_below: 500", "when_equity_below: 1e308", 11, "top_up.when_equity_below"),
    ("max_amount: 1000", "max_amount: -1e308", 14, "top_up.max_amount"),
    ("funding_reserve: 1000", "funding_reserve: 1000000000000000", 30, "limits.funding_reserve"),
    ("net_top_up_above: 10000", "net_top_up_above: 9e99999", 33, "kill_switch.net_top_up_above"),
    ("min_margin_level: 300", "min_margin_level: 1.0e+308", 22, "sweep.min_margin_level"),
    ("consecutive_top_ups: 5", "consecutive_top_ups: " + "9" * 5000, 32, "kill_switch.consecutive_top_ups"),
])
def test_an_out_of_range_number_says_so(old, new, line, key):
    problems = problems_of(BASE.replace(old, new))
    assert any(p.startswith(f"p.yaml:{line}: {key}: ") and "out of range" in p for p in problems), problems
    assert not any("decimal places" in p for p in problems), problems


def test_amounts_just_below_the_range_are_fine():
    policy = parse_policy(BASE.replace("net_top_up_above: 10000", "net_top_up_above: 999999999999999"), "p.yaml")
    assert policy.kill_switch.net_top_up_above is not None


# ---- YAML that would exhaust the stack or memory ----

def test_10k_nested_lists_are_refused_with_file_line():
    for text in (BASE + "name:\n  " + "- " * 10_000 + "x\n",
                 BASE.replace("name: base", "name: " + "[" * 10_000 + "]" * 10_000)):
        (problem,) = problems_of(text)
        assert problem.startswith("p.yaml:") and "nest" in problem, problem


def test_an_alias_bomb_is_refused_quickly():
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        bomb += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    started = time.monotonic()
    (problem,) = problems_of(bomb)
    assert "aliases" in problem and time.monotonic() - started < 5


def test_anchors_in_a_real_policy_still_work():
    text = BASE.replace("per_24h: {count: 2}", "per_24h: &w {count: 2}\n    per_7d: *w")
    assert parse_policy(text, "p.yaml").limits.sweep.windows["per_7d"].count == 2


def test_a_big_policy_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(BASE + "".join(f"# {i:08d} padding\n" for i in range(70_000)))
    assert path.stat().st_size > 1024 * 1024
    with deadline(), pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert [str(p) for p in info.value.problems] == [f"{path}: file is larger than 1 MiB"]


def test_a_policy_of_many_keys_under_1_mib_is_handled_in_seconds(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"k{i}: 1\n" for i in range(100_000))[: 1024 * 1024])
    started = time.monotonic()
    with deadline(30), pytest.raises(PolicyError):
        load_policy_file(path)
    assert time.monotonic() - started < 15


# ---- files that are not regular files ----

def test_a_policy_symlinked_to_dev_zero_or_a_fifo_is_refused(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    for name, kind in (("zero.yaml", "character device"), ("fifo.yaml", "FIFO")):
        with deadline(), pytest.raises(PolicyError) as info:
            load_policy_file(tmp_path / name)
        (problem,) = info.value.problems
        assert str(problem) == f"{tmp_path / name}: file is a {kind}, not a regular file"


def test_check_given_a_fifo_or_dev_zero_exits_1_without_hanging(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    result = run_cli("check", str(tmp_path / "zero.yaml"), str(tmp_path / "fifo.yaml"), cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert f"{tmp_path / 'zero.yaml'}: file is a character device" in result.stdout
    assert f"{tmp_path / 'fifo.yaml'}: file is a FIFO" in result.stdout


def folder_with_odd_entries(tmp_path: Path) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "good.yaml").write_text(BASE)
    (folder / "gone.yaml").symlink_to(folder / "deleted.yaml")
    (folder / "sub.yaml").mkdir()
    os.mkfifo(folder / "pipe.yml")
    (folder / "zero.yaml").symlink_to("/dev/zero")
    (folder / "notes.txt").write_text("not a policy")
    return folder


def test_policy_files_lists_what_it_will_not_load_and_load_policies_reports_it(tmp_path):
    folder = folder_with_odd_entries(tmp_path)
    files = policy_files(folder)
    with deadline():
        for path in files:  # a caller hashing each listed file (the service) must not block or read /dev/zero
            try:
                path.read_bytes()
            except OSError:
                pass
        policies, problems = load_policies(files)
    assert [p.name for p in policies] == ["base"]
    assert sorted(str(p) for p in problems) == sorted([
        f"{folder / 'gone.yaml'}: skipped: a dangling symlink",
        f"{folder / 'sub.yaml'}: skipped: a directory",
        f"{folder / 'pipe.yml'}: skipped: not a regular file",
        f"{folder / 'zero.yaml'}: skipped: not a regular file",
    ])


def test_an_empty_policies_folder_is_a_problem(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "README.txt").write_text("no policies yet")
    policies, problems = load_policies(policy_files(folder))
    assert policies == []
    assert [str(p) for p in problems] == [f"{folder}/: no *.yaml policy files"]


def test_a_folder_of_only_broken_entries_says_both(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "gone.yaml").symlink_to(folder / "deleted.yaml")
    _, problems = load_policies(policy_files(folder))
    assert [str(p) for p in problems] == [f"{folder / 'gone.yaml'}: skipped: a dangling symlink",
                                          f"{folder}/: no *.yaml policy files"]


def test_an_editor_lock_is_not_a_policy(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "good.yaml").write_text(BASE)
    (folder / ".#good.yaml").symlink_to("user@host.1234:1700000000")  # what Emacs leaves while editing
    policies, problems = load_policies(policy_files(folder))
    assert len(policies) == 1 and problems == []


def test_a_problem_with_no_line_prints_file_colon_message():
    assert str(Problem("a.yaml", 0, "skipped: a directory")) == "a.yaml: skipped: a directory"
    assert str(Problem("a.yaml", 3, "x: y")) == "a.yaml:3: x: y"


def test_check_on_a_folder_with_a_dangling_symlink_exits_1(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "good.yaml").write_text(BASE)
    (folder / "gone.yaml").symlink_to(folder / "deleted.yaml")
    result = run_cli("check", str(folder), cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{folder / 'gone.yaml'}: skipped: a dangling symlink" in result.stdout
    assert f"{folder / 'good.yaml'}: ok" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_on_a_folder_with_odd_entries_exits_1_without_hanging(tmp_path):
    folder = folder_with_odd_entries(tmp_path)
    result = run_cli("check", str(folder), cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    for name in ("gone.yaml", "sub.yaml", "pipe.yml", "zero.yaml"):
        assert f"{folder / name}: skipped: " in result.stdout, name


def test_check_through_the_config_on_an_empty_folder_exits_1(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "fund-agent.yaml").write_text("policies: policies/\nequity:\n  source: simulated\n")
    result = run_cli("check", cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{tmp_path / 'policies'}/: no *.yaml policy files" in result.stdout
