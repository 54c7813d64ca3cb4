"""The pure evaluator: each rule, each cap, each window boundary, the reserve, the kill switch, the bands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agent.equity.base import Snapshot
from agent.policy.evaluate import BrokerLimits, KindUsage, Usage, evaluate
from agent.policy.load import parse_policy

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()
D = Decimal


def edit(*pairs: tuple[str, str]):
    text = BASE
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new, 1)
    return parse_policy(text, "p.yaml")


def snap(equity: str, *, age: float = 0, margin: str = "0", margin_free: str | None = None, connected=True,
         currency="USD") -> Snapshot:
    eq = D(equity)
    return Snapshot(login="130002534", balance=eq, equity=eq, margin=D(margin),
                    margin_free=D(margin_free) if margin_free else eq - D(margin),
                    margin_level=(eq * 100 / D(margin)) if D(margin) else D(0), currency=currency, positions=0,
                    connected=connected, taken_at=NOW - timedelta(seconds=age), source="test")


def run(p, s, usage=Usage(), funding=D("10000"), broker=BrokerLimits(), no_reading=None):
    return evaluate(p, s, usage, NOW, funding_balance=funding, broker=broker, no_reading=no_reading)


P = parse_policy(BASE, "p.yaml")


def test_top_up_to_target():
    d = run(P, snap("450"))
    assert (d.action, d.amount, d.bound_by) == ("top_up", D("550.00"), None)


def test_top_up_capped_by_max_amount():
    d = run(P, snap("-200"))
    assert (d.action, d.amount, d.bound_by) == ("top_up", D("1000.00"), "top_up.max_amount")
    assert "capped from 1200.00" in d.reason


def test_exactly_at_threshold_does_nothing():
    assert run(P, snap("500")).action == "none"
    assert run(P, snap("499.99")).action == "top_up"
    assert run(P, snap("3000")).action == "none"
    assert run(P, snap("3000.01")).action == "sweep"


def test_below_min_amount_does_nothing():
    p = edit(("target_equity: 1000", "target_equity: 505"))
    d = run(p, snap("499"))
    assert d.action == "none" and d.bound_by == "top_up.min_amount"


def test_sweep_to_target():
    d = run(P, snap("3500"))
    assert (d.action, d.amount) == ("sweep", D("1500.00"))


def test_sweep_skipped_when_margin_level_would_fall_too_low():
    # equity 3500, margin 1000 -> sweeping 1500 leaves 2000/1000 = 200% < 300%
    d = run(P, snap("3500", margin="1000"))
    assert d.action == "none" and d.bound_by == "sweep.min_margin_level"
    # with no margin in use the margin level does not block
    assert run(P, snap("3500", margin="0")).action == "sweep"


def test_sweep_capped_by_free_margin():
    d = run(P, snap("3500", margin="10", margin_free="700"))
    assert (d.action, d.amount, d.bound_by) == ("sweep", D("700.00"), "margin_free")


def test_stale_reading_is_never_acted_on():
    assert run(P, snap("450", age=30)).action == "top_up"  # exactly max_equity_age: still usable
    d = run(P, snap("450", age=31))
    assert d.action == "none" and d.bound_by == "stale"


def test_no_reading_disconnected_and_wrong_currency():
    assert run(P, None, no_reading="file missing").bound_by == "no_reading"
    assert run(P, snap("450", connected=False)).bound_by == "no_reading"
    assert run(P, snap("450", currency="EUR")).bound_by == "currency"


def test_unresolved_transfer_blocks():
    d = run(P, snap("450"), Usage(unresolved="transfer 3 is unknown"))
    assert d.action == "none" and d.bound_by == "unresolved"


def test_cooldown_boundary():
    last = NOW - timedelta(minutes=30)
    assert run(P, snap("450"), Usage(top_up=KindUsage(last_at=last))).action == "top_up"
    d = run(P, snap("450"), Usage(top_up=KindUsage(last_at=last + timedelta(seconds=1))))
    assert d.action == "none" and d.bound_by == "top_up.cooldown"


def usage_at(offset: timedelta, amount="1500", n=1) -> Usage:
    return Usage(top_up=KindUsage(recent=tuple((NOW - offset, D(amount)) for _ in range(n)), total_count=n,
                                  total_amount=D(amount) * n))


@pytest.mark.parametrize("offset, inside", [
    (timedelta(hours=24), False),                          # exactly at the edge: outside
    (timedelta(hours=24) - timedelta(seconds=1), True),    # one second inside
    (timedelta(hours=24) + timedelta(seconds=1), False),   # one second outside
])
def test_per_24h_amount_window_boundaries(offset, inside):
    d = run(P, snap("450"), usage_at(offset))
    if inside:  # 2000 - 1500 = 500 left
        assert (d.amount, d.bound_by) == (D("500.00"), "limits.top_up.per_24h.amount")
    else:
        assert (d.amount, d.bound_by) == (D("550.00"), None)


@pytest.mark.parametrize("offset, blocked", [
    (timedelta(hours=24), False), (timedelta(hours=24) - timedelta(seconds=1), True),
    (timedelta(hours=24) + timedelta(seconds=1), False)])
def test_per_24h_count_window_boundaries(offset, blocked):
    d = run(P, snap("450"), usage_at(offset, amount="1", n=3))
    assert (d.action == "none") is blocked
    if blocked:
        assert d.bound_by == "limits.top_up.per_24h.count"


def test_per_7d_window_boundary():
    inside = usage_at(timedelta(days=7) - timedelta(seconds=1), amount="4900", n=1)
    assert run(P, snap("450"), inside).bound_by == "limits.top_up.per_7d.amount"
    outside = usage_at(timedelta(days=7), amount="4900", n=1)
    assert run(P, snap("450"), outside).action == "top_up"


def test_window_cap_below_min_amount_says_which_cap():
    d = run(P, snap("450"), usage_at(timedelta(hours=1), amount="1995"))
    assert d.action == "none" and d.bound_by == "limits.top_up.per_24h.amount"
    assert "per_24h amount cap 2000.00 reached: 1995.00 used" in d.reason and "< top_up.min_amount 10.00" in d.reason


def test_total_window():
    usage = Usage(top_up=KindUsage(total_count=40, total_amount=D("19900")))
    d = run(P, snap("450"), usage)
    assert (d.amount, d.bound_by) == (D("100.00"), "limits.top_up.total.amount")


def test_funding_reserve():
    d = run(P, snap("450"), funding=D("1300"))
    assert (d.amount, d.bound_by) == (D("300.00"), "limits.funding_reserve")
    d = run(P, snap("450"), funding=D("1005"))
    assert d.action == "none" and d.bound_by == "limits.funding_reserve"
    assert run(P, snap("450"), funding=None).action == "none"


def test_broker_limits_cap_and_block():
    d = run(P, snap("450"), broker=BrokerLimits(max_amount=D("300")))
    assert (d.amount, d.bound_by) == (D("300.00"), "broker.max_amount")
    d = run(P, snap("450"), broker=BrokerLimits(daily_count=6, daily_available=0))
    assert d.action == "none" and d.bound_by == "broker.daily_count"
    p = edit(("target_equity: 1000", "target_equity: 520"))
    d = run(p, snap("499"), broker=BrokerLimits(min_amount=D("25")))
    assert d.action == "none" and d.bound_by == "broker.min_amount"


def test_kill_switch_consecutive_top_ups_trips_and_blocks():
    d = run(P, snap("450"), Usage(consecutive_top_ups=5))
    assert d.action == "none" and d.kill_switch and "consecutive_top_ups" in d.kill_switch
    assert run(P, snap("450"), Usage(consecutive_top_ups=4)).action == "top_up"


def test_kill_switch_net_and_drawdown():
    assert run(P, snap("450"), Usage(net_top_up=D("10000.01"))).kill_switch
    assert not run(P, snap("1500"), Usage(net_top_up=D("10000"))).kill_switch  # "above": 10000 is not
    d = run(P, snap("400"), Usage(peak_equity=D("1000")))  # 60% below the peak
    assert d.kill_switch and "equity_drawdown_pct" in d.kill_switch
    assert not run(P, snap("401"), Usage(peak_equity=D("1000"))).kill_switch


def test_halt_blocks_top_ups_but_not_sweeps():
    halted = Usage(top_up_halt="operator halt: testing")
    assert run(P, snap("450"), halted).bound_by == "halt"
    assert run(P, snap("3500"), halted).action == "sweep"


def test_sweep_windows_count():
    usage = Usage(sweep=KindUsage(recent=((NOW - timedelta(hours=1), D("100")),) * 2, total_count=2,
                                  total_amount=D("200")))
    d = run(P, snap("3500"), usage)
    assert d.action == "none" and d.bound_by == "limits.sweep.per_24h.count"


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "policies").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_policies_top_up_and_sweep_as_annotated(path):
    p = parse_policy(path.read_text(), str(path))
    assert p.top_up is not None
    low = run(p, snap(str(p.top_up.when_equity_below - 1)), funding=D("100000"))
    assert low.action == "top_up" and low.amount > 0
    assert run(p, snap(str(p.top_up.target_equity))).action == "none"
    if p.sweep is not None:
        high = run(p, snap(str(p.sweep.when_equity_above + 500)))
        assert high.action == "sweep" and high.amount > 0


def test_failures_back_off_exponentially_and_never_loop_hot():
    def after(n: int, minutes_ago: float):
        usage = Usage(top_up=KindUsage(failures=n, last_failure_at=NOW - timedelta(minutes=minutes_ago),
                                       last_failure="NoMoney"))
        return run(P, snap("450"), usage)

    assert after(1, 0.5).bound_by == "failure_backoff"   # 1 failure: wait 1 minute
    assert after(1, 1).action == "top_up"
    assert after(3, 3.9).bound_by == "failure_backoff"   # 3 in a row: wait 4 minutes
    assert after(3, 4).action == "top_up"
    assert after(12, 59).bound_by == "failure_backoff"   # capped at one hour
    assert after(12, 60).action == "top_up"
    assert "3 failed top-up attempt(s) in a row (last: NoMoney)" in after(3, 1).reason


def test_an_all_scope_halt_blocks_sweeps_too():
    d = run(P, snap("3500"), Usage(halt="operator_needed halt: PermissionDenied"))
    assert d.action == "none" and d.bound_by == "halt"


def test_net_top_up_above_is_a_cap_not_an_after_the_fact_latch():
    """The top-up that would cross net_top_up_above is cut to the headroom; with none left it is not sent, and
    the kill switch trips then (not one top-up later)."""
    d = run(P, snap("450"), Usage(net_top_up=D("9800")))  # wants 550, 200 of headroom
    assert d.action == "top_up" and d.amount == D("200.00") and d.bound_by == "kill_switch.net_top_up_above"
    assert not d.kill_switch
    d = run(P, snap("450"), Usage(net_top_up=D("9995")))  # 5 of headroom is below min_amount 10
    assert d.action == "none" and d.bound_by == "kill_switch.net_top_up_above" and d.kill_switch
    d = run(P, snap("450"), Usage(net_top_up=D("10000")))
    assert d.action == "none" and d.kill_switch and "no room" in d.kill_switch


def test_consecutive_top_ups_the_one_past_the_limit_is_not_sent():
    assert run(P, snap("450"), Usage(consecutive_top_ups=4)).action == "top_up"  # the 5th is sent
    d = run(P, snap("450"), Usage(consecutive_top_ups=5))  # the 6th is not
    assert d.action == "none" and d.kill_switch


def test_a_reading_that_predates_the_last_transfer_is_not_acted_on():
    usage = Usage(last_transfer=(7, NOW - timedelta(seconds=10)))  # plus the 5 s skew a stamp may be ahead
    d = run(P, snap("450", age=5), usage)
    assert d.action == "none" and d.bound_by == "reading_predates_transfer"
    assert "waiting for a reading newer than transfer 7" in d.reason
    assert run(P, snap("450", age=4), usage).action == "top_up"


def test_a_reading_from_the_future_is_refused():
    assert run(P, snap("450", age=-5)).action == "top_up"  # within the skew allowed
    d = run(P, snap("450", age=-6))
    assert d.action == "none" and d.bound_by == "future_reading"


def test_unresolved_top_ups_from_the_funding_account_count_against_its_reserve():
    d = evaluate(P, snap("450"), Usage(), NOW, funding_balance=D("1600"), funding_in_flight=D("550"))
    assert d.action == "top_up" and d.amount == D("50.00") and d.bound_by == "limits.funding_reserve"
    d = evaluate(P, snap("450"), Usage(), NOW, funding_balance=D("1600"), funding_in_flight=D("600"))
    assert d.action == "none" and d.bound_by == "limits.funding_reserve"
