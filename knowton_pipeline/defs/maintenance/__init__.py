"""Housekeeping: tombstone purge, retention of history, and what each store keeps on disk."""
