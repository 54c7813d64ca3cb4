"""A reading below the floor -> the `mt5_deposit` frame at the broker, through the real engine on a warm
connection (SQLite ledger with synchronous=FULL, loopback Deriv-protocol server), and the per-transfer-process
approach (bench/per_process.py) against the same server in the same run.

The clock is virtual (a day passes between samples, so no window or cooldown holds a top-up back); the
latencies are real: from the start of the evaluation (or of the process) to the frame's arrival at the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchkit import FUNDING, TOKEN, TableSource, median_ms, mt5_login, p95_ms, policy_text, start_fake

from agent.broker.deriv import DerivClient
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import ManualClock

HERE = Path(__file__).resolve().parent


def engine_latencies(samples: int) -> list[float]:
    mt5 = mt5_login(1)
    clock = ManualClock(datetime(2026, 1, 5, tzinfo=UTC))
    fake = start_fake(clock, [mt5])
    workdir = Path(tempfile.mkdtemp(prefix="fund-agent-bench-"))
    ledger = Ledger.open(f"sqlite:///{workdir / 'ledger.db'}")
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    source = TableSource(clock, "400.00")
    engine = Engine(ledger, broker, source, clock, reconciler=Reconciler(ledger, broker, clock))
    policy = parse_policy(policy_text(mt5, full=False), f"{mt5}.yaml")
    took: list[float] = []
    try:
        broker.connect()
        for i in range(samples + 3):  # three warm-up transfers (website_status cached, code paths warm)
            clock.advance(timedelta(days=1))
            before = len(fake.deposit_arrivals)
            started = time.perf_counter()
            outcome = engine.tick(policy)
            arrived = fake.wait_deposit(before, 5)
            if arrived is None or outcome.transfer is None or outcome.transfer["state"] != "confirmed":
                raise RuntimeError(f"no confirmed top-up: {outcome.decision.reason}")
            if i >= 3:
                took.append(arrived - started)
    finally:
        broker.close()
        ledger.close()
        fake.stop()
    return took


def fsync_seconds(directory: Path, samples: int = 30) -> list[float]:
    """One fsync of a small write in the ledger's folder: SQLite's commit with synchronous=FULL pays one."""
    took = []
    with open(directory / "fsync-probe.bin", "wb") as handle:
        for _ in range(samples):
            handle.write(b"x" * 4096)
            handle.flush()
            started = time.perf_counter()
            os.fsync(handle.fileno())
            took.append(time.perf_counter() - started)
    return took


def round_trips(samples: int = 30) -> list[float]:
    """A `ping` round trip on a warm connection to the same kind of server."""
    fake = start_fake(None, [])
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    try:
        broker.connect()
        took = []
        for _ in range(samples):
            started = time.perf_counter()
            broker.call({"ping": 1})
            took.append(time.perf_counter() - started)
        return took
    finally:
        broker.close()
        fake.stop()


def per_process_latencies(samples: int) -> list[float]:
    mt5 = mt5_login(2)
    fake = start_fake(None, [mt5])
    took: list[float] = []
    try:
        for i in range(samples + 1):
            before = len(fake.deposit_arrivals)
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(HERE / "per_process.py"), fake.url.rsplit("?", 1)[0],
                                     TOKEN, FUNDING, mt5, "600.00"])
            arrived = fake.wait_deposit(before, 30)
            code = proc.wait(30)
            if arrived is None or code != 0:
                raise RuntimeError(f"the per-process deposit failed (exit {code})")
            if i >= 1:
                took.append(arrived - started)
    finally:
        fake.stop()
    return took


def run(samples: int = 30) -> list[dict[str, Any]]:
    engine = engine_latencies(samples)
    per_process = per_process_latencies(max(10, samples // 2))
    fsync = median_ms(fsync_seconds(Path(tempfile.mkdtemp(prefix="fund-agent-bench-fsync-")))) or 0.0
    rtt = median_ms(round_trips()) or 0.0
    engine_median = median_ms(engine)
    per_median = median_ms(per_process)
    ratio = round(per_median / engine_median, 1) if engine_median and per_median else None
    return [{
        "figure": "reading_to_frame_engine",
        "what": "a reading below the floor -> mt5_deposit frame at the broker (engine, warm connection)",
        "unit": "ms", "median_ms": engine_median, "p95_ms": p95_ms(engine), "samples": len(engine),
        "per_process_median_ms": per_median, "per_process_p95_ms": p95_ms(per_process),
        "per_process_samples": len(per_process), "ratio_per_process_to_engine": ratio,
        "fsync_median_ms": fsync, "round_trip_median_ms": rtt,
        "floor_ms": round(2 * fsync + rtt / 2, 2),  # the intent's commit, `sent`'s commit, half a round trip
        "target": "<= 2 ms median and >= 30x the per-process approach",
        "met": bool(engine_median is not None and engine_median <= 2 and ratio is not None and ratio >= 30),
    }]


if __name__ == "__main__":
    for row in run(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
        print(json.dumps(row))
