"""Reconciliation: prove the stores agree with PostgreSQL, find the exact keys where they don't."""
