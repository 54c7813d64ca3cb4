"""Crontab expressions (`schedule.cron`) as APScheduler 3 triggers, with crontab's meaning.

APScheduler 3's `CronTrigger.from_crontab` numbers the day of week 0=Monday..6=Sunday, so "0 12 * * 1" would
fire on Tuesdays and 0/7 would not mean Sunday. This module reads the day-of-week field itself the way crontab(5)
does (0 and 7 = Sunday, 1 = Monday .. 6 = Saturday, names sun..sat, ranges that may wrap round the week such as
"fri-mon", lists and steps) and hands APScheduler explicit day names. The other four fields are crontab syntax that
APScheduler already reads correctly (month names included), so they are left to it.

It also applies the Vixie-cron rule that APScheduler does not: when both day of month and day of week are
restricted (neither field starts with "*"), the job runs when EITHER matches, e.g. "0 0 13 * 5" runs on the 13th
and on every Friday. That is an OrTrigger of two CronTriggers.
"""

from __future__ import annotations

import re

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

__all__ = ["crontab_trigger", "day_of_week_numbers"]

# crontab day numbers 0..6 (Sunday first) -> APScheduler's day names, which do not depend on its numbering
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY_NUMBERS = {name: number for number, name in enumerate(_DAY_NAMES)}
_LAST_DOW = 7  # crontab accepts 0..7 (both 0 and 7 are Sunday); "*" is 0..7 too, so "*/2" is 0,2,4,6
_ITEM = re.compile(r"(?P<range>\*|(?P<start>[^-/]+)(?:-(?P<end>[^-/]+))?)(?:/(?P<step>[^/]*))?")
_FIELDS = ("minute", "hour", "day", "month")
_LABELS = {"minute": "minute", "hour": "hour", "day": "day-of-month", "month": "month"}


def _day(text: str, field: str) -> int:
    word = text.strip().lower()
    if word in _DAY_NUMBERS:
        return _DAY_NUMBERS[word]
    if word.isdigit():
        number = int(word)
        if number > _LAST_DOW:
            raise ValueError(f"day-of-week field {field!r}: {text} is out of range (0-7, 0 and 7 = Sunday)")
        return number
    raise ValueError(f"day-of-week field {field!r}: unknown day {text!r} (use 0-7 or sun, mon, tue, wed, thu, fri, "
                     "sat)")


def day_of_week_numbers(field: str) -> set[int]:
    """The crontab days of week (0 = Sunday .. 6 = Saturday) that a crontab day-of-week field selects."""
    days: set[int] = set()
    for item in field.split(","):
        match = _ITEM.fullmatch(item)
        if not item or match is None:
            raise ValueError(f"day-of-week field {field!r}: cannot read {item!r}")
        step = 1
        if match.group("step") is not None:
            if not match.group("step").isdigit() or int(match.group("step")) == 0:
                raise ValueError(f"day-of-week field {field!r}: bad step {match.group('step')!r} "
                                 f"(a whole number from 1)")
            step = int(match.group("step"))
        if match.group("range") == "*":
            start, end = 0, _LAST_DOW
        else:
            start = _day(match.group("start"), field)
            if match.group("end") is not None:
                end = _day(match.group("end"), field)
            elif match.group("step") is not None:
                end = _LAST_DOW  # "N/step": from N to the end of the week
            else:
                end = start
            if end < start:  # wraps round the week: "fri-mon", "sat-sun", "6-1"
                end += 7
        days.update(day % 7 for day in range(start, end + 1, step))
    return days


def _day_names(days: set[int]) -> str:
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def crontab_trigger(expression: str, timezone: str = "UTC") -> BaseTrigger:
    """An APScheduler trigger for a 5-field crontab expression with crontab semantics (see the module docstring).

    Raises ValueError, with a message naming the field, for an expression that is not a valid crontab line.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expected a crontab expression as text, got {type(expression).__name__}")
    values = expression.split()
    if len(values) != 5:
        raise ValueError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(values)}")
    fields = dict(zip(_FIELDS, values[:4], strict=True))
    for name, value in fields.items():
        try:
            CronTrigger(timezone=timezone, **{name: value})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{_LABELS[name]} field {value!r}: {exc}") from None
    dow = values[4]
    day_of_week = "*" if dow == "*" else _day_names(day_of_week_numbers(dow))
    if fields["day"].startswith("*") or dow.startswith("*"):
        return CronTrigger(day_of_week=day_of_week, timezone=timezone, **fields)
    # both restricted: crontab runs the job when either the day of month or the day of week matches
    by_day_of_month = CronTrigger(timezone=timezone, **fields)
    by_day_of_week = CronTrigger(day_of_week=day_of_week, timezone=timezone, **{**fields, "day": "*"})
    return OrTrigger([by_day_of_month, by_day_of_week])
