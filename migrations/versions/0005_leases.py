"""Account leases with fencing tokens, and the agents that share a ledger.

Several hosts on one PostgreSQL ledger: each account is acted on by the one agent that holds its lease; the
token grows at every claim so that a money write can prove, in its own transaction, that its claim is current.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account_leases",
        sa.Column("account", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", UTC_TEXT, nullable=True),
        sa.Column("claimed_at", UTC_TEXT, nullable=True),
    )
    op.create_table(
        "agent_hosts",
        sa.Column("holder", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("started_at", UTC_TEXT, nullable=False),
        sa.Column("seen_at", UTC_TEXT, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_hosts")
    op.drop_table("account_leases")
