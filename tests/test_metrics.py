"""/metrics through prometheus_client: the exposition parses with the library's own parser, label values
round-trip (a newline included), money gauges carry their currency, process metrics are there."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from agent.ledger.db import Ledger
from agent.metrics import render_metrics
from agent.service import Stats


def fake_service(ledger: Ledger | None = None) -> SimpleNamespace:
    stats = Stats()
    stats.evaluations = 7
    stats.reloads_failed = 2
    stats.last_equity = {"MTR130002534": Decimal("950.12"), 'MTR1\nwith "quotes" \\ and a newline': Decimal("1")}
    stats.last_eval = {"MTR130002534": 1764068400.5}
    policy = SimpleNamespace(currency="USD")
    return SimpleNamespace(
        stats=stats, policies={"MTR130002534": policy}, engine=None, ledger=ledger, notifier=None,
        http=SimpleNamespace(intake_accepted=3, intake_rejected=1, intake_unmanaged=4))


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_the_exposition_parses_and_labels_round_trip():
    text = render_metrics(fake_service())
    found = samples(text)
    equity = {s.labels["account"]: s for s in found["fund_agent_equity"]}
    assert equity["MTR130002534"].value == 950.12 and equity["MTR130002534"].labels["currency"] == "USD"
    odd = 'MTR1\nwith "quotes" \\ and a newline'
    assert odd in equity, equity.keys()
    assert "\\n" in text  # escaped, not turned into a space
    assert found["fund_agent_evaluations_total"][0].value == 7
    reloads = {s.labels["result"]: s.value for s in found["fund_agent_policy_reloads_total"]}
    assert reloads == {"ok": 0, "failed": 2}
    intake = {s.labels["result"]: s.value for s in found["fund_agent_intake_total"]}
    assert intake == {"accepted": 3, "rejected": 1, "unmanaged": 4}
    assert found["fund_agent_last_evaluation_timestamp_seconds"][0].value == 1764068400.5
    assert found["fund_agent_broker_connected"][0].value == 0
    assert "process_cpu_seconds_total" in found and "python_info" in found


def test_ledger_metrics_read_at_scrape_time(tmp_path):
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        service = fake_service(ledger)
        found = samples(render_metrics(service))
        assert found["fund_agent_unresolved_transfers"][0].value == 0
        assert found["fund_agent_halted_accounts"][0].value == 0
        service.stats.evaluations = 9  # read at each scrape: nothing to keep in sync
        assert samples(render_metrics(service))["fund_agent_evaluations_total"][0].value == 9
    finally:
        ledger.close()
