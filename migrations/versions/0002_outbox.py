"""Notification outbox: one row per event and channel, derived from ledger rows past a persisted cursor.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# agent.ledger.models.UTCDateTime: fixed-width ISO 8601 UTC text on SQLite, timestamptz on PostgreSQL
UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")
# row ids: BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite, as every existing ledger has them
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", UTC_TEXT, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTC_TEXT, nullable=False),
        sa.Column("delivered_at", UTC_TEXT, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.UniqueConstraint("event_id", "channel", name="uq_outbox_event_id_channel"),
    )
    op.create_index("ix_outbox_due", "outbox", ["delivered_at", "next_attempt_at"])
    op.create_table(
        "notify_cursors",
        sa.Column("source", sa.String(32), primary_key=True),
        sa.Column("last_id", ID, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("notify_cursors")
    op.drop_table("outbox")
