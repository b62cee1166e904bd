-- Tables the pipeline itself keeps in PostgreSQL, in schema ops. Idempotent.

CREATE SCHEMA IF NOT EXISTS ops;

-- DLQ records that failed their last replay attempt: parked for an operator, never dropped.
-- One row per original record and target; parking the same record again updates it.
CREATE TABLE IF NOT EXISTS ops.dlq_parked (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target           text        NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    record_key       bytea       NULL,
    record_value     bytea       NULL,
    error_class      text        NOT NULL,
    error_message    text        NOT NULL,
    attempts         integer     NOT NULL,
    first_failure_at timestamptz NOT NULL,
    parked_at        timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz NULL,
    UNIQUE (target, source_topic, source_partition, source_offset)
);

CREATE INDEX IF NOT EXISTS dlq_parked_unresolved ON ops.dlq_parked (parked_at) WHERE resolved_at IS NULL;

-- Days a backfill run has finished, so a re-execution of a failed run resumes where it stopped
-- instead of redoing every day (re-syncing is harmless, only slower: writes are versioned).
CREATE TABLE IF NOT EXISTS ops.backfill_progress (
    root_run_id  text        NOT NULL,
    asset        text        NOT NULL,
    day          date        NOT NULL,
    rows_written bigint      NOT NULL,
    snapshot_lsn bigint      NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (root_run_id, asset, day)
);

-- One row per reconciliation of a table with a target (the `reconcile` job, `knowton reconcile`).
CREATE TABLE IF NOT EXISTS ops.reconcile_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dagster_run_id   text             NULL,
    table_name       text             NOT NULL,
    target           text             NOT NULL,
    mode             text             NOT NULL,
    started_at       timestamptz      NOT NULL,
    seconds          double precision NOT NULL,
    source_rows      bigint           NOT NULL,
    target_rows      bigint           NOT NULL,
    missing          integer          NOT NULL,
    extra            integer          NOT NULL,
    different        integer          NOT NULL,
    in_flight        integer          NOT NULL,
    rows_compared    bigint           NOT NULL,
    keys_recorded    integer          NOT NULL,
    clean            boolean          NOT NULL
);

CREATE INDEX IF NOT EXISTS reconcile_runs_latest ON ops.reconcile_runs (table_name, target, id DESC);

-- The differing keys of a reconciliation (key as text), what repair re-syncs and re-verifies.
CREATE TABLE IF NOT EXISTS ops.reconcile_diffs (
    reconcile_id  bigint      NOT NULL REFERENCES ops.reconcile_runs (id) ON DELETE CASCADE,
    key           text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('missing', 'extra', 'different')),
    columns       text[]      NOT NULL DEFAULT '{}',
    repaired_at   timestamptz NULL,
    verified      boolean     NULL,
    PRIMARY KEY (reconcile_id, key)
);

-- WAL positions noted by each maintenance run, so a version (an LSN) can be given an age: the tombstone purge
-- removes deletes older than its window, i.e. below the newest position noted at least that long ago.
CREATE TABLE IF NOT EXISTS ops.wal_marks (
    noted_at timestamptz NOT NULL PRIMARY KEY DEFAULT now(),
    lsn      bigint      NOT NULL
);

-- Every tombstone purge: which store, below which version, how many keys it removed. The highest
-- below_version is the purge horizon: a write versioned below it could resurrect a purged delete, so the apply
-- and the DLQ replay refuse it.
CREATE TABLE IF NOT EXISTS ops.purges (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purged_at     timestamptz NOT NULL DEFAULT now(),
    store         text        NOT NULL,
    table_name    text        NOT NULL,
    below_version bigint      NOT NULL,
    removed       bigint      NOT NULL
);

-- Why a recorded difference was repaired (the scheduled reconciliation's automatic repair, the repair job, ...).
ALTER TABLE ops.reconcile_diffs ADD COLUMN IF NOT EXISTS repair_reason text NULL;

-- Drift incidents, one per (table, target) at a time: opened when a reconciliation finds differences that
-- remain, closed when one finds none left (or its repair verified them). closed_at - opened_at is the time to
-- heal, which the `matches_postgres` check reports.
CREATE TABLE IF NOT EXISTS ops.incidents (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject   text        NOT NULL,
    opened_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz NULL,
    detail    text        NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open ON ops.incidents (subject) WHERE closed_at IS NULL;

-- Every TRUNCATE the sinks have seen, at its version. With several partitions per topic a change committed before
-- a truncate can reach a sink after it (the truncate has no key, so it lands in any partition); a change of the
-- table versioned below its newest truncate is written as a tombstone, never as a live row.
CREATE TABLE IF NOT EXISTS ops.truncates (
    table_name text        NOT NULL,
    version    bigint      NOT NULL,
    noted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, version)
);
