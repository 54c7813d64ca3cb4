"""Replay a history through a policy: the real evaluator and the ledger's own accounting, on a virtual clock.

Counterfactual equity: the history was produced under the transfers that really happened, so the replay keeps
the trading path and swaps the transfers. For a reading taken at t,
    simulated equity = recorded equity - recorded transfers settled before t + simulated transfers made before t
(top-ups count +, sweeps -; recorded transfers count from the start of the replay). Simulated transfers settle
at once (the broker's answer is not modelled), so each one is a confirmed row in the replay's UsageBook.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from agent.backtest.sources import History, Reading
from agent.equity.base import Snapshot
from agent.policy.evaluate import MAX_CLOCK_SKEW, BrokerLimits, Decision, Usage, _kill_switch, evaluate
from agent.policy.model import Policy
from agent.policy.usage_book import HaltRecord, TransferRecord, UsageBook
from agent.policy.warnings import DEFAULT_BROKER

ZERO = Decimal(0)
# Without --funding-balance the funding account is not modelled: this balance never binds.
UNLIMITED_FUNDING = Decimal(10) ** 15
# bound_by values that say why no rule was applied (no usable reading, a latch), not a limit or cap that bound
NOT_A_CAP = frozenset({"stale", "no_reading", "currency", "future_reading", "reading_predates_transfer",
                       "unresolved", "halt", "broker", "funding_balance", "error"})
# the engine's NOT_A_PEAK (agent/engine/tick.py): readings that must not move the recorded equity peak
NOT_A_PEAK = frozenset({"stale", "no_reading", "currency", "future_reading", "reading_predates_transfer",
                        "unresolved"})


@dataclass(frozen=True)
class SimTransfer:
    time: datetime
    kind: str
    amount: Decimal
    equity: Decimal  # the simulated equity of the reading that triggered it
    reason: str
    bound_by: str | None


@dataclass
class Result:
    policy: Policy
    history: History
    transfers: list[SimTransfer] = field(default_factory=list)
    kill_switch_trips: list[tuple[datetime, str]] = field(default_factory=list)
    caps_bound: Counter[str] = field(default_factory=Counter)
    funding_start: Decimal | None = None
    lowest_funding_balance: Decimal | None = None
    time_below_floor: timedelta = timedelta(0)
    ticks: int = 0
    stale_ticks: int = 0  # ticks with no reading fresh enough to act on
    fell_to_zero: tuple[datetime, Decimal] | None = None  # (when, simulated equity): the replay stopped there
    start: datetime | None = None
    end: datetime | None = None  # the last instant replayed
    until: datetime | None = None  # --until, exclusive, when given

    def total(self, kind: str) -> Decimal:
        return sum((t.amount for t in self.transfers if t.kind == kind), ZERO)

    def simulated_offset(self, at: datetime) -> Decimal:
        """Simulated transfers made before `at` (top-ups +, sweeps -)."""
        return sum((t.amount if t.kind == "top_up" else -t.amount for t in self.transfers if t.time < at), ZERO)


def ticks(policy: Policy, start: datetime, end: datetime) -> Iterator[datetime]:
    """The virtual clock: the policy's schedule from `start` up to `end` (inclusive)."""
    every = policy.schedule.every
    if every is not None:
        at = start
        while at <= end:
            yield at
            at += every
        return
    from agent.cronspec import crontab_trigger

    assert policy.schedule.cron is not None
    trigger = crontab_trigger(policy.schedule.cron)
    fire = trigger.get_next_fire_time(None, start)
    while fire is not None:
        at = fire.astimezone(UTC)
        if at > end:
            return
        yield at
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))


