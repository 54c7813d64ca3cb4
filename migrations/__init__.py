"""Alembic migrations of the fund-agent ledger (shipped inside the wheel as agent.migrations)."""
