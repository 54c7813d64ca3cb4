"""Policy values that the broker's limits will cut: warnings for `check` and `plan`, caps at run time."""

from __future__ import annotations

from decimal import Decimal

from agent.policy.evaluate import BrokerLimits
from agent.policy.load import Problem
from agent.policy.model import Policy

# Deriv's code defaults (DESIGN.md section 3), used when the live values are not at hand (`check`).
DEFAULT_BROKER = BrokerLimits(min_amount=Decimal(1), max_amount=Decimal(2500), daily_count=6)


def broker_warnings(policy: Policy, broker: BrokerLimits, live: bool, source: str | None = None) -> list[Problem]:
    where = "the broker's live" if live else "Deriv's default"
    out: list[Problem] = []

    def warn(key: str, message: str) -> None:
        out.append(Problem(policy.path, policy.lines.get(key, 1), f"warning: {key}: {message}"))

    for kind, rule in (("top_up", policy.top_up), ("sweep", policy.sweep)):
        if rule is None:
            continue
        if broker.max_amount is not None and rule.max_amount is not None and rule.max_amount > broker.max_amount:
            warn(f"{kind}.max_amount", f"{rule.max_amount} is above {where} per-transfer maximum "
                                       f"{broker.max_amount}; transfers will be capped there")
        if broker.max_amount is not None and rule.max_amount is None:
            warn(kind, f"no max_amount: transfers will be capped at {where} per-transfer maximum "
                       f"{broker.max_amount}")
        if broker.min_amount is not None and rule.min_amount is not None and rule.min_amount < broker.min_amount:
            warn(f"{kind}.min_amount", f"{rule.min_amount} is below {where} per-transfer minimum "
                                       f"{broker.min_amount}; smaller amounts will be skipped")
    if source == "deriv" and policy.sweep is not None and policy.sweep.min_margin_level is not None:
        warn("sweep.min_margin_level", "the deriv equity source reads the MT5 balance only (no margin): "
                                       "min_margin_level cannot be checked and will not block sweeps")
    if broker.daily_count is not None:
        counts = []
        for kind, limits in (("top_up", policy.limits.top_up), ("sweep", policy.limits.sweep)):
            window = limits.windows.get("per_24h")
            if window is not None and window.count is not None:
                counts.append((kind, window.count))
        total = sum(c for _, c in counts)
        if total > broker.daily_count:
            key = f"limits.{counts[0][0]}.per_24h.count"
            warn(key, f"per_24h counts add up to {total}, above {where} limit of {broker.daily_count} MT5 "
                      "transfers per UTC day (top-ups and sweeps together)")
    return out
