"""One evaluation of one policy: a pure function of the policy, a reading, the ledger's usage and `now`.

No clock, no database, no network. Every 'why' (the rule that fired, the cap that bound, the reason for doing
nothing) is in the Decision, so that it can be recorded and shown to an operator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal

from agent import money
from agent.equity.base import Snapshot
from agent.policy.model import WINDOWS, KindLimits, Policy
from agent.timeutil import fmt_duration, iso

ZERO = Decimal(0)
MAX_FAILURE_BACKOFF = timedelta(hours=1)
# A reading dated later than now by more than this is refused (a terminal or EA whose clock runs ahead would
# otherwise shadow every later, correct reading).
MAX_CLOCK_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class KindUsage:
    """Transfers of one kind for one account, counting pending, sent and unknown ones (pessimistic)."""

    recent: tuple[tuple[datetime, Decimal], ...] = ()  # (created_at, amount) within the longest rolling window
    total_count: int = 0
    total_amount: Decimal = ZERO
    last_at: datetime | None = None  # newest transfer of this kind not known to have failed
    failures: int = 0  # failed attempts in a row since the last one that moved money (NotSent excluded)
    last_failure_at: datetime | None = None
    last_failure: str | None = None  # its error code

    def retry_after(self) -> datetime | None:
        """After n failures in a row, wait 1m, 2m, 4m ... up to 1h: a persistent error never loops hot."""
        if not self.failures or self.last_failure_at is None:
            return None
        return self.last_failure_at + min(MAX_FAILURE_BACKOFF, timedelta(minutes=2 ** (self.failures - 1)))

    def window(self, name: str, now: datetime) -> tuple[int, Decimal]:
        """(count, amount) in a rolling window. A transfer exactly `length` old is outside: (now-length, now]."""
        length = WINDOWS[name]
        if length is None:
            return self.total_count, self.total_amount
        inside = [amount for at, amount in self.recent if now - at < length]
        return len(inside), sum(inside, ZERO)


@dataclass(frozen=True)
class Usage:
    top_up: KindUsage = KindUsage()
    sweep: KindUsage = KindUsage()
    consecutive_top_ups: int = 0  # top-ups since the last sweep (and since the last kill-switch resume)
    net_top_up: Decimal = ZERO  # all top-ups minus all sweeps (since the last kill-switch resume)
    peak_equity: Decimal | None = None
    top_up_halt: str | None = None  # reason, when top-ups of this account are halted
    halt: str | None = None  # reason, when everything on this account is halted (transfers of both kinds)
    unresolved: str | None = None  # a transfer whose outcome is not proven blocks the account
    last_transfer: tuple[int, datetime] | None = None  # (id, when it was confirmed) of the newest confirmed one


@dataclass(frozen=True)
class BrokerLimits:
    """The broker's live limits (website_status, get_limits); None where not known."""

    min_amount: Decimal | None = None
    max_amount: Decimal | None = None
    daily_count: int | None = None
    daily_available: int | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # "top_up" | "sweep" | "none"
    amount: Decimal | None
    reason: str
    bound_by: str | None = None  # the cap that bound (or stopped) the amount
    kill_switch: str | None = None  # set when the kill switch trips now: the engine writes the halt
    details: dict[str, str] = field(default_factory=dict)

    @property
    def transfers(self) -> bool:
        return self.action in ("top_up", "sweep") and self.amount is not None


def _fmt(amount: Decimal, currency: str) -> str:
    return money.fmt(money.round_down(amount, currency), currency)


def _kill_switch(policy: Policy, snapshot: Snapshot, usage: Usage) -> str | None:
    ks = policy.kill_switch
    cur = policy.currency
    if ks.consecutive_top_ups is not None and usage.consecutive_top_ups >= ks.consecutive_top_ups:
        return (f"kill switch: {usage.consecutive_top_ups} top-ups with no sweep between them "
                f"(consecutive_top_ups {ks.consecutive_top_ups})")
    if ks.net_top_up_above is not None and usage.net_top_up > ks.net_top_up_above:
        return (f"kill switch: net top-ups {_fmt(usage.net_top_up, cur)} above net_top_up_above "
                f"{_fmt(ks.net_top_up_above, cur)}")
    if ks.equity_drawdown_pct is not None and usage.peak_equity and usage.peak_equity > 0:
        drawdown = (usage.peak_equity - snapshot.equity) * 100 / usage.peak_equity
        if drawdown >= ks.equity_drawdown_pct:
            return (f"kill switch: equity {_fmt(snapshot.equity, cur)} is {drawdown:.2f}% below its peak "
                    f"{_fmt(usage.peak_equity, cur)} (equity_drawdown_pct {ks.equity_drawdown_pct})")
    return None


