"""Pure policy evaluation rate (no I/O): how many decisions per second one core makes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent.equity.base import Snapshot
from agent.policy.evaluate import KindUsage, Usage, evaluate
from agent.policy.load import parse_policy

ROOT = Path(__file__).resolve().parents[1]


def main(rounds: int = 20000) -> None:
    policy = parse_policy((ROOT / "policies" / "example.yaml").read_text(), "example.yaml")
    now = datetime(2026, 11, 25, tzinfo=UTC)
    usage = Usage(top_up=KindUsage(recent=tuple((now - timedelta(hours=h), Decimal("100")) for h in range(20)),
                                   total_count=40, total_amount=Decimal(4000)))
    snaps = [Snapshot("1", Decimal(e), Decimal(e), Decimal(0), Decimal(e), Decimal(0), "USD", 0, True, now, "b")
             for e in ("450.00", "1500.00", "3500.00")]
    started = time.perf_counter()
    for i in range(rounds):
        evaluate(policy, snaps[i % 3], usage, now, funding_balance=Decimal(10000))
    took = time.perf_counter() - started
    print(f"evaluate: {rounds} decisions in {took:.2f}s = {rounds / took:.0f}/s ({took / rounds * 1e6:.0f} us each)")
    started = time.perf_counter()
    text = (ROOT / "policies" / "example.yaml").read_text()
    for _ in range(500):
        parse_policy(text, "example.yaml")
    took = time.perf_counter() - started
    print(f"policy load: 500 parses in {took:.2f}s = {took / 500 * 1000:.2f} ms each")


if __name__ == "__main__":
    main()
