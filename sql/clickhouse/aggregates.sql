-- Daily analytics aggregates computed from the ClickHouse mirrors (read with FINAL).
-- Partitioned by day so a day is recomputed and swapped in atomically (REPLACE PARTITION), never
-- appended to twice, which keeps Dagster backfills of a day idempotent.
-- The loader splits this file on semicolon-newline, so comments here stay free of semicolons.

CREATE DATABASE IF NOT EXISTS knowton;

CREATE TABLE IF NOT EXISTS knowton.user_activity
(
    date         Date,
    user_address String,
    action_type  LowCardinality(String),
    action_count UInt64,
    total_value  Decimal(38, 6)
)
ENGINE = MergeTree
PARTITION BY date
ORDER BY (user_address, action_type);

CREATE TABLE IF NOT EXISTS knowton.content_sales_daily
(
    date        Date,
    content_id  Int64,
    creator     String,
    currency    LowCardinality(String),
    sales_count UInt64,
    revenue     Decimal(38, 6)
)
ENGINE = MergeTree
PARTITION BY date
ORDER BY (content_id, currency);
