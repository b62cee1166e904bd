-- ClickHouse mirrors of the KnowTon PostgreSQL tables, one row per primary key once read with FINAL.
-- version is the PostgreSQL LSN the row reflects, so a stale or replayed write never wins over a
-- newer one. is_deleted = 1 marks a delete, which FINAL hides, rather than removing the row, so a stale
-- backfill cannot resurrect it.
-- The loader splits this file on semicolon-newline, so comments here stay free of semicolons.

CREATE DATABASE IF NOT EXISTS knowton;

CREATE TABLE IF NOT EXISTS knowton.users
(
    address     String,
    username    String,
    email       Nullable(String),
    bio         Nullable(String),
    avatar_url  Nullable(String),
    reputation  Int32,
    is_verified Bool,
    created_at  DateTime64(6, 'UTC'),
    updated_at  DateTime64(6, 'UTC'),
    version     UInt64,
    is_deleted  UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY address;

CREATE TABLE IF NOT EXISTS knowton.contents
(
    id          Int64,
    creator     String,
    title       String,
    description Nullable(String),
    category    LowCardinality(String),
    tags        Array(String),
    price       Decimal(12, 2),
    status      LowCardinality(String),
    -- Canonical JSON text (sorted keys) of the jsonb column, so hashes match PostgreSQL's.
    metadata    String,
    created_at  DateTime64(6, 'UTC'),
    updated_at  DateTime64(6, 'UTC'),
    version     UInt64,
    is_deleted  UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id;

CREATE TABLE IF NOT EXISTS knowton.purchases
(
    id         Int64,
    content_id Int64,
    buyer      String,
    amount     Decimal(20, 6),
    currency   LowCardinality(String),
    tx_hash    Nullable(String),
    status     LowCardinality(String),
    created_at DateTime64(6, 'UTC'),
    updated_at DateTime64(6, 'UTC'),
    version    UInt64,
    is_deleted UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id;

-- Mirrors ops.heartbeat: its ts shows end-to-end freshness of the CDC path even when the synced
-- tables are idle.
CREATE TABLE IF NOT EXISTS knowton.cdc_heartbeat
(
    id         Int32,
    ts         DateTime64(6, 'UTC'),
    version    UInt64,
    is_deleted UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY id;
