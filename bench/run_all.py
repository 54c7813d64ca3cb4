"""`make bench`: one JSON object per figure of issue 12's table, printed and appended to bench/results.jsonl.

Usage: python bench/run_all.py [--only FIGURE,...] [--scale S] [--label TEXT] [--no-save]
  --only   transfer_path, service, idle, ledger_cli (groups of figures; default: all)
  --scale  size of the seeded audit ledgers (1 = 1M transfers and 5M decisions; 0.1 for a quick look)
  --label  a note stored with each row (e.g. "before", "after")
Every object carries the run's id, time, commit, the figure, its unit, the numbers, the target and `met`.
See bench/README.md. (bench/evaluate.py, soak.py and backtest.py are separate benchmarks; run them by hand.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

# Imported before any group runs: the in-process figures measure the code as it was when the run started.
import benchkit  # noqa: E402
import idle  # noqa: E402
import ledger_cli  # noqa: E402
import service  # noqa: E402
import transfer_path  # noqa: E402

GROUPS = ("service", "transfer_path", "idle", "ledger_cli")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--label", default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    wanted = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    meta = {"run": f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": benchkit.git_commit(),
            "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}
    if args.label:
        meta["label"] = args.label
    runners: dict[str, Any] = {
        "service": service.run,
        "transfer_path": transfer_path.run,
        "idle": idle.run,
        "ledger_cli": lambda: ledger_cli.run(args.scale),
    }
    failed = 0
    for group in GROUPS:  # the table's order is kept in README; subprocess groups first (see above)
        if group not in wanted:
            continue
        try:
            rows = runners[group]()
        except Exception as exc:  # noqa: BLE001 - one broken group must not hide the others' numbers
            failed += 1
            rows = [{"figure": group, "error": f"{type(exc).__name__}: {exc}"}]
        for row in rows:
            record = {**meta, **row}
            line = json.dumps(record)
            print(line, flush=True)
            if not args.no_save:
                with (HERE / "results.jsonl").open("a") as handle:
                    handle.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
