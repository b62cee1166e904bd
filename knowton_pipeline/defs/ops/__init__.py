"""Operational jobs that span the stores (schema setup)."""
