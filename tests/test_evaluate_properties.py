"""Property tests: no decision exceeds any cap or window, goes below min_amount, or breaks the reserve."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.equity.base import Snapshot
from agent.policy.evaluate import BrokerLimits, KindUsage, Usage, evaluate
from agent.policy.load import parse_policy

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
cents = st.integers(min_value=1, max_value=5_000_000).map(lambda c: Decimal(c).scaleb(-2))


@st.composite
def policies(draw):
    below = draw(cents)
    top_target = below + draw(cents)
    above = top_target + draw(cents)
    sweep_target = draw(st.integers(min_value=0, max_value=int((above - top_target) * 100) - 1)) / Decimal(100)
    sweep_target = max(top_target, above - Decimal("0.01") - sweep_target)
    if sweep_target <= below:
        sweep_target = below + Decimal("0.01")
    lo, hi = sorted([draw(cents), draw(cents)])
    slo, shi = sorted([draw(cents), draw(cents)])
    text = f"""version: 1
account: {{mt5: MTR1, funding: CR1, currency: USD}}
top_up: {{when_equity_below: {below}, target_equity: {top_target}, min_amount: {lo}, max_amount: {hi}}}
sweep: {{when_equity_above: {above}, target_equity: {sweep_target}, min_amount: {slo}, max_amount: {shi}}}
limits:
  top_up:
    per_24h: {{count: {draw(st.integers(1, 5))}, amount: {draw(cents)}}}
    per_7d: {{amount: {draw(cents)}}}
    total: {{amount: {draw(cents)}}}
  sweep:
    per_24h: {{amount: {draw(cents)}}}
  funding_reserve: {draw(cents)}
"""
    return parse_policy(text, "prop.yaml")


@st.composite
def usages(draw):
    def kind():
        recent = tuple((NOW - timedelta(seconds=draw(st.integers(0, 8 * 86400))), draw(cents))
                       for _ in range(draw(st.integers(0, 4))))
        inside = [a for t, a in recent if NOW - t < timedelta(days=7)]
        extra = draw(cents)
        return KindUsage(recent=tuple((t, a) for t, a in recent if NOW - t < timedelta(days=7)),
                         total_count=len(inside) + 1, total_amount=sum(inside, Decimal(0)) + extra)
    return Usage(top_up=kind(), sweep=kind())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), usages(), cents, st.one_of(st.none(), cents), st.one_of(st.none(), cents))
def test_no_decision_breaks_a_cap(policy, usage, equity, funding, broker_max):
    snap = Snapshot(login="1", balance=equity, equity=equity, margin=Decimal(0), margin_free=equity,
                    margin_level=Decimal(0), currency="USD", positions=0, connected=True, taken_at=NOW, source="t")
    broker = BrokerLimits(min_amount=Decimal(1), max_amount=broker_max)
    d = evaluate(policy, snap, usage, NOW, funding_balance=funding, broker=broker)
    if not d.transfers:
        return
    assert d.amount is not None and d.amount > 0
    assert d.amount == d.amount.quantize(Decimal("0.01"))
    rule = policy.top_up if d.action == "top_up" else policy.sweep
    kind_usage = usage.top_up if d.action == "top_up" else usage.sweep
    limits = policy.limits.top_up if d.action == "top_up" else policy.limits.sweep
    assert rule is not None
    assert d.amount >= (rule.min_amount or 0) and d.amount >= 1
    assert rule.max_amount is None or d.amount <= rule.max_amount
    assert broker_max is None or d.amount <= broker_max
    for name, window in limits.windows.items():
        count, used = kind_usage.window(name, NOW)
        if window.amount is not None:
            assert used + d.amount <= window.amount
        if window.count is not None:
            assert count + 1 <= window.count
    if d.action == "top_up":
        assert funding is not None and funding - d.amount >= policy.limits.funding_reserve
        assert equity < rule.when_equity_below and equity + d.amount <= rule.target_equity
    else:
        assert equity > rule.when_equity_above and equity - d.amount >= rule.target_equity
