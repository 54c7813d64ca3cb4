"""Transfers name the process that made them (owner), and funding accounts get a row of their own.

The owner lets reconciliation, `resolve` and a second process leave an in-flight transfer to the process that
sends it. The funding_accounts row is the unit of coordination for accounts that share one funding account:
one process serializes them with an in-process lane today; several hosts lock this row (the scale-out issue).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# agent.ledger.models.UTCDateTime: fixed-width ISO 8601 UTC text on SQLite, timestamptz on PostgreSQL
UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("transfers") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=True))
    op.create_table(
        "funding_accounts",
        sa.Column("login", sa.String(32), primary_key=True),
        sa.Column("currency", sa.String(12), nullable=False),
        sa.Column("first_seen_at", UTC_TEXT, nullable=False),
        sa.Column("last_intent_at", UTC_TEXT, nullable=True),
    )
    # Backfill: every funding account that already paid or received a transfer.
    op.execute("INSERT INTO funding_accounts (login, currency, first_seen_at, last_intent_at) "
               "SELECT funding, MIN(currency), MIN(created_at), MAX(created_at) FROM transfers GROUP BY funding")


def downgrade() -> None:
    op.drop_table("funding_accounts")
    with op.batch_alter_table("transfers") as batch:
        batch.drop_column("owner")
