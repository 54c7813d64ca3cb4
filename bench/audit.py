"""Audit at scale: a ledger of N transfers (default 1,000,000) and M decisions (default 10,000,000), then the
auditor's commands on it, timed through the real CLI (start-up included).

Prints JSON lines: the build (bulk SQL inserts, then the hash chain backfilled as the 0004 migration does for an
existing ledger), `ledger` with a filter, `ledger --totals --by month`, `verify`, `report` for one account and one
month, `db prune --decisions-older-than 90d`, `verify` after it, and the file size before and after the prune
(and after VACUUM). The sizes are parameters: `--transfers 100000 --decisions 1000000` runs in minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.ledger.db import Ledger, make_engine

ACCOUNTS = 20
START = datetime(2025, 1, 1, tzinfo=UTC)
PAGE = 50_000


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build(path: Path, transfers: int, decisions: int, seed: int = 7) -> dict[str, float]:
    """Bulk-insert the rows with plain executemany in big transactions (the service writes one row at a time; a
    benchmark does not need to), then chain them."""
    url = f"sqlite:///{path}"
    Ledger.open(url).close()  # the schema, by the migrations
    rng = random.Random(seed)
    accounts = [f"MTR13000{n:04d}" for n in range(ACCOUNTS)]
    span_minutes = max(1, decisions // ACCOUNTS)  # one decision a minute per account
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # a benchmark's build: durability is the service's concern, not ours
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    transfer_rows, event_rows = [], []
    event_id = 0
    for tid in range(1, transfers + 1):
        account = accounts[tid % ACCOUNTS]
        at = START + timedelta(seconds=tid * span_minutes * 60 // max(1, transfers))  # spread over the span
        kind = "top_up" if tid % 3 else "sweep"
        failed = tid % 50 == 0
        state = "failed" if failed else "confirmed"
        created = stamp(at)
        transfer_rows.append((tid, created, created, account, "CR4000128", kind, rng.randint(1_000, 250_000), "USD",
                              state, None if failed else 10_000_000 + tid, f"policy-{tid % ACCOUNTS}", "a" * 64,
                              "450.00", "bench", "NotExecuted" if failed else None, None, created, None, None))
        for step in (("pending", "sent", "failed") if failed else ("pending", "sent", "confirmed")):
            event_id += 1
            event_rows.append((event_id, tid, created, step, "agent", None))
        if len(transfer_rows) >= PAGE:
            _flush_transfers(conn, transfer_rows, event_rows)
    _flush_transfers(conn, transfer_rows, event_rows)
    rows = []
    acting = max(1, decisions // max(1, transfers))  # one decision in `acting` names a transfer
    for did in range(1, decisions + 1):
        account_index = did % ACCOUNTS
        at = START + timedelta(minutes=did // ACCOUNTS)
        tid = did // acting if did % acting == 0 and did // acting <= transfers else None
        action = ("top_up" if tid % 3 else "sweep") if tid else "none"
        rows.append((did, stamp(at), accounts[account_index], f"policy-{account_index}", "a" * 64, action,
                     "100.00" if tid else None, "USD", f"{rng.randint(300, 3000)}.{rng.randint(0, 99):02d}", 3,
                     "equity in band" if not tid else "rule", None, None, tid))
        if len(rows) >= PAGE:
            conn.executemany("INSERT INTO decisions (id, at, account, policy, policy_sha256, action, amount, currency, "
                             "equity, equity_age_s, reason, bound_by, details, transfer_id) VALUES "
                             "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            rows.clear()
    if rows:
        conn.executemany("INSERT INTO decisions (id, at, account, policy, policy_sha256, action, amount, currency, "
                         "equity, equity_age_s, reason, bound_by, details, transfer_id) VALUES "
                         "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("COMMIT")
    conn.close()
    inserted = time.perf_counter() - started
    started = time.perf_counter()
    from agent.audit.chain import backfill

    engine = make_engine(url)
    with engine.begin() as sa_conn:
        chained = backfill(sa_conn, page=PAGE)
    engine.dispose()
    return {"insert_s": round(inserted, 1), "chain_s": round(time.perf_counter() - started, 1), "chained": chained}


def _flush_transfers(conn: sqlite3.Connection, transfer_rows: list[tuple], event_rows: list[tuple]) -> None:
    if transfer_rows:
        conn.executemany("INSERT INTO transfers (id, created_at, updated_at, account, funding, kind, amount_minor, "
                         "currency, state, broker_txn_id, policy, policy_sha256, equity, reason, error_code, "
                         "error_message, sent_at, resolved_by, owner) VALUES "
                         "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", transfer_rows)
    if event_rows:
        conn.executemany("INSERT INTO transfer_events (id, transfer_id, at, state, actor, detail) VALUES "
                         "(?,?,?,?,?,?)", event_rows)
    transfer_rows.clear()
    event_rows.clear()


def timed(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "agent", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            check=False)
    return round(time.perf_counter() - started, 2), result


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file()
               and not p.name.endswith((".lock", ".json")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transfers", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=10_000_000)
    parser.add_argument("--dir", type=Path, help="where to build the ledger (default: a temporary folder)")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="fund-agent-bench-audit-"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "fund-agent.yaml").write_text(
        "database: sqlite:///ledger.db\npolicies: policies/\nbroker:\n  url: ws://127.0.0.1:9\n  app_id: 1089\n"
        "  token_env: DERIV_API_TOKEN\nequity:\n  source: ea-file\n  dir: status\n")
    path = directory / "ledger.db"
    built = build(path, args.transfers, args.decisions)
    print(json.dumps({"step": "build", "transfers": args.transfers, "decisions": args.decisions, **built,
                      "bytes": size(path)}), flush=True)
    last_day = START + timedelta(minutes=args.decisions // ACCOUNTS)
    month = START + timedelta(days=31)
    steps = [
        ("ledger --account --since --until (one account, one month)",
         ["ledger", "--account", "MTR130000003", "--since", START.date().isoformat(), "--until",
          month.date().isoformat(), "--format", "jsonl"]),
        ("ledger --totals --by month", ["ledger", "--totals", "--by", "month", "--format", "json"]),
        ("verify", ["verify"]),
        ("report --account (one month)", ["report", "--account", "MTR130000003", "--since", START.date().isoformat(),
                                          "--until", month.date().isoformat(), "--output", "report.html"]),
    ]
    for name, command in steps:
        seconds, result = timed(command, directory)
        print(json.dumps({"step": name, "seconds": seconds, "exit": result.returncode,
                          "output_lines": len(result.stdout.splitlines()),
                          "first_line": result.stdout.splitlines()[0][:100] if result.stdout else result.stderr[:200]}),
              flush=True)
    before = size(path)
    # keep the newest 90 days of the history (or its newer half, for a short one): the cutoff is relative to the
    # data's end, and prune counts from now
    keep = min(90, max(1, (last_day - START).days // 2))
    cutoff_days = (datetime.now(UTC) - last_day).days + keep
    seconds, result = timed(["db", "prune", "--decisions-older-than", f"{cutoff_days}d"], directory)
    after = size(path)
    print(json.dumps({"step": "db prune", "older_than": f"{cutoff_days}d", "seconds": seconds,
                      "exit": result.returncode, "said": result.stdout.strip()[:120], "bytes_before": before,
                      "bytes_after": after}), flush=True)
    seconds, result = timed(["verify"], directory)
    print(json.dumps({"step": "verify after prune", "seconds": seconds, "exit": result.returncode,
                      "said": (result.stdout or result.stderr).strip()[:120]}), flush=True)
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.close()
    print(json.dumps({"step": "vacuum", "seconds": round(time.perf_counter() - started, 1),
                      "bytes_after_vacuum": size(path)}), flush=True)


if __name__ == "__main__":
    main()
