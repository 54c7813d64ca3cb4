"""Prometheus text exposition of the service's state and the ledger's counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select

from agent.ledger.models import Halt, Transfer

if TYPE_CHECKING:
    from agent.service import Service


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(service: Service) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], object]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    stats = service.stats
    metric("fund_agent_equity", "gauge", "Last equity reading per account (account currency).",
           [({"account": a}, str(v)) for a, v in sorted(stats.last_equity.items())])
    metric("fund_agent_last_evaluation_timestamp_seconds", "gauge", "Unix time of the last evaluation.",
           [({"account": a}, f"{v:.3f}") for a, v in sorted(stats.last_eval.items())])
    metric("fund_agent_evaluations_total", "counter", "Evaluations since start.", [({}, stats.evaluations)])
    metric("fund_agent_job_errors_total", "counter", "Scheduler jobs that raised.", [({}, stats.job_errors)])
    metric("fund_agent_jobs_missed_total", "counter", "Scheduler runs missed.", [({}, stats.jobs_missed)])
    metric("fund_agent_policy_reloads_total", "counter", "Policy reloads by result.",
           [({"result": "ok"}, stats.reloads_ok), ({"result": "failed"}, stats.reloads_failed)])
    metric("fund_agent_policies", "gauge", "Policies in force.", [({}, len(service.policies))])
    broker = service.engine.broker if service.engine else None
    metric("fund_agent_broker_connected", "gauge", "1 while the Deriv connection is authorized.",
           [({}, 1 if broker is not None and broker.connected else 0)])
    if service.ledger is not None:
        with service.ledger.reader() as session:
            counts = session.execute(select(Transfer.kind, Transfer.state, func.count(Transfer.id))
                                     .group_by(Transfer.kind, Transfer.state)).all()
            unresolved = session.execute(select(func.count(Transfer.id)).where(
                Transfer.state.in_(("pending", "sent", "unknown")))).scalar_one()
            halted = session.execute(select(func.count(func.distinct(Halt.account))).where(
                Halt.cleared_at.is_(None))).scalar_one()
        metric("fund_agent_transfers", "gauge", "Transfers in the ledger by kind and state.",
               [({"kind": k, "state": s}, n) for k, s, n in counts])
        metric("fund_agent_unresolved_transfers", "gauge", "Transfers pending, sent or unknown.", [({}, unresolved)])
        metric("fund_agent_halted_accounts", "gauge", "Accounts with an active halt.", [({}, halted)])
    if service.notifier is not None:
        outbox = service.notifier.outbox
        metric("fund_agent_notifications_total", "counter", "Notification deliveries by result.",
               [({"result": "delivered"}, outbox.delivered), ({"result": "failed"}, outbox.failures)])
    if service.http is not None:
        metric("fund_agent_intake_total", "counter", "EA status POSTs by result.",
               [({"result": "accepted"}, service.http.intake_accepted),
                ({"result": "rejected"}, service.http.intake_rejected)])
    return "\n".join(lines) + "\n"
