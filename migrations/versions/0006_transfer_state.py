"""Audit: chain every transfer's whole row (its mutable columns too: state, broker_txn_id, error fields, sent_at,
updated_at, resolved_by, owner). From now on each transfer event gets a `state` link, the transfer as the event
left it; an existing ledger gets one now per transfer, its row as it is, keyed by its latest event. No table
changes.

Revision ID: 0006
Revises: 0005
"""

from datetime import UTC, datetime

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from agent.audit.chain import BY_NAME, backfill

    backfill(op.get_bind(), datetime.now(UTC), kinds=(BY_NAME[("transfer_events", "state")],))


def downgrade() -> None:
    # the `state` links stay: links are never removed (the chain would stop verifying), and 0005's verify
    # simply does not read them
    pass