def _backing_off(what: str, usage: KindUsage, now: datetime) -> str | None:
    until = usage.retry_after()
    if until is None or now >= until:
        return None
    return (f"{usage.failures} failed {what} attempt(s) in a row (last: {usage.last_failure}); "
            f"next try after {iso(until)}")


def _apply_caps(wanted: Decimal, caps: list[tuple[str, Decimal, str]], currency: str
                ) -> tuple[Decimal, str | None, str | None]:
    """Cut `wanted` to the smallest cap. Returns (amount, name of the binding cap, its explanation)."""
    amount, bound, why = wanted, None, None
    for name, cap, explanation in caps:
        cap = max(cap, ZERO)
        if cap < amount:
            amount, bound, why = cap, name, explanation
    return money.round_down(amount, currency), bound, why


def usage_details(policy: Policy, usage: Usage, now: datetime) -> dict[str, str]:
    """'top_up.per_24h' -> '1 transfers, 550.00 USD used; limit count 3, amount 2000.00' for every window."""
    cur = policy.currency
    out: dict[str, str] = {}
    for kind, limits, kind_usage in (("top_up", policy.limits.top_up, usage.top_up),
                                     ("sweep", policy.limits.sweep, usage.sweep)):
        for name in WINDOWS:
            count, amount = kind_usage.window(name, now)
            text = f"{count} transfers, {_fmt(amount, cur)} {cur} used"
            window = limits.windows.get(name)
            if window is not None:
                bounds = ([f"count {window.count}"] if window.count is not None else []) + (
                    [f"amount {_fmt(window.amount, cur)}"] if window.amount is not None else [])
                text += f"; limit {', '.join(bounds)}"
            out[f"{kind}.{name}"] = text
    return out


def _window_caps(kind: str, limits: KindLimits, usage: KindUsage, now: datetime,
                 cur: str) -> tuple[list[tuple[str, Decimal, str]], str | None]:
    """Amount caps from the policy's rolling windows, or a reason why a count window is full."""
    caps: list[tuple[str, Decimal, str]] = []
    for name in WINDOWS:
        window = limits.windows.get(name)
        count, amount = usage.window(name, now)
        if window is None:
            continue
        if window.count is not None and count >= window.count:
            return caps, f"limits.{kind}.{name}.count {window.count} reached: {count} used"
        if window.amount is not None:
            left = window.amount - amount
            caps.append((f"limits.{kind}.{name}.amount", left,
                         f"{name} amount cap {_fmt(window.amount, cur)} reached: {_fmt(amount, cur)} used, "
                         f"{_fmt(max(left, ZERO), cur)} left"))
    return caps, None


def _broker_caps(broker: BrokerLimits, cur: str) -> tuple[list[tuple[str, Decimal, str]], str | None]:
    caps: list[tuple[str, Decimal, str]] = []
    if broker.daily_available is not None and broker.daily_available <= 0:
        return caps, f"broker daily MT5 transfer count {broker.daily_count} used up for today (UTC)"
    if broker.max_amount is not None:
        caps.append(("broker.max_amount", broker.max_amount,
                     f"broker per-transfer maximum {_fmt(broker.max_amount, cur)}"))
    return caps, None


