"""Speed: the compact decision journal and the per-account change counter.

- `decisions` gets the run columns (agent/ledger/journal.py): run_count, run_last_at, run_evals, run_sealed.
  Existing rows are runs of one evaluation: nothing to convert.
- `account_versions`: a counter per account, raised by triggers on every insert, update and delete of its
  transfers, halts and equity peak, whoever writes (this agent, another host, a command beside the service, an
  operator's SQL). The engine keeps an account's ledger summary in memory and re-reads it only when the counter
  moved.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

UTC_TEXT = sa.String(27).with_variant(sa.DateTime(timezone=True), "postgresql")

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

WATCHED = ("transfers", "halts", "equity_peaks")
OPEN_RUN = "NOT run_sealed AND run_count > 1"

SQLITE_BUMP = """INSERT INTO account_versions(account, version) VALUES ({row}.account, 1)
    ON CONFLICT(account) DO UPDATE SET version = version + 1;"""

# PostgreSQL: values from a sequence, which never hands out a number twice, even when a server crash drops the
# newest commits (no-op decisions commit with synchronous_commit off): a counter could otherwise come back to a
# value an engine already saw with other contents.
POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION fund_agent_bump_account_version() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO account_versions(account, version) VALUES (OLD.account, nextval('fund_agent_account_version_seq'))
        ON CONFLICT (account) DO UPDATE SET version = EXCLUDED.version;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.account IS DISTINCT FROM OLD.account) THEN
        INSERT INTO account_versions(account, version) VALUES (NEW.account, nextval('fund_agent_account_version_seq'))
        ON CONFLICT (account) DO UPDATE SET version = EXCLUDED.version;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if inspector.has_table("account_versions"):  # already there (a ledger whose revision was set back by hand)
        return
    op.add_column("decisions", sa.Column("run_count", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("decisions", sa.Column("run_last_at", UTC_TEXT, nullable=True))
    op.add_column("decisions", sa.Column("run_evals", sa.LargeBinary(), nullable=True))
    op.add_column("decisions", sa.Column("run_sealed", sa.Boolean(create_constraint=False), nullable=False,
                                         server_default=sa.false()))
    # the newest row of an account by id (the row a repeated evaluation joins, the one a new row ends)
    op.create_index("ix_decisions_account_id", "decisions", ["account", "id"])
    # the runs not ended yet (at most one an account): the heartbeat ends those whose hour is over
    op.create_index("ix_decisions_open_runs", "decisions", ["id"], sqlite_where=sa.text(OPEN_RUN),
                    postgresql_where=sa.text(OPEN_RUN))
    op.create_table(
        "account_versions",
        sa.Column("account", sa.String(32), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"),
    )
    if bind.dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE IF NOT EXISTS fund_agent_account_version_seq")
        op.execute(POSTGRES_FUNCTION)
        for table in WATCHED:
            # deferred to the commit: the counter's row lock is then the last lock a writer takes, after the
            # audit chain's head (which serializes writers), so no two writers ever wait on each other for it
            op.execute(f"CREATE CONSTRAINT TRIGGER trg_{table}_account_version AFTER INSERT OR UPDATE OR DELETE "
                       f"ON {table} DEFERRABLE INITIALLY DEFERRED "
                       "FOR EACH ROW EXECUTE FUNCTION fund_agent_bump_account_version()")
        return
    for table in WATCHED:
        op.execute(f"CREATE TRIGGER trg_{table}_version_insert AFTER INSERT ON {table} BEGIN "
                   f"{SQLITE_BUMP.format(row='NEW')} END")
        op.execute(f"CREATE TRIGGER trg_{table}_version_update AFTER UPDATE ON {table} BEGIN "
                   f"{SQLITE_BUMP.format(row='OLD')} "
                   f"INSERT INTO account_versions(account, version) SELECT NEW.account, 1 "
                   f"WHERE NEW.account IS NOT OLD.account ON CONFLICT(account) DO UPDATE SET version = version + 1; "
                   "END")
        op.execute(f"CREATE TRIGGER trg_{table}_version_delete AFTER DELETE ON {table} BEGIN "
                   f"{SQLITE_BUMP.format(row='OLD')} END")


def downgrade() -> None:
    bind = op.get_bind()
    for table in WATCHED:
        if bind.dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_account_version ON {table}")
        else:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_version_{event}")
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS fund_agent_bump_account_version()")
        op.execute("DROP SEQUENCE IF EXISTS fund_agent_account_version_seq")
    op.drop_index("ix_decisions_open_runs", "decisions")
    op.drop_index("ix_decisions_account_id", "decisions")
    op.drop_table("account_versions")
    with op.batch_alter_table("decisions") as batch:
        for column in ("run_sealed", "run_evals", "run_last_at", "run_count"):
            batch.drop_column(column)
