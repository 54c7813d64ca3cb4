"""The typed policy: what an operator's YAML file means once it has been validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal


@dataclass(frozen=True)
class Schedule:
    every: timedelta | None
    cron: str | None
    max_equity_age: timedelta


@dataclass(frozen=True)
class TopUp:
    when_equity_below: Decimal
    target_equity: Decimal
    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    cooldown: timedelta = timedelta(0)


@dataclass(frozen=True)
class Sweep:
    when_equity_above: Decimal
    target_equity: Decimal
    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    cooldown: timedelta = timedelta(0)
    min_margin_level: Decimal | None = None


@dataclass(frozen=True)
class Window:
    count: int | None = None
    amount: Decimal | None = None


# Rolling windows, in the order they are checked; None = no limit on that window.
WINDOWS: dict[str, timedelta | None] = {"per_24h": timedelta(hours=24), "per_7d": timedelta(days=7), "total": None}


@dataclass(frozen=True)
class KindLimits:
    windows: dict[str, Window] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    top_up: KindLimits = field(default_factory=KindLimits)
    sweep: KindLimits = field(default_factory=KindLimits)
    funding_reserve: Decimal = Decimal(0)


@dataclass(frozen=True)
class KillSwitch:
    consecutive_top_ups: int | None = None
    net_top_up_above: Decimal | None = None
    equity_drawdown_pct: Decimal | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    mt5: str
    funding: str
    currency: str
    schedule: Schedule
    top_up: TopUp | None
    sweep: Sweep | None
    limits: Limits
    kill_switch: KillSwitch
    path: str
    sha256: str
    # dotted key -> line in the file, so that later warnings can point at the key too
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def mt5_digits(self) -> str:
        return "".join(ch for ch in self.mt5 if ch.isdigit())
