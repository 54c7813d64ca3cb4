"""The real probe subprocess with the fake MetaTrader5 module, through every failure mode."""

from __future__ import annotations

import json
import os
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agent.equity.base import NoReading
from agent.equity.mt5 import Mt5Source, Terminal
from agent.timeutil import Clock

FAKE = Path(__file__).parent / "fake_mt5"


def source(tmp_path: Path, mode: str = "ok", deadline: float = 5.0, **script: object) -> tuple[Mt5Source, Path]:
    path = tmp_path / "mt5-script.json"
    path.write_text(json.dumps({"mode": mode, **script}))
    env = {**os.environ, "PYTHONPATH": str(FAKE), "FAKE_MT5_SCRIPT": str(path), "MT5_PASSWORD": "pw-s3cret-9"}
    terminals = {"MTR130002534": Terminal(path="C:\\MT5-1\\terminal64.exe", server="DerivSVG-Server",
                                          password_env="MT5_PASSWORD")}
    return Mt5Source(Clock(), terminals, deadline=deadline, init_timeout_ms=2000, env=env), path


def set_mode(path: Path, mode: str, **script: object) -> None:
    path.write_text(json.dumps({"mode": mode, **script}))


def test_reading_from_a_connected_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("MT5_PASSWORD", "pw-s3cret-9")
    src, _ = source(tmp_path)
    try:
        snap = src.read("MTR130002534")
        assert (snap.equity, snap.balance, snap.margin_level) == (Decimal("950.12"), Decimal("1000.00"),
                                                                   Decimal("9501.20"))
        assert snap.login == "130002534" and snap.connected and snap.currency == "USD" and snap.source == "mt5"
        probe = src.probes["MTR130002534"]
        assert all("pw-s3cret-9" not in part for part in probe.command)  # the password goes on stdin only
    finally:
        src.close()


@pytest.mark.parametrize("mode, words", [
    ("not_found", "-10003"),
    ("auth_failed", "authorization failed (-6)"),
    ("ipc_timeout", "IPC timeout (-10005)"),
    ("no_ipc", "no IPC connection (-10004)"),
    ("disconnected", "connected is False"),
    ("wrong_login", "logged in to 999999, not 130002534"),
])
def test_each_failure_mode_gives_a_clear_error_and_no_reading(tmp_path, monkeypatch, mode, words):
    monkeypatch.setenv("MT5_PASSWORD", "pw-s3cret-9")
    src, _ = source(tmp_path, mode, ipc_delay=0.3)
    try:
        with pytest.raises(NoReading) as info:
            src.read("MTR130002534")
        assert words in str(info.value)
    finally:
        src.close()


def test_recovers_after_the_terminal_comes_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MT5_PASSWORD", "pw-s3cret-9")
    src, script = source(tmp_path, "no_ipc")
    try:
        with pytest.raises(NoReading):
            src.read("MTR130002534")
        set_mode(script, "ok")
        assert src.read("MTR130002534").equity == Decimal("950.12")
    finally:
        src.close()


def test_a_hung_probe_is_killed_within_its_deadline_and_restarted(tmp_path, monkeypatch):
    monkeypatch.setenv("MT5_PASSWORD", "pw-s3cret-9")
    src, script = source(tmp_path, "ok", deadline=1.0)
    (tmp_path / "other").mkdir()
    other, _ = source(tmp_path / "other", "ok")
    try:
        src.read("MTR130002534")
        set_mode(script, "hang")
        results: dict[str, object] = {}

        def hung() -> None:
            started = time.monotonic()
            try:
                src.read("MTR130002534")
            except NoReading as exc:
                results["hung"] = (str(exc), time.monotonic() - started)

        thread = threading.Thread(target=hung)
        thread.start()
        time.sleep(0.2)
        results["other"] = other.read("MTR130002534").equity  # the rest of the agent keeps working
        thread.join(10)
        message, took = results["hung"]
        assert "did not answer within 1s" in message and took < 3
        assert results["other"] == Decimal("950.12")
        assert src.probes["MTR130002534"].restarts == 1
        set_mode(script, "ok")
        assert src.read("MTR130002534").equity == Decimal("950.12")  # a fresh probe
    finally:
        src.close()
        other.close()


def test_missing_password_names_the_variable(tmp_path, monkeypatch):
    from agent.config import MissingSecret

    src, _ = source(tmp_path)
    monkeypatch.delenv("MT5_PASSWORD", raising=False)
    src.env = {k: v for k, v in (src.env or {}).items() if k != "MT5_PASSWORD"}
    try:
        with pytest.raises(MissingSecret) as info:
            src.read("MTR130002534")
        assert "MT5_PASSWORD" in str(info.value)
    finally:
        src.close()


def test_fake_module_has_the_real_surface():
    import importlib
    import importlib.util
    import sys

    sys.path.insert(0, str(FAKE))
    try:
        spec = importlib.util.find_spec("MetaTrader5")
        assert spec is not None
        mt5 = importlib.import_module("MetaTrader5")
    finally:
        sys.path.remove(str(FAKE))
    assert mt5.RES_E_INTERNAL_FAIL_INIT == -10003 and mt5.RES_E_AUTH_FAILED == -6
    assert mt5.AccountInfo._fields[:3] == ("login", "trade_mode", "leverage")
    assert mt5.AccountInfo._fields[-4:] == ("name", "server", "currency", "company")
    assert "connected" in mt5.TerminalInfo._fields



def test_run_once_with_the_mt5_source_end_to_end(workspace, fake, tmp_path):
    from conftest import FUNDING, TOKEN, run_cli

    script = tmp_path / "script.json"
    script.write_text(json.dumps({"mode": "ok", "account": {"equity": 450.0, "balance": 450.0, "margin": 0.0,
                                                            "margin_free": 450.0, "margin_level": 0.0}}))
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text().replace(
        "  source: ea-file\n  dir: status\n",
        "  source: mt5\n  probe_timeout: 5s\n  terminals:\n    MTR130002534:\n"
        "      path: 'C:\\MT5-1\\terminal64.exe'\n      server: DerivSVG-Server\n      password_env: MT5_PW\n"))
    env = {"DERIV_API_TOKEN": TOKEN, "MT5_PW": "pw-s3cret-9", "PYTHONPATH": str(FAKE),
           "FAKE_MT5_SCRIPT": str(script)}
    result = run_cli("run", "--once", cwd=workspace, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top_up 550.00" in result.stdout
    assert fake.transfers(FUNDING)[0]["amount"] == Decimal("-550.00")
    assert "pw-s3cret-9" not in result.stdout + result.stderr
