"""Idle ticks through the real engine and SQLite ledger (equity in band: nothing to send, no broker call):

- idle_tick: per account, 1,000 accounts (the example policy's limits and kill switch, an empty history);
- idle_tick_history: the same with 1,000 confirmed transfers of history per account;
- journal_growth: bytes the ledger file grows per no-op evaluation (after a checkpoint, so the WAL is in it).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchkit import TOKEN, TableSource, mt5_login, policy_text, seed_transfers, start_fake

from agent.broker.deriv import DerivClient
from agent.engine.reconcile import Reconciler
from agent.engine.tick import Engine
from agent.ledger.db import Ledger
from agent.policy.load import parse_policy
from agent.policy.model import Policy
from agent.timeutil import Clock


def _setup(accounts: list[str], history: int) -> tuple[Engine, Ledger, Any, Path, list[Policy]]:
    workdir = Path(tempfile.mkdtemp(prefix="fund-agent-bench-idle-"))
    db = workdir / "ledger.db"
    ledger = Ledger.open(f"sqlite:///{db}")
    if history:
        seed_transfers(db, accounts, history, datetime.now(UTC))
    clock = Clock()
    fake = start_fake(clock, accounts)
    broker = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    engine = Engine(ledger, broker, TableSource(clock, "1500.00"), clock,
                    reconciler=Reconciler(ledger, broker, clock))
    policies = [parse_policy(policy_text(mt5), f"{mt5}.yaml") for mt5 in accounts]
    return engine, ledger, fake, db, policies


def _file_bytes(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.stat().st_size


def _pass(engine: Engine, policies: list[Policy]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one tick of every policy. The CPU figure leaves out the
    waits for the disk (fsync), which on a shared machine vary by 30x from one minute to the next."""
    started, cpu = time.perf_counter(), time.process_time()
    for policy in policies:
        outcome = engine.tick(policy)
        if outcome.transfer is not None or outcome.decision.action != "none":
            raise RuntimeError(f"not an idle tick: {outcome.decision.reason}")
    return time.perf_counter() - started, time.process_time() - cpu


def idle(accounts_count: int = 1000, passes: int = 3) -> list[dict[str, Any]]:
    accounts = [mt5_login(i) for i in range(accounts_count)]
    engine, ledger, fake, db, policies = _setup(accounts, 0)
    try:
        _pass(engine, policies)  # warm-up: first peaks, caches
        size0 = _file_bytes(db)
        took, cpu = min(_pass(engine, policies) for _ in range(passes))
        size1 = _file_bytes(db)
    finally:
        ledger.close()
        fake.stop()
    per = took / accounts_count * 1000
    growth = (size1 - size0) / (accounts_count * passes)
    return [
        {"figure": "idle_tick", "what": f"idle tick, per account, {accounts_count} accounts", "unit": "ms",
         "ms_per_account": round(per, 3), "cpu_ms_per_account": round(cpu / accounts_count * 1000, 3),
         "accounts": accounts_count, "best_of_passes": passes,
         "target": "<= 1 ms", "met": per <= 1.0},
        {"figure": "journal_growth", "what": "decision journal growth per no-op evaluation", "unit": "bytes",
         "bytes_per_evaluation": round(growth, 1), "evaluations": accounts_count * passes,
         "gb_per_day_1000_accounts_every_60s": round(growth * 1000 * 1440 / 1e9, 3),
         "target": "<= 100 B per no-op evaluation on average", "met": growth <= 100},
    ]


def idle_history(accounts_count: int = 100, history: int = 1000, passes: int = 3) -> dict[str, Any]:
    accounts = [mt5_login(5000 + i) for i in range(accounts_count)]
    engine, ledger, fake, _db, policies = _setup(accounts, history)
    try:
        _pass(engine, policies)
        took, cpu = min(_pass(engine, policies) for _ in range(passes))
    finally:
        ledger.close()
        fake.stop()
    per = took / accounts_count * 1000
    return {"figure": "idle_tick_history", "what": f"idle tick with {history} transfers of history per account",
            "unit": "ms", "ms_per_account": round(per, 3), "cpu_ms_per_account": round(cpu / accounts_count * 1000, 3),
            "accounts": accounts_count, "history": history,
            "target": "the same as with an empty history (idle_tick)", "met": None}


def run(accounts: int = 1000, history_accounts: int = 100) -> list[dict[str, Any]]:
    rows = idle(accounts)
    with_history = idle_history(history_accounts)
    empty = rows[0]["ms_per_account"]
    with_history["ms_per_account_empty_history"] = empty
    with_history["cpu_ms_per_account_empty_history"] = rows[0]["cpu_ms_per_account"]
    with_history["met"] = with_history["ms_per_account"] <= max(empty * 1.25, empty + 0.1)
    return [rows[0], with_history, rows[1]]


if __name__ == "__main__":
    for row in run(int(sys.argv[1]) if len(sys.argv) > 1 else 1000):
        print(json.dumps(row))