def evaluate(policy: Policy, snapshot: Snapshot | None, usage: Usage, now: datetime, *,
             no_reading: str | None = None, funding_balance: Decimal | None = None,
             funding_in_flight: Decimal = ZERO, broker: BrokerLimits = BrokerLimits()) -> Decision:
    """Decide what to do for one account now. `funding_balance` None means it was not read (no top-up);
    `funding_in_flight` is every unresolved top-up from the same funding account, counted as already paid."""
    cur = policy.currency
    if usage.unresolved:
        return Decision("none", None, f"blocked: {usage.unresolved}", bound_by="unresolved")
    if usage.halt:
        return Decision("none", None, f"account halted: {usage.halt}", bound_by="halt")
    if snapshot is None:
        return Decision("none", None, f"no equity reading: {no_reading or 'source gave nothing'}",
                        bound_by="no_reading")
    details = {"equity": str(snapshot.equity), "equity_taken_at": iso(snapshot.taken_at),
               "equity_age_s": str(int((now - snapshot.taken_at).total_seconds())),
               **usage_details(policy, usage, now)}
    age = now - snapshot.taken_at
    if age > policy.schedule.max_equity_age:
        return Decision("none", None, f"equity reading is {fmt_duration(age)} old, older than max_equity_age "
                        f"{fmt_duration(policy.schedule.max_equity_age)}", bound_by="stale", details=details)
    if snapshot.taken_at > now + MAX_CLOCK_SKEW:
        return Decision("none", None, f"equity reading is dated {iso(snapshot.taken_at)}, "
                        f"{fmt_duration(snapshot.taken_at - now)} in the future (more than the "
                        f"{fmt_duration(MAX_CLOCK_SKEW)} clock skew allowed): reading refused",
                        bound_by="future_reading", details=details)
    # A terminal clock up to MAX_CLOCK_SKEW ahead is accepted, so a reading's stamp may be that much later than
    # when it was taken: it proves it shows a transfer only when it is stamped later than that by more.
    if usage.last_transfer is not None and snapshot.taken_at <= usage.last_transfer[1] + MAX_CLOCK_SKEW:
        transfer_id, settled_at = usage.last_transfer
        return Decision("none", None, f"waiting for a reading newer than transfer {transfer_id} (settled "
                        f"{iso(settled_at)}); this reading was taken {iso(snapshot.taken_at)} and does not show it",
                        bound_by="reading_predates_transfer", details=details)
    if not snapshot.connected:
        return Decision("none", None, "terminal not connected to the trade server: reading not used",
                        bound_by="no_reading", details=details)
    if snapshot.currency != cur:
        return Decision("none", None, f"account currency {snapshot.currency} does not match the policy's {cur}",
                        bound_by="currency", details=details)
    equity = snapshot.equity
    tripped = _kill_switch(policy, snapshot, usage) if usage.top_up_halt is None else None

    if policy.top_up is not None and equity < policy.top_up.when_equity_below:
        rule = policy.top_up
        fired = f"equity {_fmt(equity, cur)} below {_fmt(rule.when_equity_below, cur)}"
        halt = usage.top_up_halt or tripped
        if halt:
            return Decision("none", None, f"{fired}; top-ups halted: {halt}", bound_by="halt",
                            kill_switch=tripped, details=details)
        if rule.cooldown and usage.top_up.last_at is not None and now - usage.top_up.last_at < rule.cooldown:
            until = usage.top_up.last_at + rule.cooldown
            return Decision("none", None, f"{fired}; top_up.cooldown {fmt_duration(rule.cooldown)} until "
                            f"{iso(until)}", bound_by="top_up.cooldown", details=details)
        if (backoff := _backing_off("top-up", usage.top_up, now)) is not None:
            return Decision("none", None, f"{fired}; {backoff}", bound_by="failure_backoff", details=details)
        decision = _sized("top_up", fired, rule.target_equity - equity, rule.min_amount, rule.max_amount,
                          policy, usage, now, funding_balance, broker, details, snapshot, funding_in_flight)
        if decision.bound_by == "kill_switch.net_top_up_above" and not decision.transfers:
            # the latch is a cap: the top-up that would cross it was cut; none fits any more, so it trips now
            assert policy.kill_switch.net_top_up_above is not None
            decision = replace(decision, kill_switch=(
                f"kill switch: net top-ups {_fmt(usage.net_top_up, cur)} leave no room under net_top_up_above "
                f"{_fmt(policy.kill_switch.net_top_up_above, cur)} for another top-up"))
        return decision

    if policy.sweep is not None and equity > policy.sweep.when_equity_above:
        sweep = policy.sweep
        fired = f"equity {_fmt(equity, cur)} above {_fmt(sweep.when_equity_above, cur)}"
        if sweep.cooldown and usage.sweep.last_at is not None and now - usage.sweep.last_at < sweep.cooldown:
            until = usage.sweep.last_at + sweep.cooldown
            return Decision("none", None, f"{fired}; sweep.cooldown {fmt_duration(sweep.cooldown)} until "
                            f"{iso(until)}", bound_by="sweep.cooldown", kill_switch=tripped, details=details)
        if (backoff := _backing_off("sweep", usage.sweep, now)) is not None:
            return Decision("none", None, f"{fired}; {backoff}", bound_by="failure_backoff", kill_switch=tripped,
                            details=details)
        decision = _sized("sweep", fired, equity - sweep.target_equity, sweep.min_amount, sweep.max_amount,
                          policy, usage, now, funding_balance, broker, details, snapshot)
        if tripped:
            decision = Decision(decision.action, decision.amount, decision.reason, decision.bound_by, tripped,
                                decision.details)
        return decision

    bands = []
    if policy.top_up is not None:
        bands.append(f"not below {_fmt(policy.top_up.when_equity_below, cur)}")
    if policy.sweep is not None:
        bands.append(f"not above {_fmt(policy.sweep.when_equity_above, cur)}")
    return Decision("none", None, f"equity {_fmt(equity, cur)} is {' and '.join(bands) or 'fine'}: nothing to do",
                    kill_switch=tripped, details=details)