class Replay:
    def __init__(self, policy: Policy, history: History, *, funding_balance: Decimal | None = None,
                 broker: BrokerLimits = DEFAULT_BROKER, since: datetime | None = None,
                 until: datetime | None = None, fast: bool = True) -> None:
        self.policy = policy
        # fast: skip the evaluator on ticks where it provably returns "nothing to do" (tests compare both ways)
        self.fast = fast
        self.history = history
        self.broker = broker
        self.book = UsageBook(policy.currency)
        start = since or history.readings[0].at
        end = until or history.readings[-1].at
        if until is not None:
            end = until - timedelta(microseconds=1)  # --until is exclusive
        self.result = Result(policy, history, funding_start=funding_balance, start=start, end=end, until=until,
                             lowest_funding_balance=funding_balance)
        self.funding = funding_balance if funding_balance is not None else UNLIMITED_FUNDING
        # recorded transfers settled before each reading (from the start of the replay): the offset to remove
        self.recorded = _recorded_offsets(history, start)
        self.sim_offset = ZERO  # simulated transfers so far
        self.sim_times: list[datetime] = []
        self.sim_cum: list[Decimal] = []
        self.daily: Counter[str] = Counter()  # simulated transfers per UTC day (the broker's daily count)

    def _sim_before(self, at: datetime) -> Decimal:
        if not self.sim_times or self.sim_times[-1] < at:
            return self.sim_offset
        index = bisect_left(self.sim_times, at)
        return self.sim_cum[index - 1] if index else ZERO

    def run(self) -> Result:
        policy, result, book = self.policy, self.result, self.book
        readings = self.history.readings
        times = [r.at for r in readings]
        max_age = policy.schedule.max_equity_age
        # the policy that recorded a ledger runs again at the times it really ran, on the readings it saw
        recorded_ticks = self.history.evaluations.get(policy.sha256)
        step = self.history.step and recorded_ticks is None
        valid_until = _valid_until(readings, self.history.gaps) if step else []
        login = policy.mt5_digits
        top_up, sweep = policy.top_up, policy.sweep
        below = top_up.when_equity_below if top_up is not None else None
        above = sweep.when_equity_above if sweep is not None else None
        index = bisect_left(times, result.start) - 1 if result.start else -1
        usage: Usage | None = None  # the current usage's time-independent part, rebuilt after every change
        safe_from: Decimal | None = None  # the lowest equity seen not to trip the kill switch with `usage`
        previous: datetime | None = None
        was_below = False
        assert result.start is not None and result.end is not None
        clock = ([t for t in recorded_ticks if result.start <= t <= result.end] if recorded_ticks is not None
                 else ticks(policy, result.start, result.end))
        for now in clock:
            result.ticks += 1
            if was_below and previous is not None:
                result.time_below_floor += now - previous
            previous, was_below = now, False
            while index + 1 < len(times) and times[index + 1] <= now:
                index += 1
            if index < 0 or (now >= valid_until[index] if step else now - times[index] > max_age):
                # no reading, or a stale one: the evaluator says so and nothing else happens (no halt of
                # scope "all" or unresolved transfer exists in a replay: simulated transfers settle at once)
                result.stale_ticks += 1
                if not self.fast and index >= 0:
                    stale = readings[index]
                    equity = stale.equity - self.recorded[index] + self._sim_before(stale.at)
                    self._apply(self._decide(_snapshot(policy, login, stale, equity), now), now, equity)
                    usage = None
                continue
            reading = readings[index]
            if step:  # the curve's value at `now`, read now
                reading = Reading(now, reading.equity, reading.balance, reading.margin, reading.margin_level)
            equity = reading.equity - self.recorded[index] + self._sim_before(reading.at)
            if equity <= 0:
                result.fell_to_zero = (reading.at, equity)
                break
            was_below = below is not None and equity < below
            if usage is None:
                usage, safe_from = book.usage(now), None
            if (self.fast and usage.last_transfer is not None
                    and reading.at <= usage.last_transfer[1] + MAX_CLOCK_SKEW):
                continue  # reading_predates_transfer: not acted on, not a peak
            in_band = not was_below and (above is None or equity <= above)
            snapshot = None
            if self.fast and in_band and usage.halt is None and usage.unresolved is None:
                # the evaluator would say "nothing to do" unless the kill switch trips now (not when latched)
                quiet = usage.top_up_halt is not None
                if not quiet:
                    if usage.peak_equity != book.peak:
                        usage, safe_from = replace(usage, peak_equity=book.peak), None
                    # the switch's only equity-dependent test is the drawdown, which falls as equity rises: with
                    # the same usage, an equity at or above one that did not trip does not trip either
                    quiet = safe_from is not None and equity >= safe_from
                    if not quiet:
                        snapshot = _snapshot(policy, login, reading, equity)
                        quiet = _kill_switch(policy, snapshot, usage) is None
                        if quiet:
                            safe_from = equity
                if quiet:
                    book.note_equity(equity)  # the only effect of a "nothing to do" decision: the peak
                    continue
            self._apply(self._decide(snapshot or _snapshot(policy, login, reading, equity), now), now, equity)
            usage = None
        return result

    def _apply(self, decision: Decision, now: datetime, equity: Decimal) -> None:
        """What the engine records after a decision: the peak, a kill-switch halt, the transfer."""
        if decision.bound_by not in NOT_A_PEAK:
            self.book.note_equity(equity)
        if decision.bound_by is not None and decision.bound_by not in NOT_A_CAP:
            self.result.caps_bound[decision.bound_by] += 1
        if decision.kill_switch:
            self.book.add_halt(HaltRecord(self.book.next_halt_id(), "kill_switch", "top_up", decision.kill_switch,
                                          now))
            self.result.kill_switch_trips.append((now, decision.kill_switch))
        if decision.transfers:
            self._transfer(decision, now, equity)

    def _decide(self, snapshot: Snapshot, now: datetime) -> Decision:
        """As the engine decides: the broker's limits and the funding balance are read only when the reading
        is outside the band (an idle tick reads none of this)."""
        policy = self.policy
        usage = self.book.usage(now)
        equity = snapshot.equity
        needs_broker = ((policy.top_up is not None and equity < policy.top_up.when_equity_below)
                        or (policy.sweep is not None and equity > policy.sweep.when_equity_above))
        if not needs_broker or usage.unresolved:
            return evaluate(policy, snapshot, usage, now)
        limits = self.broker
        if limits.daily_count is not None:
            used = self.daily[now.date().isoformat()]
            limits = BrokerLimits(limits.min_amount, limits.max_amount, limits.daily_count,
                                  limits.daily_count - used)
        return evaluate(policy, snapshot, usage, now, funding_balance=self.funding, broker=limits)

    def _transfer(self, decision: Decision, now: datetime, equity: Decimal) -> None:
        assert decision.amount is not None
        amount, kind = decision.amount, decision.action
        ident = len(self.result.transfers) + 1
        self.book.add_transfer(TransferRecord(ident, kind, "pending", amount, now, now))
        self.book.set_state(ident, "confirmed", now)  # settles at once; the peak shifts as in the engine
        self.result.transfers.append(SimTransfer(now, kind, amount, equity, decision.reason, decision.bound_by))
        signed = amount if kind == "top_up" else -amount
        self.sim_offset += signed
        self.sim_times.append(now)
        self.sim_cum.append(self.sim_offset)
        self.daily[now.date().isoformat()] += 1
        self.funding -= signed
        if self.result.funding_start is not None:
            low = self.result.lowest_funding_balance
            self.result.lowest_funding_balance = self.funding if low is None else min(low, self.funding)


