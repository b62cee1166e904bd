-- Enables Debezium CDC on the KnowTon database: replication slot, connector role, publication,
-- replica identity, heartbeat row, and the monitoring views and health check operators query.
--
-- Idempotent and convergent: apply it with `psql -f` or as one multi-statement string (which
-- PostgreSQL runs as one implicit transaction) as often as you like. Run it as a superuser (or the
-- database owner with CREATEROLE and REPLICATION), after sql/postgres/schema.sql.
-- The knowton_cdc role gets no password here: the application sets it from its environment.

-- The slot must come first: pg_create_logical_replication_slot refuses to run in a transaction that
-- has already written anything, and the whole file may run as a single implicit transaction.
-- The guard makes re-applying a no-op instead of an "already exists" error.
-- Apply this file before the application writes: pgoutput (PostgreSQL < 18) fails on changes decoded
-- from before the publication existed, and on a first apply the slot briefly predates the publication.
SELECT slot_name, lsn
FROM pg_create_logical_replication_slot('knowton_cdc_slot', 'pgoutput')
WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'knowton_cdc_slot');

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'knowton_cdc') THEN
        CREATE ROLE knowton_cdc LOGIN REPLICATION;
    END IF;
END
$$;

-- Converge a pre-existing role (created by hand, or altered since) to what Debezium needs.
ALTER ROLE knowton_cdc WITH LOGIN REPLICATION;

GRANT USAGE ON SCHEMA public, ops TO knowton_cdc;
-- SELECT is what Debezium's initial and incremental snapshots read with.
GRANT SELECT ON public."User", public."Content", public."Purchase" TO knowton_cdc;
-- Debezium's heartbeat.action.query upserts into ops.heartbeat as knowton_cdc.
GRANT SELECT, INSERT, UPDATE ON ops.heartbeat TO knowton_cdc;
-- Incremental snapshots: Debezium writes its window watermarks into the signalling table.
GRANT SELECT, INSERT, UPDATE, DELETE ON ops.debezium_signal TO knowton_cdc;

-- FULL puts the whole old row into UPDATE and DELETE events, so the sinks and the DLQ replay never
-- need to look a deleted row up in PostgreSQL.
ALTER TABLE public."User" REPLICA IDENTITY FULL;
ALTER TABLE public."Content" REPLICA IDENTITY FULL;
ALTER TABLE public."Purchase" REPLICA IDENTITY FULL;
ALTER TABLE ops.heartbeat REPLICA IDENTITY FULL;
ALTER TABLE ops.debezium_signal REPLICA IDENTITY FULL;

-- SET TABLE on re-apply makes the publication converge to exactly this list, dropping strays.
-- The heartbeat table is published so its upserts move the slot even when the synced tables are idle; the
-- signalling table so Debezium reads signals and its snapshot watermarks in line with the changes.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'knowton_cdc_publication') THEN
        CREATE PUBLICATION knowton_cdc_publication
            FOR TABLE public."User", public."Content", public."Purchase", ops.heartbeat, ops.debezium_signal;
    ELSE
        ALTER PUBLICATION knowton_cdc_publication
            SET TABLE public."User", public."Content", public."Purchase", ops.heartbeat, ops.debezium_signal;
        ALTER PUBLICATION knowton_cdc_publication
            SET (publish = 'insert, update, delete, truncate');
    END IF;
END
$$;

-- Comes after the publication so that, on a first apply, the slot decodes this write with the
-- publication already visible.
INSERT INTO ops.heartbeat (id, ts) VALUES (1, now()) ON CONFLICT (id) DO NOTHING;

-- Slots are cluster-wide; only ours matter here. Lag is measured from what the consumer has confirmed,
-- falling back to restart_lsn for a slot that has never been consumed from.
CREATE OR REPLACE VIEW public.replication_status AS
SELECT
    s.slot_name::text AS slot_name,
    s.plugin::text AS plugin,
    s.slot_type,
    s.active,
    s.active_pid,
    s.wal_status,
    s.restart_lsn,
    s.confirmed_flush_lsn,
    pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(s.confirmed_flush_lsn, s.restart_lsn))::bigint
        AS lag_bytes,
    pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(s.confirmed_flush_lsn, s.restart_lsn)))
        AS lag_pretty
FROM pg_replication_slots AS s
WHERE starts_with(s.slot_name::text, 'knowton');

CREATE OR REPLACE VIEW public.published_tables AS
SELECT
    pt.pubname::text AS pubname,
    pt.schemaname::text AS schemaname,
    pt.tablename::text AS tablename,
    CASE c.relreplident
        WHEN 'f' THEN 'full'
        WHEN 'd' THEN 'default'
        WHEN 'i' THEN 'index'
        WHEN 'n' THEN 'nothing'
        ELSE c.relreplident::text
    END AS replica_identity
FROM pg_publication_tables AS pt
JOIN pg_namespace AS n ON n.nspname = pt.schemaname
JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = pt.tablename
WHERE starts_with(pt.pubname::text, 'knowton');

