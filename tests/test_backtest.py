"""Backtest replays of small handmade histories; every expected number is worked out by hand in the comments.

Simulated equity = recorded equity - recorded transfers so far + simulated transfers so far (CSV histories
record no transfers, so it is recorded equity + the simulated transfers made before the reading).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from conftest import REPO, run_cli

from agent.backtest import output
from agent.backtest.replay import Replay, Result
from agent.backtest.sources import History, Reading, RecordedTransfer, read_csv
from agent.policy.evaluate import BrokerLimits
from agent.policy.load import parse_policy

D = Decimal
T0 = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday

HEAD = """version: 1
name: {name}
account:
  mt5: MTR130002534
  funding: CR4000128
  currency: USD
schedule:
  every: 60s
  max_equity_age: 30s
"""
TOP_UP = """top_up:
  when_equity_below: 500
  target_equity: 1000
  min_amount: 10
  max_amount: {max_amount}
  cooldown: {cooldown}
"""
SWEEP = """sweep:
  when_equity_above: 3000
  target_equity: 2000
  min_amount: 50
  max_amount: 2000
  cooldown: 1h
"""


def policy(*sections: str, name: str = "t"):
    return parse_policy(HEAD.format(name=name) + "".join(sections), f"{name}.yaml")


def history(*points: tuple[int, str], transfers: tuple[RecordedTransfer, ...] = ()) -> History:
    """(minute, recorded equity) pairs."""
    return History("test", [Reading(T0 + timedelta(minutes=m), D(e)) for m, e in points], list(transfers))


def replay(pol, hist: History, **kwargs) -> Result:
    return Replay(pol, hist, **kwargs).run()


def moves(result: Result) -> list[tuple[int, str, str]]:
    return [(int((t.time - T0).total_seconds() // 60), t.kind, str(t.amount)) for t in result.transfers]


def test_a_fall_below_the_floor_tops_up_once_then_the_cooldown_binds():
    pol = policy(TOP_UP.format(max_amount=1000, cooldown="30m"))
    # minute 1: 450 < 500 -> top up 1000 - 450 = 550. Then simulated = recorded + 550:
    # m2 460 -> 1010; m3 300 -> 850; m4 100 -> 650; m5 -100 -> 450 (< 500, cooldown until m31); m6 -150 -> 400 (same)
    result = replay(pol, history((0, "800"), (1, "450"), (2, "460"), (3, "300"), (4, "100"), (5, "-100"),
                                 (6, "-150")), funding_balance=D("5000"))
    assert moves(result) == [(1, "top_up", "550.00")]
    assert result.transfers[0].equity == D("450")
    assert result.caps_bound == {"top_up.cooldown": 2}
    assert result.time_below_floor == timedelta(minutes=2)  # below at the ticks of m1 and m5 (m6 is the last)
    assert result.lowest_funding_balance == D("4450.00")
    assert result.fell_to_zero is None
    record = output.record(result)
    assert record["totals"] == {"top_up": "550.00", "sweep": "0.00", "net": "550.00", "count_top_up": 1,
                                "count_sweep": 0}


def test_a_policy_that_tops_up_too_little_lets_the_account_fall_to_zero_and_says_when():
    pol = policy(TOP_UP.format(max_amount=100, cooldown="1h"))
    # m1: 450 -> wants 550, max_amount cuts it to 100; m2: 50 + 100 = 150 (cooldown); m3: -200 + 100 = -100: wiped out
    result = replay(pol, history((0, "800"), (1, "450"), (2, "50"), (3, "-200"), (4, "900")))
    assert moves(result) == [(1, "top_up", "100.00")]
    assert result.caps_bound == {"top_up.max_amount": 1, "top_up.cooldown": 1}
    assert result.fell_to_zero == (T0 + timedelta(minutes=3), D("-100.00"))
    assert result.ticks == 4  # stopped there: minute 4 is not replayed
    assert "fell to -100.00 at 2026-11-02T00:03:00Z" in output.notes(result)[0]


def test_a_profit_run_sweeps_down_to_target_then_waits_for_the_cooldown():
    pol = policy(SWEEP)
    # m2: 3100 > 3000 -> sweep 1100; simulated = recorded - 1100: m3 3300 -> 2200; m4 4000 -> 2900;
    # m5 4200 -> 3100 (> 3000, cooldown 1h until m62); m62 5500 -> 4400 -> wants 2400, max_amount 2000
    result = replay(pol, history((0, "2500"), (1, "2900"), (2, "3100"), (3, "3300"), (4, "4000"), (5, "4200"),
                                 (62, "5500")))
    assert moves(result) == [(2, "sweep", "1100.00"), (62, "sweep", "2000.00")]
    assert [t.equity for t in result.transfers] == [D("3100"), D("4400")]
    assert result.caps_bound == {"sweep.cooldown": 1, "sweep.max_amount": 1}
    assert result.stale_ticks == 62 - 6  # minutes 6..61: the newest reading is older than max_equity_age
    assert output.record(result)["totals"] == {"top_up": "0.00", "sweep": "3100.00", "net": "-3100.00",
                                               "count_top_up": 0, "count_sweep": 2}


def test_a_run_of_top_ups_trips_the_kill_switch_and_it_stays_tripped():
    pol = policy(TOP_UP.format(max_amount=1000, cooldown="0s"), "kill_switch:\n  consecutive_top_ups: 2\n")
    # m0: 400 -> top up 600; m1: -300 + 600 = 300 -> top up 700; m2: -1000 + 1300 = 300: a third top-up with
    # no sweep between -> trips (latched); m3: -900 + 1300 = 400: halted, no transfer, no second trip
    result = replay(pol, history((0, "400"), (1, "-300"), (2, "-1000"), (3, "-900")))
    assert moves(result) == [(0, "top_up", "600.00"), (1, "top_up", "700.00")]
    assert [at for at, _ in result.kill_switch_trips] == [T0 + timedelta(minutes=2)]
    assert "2 top-ups with no sweep between them" in result.kill_switch_trips[0][1]
    assert result.caps_bound == {}  # "halted" is a latch, not a cap
    assert output.record(result)["kill_switch_trips"] == [
        {"time": "2026-11-02T00:02:00Z", "reason": result.kill_switch_trips[0][1]}]


def test_the_brokers_daily_count_stops_the_third_transfer_of_the_day_and_the_next_day_goes_on():
    pol = policy(TOP_UP.format(max_amount=1000, cooldown="0s"))
    # m0: 400 -> 600; m1: -200 + 600 = 400 -> 600; m2: -800 + 1200 = 400 -> daily count 2 used up;
    # next day 00:00: -800 + 1200 = 400 -> 600 again
    day = 24 * 60
    result = replay(pol, history((0, "400"), (1, "-200"), (2, "-800"), (day, "-800")),
                    broker=BrokerLimits(min_amount=D(1), max_amount=D(2500), daily_count=2))
    assert moves(result) == [(0, "top_up", "600.00"), (1, "top_up", "600.00"), (day, "top_up", "600.00")]
    assert result.caps_bound == {"broker.daily_count": 1}


def test_recorded_transfers_are_swapped_for_the_simulated_ones():
    pol = policy(TOP_UP.format(max_amount=1000, cooldown="30m"))
    # the real agent topped up 300 at m1 (settled 00:01:10); this policy tops up 550 at m1 instead:
    # m2 recorded 760 (450 + 300 + 10) -> 760 - 300 + 550 = 1010
    hist = history((0, "800"), (1, "450"), (2, "760"),
                   transfers=(RecordedTransfer(T0 + timedelta(minutes=1, seconds=10), "top_up", D("300.00")),))
    result = replay(pol, hist)
    assert moves(result) == [(1, "top_up", "550.00")]
    assert result.simulated_offset(T0 + timedelta(minutes=2)) == D("550.00")


def test_csv_every_bad_line_is_reported_as_file_line(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("time,equity,margin\n"
                    "2026-11-02T00:00:00Z,800,0\n"
                    "yesterday,800,0\n"
                    "2026-11-02T00:02:00Z,lots,0\n"
                    "2026-11-02T00:03:00Z,800\n"
                    "2026-11-02T00:00:00Z,800,0\n"
                    "1793577840,900,\n")
    pol = tmp_path / "p.yaml"
    pol.write_text(HEAD.format(name="p") + TOP_UP.format(max_amount=1000, cooldown="30m"))
    result = run_cli("backtest", str(pol), "--equity", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:3: time: 'yesterday' is not a UTC ISO 8601 time or epoch seconds",
        f"{path}:4: equity: 'lots' is not a number",
        f"{path}:5: expected 3 fields (time,equity,margin), got 2",
        f"{path}:6: time 2026-11-02T00:00:00Z is not after the line before's",
    ]
    assert result.stdout == ""


def test_csv_header_is_required(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("2026-11-02T00:00:00Z,800\n")
    try:
        read_csv(path)
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        assert str(exc).startswith(f"{path}:1: the header must start with time,equity")
    else:
        raise AssertionError("a CSV without a header was read")


def test_epoch_seconds_and_iso_times_read_the_same(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("time,equity\n1793577600,800.5\n2026-11-02T00:01:00+00:00,450\n")
    readings = read_csv(path).readings
    assert [r.at for r in readings] == [T0, T0 + timedelta(minutes=1)]
    assert readings[0].equity == D("800.5")


def test_cli_json_is_the_contracts_object_one_per_policy(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("time,equity\n2026-11-02T00:00:00Z,800\n2026-11-02T00:01:00Z,450\n2026-11-02T00:02:00Z,3600\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(HEAD.format(name="a") + TOP_UP.format(max_amount=1000, cooldown="30m") + SWEEP)
    b.write_text(HEAD.format(name="b") + TOP_UP.format(max_amount=200, cooldown="30m"))
    result = run_cli("backtest", str(a), str(b), "--equity", str(path), "--funding-balance", "1000",
                     "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["policy"] for o in objects] == ["a", "b"]
    for obj in objects:
        assert set(obj) == {"policy", "account", "transfers", "totals", "lowest_funding_balance",
                            "kill_switch_trips", "caps_bound"}
    # a: m1 450 -> 550 (funding 1000 -> 450); m2 3600 + 550 = 4150 -> sweep 2000 (capped from 2150)
    assert objects[0]["transfers"] == [
        {"time": "2026-11-02T00:01:00Z", "kind": "top_up", "amount": "550.00", "equity": "450.00",
         "reason": "equity 450.00 below 500.00: top up 550.00 toward target 1000.00"},
        {"time": "2026-11-02T00:02:00Z", "kind": "sweep", "amount": "2000.00", "equity": "4150.00",
         "reason": "equity 4150.00 above 3000.00: sweep 2000.00 toward target 2000.00 (capped from 2150.00 by "
                   "sweep.max_amount 2000.00)"}]
    assert objects[0]["totals"] == {"top_up": "550.00", "sweep": "2000.00", "net": "-1450.00",
                                    "count_top_up": 1, "count_sweep": 1}
    assert objects[0]["lowest_funding_balance"] == "450.00"
    assert objects[1]["totals"]["top_up"] == "200.00"
    assert objects[1]["caps_bound"] == {"top_up.max_amount": 1}

    compare = run_cli("backtest", str(a), str(b), "--equity", str(path), "--compare", cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr
    assert "side by side" in compare.stdout and "550.00 USD in 1 transfers" in compare.stdout

    csv_out = run_cli("backtest", str(a), "--equity", str(path), "--format", "csv", cwd=tmp_path)
    assert csv_out.stdout.splitlines()[0] == "policy,account,time,kind,amount,equity,reason"
    assert len(csv_out.stdout.splitlines()) == 3


def test_cli_usage_errors_exit_2_and_bad_input_exits_1(tmp_path: Path):
    pol = tmp_path / "p.yaml"
    pol.write_text(HEAD.format(name="p") + TOP_UP.format(max_amount=1000, cooldown="30m"))
    path = tmp_path / "h.csv"
    path.write_text("time,equity\n2026-11-02T00:00:00Z,800\n")
    assert run_cli("backtest", str(pol), cwd=tmp_path).returncode == 2  # no --equity
    one = run_cli("backtest", str(pol), "--equity", str(path), "--compare", cwd=tmp_path)
    assert one.returncode == 2 and "--compare needs two or more policies" in one.stderr
    missing = run_cli("backtest", str(pol), "--equity", "nowhere.csv", cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD.format(name="bad") + "top_up: {when_equity_below: -5}\n")
    broken = run_cli("backtest", str(bad), "--equity", str(path), cwd=tmp_path)
    assert broken.returncode == 1 and f"{bad}:" in broken.stderr and "Traceback" not in broken.stderr


def test_the_example_history_replays_through_the_example_policies():
    for name in ("example", "top-up-and-sweep"):
        history_path = REPO / "examples" / f"history-{name}.csv"
        result = run_cli("backtest", str(REPO / "policies" / f"{name}.yaml"), "--equity", str(history_path),
                         "--funding-balance", "10000", "--format", "json", cwd=REPO)
        assert result.returncode == 0, result.stderr
        obj = json.loads(result.stdout)
        assert obj["totals"]["count_top_up"] + obj["totals"]["count_sweep"] > 0


def test_html_is_one_self_contained_file(tmp_path: Path):
    page = tmp_path / "bt.html"
    result = run_cli("backtest", str(REPO / "policies" / "example.yaml"), "--equity",
                     str(REPO / "examples" / "history-example.csv"), "--funding-balance", "10000", "--html",
                     str(page), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert text.count("<svg") == 1 and "simulated equity" in text and "recorded equity" in text
    assert "<script" not in text and 'src="http' not in text and "<link" not in text
