"""The window accounting behind `Usage`, in memory: one account's transfers, halts and equity peak.

This is the only implementation of the rules that turn a ledger into a `Usage` (rolling windows, totals, the
failure tail, consecutive top-ups since the last sweep, net top-up since the last kill-switch resume, the newest
confirmed transfer). `agent.ledger.queries.usage` loads an account's rows and folds them through a book; the
backtest keeps a book per replay and feeds it the transfers it simulates.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from agent import money
from agent.policy.evaluate import KindUsage, Usage
from agent.timeutil import iso

COUNTED_STATES = frozenset({"pending", "sent", "confirmed", "unknown"})  # everything that may have moved money
UNRESOLVED_STATES = frozenset({"pending", "sent", "unknown"})
# failed without a refusal from the broker (the agent stopped before sending, or the statement proved the
# request never executed): not a persistent broker error, so no back-off
NO_BROKER_ERROR = ("NotSent", "NotExecuted")
FAILURE_LOOKBACK = 12  # 2^11 minutes is past the 1 h cap: more failures in a row change nothing
RECENT = timedelta(days=7)  # the longest rolling window (WINDOWS): older rows only count in totals
ZERO = Decimal(0)


@dataclass
class TransferRecord:
    id: int
    kind: str  # top_up | sweep
    state: str
    amount: Decimal
    created_at: datetime
    updated_at: datetime
    error_code: str | None = None


@dataclass
class HaltRecord:
    id: int
    kind: str  # operator | kill_switch | unresolved | operator_needed
    scope: str  # top_up | all
    reason: str
    created_at: datetime
    cleared_at: datetime | None = None


@dataclass(frozen=True)
class _Settled:
    """The part of a Usage that does not depend on `now` (recomputed only after a change)."""

    top_up: KindUsage
    sweep: KindUsage
    recent: dict[str, tuple[list[datetime], list[tuple[datetime, Decimal]]]]
    rest: Usage


class UsageBook:
    """One account's ledger, in memory. Rows are added in id order (ids only grow, as in the database)."""

    def __init__(self, currency: str = "USD") -> None:
        self.currency = currency
        self.transfers: dict[int, TransferRecord] = {}  # insertion (= id) order
        self.halts: dict[int, HaltRecord] = {}
        self.peak: Decimal | None = None
        self._settled: _Settled | None = None

    # ---- changes ----

    def add_transfer(self, record: TransferRecord) -> None:
        if self.transfers and record.id <= next(reversed(self.transfers)):
            raise ValueError(f"transfer {record.id} added after a newer one")
        self.transfers[record.id] = record
        self._settled = None

    def set_state(self, transfer_id: int, state: str, updated_at: datetime, error_code: str | None = None,
                  shift_peak: bool = True) -> None:
        """A transition. Confirming shifts the peak as the engine's transition does (a sweep lowers it, a
        top-up raises it: the drawdown kill switch measures trading, not our own transfers)."""
        record = self.transfers[transfer_id]
        record.state, record.updated_at, record.error_code = state, updated_at, error_code
        if state == "confirmed" and shift_peak and self.peak is not None:
            self.peak += record.amount if record.kind == "top_up" else -record.amount
        self._settled = None

    def add_halt(self, halt: HaltRecord) -> None:
        self.halts[halt.id] = halt
        self._settled = None

    def next_halt_id(self) -> int:
        return max(self.halts, default=0) + 1

    def clear_halts(self, at: datetime, kind: str | None = None) -> None:
        """`resume` (kind None) clears every halt; after a kill-switch halt is cleared, the drawdown is measured
        from the next peak."""
        cleared = [h for h in self.halts.values() if h.cleared_at is None and (kind is None or h.kind == kind)]
        for halt in cleared:
            halt.cleared_at = at
        if any(h.kind == "kill_switch" for h in cleared):
            self.peak = None
        self._settled = None

    def note_equity(self, equity: Decimal) -> None:
        if self.peak is None or equity > self.peak:
            self.peak = equity  # read directly by usage(): nothing cached to drop

    # ---- the accounting ----

    def blocked(self) -> str | None:
        """Why the account is blocked by an unresolved transfer (None: it is not)."""
        return (self._settled or self._settle()).rest.unresolved

    def usage(self, now: datetime) -> Usage:
        """What this ledger says about the account at `now`, counting unresolved transfers as if they happened."""
        settled = self._settled or self._settle()
        start = now - RECENT
        kinds = {}
        for kind, base in (("top_up", settled.top_up), ("sweep", settled.sweep)):
            times, rows = settled.recent[kind]
            # created_at > now - 7d, as the window query reads it
            recent = tuple(rows[bisect_right(times, start):])
            kinds[kind] = KindUsage(recent=recent, total_count=base.total_count, total_amount=base.total_amount,
                                    last_at=base.last_at, failures=base.failures,
                                    last_failure_at=base.last_failure_at, last_failure=base.last_failure)
        rest = settled.rest
        return Usage(top_up=kinds["top_up"], sweep=kinds["sweep"], consecutive_top_ups=rest.consecutive_top_ups,
                     net_top_up=rest.net_top_up, peak_equity=self.peak, top_up_halt=rest.top_up_halt,
                     halt=rest.halt, unresolved=rest.unresolved, last_transfer=rest.last_transfer)

    def _exact(self, amount: Decimal) -> Decimal:
        """Sums carry the currency's scale (0 -> 0.00), as amounts read from minor units do."""
        return money.quantize(amount, self.currency)

    def _settle(self) -> _Settled:
        rows = list(self.transfers.values())  # id order
        counted = [r for r in rows if r.state in COUNTED_STATES]
        newest = rows[::-1][:FAILURE_LOOKBACK * 2]
        kinds: dict[str, KindUsage] = {}
        recent: dict[str, tuple[list[datetime], list[tuple[datetime, Decimal]]]] = {}
        for kind in ("top_up", "sweep"):
            mine = [r for r in counted if r.kind == kind]
            failures, last_failure = _failure_tail(newest, kind)
            kinds[kind] = KindUsage(
                total_count=len(mine), total_amount=self._exact(sum((r.amount for r in mine), ZERO)),
                last_at=max((r.created_at for r in mine), default=None), failures=failures,
                last_failure_at=last_failure.updated_at if last_failure else None,
                last_failure=last_failure.error_code if last_failure else None)
            ordered = sorted(mine, key=lambda r: (r.created_at, r.id))
            recent[kind] = ([r.created_at for r in ordered], [(r.created_at, r.amount) for r in ordered])
        confirmed_sweeps = [r for r in rows if r.kind == "sweep" and r.state == "confirmed"]
        last_sweep_id = max((r.id for r in confirmed_sweeps), default=None)
        resumed = max((h.cleared_at for h in self.halts.values()
                       if h.kind == "kill_switch" and h.cleared_at is not None), default=None)
        since = [r for r in counted if r.kind == "top_up" and (last_sweep_id is None or r.id > last_sweep_id)
                 and (resumed is None or r.created_at > resumed)]
        if resumed is None:
            net = kinds["top_up"].total_amount - sum((r.amount for r in confirmed_sweeps), ZERO)
        else:
            net = (sum((r.amount for r in counted if r.kind == "top_up" and r.created_at > resumed), ZERO)
                   - sum((r.amount for r in confirmed_sweeps if r.created_at > resumed), ZERO))
        net = self._exact(net)
        active = sorted((h for h in self.halts.values() if h.cleared_at is None), key=lambda h: h.id)
        halt_reason = "; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in active) or None
        all_reason = "; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in active
                               if h.scope == "all") or None
        open_rows = [r for r in rows if r.state in UNRESOLVED_STATES]
        blocked = None
        if open_rows:
            t = open_rows[0]
            blocked = (f"transfer {t.id} ({t.kind} {money.fmt(t.amount, self.currency)}) is {t.state}; "
                       "resolve it with `fund-agent reconcile` or `fund-agent resolve`")
        confirmed = [r for r in rows if r.state == "confirmed"]
        last = max(confirmed, key=lambda r: (r.updated_at, r.id), default=None)
        rest = Usage(consecutive_top_ups=len(since), net_top_up=net, top_up_halt=halt_reason, halt=all_reason,
                     unresolved=blocked, last_transfer=(last.id, last.updated_at) if last else None)
        self._settled = _Settled(kinds["top_up"], kinds["sweep"], recent, rest)
        return self._settled


def _failure_tail(newest: list[TransferRecord], kind: str) -> tuple[int, TransferRecord | None]:
    """Failed attempts of `kind` since its newest attempt that may have moved money; rows are newest first."""
    failures = []
    for row in newest:
        if row.kind != kind:
            continue
        if row.state != "failed":
            break
        if row.error_code not in NO_BROKER_ERROR:
            failures.append(row)
    return len(failures), (failures[0] if failures else None)
