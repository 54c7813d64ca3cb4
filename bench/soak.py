"""Soak: thousands of evaluations through the real engine, broker socket and SQLite ledger.

Prints memory at start and end (RSS and Python heap), the counts of evaluations, transfers, decisions and
errors, and the rate. Time is virtual (each evaluation advances 10 minutes) so cooldowns and windows roll over.
Usage: python bench/soak.py [EVALUATIONS] [--heap]   (--heap: trace the agent's heap too; much slower)
"""

from __future__ import annotations

import gc
import logging
import resource
import secrets
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent.broker.deriv import DerivClient
from agent.broker.fake import FakeDeriv
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.equity.simulated import SimulatedSource
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.timeutil import ManualClock

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def agent_heap() -> int:
    """Bytes held by the agent's side: the in-process test broker's own state (its statement grows, as a real
    broker's does) and its server stack are left out."""
    exclude = [tracemalloc.Filter(False, "*/agent/broker/fake.py", all_frames=True),
               tracemalloc.Filter(False, "*/websockets/*", all_frames=True),
               tracemalloc.Filter(False, "*/asyncio/*", all_frames=True),
               tracemalloc.Filter(False, tracemalloc.__file__)]
    snapshot = tracemalloc.take_snapshot().filter_traces(exclude)
    return sum(stat.size for stat in snapshot.statistics("filename"))


def main(evaluations: int = 2000, heap: bool = False) -> None:
    logging.disable(logging.WARNING)  # the soak counts; it does not print every verdict
    policy = parse_policy((ROOT / "policies" / "example.yaml").read_text(), "example.yaml")
    clock = ManualClock(datetime(2026, 1, 5, tzinfo=UTC))
    fake = FakeDeriv(clock)
    fake.add_account(policy.funding, "USD", "100000000.00")
    fake.add_account(policy.mt5, "USD", "450.00", mt5=True)
    token = secrets.token_hex(12)
    fake.add_token(token, policy.funding)
    fake.requests = deque(maxlen=100)  # the test broker's request log is for tests, not for soaks
    fake.start()
    workdir = Path(tempfile.mkdtemp(prefix="fund-agent-soak-"))
    ledger = Ledger.open(f"sqlite:///{workdir / 'ledger.db'}")
    broker = DerivClient(fake.url, 1089, token, timeout=5)
    source = SimulatedSource(clock, seed=11, start_equity=Decimal(450), volatility=Decimal(400), drift=Decimal(0),
                             pnl_sink=fake.adjust)
    engine = Engine(ledger, broker, source, clock, reconciler=Reconciler(ledger, broker, clock))
    errors = 0
    warmup = min(200, evaluations // 10)
    for _ in range(warmup):
        clock.advance(timedelta(minutes=10))
        engine.tick(policy)
    gc.collect()
    if heap:
        tracemalloc.start(16)  # deep enough to see through to the test broker's frames (slow: --heap only)
    heap0 = agent_heap() if heap else 0
    objects0 = len(gc.get_objects())
    rss0 = rss_mib()
    started = time.perf_counter()
    for _ in range(evaluations):
        clock.advance(timedelta(minutes=10))
        try:
            engine.tick(policy)
        except Exception:  # noqa: BLE001 - counted, the soak goes on
            errors += 1
    took = time.perf_counter() - started
    gc.collect()
    heap1 = agent_heap() if heap else 0
    objects1 = len(gc.get_objects())
    rss1 = rss_mib()
    with ledger.session() as session:
        rows = queries.list_transfers(session, queries.Filters())
        decisions = sum(row.run_count for row in queries.list_decisions(session, queries.Filters()))
    states: dict[str, int] = {}
    for t in rows:
        states[f"{t.kind}/{t.state}"] = states.get(f"{t.kind}/{t.state}", 0) + 1
    print(f"soak: {evaluations} evaluations (+{warmup} warm-up) in {took:.1f}s = {evaluations / took:.0f}/s, "
          f"{took / evaluations * 1000:.2f} ms each")
    print(f"soak: memory RSS {rss0:.1f} -> {rss1:.1f} MiB, live Python objects {objects0} -> {objects1}")
    if heap:
        print(f"soak: the agent's Python heap {heap0 / 1024:.0f} -> {heap1 / 1024:.0f} KiB "
              f"(growth {(heap1 - heap0) / 1024:+.0f} KiB)")
    print(f"soak: transfers {len(rows)} {states}, decisions {decisions}, errors {errors}, "
          f"virtual time {evaluations * 10 / 60 / 24:.0f} days")
    broker.close()
    ledger.close()
    fake.stop()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--heap"]
    main(int(args[0]) if args else 2000, heap="--heap" in sys.argv)