def _valid_until(readings: list[Reading], gaps: list[datetime]) -> list[datetime]:
    """For a step curve: each reading holds until the first gap after it (or for ever)."""
    out = []
    for reading in readings:
        index = bisect_right(gaps, reading.at)
        out.append(gaps[index] if index < len(gaps) else datetime.max.replace(tzinfo=UTC))
    return out


def _recorded_offsets(history: History, start: datetime) -> list[Decimal]:
    """For each reading, the recorded transfers settled at or after `start` and before the reading."""
    moved = sorted((t for t in history.transfers if t.at >= start), key=lambda t: t.at)
    out: list[Decimal] = []
    total, j = ZERO, 0
    for reading in history.readings:
        while j < len(moved) and moved[j].at < reading.at:
            total += moved[j].amount if moved[j].kind == "top_up" else -moved[j].amount
            j += 1
        out.append(total)
    return out


def _snapshot(policy: Policy, login: str, reading: Reading, equity: Decimal) -> Snapshot:
    """The reading with the counterfactual equity: balance moves with it; margin is the trading's own."""
    delta = equity - reading.equity
    margin = reading.margin
    level = None
    if margin is not None:
        level = equity * 100 / margin if margin > 0 else ZERO
    return Snapshot(login=login, balance=(reading.balance + delta) if reading.balance is not None
                    else equity, equity=equity, margin=margin,
                    margin_free=equity - margin if margin is not None else None, margin_level=level,
                    currency=policy.currency, positions=None, connected=True, taken_at=reading.at,
                    source="backtest")
