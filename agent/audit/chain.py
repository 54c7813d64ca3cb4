"""Tamper evidence: a hash chain over every row appended to the money tables.

Each chained row (a transfer's intent, a transfer event - the agent's, reconcile's or an operator's -, a halt's
creation and, as a link of its own, its clearing, a decision, a prune checkpoint) gets one `audit_chain` link; a
transfer event gets a second one (`state`): its transfer's whole row as the event left it, so that every column of
a transfer, the mutable ones too, is chained (verify compares each transfer with its latest `state` link):

    content_hash = sha256(canonical(row))                       (the encoding is below and in the README)
    hash         = sha256(f"{seq}:{prev_hash}:{content_hash}")  (prev_hash: the previous link of the same chain)

The links are written by a session listener at flush time, in the transaction that writes the row, so every
write path is covered without the engine knowing. Writers serialize on `audit_head` (SELECT ... FOR UPDATE on
PostgreSQL; SQLite writers already hold the write lock from BEGIN IMMEDIATE), taken at flush, as late as possible.

Two chains: `ledger` holds everything but the decisions that did nothing, which go to `journal`; `db prune` cuts a
prefix of the journal alone and records the cut (its last link's hash) in a checkpoint chained on `ledger`.

Canonical encoding: a JSON array (UTF-8, no spaces, non-ASCII kept) of
    [table, action, id, field...]
in the order of FIELDS below; every value is a JSON string or null: integers in decimal digits, amounts as
decimal strings with the currency's places ("600.00"), times as UTC "YYYY-MM-DDTHH:MM:SS.ffffffZ". It reads the
typed values (not the storage form), so a column stored as text on SQLite and timestamptz on PostgreSQL encodes
the same.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    String,
    and_,
    event,
    exists,
    insert,
    inspect,
    select,
    type_coerce,
    update,
)
from sqlalchemy.orm import Session, aliased

from agent import money
from agent.ledger.models import (
    AuditChainEntry,
    AuditCheckpoint,
    AuditHead,
    DecisionRow,
    Halt,
    Transfer,
    TransferEvent,
)

GENESIS = "0" * 64
CHAINS = ("ledger", "journal")
BATCH = 500  # ids per IN (...) query: under every database's bound-parameter limit


# Every column of `transfers`, in the order of a `transfer_events`/`state` link (a test checks the model has no other).
STATE_FIELDS = ("transfer_id", "created_at", "updated_at", "account", "funding", "kind", "amount", "currency", "state",
                "broker_txn_id", "policy", "policy_sha256", "equity", "reason", "error_code", "error_message",
                "sent_at", "resolved_by", "owner")


@dataclass(frozen=True)
class Kind:
    """One kind of chained row: a table and what happened to the row (create, clear, append)."""

    source: str
    action: str
    fields: tuple[str, ...]  # the canonical field order after [table, action]; the first is always id


KINDS: tuple[Kind, ...] = (
    Kind("transfers", "create", ("id", "created_at", "account", "funding", "kind", "amount", "currency", "policy",
                                 "policy_sha256", "equity", "reason")),
    # broker_txn_id: the transfer's, on the `confirmed` event only (a confirmed transfer never changes again)
    Kind("transfer_events", "append", ("id", "transfer_id", "at", "state", "actor", "detail", "broker_txn_id")),
    # the transfer's whole row as it is after the event (id: the event's): its mutable columns are chained too
    Kind("transfer_events", "state", ("id", *STATE_FIELDS)),
    Kind("halts", "create", ("id", "account", "kind", "scope", "reason", "created_at", "created_by")),
    Kind("halts", "clear", ("id", "cleared_at", "cleared_by")),
    Kind("decisions", "append", ("id", "at", "account", "policy", "policy_sha256", "action", "amount", "currency",
                                 "equity", "equity_age_s", "reason", "bound_by", "details", "transfer_id")),
    Kind("audit_checkpoints", "create", ("id", "at", "journal_seq", "journal_hash", "pruned_count", "cutoff")),
    # a run of no-op evaluations as it ended (agent/ledger/journal.py): its later evaluations, the entries as hex
    Kind("decisions", "run", ("id", "run_count", "run_last_at", "run_evals")),
)
BY_NAME = {(k.source, k.action): k for k in KINDS}
FIELDS = {(k.source, k.action): k.fields for k in KINDS}


def encode_value(value: Any) -> str | None:
    if value is None or value.__class__ is str:  # the common cases first: this runs for every field of every row
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in a chained row")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, float):  # no column of the chained tables holds one: refuse rather than guess a text
        raise TypeError("a float in a chained row")
    return str(value)


def canonical(source: str, action: str, values: Sequence[Any]) -> bytes:
    return json.dumps([source, action, *[encode_value(v) for v in values]], ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def content_hash(source: str, action: str, values: Sequence[Any]) -> str:
    return hashlib.sha256(canonical(source, action, values)).hexdigest()


def link(seq: int, prev_hash: str, content: str) -> str:
    return hashlib.sha256(f"{seq}:{prev_hash}:{content}".encode("ascii")).hexdigest()


def _amount(minor: int, currency: str) -> str:
    try:
        return money.fmt(money.from_minor(minor, currency), currency)
    except money.MoneyError:  # a currency this build does not know: the minor units, marked, still exact
        return f"{minor} minor"


def _as_stored(dialect: str) -> Any:
    def t_(column: Any) -> Any:
        return type_coerce(column, String) if dialect == "sqlite" else column
    return t_


def state_columns(dialect: str = "sqlite") -> list[Any]:
    """The transfer columns of a `state` link (STATE_FIELDS), as select_rows reads them."""
    t_, t = _as_stored(dialect), Transfer
    return [t.id, t_(t.created_at), t_(t.updated_at), t.account, t.funding, t.kind, t.amount_minor, t.currency,
            t.state, t.broker_txn_id, t.policy, t.policy_sha256, t.equity, t.reason, t.error_code, t.error_message,
            t_(t.sent_at), t.resolved_by, t.owner]


def encode_state(event_id: int, columns: Sequence[Any]) -> str:
    """The content hash of a `state` link: the event's id and the transfer's columns as state_columns reads them."""
    values = [event_id, *columns]
    values[7] = _amount(values[7], values[8])
    return content_hash("transfer_events", "state", values)


def select_rows(kind: Kind, dialect: str = "sqlite") -> Select[Any]:
    """The columns a kind's canonical encoding reads, ordered by id (callers add conditions).

    On SQLite a time is stored as the very text the encoding gives it ("...T09:00:00.000000Z"), so it is read as
    text, not parsed and formatted again (a third of verify's time); a stored text that is not in that form then
    simply encodes differently. Other databases give typed values, encoded by encode_value."""
    t_ = _as_stored(dialect)
    if kind.source == "transfers":
        t = Transfer
        return select(t.id, t_(t.created_at), t.account, t.funding, t.kind, t.amount_minor, t.currency, t.policy,
                      t.policy_sha256, t.equity, t.reason).order_by(t.id)
    if kind.source == "transfer_events" and kind.action == "state":
        return (select(TransferEvent.id, *state_columns(dialect))
                .join(Transfer, Transfer.id == TransferEvent.transfer_id, isouter=True).order_by(TransferEvent.id))
    if kind.source == "transfer_events":
        e = TransferEvent
        return (select(e.id, e.transfer_id, t_(e.at), e.state, e.actor, e.detail, Transfer.broker_txn_id)
                .join(Transfer, Transfer.id == e.transfer_id, isouter=True).order_by(e.id))
    if kind.source == "halts" and kind.action == "create":
        h = Halt
        return select(h.id, h.account, h.kind, h.scope, h.reason, t_(h.created_at), h.created_by).order_by(h.id)
    if kind.source == "halts":
        return (select(Halt.id, t_(Halt.cleared_at), Halt.cleared_by).where(Halt.cleared_at.is_not(None))
                .order_by(Halt.id))
    if kind.source == "decisions" and kind.action == "run":
        d = DecisionRow
        # an ended run of more than one evaluation (a row of one, ended, has nothing more to chain)
        return (select(d.id, d.run_count, t_(d.run_last_at), d.run_evals)
                .where(d.run_sealed.is_(True), d.run_count > 1).order_by(d.id))
    if kind.source == "decisions":
        d = DecisionRow
        return select(d.id, t_(d.at), d.account, d.policy, d.policy_sha256, d.action, d.amount, d.currency, d.equity,
                      d.equity_age_s, d.reason, d.bound_by, d.details, d.transfer_id).order_by(d.id)
    c = AuditCheckpoint
    return select(c.id, t_(c.at), c.journal_seq, c.journal_hash, c.pruned_count, t_(c.cutoff)).order_by(c.id)


def id_column(kind: Kind) -> Any:
    return {"transfers": Transfer.id, "transfer_events": TransferEvent.id, "halts": Halt.id,
            "decisions": DecisionRow.id, "audit_checkpoints": AuditCheckpoint.id}[kind.source]


def encode_row(kind: Kind, row: Sequence[Any]) -> tuple[str, str]:
    """(chain, content_hash) of one row as select_rows(kind) returns it."""
    values = list(row)
    chain = "ledger"
    if kind.source == "transfers":
        values[5] = _amount(values[5], values[6])
    elif kind.source == "transfer_events" and kind.action == "state":
        return chain, encode_state(values[0], values[1:])
    elif kind.source == "transfer_events":
        values[6] = values[6] if values[3] == "confirmed" else None
    elif kind.source == "decisions" and (kind.action == "run" or values[5] == "none"):
        chain = "journal"
    return chain, content_hash(kind.source, kind.action, values)


def chained_after(kind: Kind) -> Any:
    """The condition 'this row has no link yet' (backfill). For `state` links: the transfer's latest event has
    none (a ledger chained before them gets one snapshot per transfer, of its row as it is now)."""
    column = id_column(kind)
    unchained = ~exists().where(AuditChainEntry.source == kind.source, AuditChainEntry.action == kind.action,
                                AuditChainEntry.row_id == column)
    if kind.action != "state":
        return unchained
    later = aliased(TransferEvent)
    latest = ~exists().where(later.transfer_id == TransferEvent.transfer_id, later.id > TransferEvent.id)
    return and_(latest, unchained)


def fetch(conn: Connection, kind: Kind, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    """(chain, content_hash) of the rows with these ids, as they are in the database now."""
    found: dict[int, tuple[str, str]] = {}
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        for row in conn.execute(select_rows(kind, conn.dialect.name).where(id_column(kind).in_(chunk))):
            found[row[0]] = encode_row(kind, row)
    return found


def lock_heads(conn: Connection) -> dict[str, tuple[int, str]]:
    # FOR UPDATE: a second writer on PostgreSQL waits here until this transaction ends, so it chains after us.
    # (SQLAlchemy renders no FOR UPDATE on SQLite, where BEGIN IMMEDIATE already serializes writers.)
    rows = conn.execute(select(AuditHead.chain, AuditHead.seq, AuditHead.hash).order_by(AuditHead.chain)
                        .with_for_update()).all()
    heads = {r[0]: (int(r[1]), r[2]) for r in rows}
    for chain in CHAINS:
        if chain not in heads:
            conn.execute(insert(AuditHead).values(chain=chain, seq=0, hash=GENESIS))
            heads[chain] = (0, GENESIS)
    return heads


def append(conn: Connection, items: Iterable[tuple[Kind, int, str, str]], at: datetime) -> int:
    """Chain (kind, row id, chain, content_hash) items in the given order. Returns how many."""
    items = list(items)
    if not items:
        return 0
    heads = lock_heads(conn)
    seq = max(s for s, _ in heads.values())
    rows = []
    for kind, row_id, chain, content in items:
        seq += 1
        prev = heads[chain][1]
        digest = link(seq, prev, content)
        heads[chain] = (seq, digest)
        rows.append({"seq": seq, "chain": chain, "source": kind.source, "row_id": row_id, "action": kind.action,
                     "content_hash": content, "prev_hash": prev, "hash": digest, "at": at})
    conn.execute(insert(AuditChainEntry), rows)
    for chain, (head_seq, digest) in heads.items():
        conn.execute(update(AuditHead).where(AuditHead.chain == chain).values(seq=head_seq, hash=digest))
    return len(rows)


def append_rows(conn: Connection, entries: Sequence[tuple[Kind, int]], at: datetime) -> int:
    """Chain rows already written in this transaction, read back through their typed columns (the writer and
    `verify` encode exactly the same values)."""
    contents: dict[tuple[str, str], dict[int, tuple[str, str]]] = {}
    for kind in KINDS:
        ids = sorted({row_id for k, row_id in entries if k is kind})
        if ids:
            contents[(kind.source, kind.action)] = fetch(conn, kind, ids)
    items = []
    for kind, row_id in entries:
        chain, content = contents[(kind.source, kind.action)][row_id]
        items.append((kind, row_id, chain, content))
    return append(conn, items, at)


def backfill(conn: Connection, at: datetime | None = None, page: int = 20_000,
             kinds: Sequence[Kind] = KINDS) -> int:
    """Chain every row that has no link yet, table by table in id order (the migration chains an existing
    ledger from its first row with this; the benchmark too, after bulk inserts)."""
    at = at or datetime.now(UTC)
    total = 0
    for kind in kinds:
        last = 0
        column = id_column(kind)
        while True:
            rows = conn.execute(select_rows(kind, conn.dialect.name).where(and_(column > last, chained_after(kind)))
                                .limit(page)).all()
            if not rows:
                break
            items = []
            for row in rows:
                chain, content = encode_row(kind, row)
                items.append((kind, int(row[0]), chain, content))
            total += append(conn, items, at)
            last = int(rows[-1][0])
    return total


# ---- the listener ----

_ENABLED: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()
_NEW = {Transfer: BY_NAME[("transfers", "create")], TransferEvent: BY_NAME[("transfer_events", "append")],
        Halt: BY_NAME[("halts", "create")], DecisionRow: BY_NAME[("decisions", "append")],
        AuditCheckpoint: BY_NAME[("audit_checkpoints", "create")]}
_ORDER = {kind: index for index, kind in enumerate(KINDS)}
CLEAR = BY_NAME[("halts", "clear")]
RUN = BY_NAME[("decisions", "run")]
STATE = BY_NAME[("transfer_events", "state")]


def _has_chain(conn: Connection) -> bool:
    """A ledger migrated to 0004 or later. Only a positive answer is cached: a ledger migrated while this
    process runs starts chaining at once."""
    if _ENABLED.get(conn.engine):
        return True
    present = inspect(conn).has_table("audit_head")
    if present:
        _ENABLED[conn.engine] = True
    return present


def _was_uncleared(halt: Halt) -> bool:
    history = inspect(halt).attrs.cleared_at.history
    return bool(history.added) and history.added[0] is not None and not any(v is not None for v in history.deleted)


def pending_entries(session: Session) -> Iterator[tuple[Kind, int]]:
    """The rows the flush that just ran appended (session.new/dirty still show the pre-flush state here)."""
    for obj in session.new:
        kind = _NEW.get(type(obj))
        if kind is None:
            continue
        yield kind, obj.id
        if isinstance(obj, TransferEvent):
            yield STATE, obj.id
        if isinstance(obj, Halt) and obj.cleared_at is not None:
            yield CLEAR, obj.id
    for obj in session.dirty:
        if isinstance(obj, Halt) and _was_uncleared(obj):
            yield CLEAR, obj.id


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _context: Any) -> None:
    entries = sorted(set(pending_entries(session)), key=lambda e: (_ORDER[e[0]], e[1]))
    if not entries:
        return
    conn = session.connection()
    if not _has_chain(conn):
        return
    append_rows(conn, entries, datetime.now(UTC))


def seal(conn: Connection, decision_id: int, at: datetime) -> None:
    """Chain a run that ended (its row already marked sealed in this transaction)."""
    if _has_chain(conn):
        append_rows(conn, [(RUN, decision_id)], at)
