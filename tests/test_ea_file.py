"""The ea-file equity source: CONTRACT.md section 5 and its staleness rules."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import write_status

from agent.equity.base import NoReading
from agent.equity.ea_file import EaFileSource, parse_status
from agent.timeutil import Clock

GOOD = ('{"schema": 1, "login": 130002534, "server": "DerivSVG-Server", "currency": "USD", "balance": 1000.00, '
        '"equity": 950.12, "margin": 10.00, "margin_free": 940.12, "margin_level": 9501.20, "positions": 2, '
        '"connected": true, "time": 1764068400}')


def test_contract_example_parses_exactly():
    snap = parse_status(GOOD, "130002534")
    assert snap.equity == Decimal("950.12") and snap.margin_level == Decimal("9501.20")
    assert snap.taken_at == datetime.fromtimestamp(1764068400, UTC)
    assert snap.positions == 2 and snap.currency == "USD" and snap.source == "ea-file"


@pytest.mark.parametrize("text, why", [
    (GOOD[:60], "not valid JSON"),                     # torn write
    ("", "not valid JSON"),
    ("[]", "JSON object"),
    (GOOD.replace('"schema": 1', '"schema": 2'), "schema"),
    (GOOD.replace("130002534", "999"), "is for login 999"),
    (GOOD.replace('"connected": true', '"connected": false'), "not connected"),
    (GOOD.replace('"equity": 950.12', '"equity": "950.12"'), "equity"),
    (GOOD.replace('"time": 1764068400', '"time": "now"'), "time"),
    (GOOD.replace('"login": 130002534', '"login": "130002534"'), "numeric login"),
])
def test_rejects_what_it_must(text, why):
    with pytest.raises(NoReading) as info:
        parse_status(text, "130002534")
    assert why in str(info.value)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(NoReading) as info:
        EaFileSource(tmp_path, Clock()).read("MTR130002534")
    assert "missing" in str(info.value)


def test_reads_by_the_digits_of_the_mt5_login(tmp_path):
    write_status(tmp_path, equity="321.09")
    snap = EaFileSource(tmp_path, Clock()).read("MTR130002534")
    assert snap.equity == Decimal("321.09") and snap.login == "130002534"


def test_future_dated_file_is_refused(tmp_path):
    write_status(tmp_path, age=-3600)
    with pytest.raises(NoReading) as info:
        EaFileSource(tmp_path, Clock()).read("MTR130002534")
    assert "future" in str(info.value)


FIXTURES = Path(__file__).parent / "fixtures" / "ea"


@pytest.mark.parametrize("name, equity, level", [("good.json", "950.12", "9501.20"),
                                                 ("no-margin.json", "1000.00", "0.00"),
                                                 ("escaped-server.json", "950.12", "9501.20")])
def test_fixture_files_in_the_eas_format_parse(name, equity, level):
    snap = parse_status((FIXTURES / name).read_bytes(), "130002534")
    assert snap.equity == Decimal(equity) and snap.margin_level == Decimal(level)


@pytest.mark.parametrize("name, why", [("torn.json", "torn or partial"), ("empty.json", "not valid JSON"),
                                       ("deinit.json", "not connected"), ("other-login.json", "130009999")])
def test_fixture_files_rejected(name, why):
    with pytest.raises(NoReading) as info:
        parse_status((FIXTURES / name).read_bytes(), "130002534")
    assert why in str(info.value)


def test_a_file_older_than_max_equity_age_is_not_acted_on(tmp_path):
    """Staleness is the evaluator's rule: the source reports the file's own time."""
    from agent.policy.evaluate import Usage, evaluate
    from agent.policy.load import parse_policy

    write_status(tmp_path, equity="450.00", age=31)
    snap = EaFileSource(tmp_path, Clock()).read("MTR130002534")
    policy = parse_policy((Path(__file__).parent / "policies" / "good" / "base.yaml").read_text(), "p.yaml")
    decision = evaluate(policy, snap, Usage(), Clock().now(), funding_balance=Decimal(10000))
    assert decision.action == "none" and decision.bound_by == "stale"
