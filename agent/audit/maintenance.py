"""`db backup` (an online, consistent copy) and `db prune` (old no-op decisions, keeping the chain verifiable)."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.orm import aliased

from agent.audit import chain as chainmod
from agent.ledger.db import Ledger, describe, sqlite_path
from agent.ledger.models import AuditChainEntry, AuditCheckpoint, DecisionRow


class MaintenanceError(Exception):
    """One line for the operator."""


def backup(url: str, target: Path) -> str:
    """Copy a SQLite ledger with SQLite's online backup API: a consistent snapshot even while the service writes
    (it copies page by page and restarts a step a writer changed). PostgreSQL: pg_dump does this job."""
    source = sqlite_path(url)
    if source is None:
        raise MaintenanceError(
            f"the ledger {describe(url)} is PostgreSQL: back it up with pg_dump, which takes a consistent snapshot "
            "while the service runs, e.g. `pg_dump --format=custom --file ledger.dump 'postgresql://USER@HOST:PORT/"
            "DB'` (password from PGPASSWORD or ~/.pgpass); restore with `pg_restore --dbname ... ledger.dump`")
    if not source.exists():
        raise MaintenanceError(f"no ledger at {source}")
    target = target.resolve()
    if target.exists():
        raise MaintenanceError(f"{target} exists: give a new file name (a backup never overwrites)")
    partial = target.with_name(target.name + ".partial")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if check != "ok":
        partial.unlink(missing_ok=True)
        raise MaintenanceError(f"the copy failed SQLite's integrity check: {check}")
    partial.rename(target)  # only a complete, checked copy gets the name asked for
    return f"backed up {source} to {target} ({target.stat().st_size} bytes)"


def prune(ledger: Ledger, cutoff: datetime, now: datetime) -> tuple[int, datetime]:
    """Remove the decisions that did nothing (the journal chain) written before `cutoff`, as a prefix of the
    journal chain: up to the first journal link whose decision is at or after the cutoff. Their links go too; a
    checkpoint row (chained on the ledger chain in this transaction) carries the last removed link's hash, from
    which `verify` walks the rest of the journal. Transfers, events, halts and decisions that acted stay."""
    with ledger.session() as session:
        conn = session.connection()
        chainmod.lock_heads(conn)  # the journal's head must not move while its prefix is cut
        journal = AuditChainEntry.chain == "journal"
        # a run (agent/ledger/journal.py) is kept while its last evaluation is at or after the cutoff
        first_kept = conn.execute(
            select(func.min(AuditChainEntry.seq)).join(DecisionRow, DecisionRow.id == AuditChainEntry.row_id)
            .where(journal, AuditChainEntry.source == "decisions",
                   func.coalesce(DecisionRow.run_last_at, DecisionRow.at) >= cutoff)).scalar_one()
        last = _last_before(conn, first_kept)
        # a run chained when it ended (its `run` link) may end after the cut while its first link is before it:
        # the cut moves before that first link, so that no row keeps one link and loses the other
        while last is not None:
            first, run = aliased(AuditChainEntry), aliased(AuditChainEntry)
            split = conn.execute(
                select(func.min(first.seq)).join(run, run.row_id == first.row_id)
                .where(first.chain == "journal", first.source == "decisions", first.action == "append",
                       run.source == "decisions", run.action == "run", first.seq <= last, run.seq > last)
            ).scalar_one()
            if split is None:
                break
            last = _last_before(conn, int(split))
        if last is None:
            return 0, cutoff
        last_hash = conn.execute(select(AuditChainEntry.hash).where(AuditChainEntry.seq == last)).scalar_one()
        broken = _check_journal(conn, int(last))
        if broken is not None:  # pruning would erase the evidence: refuse, and leave it to `verify`
            raise MaintenanceError(f"{broken}; nothing pruned: run `fund-agent verify`")
        pruned = select(AuditChainEntry.row_id).where(journal, AuditChainEntry.source == "decisions",
                                                      AuditChainEntry.seq <= last)
        count = conn.execute(delete(DecisionRow).where(DecisionRow.id.in_(pruned), DecisionRow.action == "none")
                             ).rowcount
        conn.execute(delete(AuditChainEntry).where(journal, AuditChainEntry.seq <= last))
        session.add(AuditCheckpoint(at=now, journal_seq=int(last), journal_hash=last_hash, pruned_count=count,
                                    cutoff=cutoff))
        session.commit()
    return count, cutoff


def _last_before(conn: Connection, seq: int | None) -> int | None:
    """The newest journal link before `seq` (None: before none)."""
    query = select(func.max(AuditChainEntry.seq)).where(AuditChainEntry.chain == "journal")
    if seq is not None:
        query = query.where(AuditChainEntry.seq < seq)
    found = conn.execute(query).scalar_one()
    return int(found) if found is not None else None


def _check_journal(conn: Connection, last: int) -> str | None:
    """The journal links up to `last` follow each other from the previous checkpoint, and their decisions still
    encode to what was chained: the first problem, or None."""
    kinds = {action: chainmod.BY_NAME[("decisions", action)] for action in ("append", "run")}
    checkpoint = conn.execute(select(AuditCheckpoint.journal_seq, AuditCheckpoint.journal_hash)
                              .order_by(AuditCheckpoint.id.desc()).limit(1)).first()
    prev = checkpoint[1] if checkpoint else chainmod.GENESIS
    after = int(checkpoint[0]) if checkpoint else 0
    while True:
        links = conn.execute(select(AuditChainEntry.seq, AuditChainEntry.row_id, AuditChainEntry.content_hash,
                                    AuditChainEntry.prev_hash, AuditChainEntry.hash, AuditChainEntry.action)
                             .where(AuditChainEntry.chain == "journal", AuditChainEntry.seq > after,
                                    AuditChainEntry.seq <= last)
                             .order_by(AuditChainEntry.seq).limit(10_000)).all()
        if not links:
            return None
        contents = {action: chainmod.fetch(conn, kind, [int(link.row_id) for link in links if link.action == action])
                    for action, kind in kinds.items()}
        for seq, row_id, content, prev_hash, digest, action in links:
            if prev_hash != prev or chainmod.link(seq, prev_hash, content) != digest:
                return f"audit_chain id {seq}: the journal chain is broken there"
            if contents.get(action, {}).get(row_id) != ("journal", content):
                return f"decisions id {row_id}: differs from what was chained at seq {seq}, or is missing"
            prev = digest
        after = int(links[-1][0])


def vacuum_ledger(ledger: Ledger) -> None:
    """Give freed pages back to the file system (SQLite only; PostgreSQL's autovacuum reuses them)."""
    if ledger.dialect != "sqlite":
        return
    raw = ledger.engine.raw_connection()
    try:
        raw.driver_connection.execute("VACUUM")  # type: ignore[union-attr]
    finally:
        raw.close()
