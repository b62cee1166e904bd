"""PostgreSQL, the source of truth: its synced tables as external assets."""
