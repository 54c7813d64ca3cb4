"""Chaos on one machine: one PostgreSQL ledger, one Deriv-protocol server, several `fund-agent run` processes
(hosts) on 20 accounts paid by 2 funding accounts of one Deriv user, with tight limits, broker faults, trading
that moves every balance, and a driver that kill -9s a host (and starts a new one) or freezes one (SIGSTOP)
for longer than its leases, for a bounded time; then every host stops and a final `reconcile` runs.

It asserts, and prints as one JSON line: broker transfers map 1:1 to confirmed rows (0 duplicates, 0 lost,
0 left unresolved, 0 failed rows that moved money); the largest 24h usage per account against its limits; the
lowest funding balance against its reserve; the largest daily count of the Deriv user against the broker's;
fenced writes (frozen hosts that woke up and were refused); failover times from a kill to the next
evaluation of each of the victim's accounts. Runs in the PostgreSQL run of the suite (make test runs both).
FUND_AGENT_CHAOS_SECONDS sets the length (default 40)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import POSTGRES, REPO, TOKEN, pg_cluster, run_cli

from agent.broker.fake import FakeDeriv, Fault

D = Decimal
FUNDINGS = ("CR4000128", "CR4000129")
ACCOUNTS = [f"MTR13000{2500 + i}" for i in range(20)]
START_FUNDING = D("9000.00")
RESERVE = D("5000")
DAILY = 60
PER_24H_COUNT, PER_24H_AMOUNT, PER_7D_AMOUNT = 3, D("1500"), D("3000")
TTL, RENEW, TIMEOUT, IDLE_CLOSE = 4.0, 1.0, 1.0, 3.0

pytestmark = pytest.mark.skipif(not POSTGRES, reason="several hosts need the shared ledger: runs in the "
                                "PostgreSQL run of the suite (FUND_AGENT_TEST_LEDGER=postgresql)")

POLICY = """version: 1
account:
  mt5: {mt5}
  funding: {funding}
  currency: USD
schedule:
  every: 1s
  max_equity_age: 30s
top_up:
  when_equity_below: 500
  target_equity: 1000
  min_amount: 10
  max_amount: 1000
  cooldown: 0s
sweep:
  when_equity_above: 1600
  target_equity: 1200
  min_amount: 50
  max_amount: 2000
  cooldown: 0s
limits:
  top_up:
    per_24h: {{count: {count}, amount: {amount}}}
    per_7d: {{amount: {week}}}
  funding_reserve: {reserve}
kill_switch:
  consecutive_top_ups: 10
