"""Readings between ticks: a POSTed status or a rewritten status file across a policy band is evaluated at once
(not at the next scheduled tick), through the same per-account exclusion, and never in bursts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, REPO, TOKEN, write_status

from agent.equity.watch import FolderWatcher, Reactor, Triggers
from agent.policy.load import parse_policy

SECRET = "react-intake-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def post_status(port: int, equity: str) -> int:
    body = {"schema": 1, "login": 130002534, "server": "DerivSVG-Server", "currency": "USD", "balance": 450,
            "equity": "EQUITY", "margin": 0, "margin_free": 450, "margin_level": 0, "positions": 0,
            "connected": True, "time": int(time.time())}
    data = json.dumps(body).replace('"EQUITY"', equity).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status", data=data, method="POST",
                                     headers={"X-Fund-Agent-Secret": SECRET})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def _or_none(attempt):
    try:
        return attempt()
    except AssertionError:
        return None


def rewrite_status(directory: Path, equity: str) -> None:
    """As the EA does it: a temporary file renamed over the old one."""
    written = write_status(directory, equity=equity)
    tmp = directory / "status-130002534.json.tmp"
    tmp.write_text(written.read_text())
    os.replace(tmp, written)


@pytest.fixture
def hourly(workspace):
    """The example policy on a one-hour schedule with no cooldown: only readings can bring a transfer sooner."""
    port = free_port()
    policy = workspace / "policies" / "example.yaml"
    text = policy.read_text().replace("every: 60s", "every: 1h").replace("cooldown: 30m", "cooldown: 0s")
    # the drawdown switch would trip on these made-up readings (1500 then 450): not what this test is about
    policy.write_text("\n".join(line for line in text.splitlines() if "equity_drawdown_pct" not in line) + "\n")
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + f"http:\n  listen: 127.0.0.1:{port}\n  intake_secret_env: INTAKE\n")
    return workspace, port


def start(workspace: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    env.update({"DERIV_API_TOKEN": TOKEN, "INTAKE": SECRET})
    return subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=workspace, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_posted_reading_and_a_rewritten_file_below_the_floor_are_evaluated_at_once(hourly, fake):
    workspace, port = hourly
    # in band: the start-up evaluation does nothing (dated back: the POST below is the newer reading)
    write_status(workspace / "status", equity="1500.00", age=3)
    proc = start(workspace)
    try:
        wait_for(lambda: healthy(port), what="the service to start and evaluate once")
        assert fake.transfers(FUNDING) == []

        # the EA POSTs a reading below the floor: a top-up follows, long before the hourly tick
        assert post_status(port, "450.00") == 200
        first = wait_for(lambda: fake.transfers(FUNDING), what="a top-up after the POST")
        assert len(first) == 1 and first[0]["amount"] == -550

        # the EA rewrites its file with a newer reading below the floor: the same again (a reading proves it shows
        # a transfer only when stamped more than the 5 s clock skew after it; readings are whole seconds)
        time.sleep(6.5)

        def rewritten() -> list:
            # as the EA does every few seconds: a slow ledger may still have judged the last one too close to
            # the first transfer (the decision then waits for a newer reading, and the next write brings it)
            rewrite_status(workspace / "status", "400.00")
            return wait_for(lambda: len(fake.transfers(FUNDING)) == 2 and fake.transfers(FUNDING), timeout=2.0,
                            what="a top-up after the file rewrite")

        both = wait_for(lambda: _or_none(rewritten), what="a top-up after the file rewrite")
        assert both[-1]["amount"] == -600

        # a reading in band is taken, and brings no evaluation forward
        rewrite_status(workspace / "status", "1500.00")
        assert post_status(port, "1600.00") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    ledger = json.loads(subprocess.run([sys.executable, "-m", "agent", "ledger", "--format", "json"], cwd=workspace,
                                       capture_output=True, text=True, timeout=60,
                                       env={k: v for k, v in os.environ.items()
                                            if not k.startswith(("DERIV_", "FUND_AGENT_"))}).stdout)
    assert [(t["kind"], t["amount"], t["state"]) for t in ledger] == [("top_up", "550.00", "confirmed"),
                                                                      ("top_up", "600.00", "confirmed")]


def test_the_reactor_folds_pokes_and_never_overlaps_an_account():
    running: dict[str, int] = {}
    overlaps = []
    runs: list[str] = []
    guard = threading.Lock()

    def run(account: str) -> None:
        with guard:
            running[account] = running.get(account, 0) + 1
            if running[account] > 1:
                overlaps.append(account)
            runs.append(account)
        time.sleep(0.05)
        with guard:
            running[account] -= 1

    reactor = Reactor(run, min_interval=0.3, workers=4)
    try:
        for _ in range(50):  # a burst of readings for one account, and one for another
            reactor.poke("MTR1")
        reactor.poke("MTR2")
        wait_for(lambda: "MTR2" in runs and runs.count("MTR1") >= 1, what="the first evaluations")
        time.sleep(0.8)  # past the interval: a folded poke has had its one evaluation
        assert 1 <= runs.count("MTR1") <= 2  # fifty readings, at most one extra evaluation per interval
        assert runs.count("MTR2") == 1
        assert reactor.folded >= 47
        assert not overlaps
    finally:
        reactor.close()


@pytest.mark.parametrize("notifications", [True, False], ids=["watchdog", "polling"])
def test_the_folder_watcher_sees_a_rewritten_status_file(tmp_path, notifications):
    seen: list[str] = []
    folder = tmp_path / "status"
    folder.mkdir()
    write_status(folder, equity="1500.00")
    watcher = FolderWatcher(folder, seen.append, use_notifications=notifications, poll_every=0.1)
    try:
        assert watcher.mode == ("notify" if notifications else "poll")
        time.sleep(0.2)
        (folder / "notes.txt").write_text("not a status file")
        rewrite_status(folder, "400.00")
        wait_for(lambda: "130002534" in seen, timeout=10, what="the rewrite to be noticed")
        assert set(seen) == {"130002534"}
    finally:
        watcher.close()


def test_the_folder_watcher_falls_back_to_polling_when_notifications_cannot_start(tmp_path):
    missing = tmp_path / "not-yet"  # the EA has not created its folder yet: inotify cannot watch it
    watcher = FolderWatcher(missing, lambda digits: None, poll_every=0.1)
    try:
        assert watcher.mode == "poll"
    finally:
        watcher.close()


def test_a_reading_that_stays_beyond_the_band_brings_no_new_evaluation_until_something_changes():
    policy = parse_policy((REPO / "policies" / "example.yaml").read_text(), "example.yaml")  # 500 .. 3000
    triggers = Triggers()
    assert triggers.reading(policy, Decimal("1500")) is False  # in band
    assert triggers.reading(policy, Decimal("450")) is True  # crosses below the floor
    triggers.evaluated(policy, Decimal("450"), had_reading=True, confirmed=False)  # e.g. held back by a cooldown
    assert triggers.reading(policy, Decimal("440")) is False  # still below: the schedule will see it
    triggers.evaluated(policy, Decimal("440"), had_reading=False, confirmed=False)  # it waited for a newer reading
    assert triggers.reading(policy, Decimal("430")) is True
    triggers.evaluated(policy, Decimal("430"), had_reading=True, confirmed=True)  # topped up
    assert triggers.reading(policy, Decimal("420")) is True  # below again after a top-up: news
    triggers.evaluated(policy, Decimal("420"), had_reading=True, confirmed=False)
    assert triggers.reading(policy, Decimal("3500")) is True  # from below the floor to above the ceiling
    assert triggers.reading(policy, Decimal("3600")) is False
    assert triggers.reading(policy, Decimal("2000")) is False
    # the evaluation used another source's newer reading, in band: a reading below the floor is news again
    assert triggers.reading(policy, Decimal("450")) is True
    triggers.evaluated(policy, Decimal("1500"), had_reading=True, confirmed=False)
    assert triggers.reading(policy, Decimal("450")) is True
