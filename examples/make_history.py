"""Writes the sample histories in this folder (seeded: the same files every time).

    python examples/make_history.py

history-example.csv: three days of one-minute readings for policies/example.yaml (bands 500 / 3000);
history-top-up-and-sweep.csv: two weeks of five-minute readings for policies/top-up-and-sweep.yaml
(bands 1000 / 5000). Each is a random walk with losing stretches and profit runs, as an MT5 account would
record it with no transfers at all: the backtest adds the policy's transfers.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent


def walk(path: Path, start: datetime, step: timedelta, count: int, equity: int, drifts: list[int],
         noise: int, seed: int) -> None:
    rng = random.Random(seed)
    cents = equity * 100
    phase = max(1, count // len(drifts))
    with path.open("w", newline="") as handle:
        handle.write("time,equity,balance,margin\n")
        for i in range(count):
            cents += drifts[min(i // phase, len(drifts) - 1)] + rng.randint(-noise, noise)
            margin = Decimal(rng.randint(0, 4000)).scaleb(-2)
            value = Decimal(cents).scaleb(-2)
            at = (start + i * step).strftime("%Y-%m-%dT%H:%M:%SZ")
            handle.write(f"{at},{value},{value},{margin}\n")


def main() -> None:
    walk(HERE / "history-example.csv", datetime(2026, 11, 2, tzinfo=UTC), timedelta(minutes=1), 3 * 1440,
         equity=1200, drifts=[-150, 200, -100, 300], noise=400, seed=14)
    walk(HERE / "history-top-up-and-sweep.csv", datetime(2026, 11, 2, tzinfo=UTC), timedelta(minutes=5),
         14 * 288, equity=5000, drifts=[-270, 660, -360], noise=1200, seed=14)


if __name__ == "__main__":
    main()
