"""Backtest: replay readings through a policy with the real rules on a virtual clock."""
