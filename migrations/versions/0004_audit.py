"""Audit: the tamper-evidence hash chain (audit_chain, audit_head, audit_checkpoints), the auditor's SQL views
(v_transfers, v_net_flow_daily, v_unresolved, with decimal amounts), and the chaining of an existing ledger from
its first row.

Revision ID: 0004
Revises: 0003
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_chain",
        sa.Column("seq", ID, primary_key=True, autoincrement=False),
        sa.Column("chain", sa.String(8), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("row_id", ID, nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", UTC_TEXT, nullable=False),
        sa.UniqueConstraint("source", "action", "row_id", name="uq_audit_chain_source_action_row_id"),
    )
    op.create_index("ix_audit_chain_chain_seq", "audit_chain", ["chain", "seq"])
    op.create_table(
        "audit_head",
        sa.Column("chain", sa.String(8), primary_key=True),
        sa.Column("seq", ID, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("at", UTC_TEXT, nullable=False),
        sa.Column("journal_seq", ID, nullable=False),
        sa.Column("journal_hash", sa.String(64), nullable=False),
        sa.Column("pruned_count", ID, nullable=False),
        sa.Column("cutoff", UTC_TEXT, nullable=False),
    )
    op.execute(f"INSERT INTO audit_head (chain, seq, hash) VALUES ('ledger', 0, '{GENESIS}'), "
               f"('journal', 0, '{GENESIS}')")
    bind = op.get_bind()
    from agent.audit.chain import KINDS, backfill
    from agent.audit.views import create_views

    create_views(bind)

    # an existing ledger is chained from its first row, in this transaction (runs of decisions come with 0007)
    backfill(bind, datetime.now(UTC), kinds=[kind for kind in KINDS if kind.action != "run"])


def downgrade() -> None:
    from agent.audit.views import drop_views

    drop_views(op.get_bind())
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    op.drop_index("ix_audit_chain_chain_seq", "audit_chain")
    op.drop_table("audit_chain")
