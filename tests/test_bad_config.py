"""Hostile fund-agent.yaml files: each is one ConfigError line naming the key (FILE:LINE: key: message), never
another exception, never a hang, never memory exhaustion; secrets the config names are redacted at once."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import REPO, deadline, run_cli

from agent import logs
from agent.config import ConfigError, load_config

GOOD = "database: sqlite:///ledger.db\npolicies: policies/\nequity:\n  source: simulated\n"



def refused(path: Path) -> str:
    with deadline(), pytest.raises(ConfigError) as info:  # any other exception fails the test
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fund-agent.yaml"
    path.write_text(text)
    return path


# (id, config text, key named by the message, line, a word of the message)
BROKEN = [
    ("database_number", "database: 5\n", "database", 1, "got a number (5)"),
    ("database_list", "database: [a, b]\n", "database", 1, "got a list"),
    ("database_null", "database:\n", "database", 1, "got nothing"),
    ("policies_mapping", "policies: {a: 1}\n", "policies", 1, "got a mapping"),
    ("equity_list", "equity: [1]\n", "equity", 1, "must be a mapping"),
    ("notify_list", "notify: [1]\n", "notify", 1, "must be a mapping"),
    ("http_text", 'http: "yes"\n', "http", 1, "must be a mapping"),
    ("broker_number", "broker: 5\n", "broker", 1, "must be a mapping"),
    ("token_env_list", "broker:\n  token_env: [A, B]\n", "broker.token_env", 2, "got a list"),
    ("token_env_not_a_name", "broker:\n  token_env: my token\n", "broker.token_env", 2,
     "not an environment variable name"),
    ("timeout_zero", "broker:\n  url: wss://x\n  timeout: 0s\n", "broker.timeout", 3, "longer than 0s"),
    ("timeout_number", "broker:\n  timeout: 15\n", "broker.timeout", 2, "string"),
    ("timeout_huge", "broker:\n  timeout: 99999999999999d\n", "broker.timeout", 2, "at most 3650d"),
    ("settle_negative", "broker:\n  settle_window: -2m\n", "broker.settle_window", 2, "bad duration"),
    ("settle_words", "broker:\n  settle_window: two minutes\n", "broker.settle_window", 2, "bad duration"),
    ("settle_zero", "broker:\n  settle_window: 0m\n", "broker.settle_window", 2, "longer than 0s"),
    ("settle_list", "broker:\n  settle_window: [2m]\n", "broker.settle_window", 2, "bad duration"),
    ("app_id_bool", "broker:\n  app_id: true\n", "broker.app_id", 2, "must be a number"),
    ("app_id_float", "broker:\n  app_id: 1.5e3\n", "broker.app_id", 2, "must be a number"),
    ("app_id_huge", "broker:\n  app_id: " + "9" * 5000 + "\n", "broker.app_id", 2, "must be a number"),
    ("app_id_date", "broker:\n  app_id: 2024-13-45\n", "broker.app_id", 2, "must be a number"),
    ("url_http", "broker:\n  url: http://example.com\n", "broker.url", 2, "wss://"),
    ("url_list", "broker:\n  url: [wss://x]\n", "broker.url", 2, "got a list"),
    ("broker_unknown", "broker:\n  tokn_env: X\n", "broker.tokn_env", 2, "unknown key"),
    ("top_unknown", "database: sqlite:///x.db\ndatabse: x\n", "databse", 2, "unknown key"),
    ("source_unknown", "equity:\n  source: excel\n", "equity.source", 2, "must be one of"),
    ("source_list", "equity:\n  source: [mt5]\n", "equity.source", 2, "must be one of"),
    ("ea_file_no_dir", "equity:\n  source: ea-file\n", "equity.dir", 1, "required"),
    ("equity_unknown", "equity:\n  source: mt5\n  probe_timout: 5s\n", "equity.probe_timout", 3, "unknown key"),
    ("probe_timeout_zero", "equity:\n  source: mt5\n  probe_timeout: 0s\n", "equity.probe_timeout", 3,
     "longer than 0s"),
    ("terminal_list", "equity:\n  source: mt5\n  terminals:\n    MTR1: [1]\n", "equity.terminals.MTR1", 4,
     "must be a mapping"),
    ("terminal_password_env", "equity:\n  terminals:\n    MTR1: {password_env: [X]}\n",
     "equity.terminals.MTR1.password_env", 3, "got a list"),
    ("seed_text", "equity:\n  source: simulated\n  seed: abc\n", "equity.seed", 3, "whole number"),
    ("drift_list", "equity:\n  source: simulated\n  drift: [1]\n", "equity.drift", 3, "expected a number"),
    ("http_listen_number", "http:\n  listen: 8787\n", "http.listen", 2, "HOST:PORT"),
    ("http_listen_port", "http:\n  listen: 127.0.0.1:99999\n", "http.listen", 2, "HOST:PORT"),
    ("http_allow_remote_text", "http:\n  allow_remote: 'yes'\n", "http.allow_remote", 2, "true or false"),
    ("http_secret_env_list", "http:\n  intake_secret_env: [S]\n", "http.intake_secret_env", 2, "got a list"),
    ("http_unknown", "http:\n  lisen: 127.0.0.1:1\n", "http.lisen", 2, "unknown key"),
    ("notify_webhook_list", "notify:\n  webhook: [1]\n", "notify.webhook", 2, "must be a mapping"),
    ("notify_webhook_url_number", "notify:\n  webhook: {url: 5}\n", "notify.webhook.url", 2, "http(s) URL"),
    ("notify_unknown_channel", "notify:\n  slack: {}\n", "notify.slack", 2, "unknown key"),
    ("telegram_token_env_map", "notify:\n  telegram:\n    token_env: {a: 1}\n", "notify.telegram.token_env", 3,
     "got a mapping"),
    ("telegram_events_text", "notify:\n  telegram: {events: halt}\n", "notify.telegram.events", 2,
     "list of event names"),
    ("reload_every_words", "reload_every: often\n", "reload_every", 1, "bad duration"),
    ("reload_every_bool", "reload_every: false\n", "reload_every", 1, "bad duration"),
    ("duplicate_section", "broker:\n  url: wss://a\nbroker:\n  url: wss://b\n", "broker", 3, "duplicate key"),
    ("duplicate_inner", "broker:\n  timeout: 5s\n  timeout: 6s\n", "broker.timeout", 3, "duplicate key"),
]


def test_the_corpus_is_big_enough():
    assert len(BROKEN) >= 15


@pytest.mark.parametrize(("text", "key", "line", "word"), [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_a_broken_config_is_one_line_naming_the_key(tmp_path, text, key, line, word):
    path = write(tmp_path, text)
    message = refused(path)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert word in message, message


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", "[1, 2]\n", "just text\n", "a: b: c\n", "database: 'x\n", "\tdatabase: x\n",
    "!!python/object/apply:os.system ['true']\n", "database: !!binary '%%%'\n", "? [a, b]\n: 1\n",
    "database: x\n---\ndatabase: y\n", "x: 2024-13-45\n", "equity: {options: *nothing}\n",
], ids=["empty", "comment", "list", "scalar", "nested_colon", "unterminated", "tab", "python_tag", "bad_binary",
        "list_key", "two_documents", "bad_date_unknown_key", "undefined_alias"])
def test_malformed_yaml_is_a_config_error(tmp_path, text):
    refused(write(tmp_path, text))


def test_not_utf8(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    path.write_bytes(b"database: \xff\xfe\n")
    assert "not UTF-8" in refused(path)


def test_good_configs_still_load(tmp_path):
    config = load_config(write(tmp_path, GOOD + "reload_every: 0s\n"))
    assert config.equity.source == "simulated" and config.reload_every == 0.0
    assert config.broker.timeout == 15.0 and config.broker.settle_window == 120.0


def test_the_readme_example_loads(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(\s*database:.*?)```", readme, re.DOTALL)
    assert block, "README has no fund-agent.yaml example"
    text = "\n".join(line[3:] if line.startswith("   ") else line for line in block.group(1).splitlines())
    config = load_config(write(tmp_path, text + "\n"))
    assert config.broker.app_id == 1089 and config.http["listen"] == "127.0.0.1:8787"
    assert config.notify["telegram"]["chat_id"] == "123456"


# ---- unbounded input ----

def test_billion_laughs_is_refused_quickly(tmp_path):
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 10):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    text = "equity:\n  source: simulated\n  terminals:\n    " + text.replace("\n", "\n    ").rstrip() + "\n"
    started = time.monotonic()
    message = refused(write(tmp_path, text))
    assert "aliases" in message and time.monotonic() - started < 5


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    assert "contains it" in refused(write(tmp_path, "database: &a [*a]\n"))


def test_deep_nesting_is_refused_with_a_line(tmp_path):
    block = "equity:\n  " + "- " * 10_000 + "x\n"  # compact block lists: 10,000 levels on one line
    assert re.search(r":\d+: YAML nested more than 50 levels", refused(write(tmp_path, block)))
    flow = "equity: " + "[" * 10_000 + "]" * 10_000 + "\n"
    assert "nest" in refused(write(tmp_path, flow))


def test_a_config_over_1_mib_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "#" * (1024 * 1024) + "\n")
    assert refused(path) == f"{path}: file is larger than 1 MiB"
    exactly = write(tmp_path, GOOD + "#" * (1024 * 1024 - len(GOOD) - 1) + "\n")
    assert exactly.stat().st_size == 1024 * 1024
    assert load_config(exactly).equity.source == "simulated"


def test_a_symlink_to_dev_zero_is_refused(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    path.symlink_to("/dev/zero")
    message = refused(path)
    assert "not a regular file" in message and "character device" in message


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fund-agent.yaml"
    os.mkfifo(path)
    assert "FIFO" in refused(path)


def test_a_directory_and_a_dangling_symlink_are_refused(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    assert "a directory" in refused(tmp_path / "dir.yaml")
    (tmp_path / "fund-agent.yaml").symlink_to(tmp_path / "gone.yaml")
    assert "dangling symlink" in refused(tmp_path / "fund-agent.yaml")


@pytest.mark.parametrize("kind", ["fifo", "zero", "bomb"])
def test_the_cli_gives_one_error_line_and_exits_1(tmp_path, kind):
    path = tmp_path / "fund-agent.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)))
    result = run_cli("--config", str(path), "check", cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fund-agent: error: {path}"), result.stderr
    assert "Traceback" not in result.stderr


# ---- secrets ----

def test_secrets_named_by_the_config_are_registered_at_load(tmp_path, monkeypatch):
    secrets = {
        "CFG_TEST_BROKER_TOKEN": "broker-secret-Q1w2e3r4",
        "CFG_TEST_INTAKE": "intake-secret-T5y6u7i8",
        "CFG_TEST_TELEGRAM": "123456:telegram-secret-O9p0",
        "CFG_TEST_MT5_PASSWORD": "mt5-password-A1s2d3",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    load_config(write(tmp_path, (
        "broker:\n  token_env: CFG_TEST_BROKER_TOKEN\n"
        "equity:\n  source: mt5\n  terminals:\n    MTR1: {password_env: CFG_TEST_MT5_PASSWORD}\n"
        "http:\n  intake_secret_env: CFG_TEST_INTAKE\n"
        "notify:\n  telegram: {token_env: CFG_TEST_TELEGRAM, chat_id: 1}\n")))
    for value in secrets.values():
        assert logs.redact(f"before {value} after") == "before *** after"


def test_the_default_token_variable_is_registered(tmp_path, monkeypatch):
    monkeypatch.setenv("DERIV_API_TOKEN", "default-token-Z9x8c7v6")
    load_config(write(tmp_path, GOOD))
    assert logs.redact("default-token-Z9x8c7v6") == "***"


def test_an_unset_variable_is_not_an_error_at_load(tmp_path, monkeypatch):
    monkeypatch.delenv("CFG_TEST_UNSET", raising=False)
    config = load_config(write(tmp_path, GOOD + "broker:\n  token_env: CFG_TEST_UNSET\n"))
    assert config.broker.token_env == "CFG_TEST_UNSET"
