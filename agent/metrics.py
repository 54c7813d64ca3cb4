"""Prometheus metrics of the service, through prometheus_client: a custom collector reads the service's state and
the ledger's counts at scrape time (nothing is kept in sync by hand), beside the library's process metrics.

The library does the exposition, so label values are escaped as the format says (a newline is `\\n`, not a
space). Money gauges carry a `currency` label. Prometheus sample values are float64 by definition: amounts are
Decimal up to the exposition, where the library writes them out.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from agent import money
from agent.ledger.models import Halt, Transfer

if TYPE_CHECKING:
    from agent.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes


class ServiceCollector(Collector):
    """Everything fund-agent knows, read when Prometheus scrapes."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        stats = service.stats
        policies = dict(service.policies)  # a reload may replace it while we read
        equity = GaugeMetricFamily("fund_agent_equity", "Last equity reading per account (account currency).",
                                   labels=["account", "currency"])
        for account, value in sorted(stats.last_equity.items()):
            policy = policies.get(account)
            equity.add_metric([account, policy.currency if policy is not None else ""], value)
        yield equity
        last_eval = GaugeMetricFamily("fund_agent_last_evaluation_timestamp_seconds",
                                      "Unix time of the last evaluation.", labels=["account"])
        for account, at in sorted(stats.last_eval.items()):
            last_eval.add_metric([account], at)
        yield last_eval
        yield CounterMetricFamily("fund_agent_evaluations_total", "Evaluations since start.",
                                  value=stats.evaluations)
        yield CounterMetricFamily("fund_agent_job_errors_total", "Scheduler jobs that raised.",
                                  value=stats.job_errors)
        yield CounterMetricFamily("fund_agent_jobs_missed_total", "Scheduler runs missed.", value=stats.jobs_missed)
        reloads = CounterMetricFamily("fund_agent_policy_reloads_total", "Policy reloads by result.",
                                      labels=["result"])
        reloads.add_metric(["ok"], stats.reloads_ok)
        reloads.add_metric(["failed"], stats.reloads_failed)
        yield reloads
        yield GaugeMetricFamily("fund_agent_policies", "Policies in force.", value=len(policies))
        broker = service.engine.broker if service.engine else None
        yield GaugeMetricFamily("fund_agent_broker_connected", "1 while the Deriv connection is authorized.",
                                value=1 if broker is not None and broker.connected else 0)
        if service.ledger is not None:
            yield from self._ledger()
        if service.notifier is not None:
            outbox = service.notifier.outbox
            sent = CounterMetricFamily("fund_agent_notifications_total", "Notification deliveries by result.",
                                       labels=["result"])
            sent.add_metric(["delivered"], outbox.delivered)
            sent.add_metric(["failed"], outbox.failures)
            yield sent
        leases = getattr(service, "leases", None)
        if leases is not None:  # several hosts on one ledger
            yield GaugeMetricFamily("fund_agent_leases_held", "Accounts whose lease this agent holds now.",
                                    value=len(leases.held()))
            yield GaugeMetricFamily("fund_agent_lease_time_left_seconds", "Time left on this agent's leases "
                                    "since their last renewal.", value=leases.time_left())
            yield CounterMetricFamily("fund_agent_lease_claims_total", "Leases claimed (taken over or new).",
                                      value=leases.claims)
            yield CounterMetricFamily("fund_agent_lease_losses_total", "Leases lost to another agent.",
                                      value=leases.losses)
            yield CounterMetricFamily("fund_agent_fenced_writes_total", "Money writes refused because this agent's "
                                      "lease was no longer current.", value=leases.fenced_writes)
            yield CounterMetricFamily("fund_agent_lease_lock_wait_seconds_total", "Time spent waiting for lease "
                                      "row locks.", value=leases.lock_wait_seconds)
            if service.ledger is not None:
                from agent.ledger.leases import holders

                with service.ledger.reader() as session:
                    infos = holders(session)
                owner = GaugeMetricFamily("fund_agent_lease_holder", "1 per account for the agent (host) that "
                                          "holds its lease now.", labels=["account", "host", "holder"])
                for account, info in infos.items():
                    if info.live:
                        owner.add_metric([account, info.host or "", info.holder or ""], 1)
                yield owner
        if service.http is not None:
            http = service.http
            intake = CounterMetricFamily("fund_agent_intake_total", "EA status POSTs by result (unmanaged: a "
                                         "login no policy manages).", labels=["result"])
            intake.add_metric(["accepted"], http.intake_accepted)
            intake.add_metric(["rejected"], http.intake_rejected)
            intake.add_metric(["unmanaged"], http.intake_unmanaged)
            yield intake

    def _ledger(self) -> Iterator[Metric]:
        assert self.service.ledger is not None
        with self.service.ledger.reader() as session:
            counts = session.execute(
                select(Transfer.kind, Transfer.state, Transfer.currency, func.count(Transfer.id),
                       func.sum(Transfer.amount_minor))
                .group_by(Transfer.kind, Transfer.state, Transfer.currency)).all()
            unresolved = session.execute(select(func.count(Transfer.id)).where(
                Transfer.state.in_(("pending", "sent", "unknown")))).scalar_one()
            halted = session.execute(select(func.count(func.distinct(Halt.account))).where(
                Halt.cleared_at.is_(None))).scalar_one()
        number: dict[tuple[str, str], int] = {}
        amount = GaugeMetricFamily("fund_agent_transfer_amount", "Sum of the ledger's transfers by kind, state "
                                   "and currency.", labels=["kind", "state", "currency"])
        for kind, state, currency, count, minor in counts:
            number[(kind, state)] = number.get((kind, state), 0) + count
            total: Decimal = money.from_minor(int(minor or 0), currency)
            amount.add_metric([kind, state, currency], total)
        transfers = GaugeMetricFamily("fund_agent_transfers", "Transfers in the ledger by kind and state.",
                                      labels=["kind", "state"])
        for (kind, state), count in sorted(number.items()):
            transfers.add_metric([kind, state], count)
        yield transfers
        yield amount
        yield GaugeMetricFamily("fund_agent_unresolved_transfers", "Transfers pending, sent or unknown.",
                                value=unresolved)
        yield GaugeMetricFamily("fund_agent_halted_accounts", "Accounts with an active halt.", value=halted)


def registry_for(service: Service) -> CollectorRegistry:
    """A registry of its own (not the library's global one): tests run several services in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render_metrics(service: Service) -> str:
    registry = getattr(service, "_metrics_registry", None)
    if registry is None:
        registry = registry_for(service)
        service._metrics_registry = registry  # type: ignore[attr-defined]  # noqa: SLF001 - a per-service cache
    return generate_latest(registry).decode("utf-8")
