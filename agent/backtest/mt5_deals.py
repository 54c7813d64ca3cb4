"""`mt5:ACCOUNT`: the account's deal history through the MT5 probe (history_deals_get), as a balance curve.

Every deal moves the balance by profit + commission + swap + fee. Balance deals (DEAL_TYPE_BALANCE) are the
deposits and withdrawals that really happened: they are the recorded transfers the replay swaps out. The curve
is anchored on the terminal's current balance. Floating P/L (open positions) is not in a deal history, so the
simulated equity is a balance: the output says so.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.backtest.sources import History, Reading, RecordedTransfer, SourceError
from agent.config import Config
from agent.equity.base import NoReading
from agent.timeutil import Clock

DEAL_TYPE_BALANCE = 2
NO_FLOATING_PL = ("mt5: a balance curve from the deal history: floating P/L of open positions is absent, so "
                  "equity here is the balance after each deal")


def _number(deal: dict[str, Any], key: str) -> Decimal:
    try:
        value = Decimal(str(deal.get(key) or 0))
    except InvalidOperation:
        raise SourceError([f"mt5: deal {deal.get('ticket')}: {key} {deal.get(key)!r} is not a number"]) from None
    return value.quantize(Decimal("0.01")) if value.is_finite() else Decimal(0)


def _msc(deal: dict[str, Any]) -> int:
    return int(deal.get("time_msc") or 0) or int(deal.get("time") or 0) * 1000


def curve(deals: list[dict[str, Any]], balance: Decimal, places: int = 2) -> History:
    """The balance after each deal (anchored so that the last equals `balance`) and the balance deals."""
    unit = Decimal(1).scaleb(-places)
    ordered = sorted(deals, key=lambda d: (_msc(d), int(d.get("ticket") or 0)))
    moves = [sum((_number(d, k) for k in ("profit", "commission", "swap", "fee")), Decimal(0)).quantize(unit)
             for d in ordered]
    running = balance - sum(moves, Decimal(0))  # the balance before the first deal in the range
    by_time: dict[datetime, Decimal] = {}
    transfers = []
    for deal, move in zip(ordered, moves, strict=True):
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=_msc(deal))
        running += move
        by_time[at] = running  # deals in the same millisecond: the balance after the last of them
        if int(deal.get("type", -1)) == DEAL_TYPE_BALANCE and move:
            # the reading at `at` shows it: it settled just before
            transfers.append(RecordedTransfer(at - timedelta(microseconds=1), "top_up" if move > 0 else "sweep",
                                              abs(move)))
    readings = [Reading(at, value, balance=value) for at, value in sorted(by_time.items())]
    return History(label="mt5 deal history", readings=readings, transfers=transfers, notes=[NO_FLOATING_PL],
                   step=True)


def read_mt5(config: Config, account: str, since: datetime | None, until: datetime | None) -> History:
    if config.equity.source != "mt5":
        raise SourceError([f"mt5:{account}: needs `equity: {{source: mt5, terminals: ...}}` in the configuration "
                           f"(it is {config.equity.source})"])
    from agent.equity.mt5 import _describe
    from agent.wiring import make_source

    source: Any = make_source(config, Clock())
    try:
        try:
            snapshot = source.read(account)  # starts and initializes the probe
            reply = source.probes[account].request(
                # up to now whatever --until says: the curve is anchored on today's balance
                {"op": "deals", "from": int(since.timestamp()) if since else 0,
                 "to": int(datetime.now(UTC).timestamp()) + 86400},
                source.deadline)
        except NoReading as exc:
            raise SourceError([f"mt5:{account}: {exc}"]) from None
    finally:
        source.close()
    if not reply.get("ok"):
        raise SourceError([f"mt5:{account}: {_describe(reply)}"])
    deals = reply.get("deals") or []
    if not deals:
        raise SourceError([f"mt5:{account}: no deals in the range"])
    history = curve(deals, snapshot.balance)
    history.label, history.account, history.currency = f"mt5:{account}", account, snapshot.currency or None
    return history
