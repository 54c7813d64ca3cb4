"""Backtest replay speed: one account-year of one-minute readings (525,600) through policies/example.yaml.

Prints one JSON line per policy variant (readings, ticks, simulated transfers, seconds, readings/second) and
one for reading the same history from a CSV file. The history is a seeded random walk with profit runs and drawdowns, so
the replay takes both its fast path (equity in band) and the full evaluator (top-ups, sweeps, caps, halts).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent.backtest.replay import Replay
from agent.backtest.sources import History, Reading, read_csv
from agent.policy.load import load_policy_file, parse_policy

ROOT = Path(__file__).resolve().parents[1]


def history(minutes: int, seed: int = 7) -> History:
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    cents = 150_000  # 1500.00
    readings = []
    for minute in range(minutes):
        drift = 10 if (minute // 20_000) % 2 == 0 else -10  # alternating profit runs and losing stretches
        cents = max(1_000, cents + drift + rng.randint(-60, 60))
        readings.append(Reading(start + timedelta(minutes=minute), Decimal(cents).scaleb(-2)))
    return History(label="bench", readings=readings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=525_600)
    parser.add_argument("--policy", default=str(ROOT / "policies" / "example.yaml"))
    args = parser.parse_args()
    policy = load_policy_file(Path(args.policy))
    data = history(args.minutes)
    # the policy as written (its drawdown switch trips early and halts top-ups), and without that switch
    # (top-ups and sweeps all year: more ticks go through the full evaluator)
    text = Path(args.policy).read_text()
    untripped = parse_policy("\n".join(line for line in text.splitlines() if "equity_drawdown_pct" not in line),
                             f"{policy.path} (no equity_drawdown_pct)")
    for variant in (policy, untripped):
        started = time.perf_counter()
        result = Replay(variant, data, funding_balance=Decimal(1_000_000)).run()
        took = time.perf_counter() - started
        print(json.dumps({"bench": "backtest", "policy": variant.path, "readings": len(data.readings),
                          "ticks": result.ticks, "transfers": len(result.transfers),
                          "kill_switch_trips": len(result.kill_switch_trips),
                          "replay_s": round(took, 3), "readings_per_s": round(len(data.readings) / took)}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.csv"
        with path.open("w") as handle:
            handle.write("time,equity\n")
            for r in data.readings:
                handle.write(f"{int(r.at.timestamp())},{r.equity}\n")
        began = time.perf_counter()
        read_csv(path)
        csv_took = time.perf_counter() - began
    print(json.dumps({"bench": "backtest-csv", "readings": len(data.readings), "csv_read_s": round(csv_took, 3),
                      "lines_per_s": round(len(data.readings) / csv_took)}))


if __name__ == "__main__":
    main()
