"""The replay's fast path (skip the evaluator where it provably says "nothing to do") changes nothing: random
histories through the example policies give the same result with it and with the evaluator on every tick."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backtest.replay import Replay
from agent.backtest.sources import History, Reading, RecordedTransfer
from agent.policy.load import load_policy_file

T0 = datetime(2026, 11, 2, tzinfo=UTC)
POLICIES = {name: load_policy_file(REPO / "policies" / f"{name}.yaml")
            for name in ("example", "prop-strict", "conservative-top-up", "top-up-and-sweep")}


@st.composite
def histories(draw: st.DrawFn) -> History:
    start = draw(st.integers(100, 8000)) * 100  # cents
    steps = draw(st.lists(st.tuples(st.integers(1, 7), st.integers(-40000, 40000)), min_size=5, max_size=250))
    readings, cents, minute = [], start, 0
    for gap, move in steps:
        minute += gap  # gaps over max_equity_age leave ticks without a fresh reading
        cents = max(100, cents + move)
        readings.append(Reading(T0 + timedelta(minutes=minute), Decimal(cents).scaleb(-2)))
    transfers = [RecordedTransfer(T0 + timedelta(minutes=m, seconds=30), kind, Decimal(amount))
                 for m, kind, amount in draw(st.lists(st.tuples(st.integers(0, minute), st.sampled_from(
                     ["top_up", "sweep"]), st.integers(1, 900)), max_size=3))]
    return History("random", readings, transfers)


@settings(max_examples=80, deadline=None)
@given(history=histories(), name=st.sampled_from(sorted(POLICIES)),
       funding=st.sampled_from([None, Decimal("1500.00"), Decimal("100000.00")]))
def test_the_fast_path_gives_exactly_what_the_evaluator_on_every_tick_gives(history, name, funding):
    policy = POLICIES[name]
    fast = Replay(policy, history, funding_balance=funding).run()
    slow = Replay(policy, history, funding_balance=funding, fast=False).run()
    assert fast.transfers == slow.transfers
    assert fast.kill_switch_trips == slow.kill_switch_trips
    assert fast.caps_bound == slow.caps_bound
    assert (fast.ticks, fast.stale_ticks, fast.time_below_floor, fast.fell_to_zero, fast.lowest_funding_balance) \
        == (slow.ticks, slow.stale_ticks, slow.time_below_floor, slow.fell_to_zero, slow.lowest_funding_balance)
