"""The auditor's SQL views (v_transfers, v_net_flow_daily, v_unresolved), with decimal amounts.

Created by migration 0004. SQLite checks every view when a table is renamed, and Alembic's batch mode (how a
migration alters a table on SQLite) renames a copy of the table into place: a later migration that batch-alters
`transfers` must call drop_views(bind) before and create_views(bind) after, or SQLite refuses with
"error in view v_transfers: no such table".
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from agent.money import CURRENCY_PLACES

VIEWS = ("v_unresolved", "v_net_flow_daily", "v_transfers")


def _places() -> dict[int, list[str]]:
    by_places: dict[int, list[str]] = {}
    for currency, places in sorted(CURRENCY_PLACES.items()):
        by_places.setdefault(places, []).append(currency)
    return by_places


def decimal_sql(minor: str, currency: str, dialect: str) -> str:
    """SQL for an amount in integer minor units as an exact decimal: numeric on PostgreSQL; on SQLite, which has
    no decimal type, exact text built with integer arithmetic ('600.00', '-0.05'), never a binary float."""
    whens = []
    for places, currencies in sorted(_places().items()):
        names = ", ".join(f"'{c}'" for c in currencies)
        scale = 10 ** places
        if dialect == "postgresql":
            expr = f"ROUND(CAST({minor} AS NUMERIC) / {scale}, {places})"
        elif places == 0:
            expr = f"CAST({minor} AS TEXT)"
        else:
            expr = (f"(CASE WHEN {minor} < 0 THEN '-' ELSE '' END || (ABS({minor}) / {scale}) || '.' || "
                    f"SUBSTR('{'0' * places}' || (ABS({minor}) % {scale}), -{places}))")
        whens.append(f"WHEN {currency} IN ({names}) THEN {expr}")
    return f"(CASE {' '.join(whens)} END)"


def day_sql(column: str, dialect: str) -> str:
    if dialect == "postgresql":
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    return f"SUBSTR({column}, 1, 10)"  # fixed-width ISO 8601 UTC text


def view_sql(dialect: str) -> list[str]:
    amount = decimal_sql("t.amount_minor", "t.currency", dialect)
    top_up = "SUM(CASE WHEN t.kind = 'top_up' THEN t.amount_minor ELSE 0 END)"
    sweep = "SUM(CASE WHEN t.kind = 'sweep' THEN t.amount_minor ELSE 0 END)"
    day = day_sql("t.created_at", dialect)
    return [
        f"""CREATE VIEW v_transfers AS
SELECT t.id, t.created_at, t.updated_at, t.account, t.funding, t.kind, {amount} AS amount, t.amount_minor,
       t.currency, t.state, t.broker_txn_id, t.policy, t.equity, t.reason, t.error_code, t.error_message,
       t.sent_at, t.resolved_by
FROM transfers t""",
        f"""CREATE VIEW v_net_flow_daily AS
SELECT {day} AS day, t.account, t.funding, t.currency,
       {decimal_sql(top_up, 't.currency', dialect)} AS top_up,
       {decimal_sql(sweep, 't.currency', dialect)} AS sweep,
       {decimal_sql(f'({top_up} - {sweep})', 't.currency', dialect)} AS net,
       SUM(CASE WHEN t.kind = 'top_up' THEN 1 ELSE 0 END) AS top_up_count,
       SUM(CASE WHEN t.kind = 'sweep' THEN 1 ELSE 0 END) AS sweep_count
FROM transfers t
WHERE t.state = 'confirmed'
GROUP BY {day}, t.account, t.funding, t.currency""",
        f"""CREATE VIEW v_unresolved AS
SELECT t.id, t.created_at, t.sent_at, t.account, t.funding, t.kind, {amount} AS amount, t.currency, t.state,
       t.owner, t.error_code, t.error_message, t.reason
FROM transfers t
WHERE t.state IN ('pending', 'sent', 'unknown')""",
    ]


def create_views(bind: Connection) -> None:
    for statement in view_sql(bind.dialect.name):
        bind.execute(text(statement))


def drop_views(bind: Connection) -> None:
    for view in VIEWS:
        bind.execute(text(f"DROP VIEW IF EXISTS {view}"))
