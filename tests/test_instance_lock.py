"""One agent per ledger: the lock beside the ledger, across processes and within one; the holder file; the
systemd unit that runs the agent."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

from agent.instance_lock import InstanceLock, LockHeld, holder, is_held
from agent.service import Service, ServiceError

CHILD = """
import sys
from pathlib import Path
from agent.instance_lock import InstanceLock
lock = InstanceLock(Path(sys.argv[1]), "run")
lock.acquire()
print("locked", lock.owner, flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.db"


def test_a_lock_held_by_another_process_refuses_and_names_it(ledger):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ledger)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["locked"], line
        child_owner = line[1]
        assert is_held(ledger)
        lock = InstanceLock(ledger, "run")
        with pytest.raises(LockHeld) as refused:
            lock.acquire()
        message = str(refused.value)
        assert f"pid {child.pid}" in message and f"on host {socket.gethostname()}" in message
        assert '"run" since ' in message and "already running" in message and "stop it first" in message
        assert str(ledger) + ".lock" in message
        assert refused.value.holder["pid"] == child.pid and refused.value.holder["owner"] == child_owner
        assert not lock.held
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert child.wait(timeout=10) == 0
        assert not is_held(ledger)
        with lock:
            assert lock.held and is_held(ledger)
            info = holder(ledger)
            assert info["pid"] == os.getpid() and info["owner"] == lock.owner != child_owner
            assert info["command"] == "run" and info["host"] == socket.gethostname()
            assert info["started"].endswith("Z")
        assert not lock.held and holder(ledger) is None  # our holder file goes with the lock
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_killed_holder_leaves_no_stale_lock(ledger):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ledger)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("locked")
    finally:
        child.kill()
        child.wait()
    assert holder(ledger)["pid"] == child.pid  # its holder file is left behind, but not its lock
    with InstanceLock(ledger, "run") as lock:
        assert holder(ledger)["owner"] == lock.owner


def test_two_locks_in_one_process_exclude_each_other(ledger):
    first, second = InstanceLock(ledger, "run"), InstanceLock(ledger, "db upgrade")
    assert first.owner != second.owner
    assert not is_held(ledger) and not ledger.parent.exists()  # looking creates nothing
    first.acquire()
    try:
        assert first.acquire() is first  # re-acquiring the same object is a no-op
        with pytest.raises(LockHeld) as refused:
            second.acquire()
        assert f"pid {os.getpid()}" in str(refused.value) and refused.value.holder["owner"] == first.owner
        assert is_held(ledger)
        second.release()  # releasing a lock never taken does nothing, and frees nothing
        assert is_held(ledger) and first.held
    finally:
        first.release()
    first.release()
    assert not is_held(ledger)
    with second:
        assert holder(ledger)["command"] == "db upgrade"
        with pytest.raises(LockHeld):
            first.acquire()
    assert not is_held(ledger)


def test_a_lock_taken_in_one_thread_is_released_from_another(ledger):
    lock = InstanceLock(ledger, "run").acquire()
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    releaser.join()
    assert not lock.held and not is_held(ledger)
    with InstanceLock(ledger, "run"):
        pass


def test_other_ledgers_are_not_locked(tmp_path):
    with InstanceLock(tmp_path / "a.db", "run"):
        assert not is_held(tmp_path / "b.db")
        with InstanceLock(tmp_path / "b.db", "run"):
            assert is_held(tmp_path / "a.db") and is_held(tmp_path / "b.db")


def test_holder_reads_the_json_and_tolerates_a_missing_or_torn_file(ledger):
    assert holder(ledger) is None
    ledger.parent.mkdir(parents=True)
    info = ledger.with_name("ledger.db.lock.json")
    info.write_text(json.dumps({"pid": 1234, "host": "vps1", "command": "run", "started": "2026-11-25T21:00:00Z",
                                "owner": "vps1:1234:abcdef01"}))
    assert holder(ledger) == {"pid": 1234, "host": "vps1", "command": "run", "started": "2026-11-25T21:00:00Z",
                              "owner": "vps1:1234:abcdef01"}
    assert str(LockHeld(Path("ledger.db.lock"), holder(ledger))) == (
        'another fund-agent is already running on this ledger and holds its lock ledger.db.lock: pid 1234 on host '
        'vps1, "run" since 2026-11-25T21:00:00Z; stop it first')
    for torn in ('{"pid": 12', "", "[1, 2]", "null", b"\xff\xfe\x00garbage"):
        info.write_bytes(torn if isinstance(torn, bytes) else torn.encode())
        assert holder(ledger) is None
    assert str(LockHeld(Path("ledger.db.lock"), None)) == (
        "another fund-agent is already running on this ledger and holds its lock ledger.db.lock; stop it first")


@pytest.mark.sqlite_only  # the lock file; several hosts on PostgreSQL use leases
def test_the_service_turns_a_held_lock_into_a_service_error(workspace):
    from agent.config import load_config

    config = load_config(workspace / "fund-agent.yaml")
    with InstanceLock(workspace / "ledger.db", "run") as lock:
        service = Service(config)
        with pytest.raises(ServiceError, match="already running") as refused:
            service.start()
        assert f"pid {os.getpid()}" in str(refused.value)
        service.close()
        assert lock.held and is_held(workspace / "ledger.db")  # the refused service did not free it
    assert service.owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")


# ---- the systemd unit ----

UNIT = REPO / "deploy" / "fund-agent.service"


def read_unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, empty_lines_in_values=False, delimiters=("=",),
                                          comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_systemd_unit_is_the_hardened_one_the_readme_promises():
    unit = read_unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/fund-agent/.venv/bin/fund-agent --config /etc/fund-agent/fund-agent.yaml run"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "fund-agent"
    assert service["EnvironmentFile"] == "/etc/fund-agent/secrets.env"
    assert int(service["TimeoutStopSec"]) > 15  # longer than the broker timeout: a transfer in flight finishes
    assert service.get("DynamicUser") == "yes" or service.get("User") == "fund-agent"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/fund-agent" in service["ReadWritePaths"].split()
    assert "/etc/fund-agent" in service["ReadOnlyPaths"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    readme = (REPO / "README.md").read_text()
    assert "deploy/fund-agent.service" in readme and (REPO / "deploy" / "README.md").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_no_syntax_error_in_the_unit():
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    bad = [line for line in output.splitlines()
           if any(marker in line for marker in ("Unknown key", "Unknown lvalue", "Unknown section", "Invalid",
                                                "Failed to parse", "Missing '='"))]
    assert not bad, output
