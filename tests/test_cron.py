"""`schedule.cron` has crontab's meaning: 0 and 7 are Sunday, names, wrap-around ranges, steps, dom-OR-dow."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from agent.cronspec import crontab_trigger, day_of_week_numbers
from agent.policy.load import PolicyError, load_policies, parse_policy

MONDAY = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday, 00:00 UTC
BASE = (Path(__file__).parent / "policies" / "good" / "base.yaml").read_text()


def fires(expression: str, start: datetime = MONDAY, until: datetime | None = None, count: int = 50) -> list[datetime]:
    trigger = crontab_trigger(expression)
    until = until or start + timedelta(days=14)
    out: list[datetime] = []
    previous = None
    now = start
    while len(out) < count:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= until:
            break
        out.append(fire)
        previous, now = fire, fire + timedelta(seconds=1)
    return out


def days(expression: str, **kwargs) -> list[date]:
    return [fire.date() for fire in fires(expression, **kwargs)]


# (field, expected first fire date from Monday 2026-11-23 00:00 UTC)
WEEKDAYS = [
    ("0", date(2026, 11, 29)), ("7", date(2026, 11, 29)), ("1", date(2026, 11, 23)), ("2", date(2026, 11, 24)),
    ("3", date(2026, 11, 25)), ("4", date(2026, 11, 26)), ("5", date(2026, 11, 27)), ("6", date(2026, 11, 28)),
    ("sun", date(2026, 11, 29)), ("mon", date(2026, 11, 23)), ("tue", date(2026, 11, 24)),
    ("wed", date(2026, 11, 25)), ("thu", date(2026, 11, 26)), ("fri", date(2026, 11, 27)),
    ("sat", date(2026, 11, 28)), ("SUN", date(2026, 11, 29)), ("Fri", date(2026, 11, 27)),
]


@pytest.mark.parametrize(("dow", "expected"), WEEKDAYS, ids=[w for w, _ in WEEKDAYS])
def test_every_weekday_number_and_name(dow: str, expected: date):
    first = crontab_trigger(f"0 12 * * {dow}").get_next_fire_time(None, MONDAY)
    assert first == datetime.combine(expected, datetime.min.time(), UTC).replace(hour=12)
    assert (first.isoweekday() % 7) == (expected.isoweekday() % 7)
    # and it keeps to that one weekday
    assert {d.weekday() for d in days(f"0 12 * * {dow}", until=MONDAY + timedelta(days=28))} == {expected.weekday()}


def test_weekdays_range_over_two_weeks():
    got = days("0 12 * * 1-5")
    assert len(got) == 10
    assert {d.weekday() for d in got} == {0, 1, 2, 3, 4}  # Python: Monday=0 .. Friday=4
    assert days("0 12 * * mon-fri") == got


@pytest.mark.parametrize("dow", ["5-7", "fri-sun", "FRI-SUN", "5,6,0", "fri,sat,7"])
def test_friday_to_sunday(dow: str):
    got = days(f"0 12 * * {dow}")
    assert got == [date(2026, 11, 27), date(2026, 11, 28), date(2026, 11, 29),
                   date(2026, 12, 4), date(2026, 12, 5), date(2026, 12, 6)]


@pytest.mark.parametrize(("dow", "expected"), [
    ("sat-sun", {0, 6}), ("fri-mon", {5, 6, 0, 1}), ("6-1", {6, 0, 1}), ("*/2", {0, 2, 4, 6}),
    ("1-5/2", {1, 3, 5}), ("mon-fri/2", {1, 3, 5}), ("1,3,5", {1, 3, 5}), ("0-7", set(range(7))),
    ("*", set(range(7))), ("1/2", {1, 3, 5, 0}), ("*/3", {0, 3, 6}), ("2,4-5,sun", {0, 2, 4, 5}),
])
def test_day_of_week_expansion(dow: str, expected: set[int]):
    assert day_of_week_numbers(dow) == expected


def test_steps_and_lists_fire_on_the_right_days():
    assert {d.weekday() for d in days("0 12 * * */2")} == {6, 1, 3, 5}  # Sun, Tue, Thu, Sat
    assert {d.weekday() for d in days("0 12 * * 1-5/2")} == {0, 2, 4}  # Mon, Wed, Fri
    assert {d.weekday() for d in days("0 12 * * 1,3,5")} == {0, 2, 4}
    assert {d.weekday() for d in days("0 12 * * sat-sun")} == {5, 6}


def test_day_of_month_or_day_of_week():
    start = datetime(2026, 11, 1, tzinfo=UTC)
    got = days("0 0 13 * 5", start=start, until=datetime(2027, 1, 1, tzinfo=UTC))
    fridays = [date(2026, 11, 6), date(2026, 11, 13), date(2026, 11, 20), date(2026, 11, 27), date(2026, 12, 4),
               date(2026, 12, 11), date(2026, 12, 18), date(2026, 12, 25)]
    assert got == sorted(set(fridays) | {date(2026, 12, 13)})  # Nov 13 is a Friday; Dec 13 is a Sunday


def test_a_star_field_keeps_and():
    # a field starting with "*" is unrestricted for the OR rule (crontab(5)): "*/2" days of month AND Fridays
    start = datetime(2026, 11, 1, tzinfo=UTC)
    got = days("0 0 */2 * fri", start=start, until=datetime(2026, 12, 1, tzinfo=UTC))
    assert got == [date(2026, 11, 13), date(2026, 11, 27)]
    assert days("0 0 13 * *", start=start, until=datetime(2027, 1, 1, tzinfo=UTC)) == \
        [date(2026, 11, 13), date(2026, 12, 13)]


def test_other_fields_are_crontab_syntax():
    monday = fires("*/15 9 * * 1", count=5)
    assert [(f.date(), f.hour, f.minute) for f in monday[:4]] == [(date(2026, 11, 23), 9, m) for m in (0, 15, 30, 45)]
    assert monday[4] == datetime(2026, 11, 30, 9, tzinfo=UTC)
    assert days("0 0 1 jan,JUL *", start=datetime(2026, 1, 1, tzinfo=UTC),
                until=datetime(2027, 1, 1, tzinfo=UTC)) == [date(2026, 1, 1), date(2026, 7, 1)]


def test_gap_between_fire_times_with_the_or_trigger():
    trigger = crontab_trigger("0 0 13 * 5")
    first = trigger.get_next_fire_time(None, MONDAY)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    assert (first, second) == (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 12, 4, tzinfo=UTC))


@pytest.mark.parametrize(("expression", "words"), [
    ("0 12 * * 8", "out of range"), ("0 12 * * funday", "unknown day"), ("* * * *", "expected 5 fields"),
    ("0 12 * * 1-", "cannot read"), ("0 12 * * */0", "bad step"), ("0 12 * * 1-5/x", "bad step"),
    ("0 12 * * 1,,2", "cannot read"), ("0 12 * * 1-9", "out of range"), ("* * * * * *", "expected 5 fields"),
    ("", "expected 5 fields"), ("61 * * * *", "minute"), ("0 24 * * *", "hour"), ("0 0 32 * *", "day-of-month"),
    ("0 0 1 13 *", "month"), ("0 0 1 foo *", "month"), ("0 12 * * monday", "unknown day"), ("0 0 0 * *", "day"),
])
def test_bad_expressions_are_rejected(expression: str, words: str):
    with pytest.raises(ValueError, match=words):
        crontab_trigger(expression)


def test_policy_with_a_bad_day_of_week_is_a_file_line_problem(tmp_path):
    text = BASE.replace("  every: 60s\n", '  cron: "0 12 * * 8"\n', 1)
    assert text != BASE
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "x.yaml")
    messages = [str(p) for p in info.value.problems]
    assert any(m.startswith("x.yaml:8: schedule.cron: bad cron expression '0 12 * * 8'") and "out of range" in m
               for m in messages), messages

    (tmp_path / "p.yaml").write_text(text.replace('"0 12 * * 8"', '"0 12 * * funday"'))
    policies, problems = load_policies([tmp_path / "p.yaml"])
    assert not policies
    assert any(str(p).startswith(f"{tmp_path / 'p.yaml'}:8: schedule.cron:") and "funday" in str(p)
               for p in problems), problems


@pytest.mark.parametrize("cron", ["0 12 * * 0", "0 12 * * 7", "*/5 * * * mon-fri", "0 0 13 * 5", "0 9 * * sat-sun"])
def test_policy_with_a_good_cron_loads(cron: str):
    policy = parse_policy(BASE.replace("  every: 60s\n", f'  cron: "{cron}"\n', 1), "x.yaml")
    assert policy.schedule.cron == cron and policy.schedule.every is None
