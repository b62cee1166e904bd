"""ClickHouse: the mirror tables and the daily aggregates computed from them."""
