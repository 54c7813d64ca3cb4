"""`fund-agent run` as a subprocess: schedule, hot reload (valid then invalid), a broker restart under it,
notifications to a local webhook sink, /healthz and /metrics, a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, TOKEN, Receiver, run_cli, write_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def service_dir(workspace, fake):
    sink = Receiver(status=204)
    port = free_port()
    policy = workspace / "policies" / "example.yaml"
    policy.write_text(policy.read_text().replace("every: 60s", "every: 1s").replace("cooldown: 30m", "cooldown: 1h"))
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + f"http:\n  listen: 127.0.0.1:{port}\n  intake_secret_env: INTAKE\n"
                      f"notify:\n  webhook:\n    url: {sink.url}/hook\n")
    yield workspace, port, sink
    sink.stop()


def start(workspace: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    env.update({"DERIV_API_TOKEN": TOKEN, "INTAKE": "intake-secret-123"})
    return subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=workspace, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def decisions(workspace: Path) -> list[dict]:
    return json.loads(run_cli("decisions", "--format", "json", cwd=workspace).stdout)


def test_service_end_to_end(service_dir, fake):
    workspace, port, sink = service_dir
    write_status(workspace / "status", equity="450.00")
    proc = start(workspace)
    try:
        wait_for(lambda: fake.transfers(FUNDING), what="the first top-up")
        wait_for(lambda: "transfer_confirmed" in sink.events(), what="the confirmed notification")
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"

        # a valid edit is swapped in between evaluations
        policy = workspace / "policies" / "example.yaml"
        good = policy.read_text()
        policy.write_text(good.replace("target_equity: 1000", "target_equity: 1100"))
        wait_for(lambda: any(d["policy_sha256"] != decisions(workspace)[0]["policy_sha256"]
                             for d in decisions(workspace)), what="a decision under the edited policy")

        # an invalid edit is reported and the last good policy stays in force
        policy.write_text(good.replace("target_equity: 1000", "target_equity: lots"))
        wait_for(lambda: "policy_reload_failed" in sink.events(), what="the reload failure notification")
        failed = [d for d in decisions(workspace) if d["bound_by"] == "policy_reload"]
        assert "example.yaml:14: top_up.target_equity" in failed[0]["reason"]
        assert "stays in force" in failed[0]["reason"]
        count = len(decisions(workspace))
        wait_for(lambda: len(decisions(workspace)) > count + 1, what="evaluations going on")

        # the broker restarts under the agent: it reconnects, authorizes again and goes on
        fake.restart(down_for=1.5)
        with fake.lock:  # the MT5 side has made profit, as the status file will say
            fake.state.accounts["MTR130002534"].balance = Decimal("3500.00")
        write_status(workspace / "status", equity="3500.00")
        wait_for(lambda: len(fake.transfers(FUNDING)) == 2, what="a sweep after the reconnect")

        # the EA's POST intake
        request = urllib.request.Request(f"http://127.0.0.1:{port}/status", method="POST",
                                         data=b'{"schema":1}', headers={"X-Fund-Agent-Secret": "wrong"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, timeout=3)
        assert denied.value.code == 401

        status, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'fund_agent_transfers{kind="top_up",state="confirmed"} 1' in metrics
        assert 'fund_agent_transfers{kind="sweep",state="confirmed"} 1' in metrics
        assert 'fund_agent_policy_reloads_total{result="failed"}' in metrics
        assert "fund_agent_broker_connected 1" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    assert TOKEN not in out + err and "intake-secret-123" not in out + err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("account") == "MTR130002534" and line.get("policy") == "example" for line in lines)
    assert any("stopped" in line["message"] for line in lines)
    ledger = json.loads(run_cli("ledger", "--format", "json", cwd=workspace).stdout)
    assert [(r["kind"], r["state"]) for r in ledger] == [("top_up", "confirmed"), ("sweep", "confirmed")]
    ids = [e["id"] for e in sink.received]
    assert all(isinstance(i, str) for i in ids)
    confirmed = [e for e in sink.received if e["event"] == "transfer_confirmed"]
    assert confirmed[0]["transfer"]["state"] == "confirmed" and confirmed[0]["time"].endswith("Z")


@pytest.mark.sqlite_only  # the lock file; several hosts on PostgreSQL use leases
def test_second_instance_on_the_same_ledger_refuses(service_dir, fake):
    workspace, _port, _sink = service_dir
    write_status(workspace / "status", equity="1500.00")
    first = start(workspace)
    try:
        wait_for(lambda: (workspace / "ledger.db.lock").exists() and decisions(workspace), what="first agent")
        second = run_cli("run", cwd=workspace, env={"DERIV_API_TOKEN": TOKEN, "INTAKE": "x" * 8}, timeout=30)
        assert second.returncode == 1
        assert "already running" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=20)
    assert first.returncode == 0


def test_sighup_reloads_the_policies(service_dir, fake):
    workspace, _port, _sink = service_dir
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + "reload_every: 0s\n")  # no polling: only SIGHUP reloads
    write_status(workspace / "status", equity="1500.00")
    proc = start(workspace)
    try:
        wait_for(lambda: decisions(workspace), what="a first evaluation")
        first_sha = decisions(workspace)[0]["policy_sha256"]
        policy = workspace / "policies" / "example.yaml"
        policy.write_text(policy.read_text().replace("target_equity: 1000", "target_equity: 1100"))
        time.sleep(2.5)
        assert {d["policy_sha256"] for d in decisions(workspace)} == {first_sha}  # not picked up by itself
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: decisions(workspace)[-1]["policy_sha256"] != first_sha, what="the reload on SIGHUP")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