def _sized(kind: str, fired: str, wanted: Decimal, min_amount: Decimal | None, max_amount: Decimal | None,
           policy: Policy, usage: Usage, now: datetime, funding_balance: Decimal | None, broker: BrokerLimits,
           details: dict[str, str], snapshot: Snapshot, funding_in_flight: Decimal = ZERO) -> Decision:
    cur = policy.currency
    limits = policy.limits.top_up if kind == "top_up" else policy.limits.sweep
    kind_usage = usage.top_up if kind == "top_up" else usage.sweep
    wanted = money.round_down(wanted, cur)
    details["wanted"] = _fmt(wanted, cur)
    caps: list[tuple[str, Decimal, str]] = []
    if max_amount is not None:
        caps.append((f"{kind}.max_amount", max_amount, f"{kind}.max_amount {_fmt(max_amount, cur)}"))
    window_caps, full = _window_caps(kind, limits, kind_usage, now, cur)
    if full:
        return Decision("none", None, f"{fired}; {full}", bound_by=full.split(" ")[0], details=details)
    caps += window_caps
    broker_caps, broker_full = _broker_caps(broker, cur)
    if broker_full:
        return Decision("none", None, f"{fired}; {broker_full}", bound_by="broker.daily_count", details=details)
    caps += broker_caps
    if kind == "top_up":
        if funding_balance is None:
            return Decision("none", None, f"{fired}; funding account balance unknown", bound_by="funding_balance",
                            details=details)
        reserve = policy.limits.funding_reserve
        details["funding_balance"] = _fmt(funding_balance, cur)
        in_flight = ""
        if funding_in_flight:
            details["funding_in_flight"] = _fmt(funding_in_flight, cur)
            in_flight = f" less {_fmt(funding_in_flight, cur)} of unresolved top-ups from it"
        caps.append(("limits.funding_reserve", funding_balance - funding_in_flight - reserve,
                     f"funding balance {_fmt(funding_balance, cur)}{in_flight} less reserve {_fmt(reserve, cur)}"))
        ks = policy.kill_switch
        if ks.net_top_up_above is not None:
            caps.append(("kill_switch.net_top_up_above", ks.net_top_up_above - usage.net_top_up,
                         f"net top-ups {_fmt(usage.net_top_up, cur)} of kill_switch.net_top_up_above "
                         f"{_fmt(ks.net_top_up_above, cur)}"))
    elif snapshot.margin_free is not None and snapshot.margin and snapshot.margin > 0:
        caps.append(("margin_free", snapshot.margin_free, f"free margin {_fmt(snapshot.margin_free, cur)}"))

    amount, bound, why = _apply_caps(wanted, caps, cur)
    floor = min_amount if min_amount is not None else Decimal(1).scaleb(-money.places(cur))
    if broker.min_amount is not None and broker.min_amount > floor:
        if amount < broker.min_amount:
            return Decision("none", None, f"{fired}; {_fmt(amount, cur)} is below the broker's per-transfer "
                            f"minimum {_fmt(broker.min_amount, cur)}" + (f" ({why})" if why else ""),
                            bound_by="broker.min_amount" if bound is None else bound, details=details)
    if amount < floor or amount <= 0:
        if bound is None:
            return Decision("none", None, f"{fired}; {_fmt(wanted, cur)} wanted is below {kind}.min_amount "
                            f"{_fmt(floor, cur)}", bound_by=f"{kind}.min_amount", details=details)
        return Decision("none", None, f"{fired}; {why}, {_fmt(wanted, cur)} wanted, {_fmt(amount, cur)} allowed "
                        f"< {kind}.min_amount {_fmt(floor, cur)}", bound_by=bound, details=details)
    if kind == "sweep" and policy.sweep and policy.sweep.min_margin_level is not None and snapshot.margin:
        level_after = (snapshot.equity - amount) * 100 / snapshot.margin
        if level_after < policy.sweep.min_margin_level:
            return Decision("none", None, f"{fired}; margin level after sweeping {_fmt(amount, cur)} would be "
                            f"{level_after:.2f}%, below sweep.min_margin_level {policy.sweep.min_margin_level}%",
                            bound_by="sweep.min_margin_level", details=details)
    verb = "top up" if kind == "top_up" else "sweep"
    target = policy.top_up.target_equity if kind == "top_up" and policy.top_up else (
        policy.sweep.target_equity if policy.sweep else ZERO)
    reason = f"{fired}: {verb} {_fmt(amount, cur)} toward target {_fmt(target, cur)}"
    if bound:
        reason += f" (capped from {_fmt(wanted, cur)} by {why})"
    return Decision(kind, amount, reason, bound_by=bound, details=details)
