"""MemoryBroker: Deriv's two-leg MT5 transfers, rules, faults and paging, in memory; and it is thread-safe."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import money
from agent.broker.base import Broker
from agent.broker.deriv import DerivClient
from agent.broker.errors import BadReply, BrokerError, LostReply, NotSent
from agent.broker.memory import MemoryBroker
from agent.timeutil import Clock, ManualClock

FUNDING = "CR4000128"
MT5 = "MTR130002534"
START = datetime(2025, 3, 3, 12, 0, 0, tzinfo=UTC)
FAR = 9_999_999_999


def make(funding: str = "1000.00", mt5: str = "450.00", **kwargs: Any) -> tuple[MemoryBroker, ManualClock]:
    clock = ManualClock(START)
    broker = MemoryBroker(clock, **kwargs)
    broker.add_account(FUNDING, "USD", funding)
    broker.add_account(MT5, "USD", mt5, mt5=True)
    return broker, clock


def rows(broker: MemoryBroker, **kwargs: Any) -> list[dict[str, Any]]:
    return broker.statement(0, FAR, **kwargs)


def test_it_is_a_broker_as_deriv_client_is() -> None:
    assert isinstance(MemoryBroker(), Broker)
    assert isinstance(DerivClient("ws://127.0.0.1:9/websockets/v3", 1089, "token"), Broker)


def test_connect_close_and_calls_reconnect() -> None:
    broker, _ = make()
    assert not broker.connected
    session = broker.connect()
    assert broker.connected and session.loginid == FUNDING and session.currency == "USD"
    broker.close()
    assert not broker.connected
    assert broker.balance() == (Decimal("1000.00"), "USD")
    assert broker.connected


def test_deposit_debits_and_writes_the_row_at_once_the_mt5_credit_lands_later() -> None:
    broker, clock = make(deposit_credit_delay=timedelta(seconds=30))
    txn = broker.mt5_deposit(FUNDING, MT5, Decimal("20.00"))
    assert isinstance(txn, int)
    assert broker.balance(FUNDING) == (Decimal("980.00"), "USD")
    assert broker.balance_of(MT5) == Decimal("450.00")
    assert broker.mt5_get_settings(MT5) == {"login": MT5, "balance": Decimal("450.00"), "currency": "USD"}
    assert broker.in_flight() == 1
    assert rows(broker) == [{
        "action_type": "transfer", "amount": Decimal("-20.00"), "balance_after": Decimal("980.00"),
        "transaction_id": txn, "transaction_time": int(START.timestamp()), "app_id": 1089,
        "from": {"loginid": FUNDING}, "to": {"loginid": MT5}, "longcode": "Transfer to MT5 account 130002534",
        "reference_id": None, "contract_id": None, "payout": None, "shortcode": None}]
    clock.advance(timedelta(seconds=29))
    assert broker.balance_of(MT5) == Decimal("450.00")
    clock.advance(timedelta(seconds=1))
    assert broker.mt5_get_settings(MT5)["balance"] == Decimal("470.00")
    assert broker.in_flight() == 0
    assert broker.sent == [("mt5_deposit", FUNDING, MT5, Decimal("20.00"))]


def test_withdrawal_debits_mt5_at_once_the_funding_credit_and_row_land_later() -> None:
    broker, clock = make(withdrawal_credit_delay=timedelta(seconds=30))
    txn = broker.mt5_withdrawal(MT5, FUNDING, Decimal("50.00"))
    assert broker.balance_of(MT5) == Decimal("400.00")
    assert broker.balance(FUNDING)[0] == Decimal("1000.00")
    assert rows(broker) == [] and broker.transfers(FUNDING) == []
    assert broker.in_flight() == 1
    clock.advance(timedelta(hours=1))  # looked at long after it landed: stamped with when it landed
    [row] = rows(broker)
    assert row["amount"] == Decimal("50.00") and row["balance_after"] == Decimal("1050.00")
    assert row["transaction_id"] == txn
    assert row["transaction_time"] == int((START + timedelta(seconds=30)).timestamp())
    assert row["from"] == {"loginid": MT5} and row["to"] == {"loginid": FUNDING}
    assert row["longcode"] == "Transfer from MT5 account 130002534"
    assert broker.balance(FUNDING)[0] == Decimal("1050.00")
    assert broker.sent == [("mt5_withdrawal", MT5, FUNDING, Decimal("50.00"))]


def test_no_delay_means_both_legs_are_visible_at_once() -> None:
    broker, _ = make()
    broker.mt5_deposit(FUNDING, MT5, Decimal("100"))
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("25.50"))
    assert broker.balance_of(FUNDING) == Decimal("925.50")
    assert broker.balance_of(MT5) == Decimal("524.50")
    assert broker.in_flight() == 0
    assert [r["amount"] for r in broker.transfers(FUNDING)] == [Decimal("-100.00"), Decimal("25.50")]


def test_legs_land_in_due_order_and_settle_due_applies_them() -> None:
    broker, clock = make(deposit_credit_delay=timedelta(seconds=10), withdrawal_credit_delay=timedelta(seconds=5))
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("10.00"))
    clock.advance(timedelta(seconds=2))
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("20.00"))
    clock.advance(timedelta(minutes=1))
    assert broker.settle_due() == 2
    assert [(r["amount"], r["balance_after"]) for r in broker.transfers(FUNDING)] == [
        (Decimal("10.00"), Decimal("1010.00")), (Decimal("20.00"), Decimal("1030.00"))]
    assert broker.settle_due() == 0


# ---- the broker's rules ----


@pytest.mark.parametrize(("call", "args", "code"), [
    ("mt5_deposit", (FUNDING, MT5, Decimal("0.99")), "MT5DepositError"),
    ("mt5_deposit", (FUNDING, MT5, Decimal("2500.01")), "MT5DepositError"),
    ("mt5_deposit", (FUNDING, MT5, Decimal("10.001")), "MT5DepositError"),
    ("mt5_deposit", (FUNDING, MT5, Decimal("1000.01")), "NoMoney"),
    ("mt5_deposit", ("CR999", MT5, Decimal("10")), "PermissionDenied"),
    ("mt5_deposit", (MT5, MT5, Decimal("10")), "PermissionDenied"),
    ("mt5_deposit", (FUNDING, "MTR999", Decimal("10")), "MT5DepositError"),
    ("mt5_deposit", (FUNDING, "CREUR1", Decimal("10")), "MT5DepositError"),
    ("mt5_deposit", (FUNDING, "MTREUR1", Decimal("10")), "CurrencyShouldMatch"),
    ("mt5_withdrawal", (MT5, FUNDING, Decimal("0.50")), "MT5WithdrawalError"),
    ("mt5_withdrawal", (MT5, FUNDING, Decimal("450.01")), "MT5WithdrawalError"),
    ("mt5_withdrawal", (MT5, FUNDING, Decimal("1.234")), "MT5WithdrawalError"),
    ("mt5_withdrawal", ("MTR999", FUNDING, Decimal("10")), "MT5WithdrawalError"),
    ("mt5_withdrawal", (MT5, "CR999", Decimal("10")), "PermissionDenied"),
])
def test_refusals_have_derivs_codes_and_move_nothing(call: str, args: tuple[str, str, Decimal], code: str) -> None:
    broker, _ = make()
    broker.add_account("CREUR1", "EUR", "100.00")
    broker.add_account("MTREUR1", "EUR", "100.00", mt5=True)
    with pytest.raises(BrokerError) as err:
        getattr(broker, call)(*args)
    assert err.value.code == code and type(err.value) is BrokerError
    assert broker.balance_of(FUNDING) == Decimal("1000.00") and broker.balance_of(MT5) == Decimal("450.00")
    assert rows(broker) == [] and broker.in_flight() == 0
    assert broker.sent == [(call, args[0], args[1], args[2])]
    assert broker.get_limits()["daily_transfers"]["mt5"]["available"] == 6  # a refusal does not count


def test_a_float_amount_is_refused_before_sending() -> None:
    broker, _ = make()
    with pytest.raises(money.MoneyError):
        broker.mt5_deposit(FUNDING, MT5, 10.0)  # type: ignore[arg-type]
    assert broker.sent == []


def test_daily_count_per_funding_account_per_utc_day_both_kinds() -> None:
    broker, clock = make(daily_transfers=3)
    clock.advance(timedelta(hours=11, minutes=59))  # 23:59 UTC
    broker.mt5_deposit(FUNDING, MT5, Decimal("10"))
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("10"))
    assert broker.get_limits() == {"daily_transfers": {"mt5": {"allowed": 3, "available": 1}}}
    broker.mt5_deposit(FUNDING, MT5, Decimal("10"))
    with pytest.raises(BrokerError) as err:
        broker.mt5_withdrawal(MT5, FUNDING, Decimal("10"))
    assert err.value.code == "MaximumTransfers" and err.value.nothing_moved
    assert broker.get_limits()["daily_transfers"]["mt5"]["available"] == 0
    clock.advance(timedelta(minutes=1))  # midnight UTC: a new day
    assert broker.get_limits()["daily_transfers"]["mt5"]["available"] == 3
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("10"))
    assert len(rows(broker)) == 4


def test_balance_is_for_funding_accounts_only() -> None:
    broker, _ = make()
    assert broker.balance() == (Decimal("1000.00"), "USD")
    for loginid in (MT5, "CR999"):
        with pytest.raises(BrokerError) as err:
            broker.balance(loginid)
        assert err.value.code == "PermissionDenied"
    with pytest.raises(BrokerError) as err:
        broker.mt5_get_settings("MTR999")
    assert err.value.code == "MT5AccountInaccessible"


def test_website_status_and_limits() -> None:
    broker, _ = make(min_transfer=Decimal(5), max_transfer=Decimal(100))
    broker.add_account("CRBTC1", "BTC", "1")
    config = broker.website_status()["currencies_config"]
    assert set(config) == {"USD", "BTC"}
    assert config["USD"]["fractional_digits"] == 2 and config["BTC"]["fractional_digits"] == 8
    assert config["USD"]["transfer_between_accounts"]["limits_mt5"] == {"min": Decimal(5), "max": Decimal(100)}
    assert broker.get_limits() == {"daily_transfers": {"mt5": {"allowed": 6, "available": 6}}}


def test_adjust_is_trading_profit_and_loss() -> None:
    broker, _ = make()
    broker.adjust(MT5, Decimal("12.34"))
    assert broker.balance_of(MT5) == Decimal("462.34")
    broker.adjust(MT5, "-1000")
    assert broker.balance_of(MT5) == Decimal("0.00")


# ---- statement ----


def test_statement_pages_newest_first_with_inclusive_dates() -> None:
    broker, clock = make(daily_transfers=100)
    ids = []
    for i in range(12):
        ids.append(broker.mt5_deposit(FUNDING, MT5, Decimal(10 + i)))
        clock.advance(timedelta(minutes=1))
    everything = rows(broker)
    assert [r["transaction_id"] for r in everything] == ids[::-1]
    pages = [rows(broker, limit=5, offset=offset) for offset in (0, 5, 10, 15)]
    assert [len(p) for p in pages] == [5, 5, 2, 0]
    assert [r for p in pages for r in p] == everything
    assert broker.transfers(FUNDING) == everything[::-1]
    t0 = int(START.timestamp())
    window = broker.statement(t0 + 60, t0 + 180)
    assert [r["transaction_time"] for r in window] == [t0 + 180, t0 + 120, t0 + 60]
    assert broker.statement(0, FAR, action_type=None) == everything
    assert broker.statement(0, FAR, action_type="buy") == []
    assert broker.statement(0, FAR, loginid=FUNDING, limit=1) == everything[:1]
    assert broker.statement(0, FAR, limit=0) == []
    with pytest.raises(BrokerError) as err:
        broker.statement(0, FAR, loginid=MT5)
    assert err.value.code == "PermissionDenied"


def test_statement_rows_are_copies() -> None:
    broker, _ = make()
    broker.mt5_deposit(FUNDING, MT5, Decimal("10"))
    rows(broker)[0]["from"]["loginid"] = "tampered"
    assert rows(broker)[0]["from"] == {"loginid": FUNDING}


@pytest.mark.parametrize("kwargs", [{"limit": 1000}, {"limit": -1}, {"offset": -1}, {"action_type": "nonsense"}])
def test_statement_arguments_the_send_schema_refuses_are_not_sent(kwargs: dict[str, Any]) -> None:
    broker, _ = make()
    with pytest.raises(NotSent):
        broker.statement(0, FAR, **kwargs)


# ---- injected faults ----


def moved(broker: MemoryBroker) -> bool:
    return broker.balance_of(FUNDING) == Decimal("980.00") and broker.balance_of(MT5) == Decimal("470.00")


def untouched(broker: MemoryBroker) -> bool:
    return (broker.balance_of(FUNDING) == Decimal("1000.00") and broker.balance_of(MT5) == Decimal("450.00")
            and broker.transfers(FUNDING) == [])


@pytest.mark.parametrize(("mode", "error", "code", "applied"), [
    ("error", BrokerError, "InvalidLoginid", False),
    ("error_after_apply", BrokerError, "InvalidLoginid", True),
    ("lost_before_apply", LostReply, "ConnectionClosed", False),
    ("lost_after_apply", LostReply, "ConnectionClosed", True),
    ("malformed", BadReply, "MalformedReply", True),
    ("not_sent", NotSent, "NotSent", False),
])
def test_each_fault_mode_moves_money_or_not_and_is_one_shot(mode: str, error: type[BrokerError], code: str,
                                                           applied: bool) -> None:
    broker, _ = make()
    broker.inject("mt5_deposit", mode, code="InvalidLoginid")
    with pytest.raises(error) as err:
        broker.mt5_deposit(FUNDING, MT5, Decimal("20.00"))
    assert err.value.code == code
    assert moved(broker) if applied else untouched(broker)
    assert len(broker.sent) == (0 if mode == "not_sent" else 1)  # a request that never left was not received
    assert not broker.faults
    if mode in ("lost_before_apply", "lost_after_apply", "not_sent"):
        assert not broker.connected
    broker.mt5_deposit(FUNDING, MT5, Decimal("20.00"))  # the fault was used up; the call reconnects
    assert broker.connected
    assert len(rows(broker)) == (2 if applied else 1)


def test_late_apply_times_out_now_and_moves_the_money_later() -> None:
    broker, clock = make(withdrawal_credit_delay=timedelta(seconds=5))
    broker.inject("mt5_withdrawal", "late_apply", delay=timedelta(seconds=20))
    with pytest.raises(LostReply) as err:
        broker.mt5_withdrawal(MT5, FUNDING, Decimal("50.00"))
    assert err.value.code == "Timeout"
    assert broker.balance_of(MT5) == Decimal("450.00") and broker.in_flight() == 1
    clock.advance(timedelta(seconds=20))
    assert broker.balance_of(MT5) == Decimal("400.00")  # the first leg, when the request finally arrived
    assert broker.transfers(FUNDING) == [] and broker.in_flight() == 1
    clock.advance(timedelta(seconds=5))
    [row] = broker.transfers(FUNDING)
    assert row["amount"] == Decimal("50.00") and row["transaction_time"] == int(START.timestamp()) + 25
    assert broker.in_flight() == 0


def test_late_apply_checks_the_rules_when_it_arrives_and_then_nothing_moves() -> None:
    broker, clock = make(daily_transfers=2)
    broker.inject("mt5_deposit", "late_apply", delay=timedelta(seconds=10))
    with pytest.raises(LostReply):
        broker.mt5_deposit(FUNDING, MT5, Decimal("600.00"))
    broker.mt5_deposit(FUNDING, MT5, Decimal("500.00"))  # leaves too little for the late one
    clock.advance(timedelta(seconds=10))
    assert broker.balance_of(FUNDING) == Decimal("500.00") and broker.in_flight() == 0
    assert len(broker.transfers(FUNDING)) == 1
    assert broker.get_limits()["daily_transfers"]["mt5"]["available"] == 1  # refused: it did not count


def test_late_apply_refused_by_the_daily_count_when_it_arrives() -> None:
    broker, clock = make(daily_transfers=1)
    broker.inject("mt5_deposit", "late_apply", delay=timedelta(seconds=10))
    with pytest.raises(LostReply):
        broker.mt5_deposit(FUNDING, MT5, Decimal("10.00"))
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("10.00"))  # uses the day's only transfer first
    clock.advance(timedelta(seconds=10))
    assert broker.balance_of(FUNDING) == Decimal("1010.00") and broker.balance_of(MT5) == Decimal("440.00")


def test_faults_are_per_call_name_and_in_order() -> None:
    broker, _ = make()
    broker.inject("mt5_withdrawal", "error", code="A")
    broker.inject("mt5_deposit", "error", code="B")
    broker.inject("mt5_deposit", "error", code="C")
    codes = []
    for _ in range(2):
        with pytest.raises(BrokerError) as err:
            broker.mt5_deposit(FUNDING, MT5, Decimal("10"))
        codes.append(err.value.code)
    assert codes == ["B", "C"]
    broker.mt5_deposit(FUNDING, MT5, Decimal("10"))
    assert [(f.call, f.code) for f in broker.faults] == [("mt5_withdrawal", "A")]
    broker.clear_faults()
    broker.mt5_withdrawal(MT5, FUNDING, Decimal("10"))
    assert broker.balance_of(FUNDING) == Decimal("1000.00")


@pytest.mark.parametrize(("mode", "error", "code"), [
    ("error", BrokerError, "RateLimit"), ("error_after_apply", BrokerError, "RateLimit"),
    ("lost_before_apply", LostReply, "ConnectionClosed"), ("lost_after_apply", LostReply, "ConnectionClosed"),
    ("late_apply", LostReply, "Timeout"), ("malformed", BadReply, "MalformedReply"), ("not_sent", NotSent, "NotSent"),
])
@pytest.mark.parametrize("call", ["balance", "statement", "website_status", "get_limits", "mt5_get_settings"])
def test_faults_on_calls_that_move_nothing(call: str, mode: str, error: type[BrokerError], code: str) -> None:
    broker, _ = make()
    args: dict[str, tuple[Any, ...]] = {"statement": (0, FAR), "mt5_get_settings": (MT5,)}
    broker.inject(call, mode, code="RateLimit")
    with pytest.raises(error) as err:
        getattr(broker, call)(*args.get(call, ()))
    assert err.value.code == code
    getattr(broker, call)(*args.get(call, ()))
    assert untouched(broker)


def test_a_connect_fault_is_used_by_the_next_connection() -> None:
    broker, _ = make()
    broker.connect()
    broker.inject("connect", "error", code="InvalidToken")
    broker.balance()  # already connected: the fault waits
    broker.close()
    with pytest.raises(BrokerError) as err:
        broker.balance()
    assert err.value.code == "InvalidToken" and err.value.needs_operator and not broker.connected
    assert err.value.before_send  # the balance request itself never left
    broker.inject("connect", "not_sent")
    with pytest.raises(NotSent):
        broker.connect()
    assert broker.balance()[0] == Decimal("1000.00")


def test_inject_refuses_unknown_calls_and_modes() -> None:
    broker, _ = make()
    for call, mode in (("mt5_transfer", "error"), ("mt5_deposit", "explode"), ("connect", "late_apply")):
        with pytest.raises(ValueError):
            broker.inject(call, mode)
    assert not broker.faults


# ---- concurrency ----


def test_concurrent_deposits_never_overdraw_the_funding_account() -> None:
    broker = MemoryBroker(Clock(), daily_transfers=100, latency=0.01)
    broker.add_account(FUNDING, "USD", "100.00")
    broker.add_account(MT5, "USD", "0.00", mt5=True)
    start = threading.Barrier(8)
    outcomes: list[tuple[str, int | str]] = []
    record = threading.Lock()

    def deposit() -> None:
        start.wait()
        try:
            txn = broker.mt5_deposit(FUNDING, MT5, Decimal("20.00"))
        except BrokerError as exc:
            with record:
                outcomes.append(("refused", exc.code))
        else:
            with record:
                outcomes.append(("done", txn))

    seen: list[Decimal] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(broker.balance_of(FUNDING))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=deposit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    stop.set()
    watcher.join(10)

    done = [txn for kind, txn in outcomes if kind == "done"]
    assert len(done) == 5 and len(set(done)) == 5
    assert sorted(code for kind, code in outcomes if kind == "refused") == ["NoMoney"] * 3
    assert seen and min(seen) >= 0
    assert broker.balance_of(FUNDING) == Decimal("0.00") and broker.balance_of(MT5) == Decimal("100.00")
    statement = rows(broker)
    assert sum(r["amount"] for r in statement) == Decimal("-100.00")
    assert sorted(r["transaction_id"] for r in statement) == sorted(done)
    assert all(r["balance_after"] >= 0 for r in statement)
    assert len(broker.sent) == 8


def test_latency_is_slept_outside_the_lock() -> None:
    broker, _ = make(latency=0.5)
    caller = threading.Thread(target=broker.mt5_deposit, args=(FUNDING, MT5, Decimal("10.00")))
    caller.start()
    deadline = time.monotonic() + 5
    while not broker.sent and time.monotonic() < deadline:
        time.sleep(0.001)
    assert broker.balance_of(FUNDING) == Decimal("1000.00")  # readable while the call is on its way
    assert caller.is_alive()
    caller.join(5)
    assert broker.balance_of(FUNDING) == Decimal("990.00")


# ---- properties ----

OPS = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 60_000)),
    st.tuples(st.just("withdraw"), st.integers(0, 60_000)),
    st.tuples(st.just("advance"), st.integers(0, 120)),
    st.tuples(st.just("fault"), st.sampled_from(["error", "error_after_apply", "lost_before_apply",
                                                  "lost_after_apply", "late_apply", "malformed", "not_sent"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=30), st.integers(0, 60), st.integers(0, 60))
def test_money_is_conserved_and_the_statement_explains_the_funding_balance(
        ops: list[tuple[str, Any]], deposit_delay: int, withdrawal_delay: int) -> None:
    broker, clock = make(funding="300.00", mt5="200.00", daily_transfers=10,
                         deposit_credit_delay=timedelta(seconds=deposit_delay),
                         withdrawal_credit_delay=timedelta(seconds=withdrawal_delay))
    confirmed: list[int] = []
    for op, arg in ops:
        try:
            if op == "deposit":
                confirmed.append(broker.mt5_deposit(FUNDING, MT5, money.from_minor(arg, "USD")))
            elif op == "withdraw":
                confirmed.append(broker.mt5_withdrawal(MT5, FUNDING, money.from_minor(arg, "USD")))
            elif op == "advance":
                clock.advance(timedelta(seconds=arg))
            else:
                broker.inject("mt5_deposit" if len(confirmed) % 2 else "mt5_withdrawal", arg,
                              delay=timedelta(seconds=30))
        except BrokerError:
            pass
        funding = broker.transfers(FUNDING)
        expected = funding[-1]["balance_after"] if funding else Decimal("300.00")
        assert broker.balance_of(FUNDING) == expected  # no movement of the funding account without its row
        assert broker.balance_of(FUNDING) >= 0 and broker.balance_of(MT5) >= 0
    clock.advance(timedelta(days=1))
    assert broker.in_flight() == 0
    assert broker.balance_of(FUNDING) + broker.balance_of(MT5) == Decimal("500.00")
    funding = broker.transfers(FUNDING)
    balance = Decimal("300.00")
    for row in funding:
        balance += row["amount"]
        assert row["balance_after"] == balance
    ids = [r["transaction_id"] for r in funding]
    assert len(set(ids)) == len(ids) and set(confirmed) <= set(ids)
    assert [r["transaction_time"] for r in funding] == sorted(r["transaction_time"] for r in funding)
