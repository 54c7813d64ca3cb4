"""The initial ledger: transfers, their events, decisions, halts, equity peaks.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# agent.ledger.models.UTCDateTime: fixed-width ISO 8601 UTC text on SQLite, timestamptz on PostgreSQL
UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")
# row ids: BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite, as every existing ledger has them
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN = "state IN ('pending','sent','unknown')"


def upgrade() -> None:
    op.create_table(
        "transfers",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTC_TEXT, nullable=False),
        sa.Column("updated_at", UTC_TEXT, nullable=False),
        sa.Column("account", sa.String(32), nullable=False),
        sa.Column("funding", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(12), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("broker_txn_id", sa.BigInteger, nullable=True),
        sa.Column("policy", sa.String(200), nullable=False),
        sa.Column("policy_sha256", sa.String(64), nullable=False),
        sa.Column("equity", sa.String(40), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("sent_at", UTC_TEXT, nullable=True),
        sa.Column("resolved_by", sa.String(200), nullable=True),
        sa.CheckConstraint("state IN ('pending','sent','confirmed','failed','unknown')", name="state"),
        sa.CheckConstraint("kind IN ('top_up','sweep')", name="kind"),
        sa.CheckConstraint("amount_minor > 0", name="amount_positive"),
        sa.UniqueConstraint("broker_txn_id", name="uq_transfers_broker_txn_id"),
    )
    op.create_index("uq_transfers_one_open_per_account", "transfers", ["account"], unique=True,
                    sqlite_where=sa.text(OPEN), postgresql_where=sa.text(OPEN))
    op.create_index("ix_transfers_account_created", "transfers", ["account", "created_at"])
    op.create_table(
        "transfer_events",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("transfer_id", ID, sa.ForeignKey("transfers.id"), nullable=False),
        sa.Column("at", UTC_TEXT, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_transfer_events_transfer_id", "transfer_events", ["transfer_id"])
    op.create_table(
        "decisions",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("at", UTC_TEXT, nullable=False),
        sa.Column("account", sa.String(32), nullable=False),
        sa.Column("policy", sa.String(200), nullable=False),
        sa.Column("policy_sha256", sa.String(64), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("amount", sa.String(40), nullable=True),
        sa.Column("currency", sa.String(12), nullable=True),
        sa.Column("equity", sa.String(40), nullable=True),
        sa.Column("equity_age_s", sa.Integer, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("bound_by", sa.String(100), nullable=True),
        sa.Column("details", sa.Text, nullable=True),
        sa.Column("transfer_id", ID, sa.ForeignKey("transfers.id"), nullable=True),
    )
    op.create_index("ix_decisions_account_at", "decisions", ["account", "at"])
    op.create_table(
        "halts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", UTC_TEXT, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("cleared_at", UTC_TEXT, nullable=True),
        sa.Column("cleared_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_halts_account", "halts", ["account"])
    op.create_table(
        "equity_peaks",
        sa.Column("account", sa.String(32), primary_key=True),
        sa.Column("peak", sa.String(40), nullable=False),
        sa.Column("at", UTC_TEXT, nullable=False),
    )


def downgrade() -> None:
    for table in ("equity_peaks", "halts", "decisions", "transfer_events", "transfers"):
        op.drop_table(table)
