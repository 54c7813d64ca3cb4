"""The audit commands on big ledgers (seeded with plain sqlite3, then read by the real CLI in a subprocess):

- ledger_totals: `fund-agent ledger --totals --format json` over 1M transfers (1,000 accounts x 1,000);
- status_big: `fund-agent status --format json` with 1,000 policies and 5M decisions (5,000 per account).
Wall time and the peak RSS of the command's process. `--scale 0.1` seeds a tenth (a quick look).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchkit import mt5_login, run_measured, seed_decisions, seed_transfers, workspace

from agent.ledger.db import Ledger


def _ledger(base: Path, accounts: list[str]) -> Path:
    workspace(base, None, accounts, every="60s")
    db = base / "ledger.db"
    Ledger.open(f"sqlite:///{db}").close()
    return db


def ledger_totals(scale: float = 1.0) -> dict[str, Any]:
    per_account = max(1, int(1000 * scale))
    accounts = [mt5_login(i) for i in range(1000)]
    base = Path(tempfile.mkdtemp(prefix="fund-agent-bench-totals-"))
    db = _ledger(base, [])
    seeded = time.perf_counter()
    rows = seed_transfers(db, accounts, per_account, datetime.now(UTC))
    seeded = time.perf_counter() - seeded
    took, rss, code, err = run_measured([sys.executable, "-m", "agent", "ledger", "--totals", "--format", "json"],
                                        base)
    return {"figure": "ledger_totals", "what": f"`fund-agent ledger --totals`, {rows} transfers", "unit": "s",
            "seconds": round(took, 2), "peak_rss_mib": round(rss, 1), "transfers": rows, "exit": code,
            "error": err if code else None, "seed_s": round(seeded, 1), "target": "< 2 s, < 200 MB",
            "met": code == 0 and took < 2 and rss < 200}


def status_big(scale: float = 1.0) -> dict[str, Any]:
    per_account = max(1, int(5000 * scale))
    accounts = [mt5_login(i) for i in range(1000)]
    base = Path(tempfile.mkdtemp(prefix="fund-agent-bench-status-"))
    db = _ledger(base, accounts)
    seeded = time.perf_counter()
    rows = seed_decisions(db, accounts, per_account, datetime.now(UTC))
    seeded = time.perf_counter() - seeded
    took, rss, code, err = run_measured([sys.executable, "-m", "agent", "status", "--format", "json"], base)
    return {"figure": "status_big", "what": f"`fund-agent status`, 1000 policies, {rows} decisions", "unit": "s",
            "seconds": round(took, 2), "peak_rss_mib": round(rss, 1), "decisions": rows, "exit": code,
            "error": err if code else None, "seed_s": round(seeded, 1), "target": "< 2 s",
            "met": code == 0 and took < 2}


def run(scale: float = 1.0) -> list[dict[str, Any]]:
    return [ledger_totals(scale), status_big(scale)]


if __name__ == "__main__":
    scale = float(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 1.0
    for row in run(scale):
        print(json.dumps(row))
