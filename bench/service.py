"""`fund-agent run` as a subprocess, against a loopback Deriv-protocol server in this process:

- reading_to_frame_service: the EA POSTs `/status` (or rewrites its status file) with equity below the floor;
  the time from the POST (the file's rename) to the `mt5_deposit` frame at the broker. The policies say
  `every: 1h`: a frame that comes sooner came from the reading, not from the schedule.
- cpu_per_evaluation: CPU seconds of the `fund-agent run` process over a stretch of scheduled idle evaluations,
  divided by the evaluations it recorded.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchkit import (
    INTAKE_SECRET,
    cpu_seconds,
    free_port,
    median_ms,
    mt5_login,
    p95_ms,
    start_agent,
    start_fake,
    status_json,
    stop_agent,
    workspace,
    write_status,
)

# Between two top-ups of one account: a reading proves it shows the last transfer only when stamped more than
# the 5 s clock skew after it (readings are whole seconds), and the service spaces reading-triggered
# evaluations of one account by 5 s.
SPACING = 6.3


def _post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status", data=body, method="POST",
                                     headers={"X-Fund-Agent-Secret": INTAKE_SECRET,
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _wait_healthy(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError("fund-agent run did not become healthy")


def _next_second() -> None:
    """Sleep to just after a whole second: a reading's `time` is whole seconds and must be newer than the
    account's last confirmed transfer."""
    time.sleep(1.02 - (time.time() % 1.0))


def reading_to_frame(samples: int = 10, wait: float = 10.0) -> dict[str, Any]:
    accounts = [mt5_login(100 + i) for i in range(8)]
    fake = start_fake(None, accounts)
    base = Path(tempfile.mkdtemp(prefix="fund-agent-bench-service-"))
    port = free_port()
    workspace(base, fake, accounts, every="1h", full=False, http_port=port)
    for mt5 in accounts:
        write_status(base / "status", mt5, "1500.00")
    proc = start_agent(base)
    took: dict[str, list[float]] = {"post": [], "file": []}
    missed: dict[str, int] = {"post": 0, "file": 0}
    last: dict[str, float] = {}
    try:
        _wait_healthy(port)
        time.sleep(1.0)  # the start-up evaluations (in band) are done
        for i in range(samples * 2):
            way = "post" if i % 2 == 0 else "file"
            mt5 = accounts[i % len(accounts)]
            pause = SPACING - (time.monotonic() - last.get(mt5, 0.0))
            if pause > 0:
                time.sleep(pause)
            _next_second()
            before = len(fake.deposit_arrivals)
            started = time.perf_counter()
            if way == "post":
                status = _post(port, status_json(mt5, "400.00"))
                if status != 200:
                    raise RuntimeError(f"POST /status answered {status}")
            else:
                write_status(base / "status", mt5, "400.00")
            arrived = fake.wait_deposit(before, wait)
            last[mt5] = time.monotonic()
            if arrived is None:
                missed[way] += 1
                if missed[way] >= 2:  # the service does not react to readings: one schedule period, not ms
                    if all(missed[w] >= 2 or len(took[w]) >= samples for w in took):
                        break
                continue
            took[way].append(arrived - started)
            if way == "file":
                write_status(base / "status", mt5, "1500.00")
    finally:
        stop_agent(proc)
        fake.stop()
    row: dict[str, Any] = {
        "figure": "reading_to_frame_service",
        "what": "through the service: the EA POSTs /status (or rewrites its file) -> mt5_deposit frame",
        "unit": "ms", "target": "<= 50 ms from the POST / file change to the frame", "schedule": "every: 1h",
    }
    for way in ("post", "file"):
        row[f"{way}_median_ms"] = median_ms(took[way])
        row[f"{way}_p95_ms"] = p95_ms(took[way])
        row[f"{way}_samples"] = len(took[way])
        row[f"{way}_no_frame_within_{wait:g}s"] = missed[way]
    row["met"] = all(row[f"{w}_median_ms"] is not None and row[f"{w}_median_ms"] <= 50 and not missed[w]
                     for w in ("post", "file"))
    return row


def cpu_per_evaluation(accounts_count: int = 50, seconds: float = 15.0) -> dict[str, Any]:
    accounts = [mt5_login(1000 + i) for i in range(accounts_count)]
    fake = start_fake(None, accounts)
    base = Path(tempfile.mkdtemp(prefix="fund-agent-bench-cpu-"))
    workspace(base, fake, accounts, every="1s", full=True)
    for mt5 in accounts:
        write_status(base / "status", mt5, "1500.00")
    proc = start_agent(base)
    db = base / "ledger.db"
    try:
        deadline = time.monotonic() + 30
        while _evaluations(db) < accounts_count * 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # past the start-up (imports, migrations, first evaluations)
        cpu0, evals0 = cpu_seconds(proc.pid), _evaluations(db)
        refresh = time.monotonic()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            if time.monotonic() - refresh > 10:  # keep the readings younger than max_equity_age
                for mt5 in accounts:
                    write_status(base / "status", mt5, "1500.00")
                refresh = time.monotonic()
        cpu1, evals1 = cpu_seconds(proc.pid), _evaluations(db)
    finally:
        stop_agent(proc)
        fake.stop()
    evaluations = max(1, evals1 - evals0)
    per = (cpu1 - cpu0) / evaluations * 1000
    return {"figure": "cpu_per_evaluation", "what": "CPU of `fund-agent run` per evaluation", "unit": "ms",
            "cpu_ms_per_evaluation": round(per, 2), "evaluations": evals1 - evals0, "accounts": accounts_count,
            "schedule": "every: 1s", "cpu_s": round(cpu1 - cpu0, 2), "target": "<= 1 ms", "met": per <= 1.0}


def _evaluations(db: Path) -> int:
    """Evaluations recorded so far: decision rows, or (with a compact journal) the sum of their run counts."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}
            if "run_count" in columns:
                return int(conn.execute("SELECT coalesce(sum(run_count), 0) FROM decisions").fetchone()[0])
            return int(conn.execute("SELECT count(*) FROM decisions").fetchone()[0])
    except sqlite3.Error:
        return 0


def run() -> list[dict[str, Any]]:
    return [reading_to_frame(), cpu_per_evaluation()]


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    rows = [reading_to_frame()] if which == "react" else [cpu_per_evaluation()] if which == "cpu" else run()
    for row in rows:
        print(json.dumps(row))
