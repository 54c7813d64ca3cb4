"""Ledger tables. Amounts are integer minor units (SQLite has no decimal type); rows are never deleted."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

# Alembic batch mode on SQLite needs named constraints to alter them later.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TRANSFER_STATES = ("pending", "sent", "confirmed", "failed", "unknown")
UNRESOLVED_STATES = ("pending", "sent", "unknown")
OPEN_RUN = "NOT run_sealed AND run_count > 1"  # a decision row whose run has not ended (the partial index's form)
KINDS = ("top_up", "sweep")
# Row ids: BIGINT on PostgreSQL (a shared ledger outlives 2^31 decisions), INTEGER on SQLite, where it is the
# 64-bit rowid already and the type existing ledgers were created with.
ID = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC time: `timestamptz` on PostgreSQL; on SQLite fixed-width ISO 8601 UTC text, so that SQL
    string comparison is time order."""

    impl = String(27)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[object]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(DateTime(timezone=True))
        return dialect.type_descriptor(String(27))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> str | datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger: times must be UTC-aware")
        if dialect.name == "postgresql":
            return value.astimezone(UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def process_result_value(self, value: str | datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):  # timestamptz: psycopg gives it in the session's time zone
            return value.astimezone(UTC)
        if len(value) == 27 and value[26] == "Z" and value[10] == "T":
            # the form this type writes: fromisoformat reads it (Z as UTC) about 40x faster than strptime
            return datetime.fromisoformat(value)
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)  # anything else: as before


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Transfer(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    account: Mapped[str] = mapped_column(String(32), nullable=False)
    funding: Mapped[str] = mapped_column(String(32), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    amount_minor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(12), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    # UNIQUE: one broker transaction confirms at most one ledger row.
    broker_txn_id: Mapped[int | None] = mapped_column(BigInteger, unique=True, nullable=True)
    policy: Mapped[str] = mapped_column(String(200), nullable=False)
    policy_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    equity: Mapped[str] = mapped_column(String(40), nullable=False)  # the triggering reading, exact text
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The process that made it (host:pid:run): while that process lives, nobody else settles it in flight.
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('pending','sent','confirmed','failed','unknown')", name="state"),
        CheckConstraint("kind IN ('top_up','sweep')", name="kind"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        # One unresolved transfer per account, enforced by the database, not only by the scheduler.
        Index("uq_transfers_one_open_per_account", "account", unique=True,
              sqlite_where="state IN ('pending','sent','unknown')",
              postgresql_where="state IN ('pending','sent','unknown')"),
        Index("ix_transfers_account_created", "account", "created_at"),
        # Covers `ledger --totals` (GROUP BY these, sum amount_minor): migration 0008
        Index("ix_transfers_totals", "account", "kind", "currency", "state", "created_at", "amount_minor"),
    )


class FundingAccount(Base):
    """A Deriv account that pays top-ups and receives sweeps for one or more MT5 accounts: the unit that
    evaluations of those accounts are serialized on (its lane; a row lock across hosts)."""

    __tablename__ = "funding_accounts"

    login: Mapped[str] = mapped_column(String(32), primary_key=True)
    currency: Mapped[str] = mapped_column(String(12), nullable=False)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_intent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TransferEvent(Base):
    __tablename__ = "transfer_events"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    transfer_id: Mapped[int] = mapped_column(ID, ForeignKey("transfers.id"), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)  # "agent", "reconcile", "operator:<user>"
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class DecisionRow(Base):
    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    account: Mapped[str] = mapped_column(String(32), nullable=False)
    policy: Mapped[str] = mapped_column(String(200), nullable=False)
    policy_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # top_up | sweep | none | error
    amount: Mapped[str | None] = mapped_column(String(40), nullable=True)
    currency: Mapped[str | None] = mapped_column(String(12), nullable=True)
    equity: Mapped[str | None] = mapped_column(String(40), nullable=True)
    equity_age_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    bound_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    details: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON object
    transfer_id: Mapped[int | None] = mapped_column(ID, ForeignKey("transfers.id"), nullable=True)
    # A run of identical no-op evaluations (agent/ledger/journal.py): the columns above are its first one.
    run_count: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    run_last_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    run_evals: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    run_sealed: Mapped[bool] = mapped_column(Boolean(create_constraint=False), nullable=False, default=False,
                                             server_default=false())

    __table_args__ = (Index("ix_decisions_account_at", "account", "at"),
                      Index("ix_decisions_account_id", "account", "id"),
                      Index("ix_decisions_open_runs", "id", sqlite_where=text(OPEN_RUN),
                            postgresql_where=text(OPEN_RUN)))


class AccountVersion(Base):
    """A counter per account raised by database triggers on any write to its transfers, halts or equity peak
    (migration 0007): the engine's in-memory summary of the account is current while it has not moved."""

    __tablename__ = "account_versions"

    account: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class Halt(Base):
    """A persistent latch: only `fund-agent resume` clears it (sets cleared_at)."""

    __tablename__ = "halts"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    account: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # operator | kill_switch | unresolved
    scope: Mapped[str] = mapped_column(String(16), nullable=False)  # top_up | all
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cleared_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class EquityPeak(Base):
    __tablename__ = "equity_peaks"

    account: Mapped[str] = mapped_column(String(32), primary_key=True)
    peak: Mapped[str] = mapped_column(String(40), nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class OutboxRow(Base):
    """A notification to deliver at least once; `event_id` is stable so that receivers can drop repeats."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), nullable=False)
    channel: Mapped[str] = mapped_column(String(16), nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("event_id", "channel", name="uq_outbox_event_id_channel"),
        Index("ix_outbox_due", "delivered_at", "next_attempt_at"),
    )


class NotifyCursor(Base):
    """How far the outbox has read each ledger table (transfer_events, halts, decisions)."""

    __tablename__ = "notify_cursors"

    source: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(ID, nullable=False)


class AccountLease(Base):
    """Which agent acts on an account when several hosts share one ledger. `token` grows by one at every claim:
    a money write checks (holder, token) in its own transaction, so a host that lost the lease (frozen, then
    woken) cannot write under an old claim."""

    __tablename__ = "account_leases"

    account: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200), nullable=True)  # owner id host:pid:run
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host_id, for people
    token: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # the database's clock
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AgentHost(Base):
    """Agents that share the ledger, with their last heartbeat: how many are alive decides each one's share."""

    __tablename__ = "agent_hosts"

    holder: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class AuditChainEntry(Base):
    """One link of the tamper-evidence hash chain (agent/audit/chain.py): a row appended to a money table, or a
    halt's clearing, hashed over its canonical encoding and the previous link of its chain. `chain` is `ledger`
    (transfers, their events, halts, decisions that acted, prune checkpoints) or `journal` (decisions that did
    nothing: the only rows `db prune` removes, so pruning cuts a prefix of their chain alone)."""

    __tablename__ = "audit_chain"

    seq: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=False)
    chain: Mapped[str] = mapped_column(String(8), nullable=False)
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    row_id: Mapped[int] = mapped_column(ID, nullable=False)
    action: Mapped[str] = mapped_column(String(8), nullable=False)  # create | clear | append
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (
        UniqueConstraint("source", "action", "row_id", name="uq_audit_chain_source_action_row_id"),
        Index("ix_audit_chain_chain_seq", "chain", "seq"),
    )


class AuditHead(Base):
    """The newest link of each chain: the one row writers lock (FOR UPDATE on PostgreSQL) so that concurrent
    writers never fork a chain."""

    __tablename__ = "audit_head"

    chain: Mapped[str] = mapped_column(String(8), primary_key=True)
    seq: Mapped[int] = mapped_column(ID, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditCheckpoint(Base):
    """A `db prune`: the journal chain now starts after `journal_seq`, whose hash was `journal_hash`. The row is
    itself chained on the ledger chain, so the pruned range's head cannot be changed unseen."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    journal_seq: Mapped[int] = mapped_column(ID, nullable=False)
    journal_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    pruned_count: Mapped[int] = mapped_column(ID, nullable=False)
    cutoff: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