-- One row per check so the Dagster asset check can turn each into metadata.
-- Missing synced tables or a lost slot mean data loss (ERROR). An inactive slot or a non-FULL
-- replica identity still deliver every change, just degraded (WARN).
CREATE OR REPLACE FUNCTION public.check_cdc_health()
RETURNS TABLE (check_name text, status text, detail text)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, public
AS $$
#variable_conflict use_column
DECLARE
    v_slot_name constant text := 'knowton_cdc_slot';
    v_publication constant text := 'knowton_cdc_publication';
    v_wal_level text := current_setting('wal_level');
    v_slot record;
    v_slot_found boolean;
    v_missing text[];
    v_table record;
BEGIN
    check_name := 'wal_level';
    status := CASE WHEN v_wal_level = 'logical' THEN 'OK' ELSE 'ERROR' END;
    detail := format('wal_level is %s', v_wal_level);
    RETURN NEXT;

    check_name := 'publication';
    IF NOT EXISTS (SELECT 1 FROM pg_publication AS p WHERE p.pubname = v_publication) THEN
        status := 'ERROR';
        detail := format('publication %s does not exist', v_publication);
    ELSE
        SELECT array_agg(w.tablename ORDER BY w.tablename) INTO v_missing
        FROM (VALUES ('User'), ('Content'), ('Purchase')) AS w (tablename)
        WHERE NOT EXISTS (
            SELECT 1 FROM pg_publication_tables AS pt
            WHERE pt.pubname = v_publication
              AND pt.schemaname = 'public'
              AND pt.tablename = w.tablename
        );
        IF v_missing IS NULL THEN
            status := 'OK';
            detail := format('publication %s contains "User", "Content", "Purchase"', v_publication);
        ELSE
            status := 'ERROR';
            detail := format('publication %s is missing %s', v_publication,
                             array_to_string(v_missing, ', '));
        END IF;
    END IF;
    RETURN NEXT;

    SELECT s.plugin, s.slot_type, s.active, s.active_pid, s.wal_status,
           pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(s.confirmed_flush_lsn, s.restart_lsn))::bigint
               AS lag_bytes
    INTO v_slot
    FROM pg_replication_slots AS s
    WHERE s.slot_name = v_slot_name;
    v_slot_found := FOUND;

    check_name := 'replication_slot';
    IF NOT v_slot_found THEN
        status := 'ERROR';
        detail := format('replication slot %s does not exist', v_slot_name);
    ELSIF v_slot.slot_type <> 'logical' OR v_slot.plugin IS DISTINCT FROM 'pgoutput' THEN
        status := 'ERROR';
        detail := format('replication slot %s is %s/%s, expected logical/pgoutput',
                         v_slot_name, v_slot.slot_type, v_slot.plugin);
    ELSE
        status := 'OK';
        detail := format('replication slot %s exists (pgoutput)', v_slot_name);
    END IF;
    RETURN NEXT;

    check_name := 'replication_slot_active';
    IF NOT v_slot_found THEN
        status := 'ERROR';
        detail := format('replication slot %s does not exist', v_slot_name);
    ELSIF v_slot.active THEN
        status := 'OK';
        detail := format('consumed by pid %s, lag %s', v_slot.active_pid,
                         pg_size_pretty(v_slot.lag_bytes));
    ELSE
        status := 'WARN';
        detail := format('no consumer attached (is the Debezium connector running?), lag %s',
                         pg_size_pretty(v_slot.lag_bytes));
    END IF;
    RETURN NEXT;

    check_name := 'replication_slot_wal_status';
    IF NOT v_slot_found THEN
        status := 'ERROR';
        detail := format('replication slot %s does not exist', v_slot_name);
    ELSE
        -- 'unreserved' is lost at the next checkpoint unless the consumer catches up, and
        -- 'lost' means the slot can no longer stream: both need a resnapshot, so both are errors.
        status := CASE
            WHEN v_slot.wal_status IN ('unreserved', 'lost') THEN 'ERROR'
            WHEN v_slot.wal_status = 'extended' THEN 'WARN'
            ELSE 'OK'
        END;
        detail := format('wal_status is %s, lag %s', coalesce(v_slot.wal_status, 'unknown'),
                         pg_size_pretty(v_slot.lag_bytes));
    END IF;
    RETURN NEXT;

    FOR v_table IN
        SELECT t.schemaname, t.tablename, t.replica_identity
        FROM public.published_tables AS t
        WHERE t.pubname = v_publication
        ORDER BY t.schemaname, t.tablename
    LOOP
        check_name := format('replica_identity:%s.%s', v_table.schemaname, v_table.tablename);
        status := CASE v_table.replica_identity
            WHEN 'full' THEN 'OK'
            -- Without a replica identity PostgreSQL rejects UPDATE and DELETE on a published table.
            WHEN 'nothing' THEN 'ERROR'
            ELSE 'WARN'
        END;
        detail := format('replica identity is %s', v_table.replica_identity);
        RETURN NEXT;
    END LOOP;
END
$$;

GRANT SELECT ON public.replication_status, public.published_tables TO knowton_cdc;
GRANT EXECUTE ON FUNCTION public.check_cdc_health() TO knowton_cdc;
