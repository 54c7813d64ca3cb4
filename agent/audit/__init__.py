"""Audit: the hash chain, verify (chain, invariants, against the broker), reports."""
