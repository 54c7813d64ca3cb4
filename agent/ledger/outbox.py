"""Notifications staged in the transaction of the event they report.

Every writer session of a Ledger runs `stage` after each flush: a new transfer event (confirmed, failed, unknown),
halt, or decision that reports a reload failure or a source going down adds one row to the outbox with the
channel STAGED, in the same transaction. The notifier later fans each staged row out to the configured channels
(agent.notify.Outbox.collect). An event that commits is therefore always reported, whatever order concurrent
transactions commit their ids in (a cursor over ids skipped an id that committed after a higher one), and an
event whose transaction rolls back is never reported.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session, sessionmaker

from agent.ledger.models import DecisionRow, Halt, OutboxRow, Transfer, TransferEvent
from agent.timeutil import iso

STAGED = "*"  # the channel of a row not yet fanned out to the configured channels
SOURCES = ((TransferEvent, "transfer_events"), (Halt, "halts"), (DecisionRow, "decisions"))


def payload(event_name: str, at: datetime, account: str | None, message: str,
            transfer: dict[str, Any] | None) -> dict[str, Any]:
    return {"event": event_name, "time": iso(at), "account": account, "message": message, "transfer": transfer}


def events_of(session: Session, source: str, row: Any) -> list[tuple[str, dict[str, Any]]]:
    """The notifications one new ledger row stands for: (event, payload) pairs, usually none."""
    from agent.ledger import queries

    if source == "transfer_events":
        if row.state not in ("confirmed", "failed", "unknown"):
            return []
        # Core, not the identity map: the transfer's row as this transaction wrote it (settle's UPDATE)
        transfer = session.connection().execute(select(Transfer.__table__).where(Transfer.id == row.transfer_id)
                                                ).first()
        record = queries.transfer_record(transfer) if transfer is not None else None  # type: ignore[arg-type]
        message = f"transfer {row.transfer_id} is {row.state}"
        if record:
            message = (f"{record['kind']} {record['amount']} {record['currency']} ({record['funding']} / "
                       f"{record['account']}) {row.state}")
            if record["broker_txn_id"]:
                message += f", broker txn {record['broker_txn_id']}"
            if row.state != "confirmed" and record["error_code"]:
                message += f": {record['error_code']}: {record['error_message']}"
        name = f"transfer_{row.state}"
        return [(name, payload(name, row.at, transfer.account if transfer is not None else None, message, record))]
    if source == "halts":
        name = "kill_switch" if row.kind == "kill_switch" else "halt"
        return [(name, payload(name, row.created_at, row.account,
                               f"{row.kind} halt ({row.scope}) by {row.created_by}: {row.reason}", None))]
    if row.bound_by == "policy_reload":
        return [("policy_reload_failed", payload("policy_reload_failed", row.at, row.account, row.reason, None))]
    if row.bound_by == "no_reading":
        previous = session.connection().execute(select(DecisionRow.bound_by).where(
            DecisionRow.account == row.account, DecisionRow.id < row.id).order_by(DecisionRow.id.desc())
            .limit(1)).scalar()
        if previous != "no_reading":  # only the first of a run of missing readings is news
            return [("source_down", payload("source_down", row.at, row.account, row.reason, None))]
    return []


def stage(session: Session, _flush_context: object) -> None:
    """after_flush: the new rows have their ids; stage their notifications on the flush's connection."""
    new = list(session.new)
    if not new:
        return
    rows: list[dict[str, Any]] = []
    for model, source in SOURCES:
        for row in sorted((obj for obj in new if isinstance(obj, model)), key=lambda obj: obj.id):
            for name, body in events_of(session, source, row):
                event_id = f"{source}-{row.id}"
                at = row.created_at if source == "halts" else row.at
                rows.append({"event_id": event_id, "channel": STAGED, "event": name,
                             "payload": json.dumps({"id": event_id, **body}), "created_at": at, "attempts": 0,
                             "next_attempt_at": at})
    if rows:
        session.connection().execute(insert(OutboxRow.__table__), rows)


def install(sessions: sessionmaker[Session]) -> None:
    """Stage notifications in every session this factory makes (the ledger's writers)."""
    event.listen(sessions, "after_flush", stage)