"""


class Host:
    def __init__(self, workspace: Path, number: int, env: dict[str, str]) -> None:
        self.number = number
        self.log = workspace / f"host-{number}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(workspace / "fund-agent.yaml"),
                                      "run"], cwd=workspace, env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def _ledger_rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        return list(conn.execute(sql).fetchall())


def test_hosts_killed_and_frozen_never_move_money_twice(tmp_path: Path) -> None:
    seconds = float(os.environ.get("FUND_AGENT_CHAOS_SECONDS", "40"))
    cluster = pg_cluster()
    url = cluster.url(cluster.create_database("chaos"))
    rng = random.Random(int(os.environ.get("FUND_AGENT_CHAOS_SEED", "7")))
    # The server closes idle connections after IDLE_CLOSE s (Deriv: 120 s): after that, a frozen host's unsent
    # frame can no longer execute, and a new holder may fail its absent transfer (agent/ledger/leases.py).
    fake = FakeDeriv(daily_transfers=DAILY, idle_timeout=IDLE_CLOSE)
    for funding in FUNDINGS:
        fake.add_account(funding, "USD", START_FUNDING)
    for mt5 in ACCOUNTS:
        fake.add_account(mt5, "USD", "450.00", mt5=True)
    fake.add_token(TOKEN, FUNDINGS[0], ("read", "payments"), siblings=FUNDINGS[1:])
    fake.start()
    workspace = tmp_path
    (workspace / "policies").mkdir()
    for i, mt5 in enumerate(ACCOUNTS):
        (workspace / "policies" / f"{mt5}.yaml").write_text(POLICY.format(
            mt5=mt5, funding=FUNDINGS[i % 2], count=PER_24H_COUNT, amount=PER_24H_AMOUNT, week=PER_7D_AMOUNT,
            reserve=RESERVE))
    (workspace / "fund-agent.yaml").write_text(
        f"database: {url}\npolicies: policies/\n"
        f"broker:\n  url: {fake.url}\n  app_id: 1089\n  token_env: DERIV_API_TOKEN\n  timeout: {TIMEOUT:g}s\n"
        "  settle_window: 3s\nequity:\n  source: deriv\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    env.update({"DERIV_API_TOKEN": TOKEN, "FUND_AGENT_LEASE_TTL": str(TTL), "FUND_AGENT_LEASE_RENEW": str(RENEW),
                "FUND_AGENT_BROKER_IDLE_CLOSE": str(IDLE_CLOSE), "PYTHONPATH": str(REPO)})
    done = run_cli("--config", str(workspace / "fund-agent.yaml"), "db", "upgrade", cwd=workspace, env=env)
    assert done.returncode == 0, done.stderr
    hosts = [Host(workspace, n, env) for n in range(3)]
    numbers = iter(range(3, 1000))
    kills: list[tuple[float, list[str]]] = []  # (unix time of the kill, accounts the victim held)
    freezes = 0
    actions = 0
    lowest = {f: START_FUNDING for f in FUNDINGS}
    faults = [Fault("mt5_deposit", "delay_reply", delay=1.6), Fault("mt5_withdrawal", "drop_after_apply"),
              Fault("mt5_deposit", "error", code="MT5DepositError"), Fault("mt5_deposit", "drop_before_apply"),
              Fault("mt5_deposit", "late_apply", delay=1.0)]
    try:
        end = time.monotonic() + seconds
        next_chaos = time.monotonic() + 4
        while time.monotonic() < end:
            time.sleep(0.25)
            for mt5 in rng.sample(ACCOUNTS, 4):  # trading: losses and profits
                fake.adjust(mt5, D(rng.randint(-450, 450)))
            if rng.random() < 0.15:
                fake.inject(rng.choice(faults))
            if rng.random() < 0.5:  # slow replies: a host frozen now is often in the middle of a transfer
                fake.inject(Fault(rng.choice(["mt5_deposit", "mt5_withdrawal"]), "delay_reply", delay=0.7))
            for f in FUNDINGS:
                lowest[f] = min(lowest[f], fake.balance_of(f))
            if time.monotonic() < next_chaos:
                continue
            next_chaos = time.monotonic() + rng.uniform(3, 6)
            live = [h for h in hosts if h.alive() and not h.frozen]
            if len(live) < 2:
                hosts.append(Host(workspace, next(numbers), env))
                continue
            in_flight = _ledger_rows(url, "SELECT owner FROM transfers WHERE state = 'sent'")
            busy = [h for h in live if any(o and f":{h.pid}:" in o for (o,) in in_flight)]
            actions += 1
            if actions % 2 == 0:  # kills and freezes take turns: every run has both
                victim = rng.choice(busy or live)
                held = [a for (a,) in _ledger_rows(url, f"SELECT account FROM account_leases WHERE holder LIKE "
                                                        f"'%:{victim.pid}:%' AND expires_at > now()")]
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                kills.append((time.time(), held))
                hosts.append(Host(workspace, next(numbers), env))
            else:  # freeze longer than the lease, preferably in the middle of a transfer
                for _ in range(20):
                    if busy:
                        break
                    time.sleep(0.1)
                    in_flight = _ledger_rows(url, "SELECT owner FROM transfers WHERE state = 'sent'")
                    busy = [h for h in live if any(o and f":{h.pid}:" in o for (o,) in in_flight)]
                victim = rng.choice(busy or live)
                victim.proc.send_signal(signal.SIGSTOP)
                victim.frozen = True
                freezes += 1
                time.sleep(TTL + 2)
                victim.proc.send_signal(signal.SIGCONT)
                victim.frozen = False
    finally:
        for h in hosts:
            if h.alive():
                h.proc.send_signal(signal.SIGCONT)
                h.proc.send_signal(signal.SIGTERM)
        for h in hosts:
            try:
                h.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                h.proc.kill()
    try:
        for _ in range(20):  # the final reconcile: every unresolved transfer proven one way or the other
            time.sleep(1.0)
            run_cli("--config", str(workspace / "fund-agent.yaml"), "reconcile", cwd=workspace, env=env)
            if not _ledger_rows(url, "SELECT id FROM transfers WHERE state IN ('pending','sent','unknown')"):
                break
        rows = _ledger_rows(url, "SELECT id, account, funding, kind, amount_minor, state, broker_txn_id, created_at "
                                 "FROM transfers ORDER BY id")
        statement = {f: [r for r in fake.transfers(f) if r["action_type"] == "transfer"] for f in FUNDINGS}
    finally:
        fake.stop()
    logs = "".join(h.log.read_text(errors="replace") for h in hosts)
    fenced = logs.count("fenced write:")

    broker_ids = [r["transaction_id"] for f in FUNDINGS for r in statement[f]]
    confirmed = {r[6]: r for r in rows if r[5] == "confirmed"}
    unresolved = [r for r in rows if r[5] in ("pending", "sent", "unknown")]
    duplicates = len(broker_ids) - len(set(broker_ids))
    lost = sorted(set(broker_ids) - set(confirmed))
    phantom = sorted(set(confirmed) - set(broker_ids))  # confirmed in the ledger, not at the broker
    failed_moved = [r for r in rows if r[5] == "failed" and r[6] is not None and r[6] in broker_ids]
    by_account: dict[str, list[tuple]] = {}
    for r in rows:
        if r[5] in ("confirmed", "unknown") and r[3] == "top_up":
            by_account.setdefault(r[1], []).append(r)
    max_count = max((len(v) for v in by_account.values()), default=0)
    max_amount = max((sum(D(x[4]) / 100 for x in v) for v in by_account.values()), default=D(0))
    per_day: dict[str, int] = {}
    for f in FUNDINGS:
        for r in statement[f]:
            day = datetime.fromtimestamp(r["transaction_time"], UTC).date().isoformat()
            per_day[day] = per_day.get(day, 0) + 1
    lowest_statement = {f: min([START_FUNDING] + [D(r["balance_after"]) for r in statement[f]]) for f in FUNDINGS}
    decisions = _ledger_rows(url, "SELECT account, at FROM decisions ORDER BY at")
    failovers = []
    for killed_at, held in kills:
        for account in held:
            after = [at for a, at in decisions if a == account and _epoch(at) > killed_at]
            if after:
                failovers.append(_epoch(after[0]) - killed_at)
    failovers.sort()

    def pct(p: float) -> float | None:
        return round(failovers[min(len(failovers) - 1, int(p * len(failovers)))], 2) if failovers else None

    report = {
        "seconds": seconds, "hosts_started": len(hosts), "kills": len(kills), "freezes": freezes,
        "broker_transfers": len(broker_ids), "confirmed_rows": len(confirmed), "duplicates": duplicates,
        "lost": len(lost), "phantom": len(phantom), "unresolved": len(unresolved),
        "failed_that_moved": len(failed_moved),
        "max_top_ups_per_account": max_count, "limit_count_24h": PER_24H_COUNT,
        "max_top_up_amount_per_account": str(max_amount), "limit_amount_24h": str(PER_24H_AMOUNT),
        "lowest_funding_balance": {f: str(v) for f, v in lowest_statement.items()}, "reserve": str(RESERVE),
        "max_daily_count": max(per_day.values(), default=0), "broker_daily_count": DAILY,
        "fenced_writes": fenced,
        "failover_s": {"n": len(failovers), "p50": pct(0.5), "p95": pct(0.95),
                       "max": round(failovers[-1], 2) if failovers else None},
    }
    print("CHAOS " + json.dumps(report))
    assert duplicates == 0 and not lost and not phantom, report
    assert not unresolved, (report, unresolved)
    assert not failed_moved, report
    assert max_count <= PER_24H_COUNT and max_amount <= PER_24H_AMOUNT, report
    assert all(v >= RESERVE for v in lowest_statement.values()), report
    assert all(v >= RESERVE for v in lowest.values()), (report, lowest)
    assert max(per_day.values(), default=0) <= DAILY, report
    assert len(broker_ids) > 0, report
    assert kills and failovers, report


def _epoch(value: object) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
