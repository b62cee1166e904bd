"""The code location loads, with the asset graph, jobs and instance policy the project is known by."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import yaml

from knowton_pipeline.definitions import defs
from knowton_pipeline.defs.resources import CLICKHOUSE_POOL
from knowton_pipeline.lib.settings import PROJECT_ROOT, Settings


def _defs() -> dg.Definitions:
    return defs()


def test_definitions_are_loadable() -> None:
    dg.Definitions.validate_loadable(_defs())


def test_asset_keys_snapshot() -> None:
    keys = sorted(k.to_user_string() for k in _defs().resolve_all_asset_keys())
    assert keys == [
        "clickhouse/knowton/content_sales_daily",
        "clickhouse/knowton/contents",
        "clickhouse/knowton/purchases",
        "clickhouse/knowton/user_activity",
        "clickhouse/knowton/users",
        "elasticsearch/knowton-contents",
        "elasticsearch/knowton-users",
        "kafka/topics/cdc-Content",
        "kafka/topics/cdc-Purchase",
        "kafka/topics/cdc-User",
        "kafka/topics/cdc-heartbeat",
        "kafka/topics/dlq-clickhouse-failed",
        "kafka/topics/dlq-elasticsearch-failed",
        "kafka/topics/dlq-parked",
        "postgres/ops/heartbeat",
        "postgres/public/Content",
        "postgres/public/Purchase",
        "postgres/public/User",
    ]


def test_each_cdc_topic_is_downstream_of_its_postgres_table() -> None:
    graph = _defs().resolve_asset_graph()
    for table in ("User", "Content", "Purchase"):
        topic = dg.AssetKey(["kafka", "topics", f"cdc-{table}"])
        assert graph.get(topic).parent_keys == {dg.AssetKey(["postgres", "public", table])}
    assert graph.get(dg.AssetKey(["postgres", "public", "User"])).kinds == {"postgres"}


def test_jobs_snapshot_and_clickhouse_ops_hold_the_clickhouse_pool() -> None:
    d = _defs()
    jobs = {j.name for j in d.resolve_all_job_defs() if not j.name.startswith("__")}
    assert jobs == {
        "apply_cdc",
        "apply_schemas",
        "deploy_connectors",
        "rebuild_search_index",
        "reconcile",
        "repair",
        "reprocess_dlq",
        "restart_failed_connectors",
        "health_checks",
        "maintenance",
        "heal_replication",
    }
    assert d.resolve_job_def("maintenance").nodes[0].definition.pool == CLICKHOUSE_POOL  # type: ignore[union-attr]
    assert d.resolve_job_def("repair").nodes[0].definition.pool == CLICKHOUSE_POOL  # type: ignore[union-attr]
    assert d.resolve_job_def("reprocess_dlq").nodes[0].definition.pool == CLICKHOUSE_POOL  # type: ignore[union-attr]
    assert d.resolve_job_def("apply_cdc").nodes[0].definition.pool == CLICKHOUSE_POOL  # type: ignore[union-attr]
    schema_job = d.resolve_job_def("apply_schemas")
    pools = {n.name: n.definition.pool for n in schema_job.nodes}  # type: ignore[union-attr]
    assert pools["apply_clickhouse_schema"] == CLICKHOUSE_POOL
    assert pools["apply_postgres_schema"] is None


def test_mirrors_sit_downstream_of_their_topic_and_contents_index_of_users_and_purchases_too() -> None:
    graph = _defs().resolve_asset_graph()
    mirror = graph.get(dg.AssetKey(["clickhouse", "knowton", "users"]))
    assert mirror.parent_keys == {dg.AssetKey(["kafka", "topics", "cdc-User"])}
    assert mirror.partitions_def is not None
    contents = graph.get(dg.AssetKey(["elasticsearch", "knowton-contents"]))
    assert contents.parent_keys == {
        dg.AssetKey(["kafka", "topics", f"cdc-{t}"]) for t in ("Content", "User", "Purchase")
    }


def test_mirrors_and_indices_carry_the_freshness_their_sinks_keep() -> None:
    graph = _defs().resolve_asset_graph()
    kept = {
        k.to_user_string()
        for k in graph.get_all_asset_keys()
        if isinstance(graph.get(k).freshness_policy, dg.FreshnessPolicy)
    }
    assert kept == {
        "clickhouse/knowton/users",
        "clickhouse/knowton/contents",
        "clickhouse/knowton/purchases",
        "elasticsearch/knowton-users",
        "elasticsearch/knowton-contents",
    }


def test_every_mirror_index_and_aggregate_has_a_reconcile_check_and_schedules_pick_the_mode() -> None:
    d = _defs()
    checked = {
        k.asset_key.to_user_string() for k in d.resolve_asset_graph().asset_check_keys if k.name == "matches_postgres"
    }
    assert checked == {
        "clickhouse/knowton/users",
        "clickhouse/knowton/contents",
        "clickhouse/knowton/purchases",
        "clickhouse/knowton/user_activity",
        "clickhouse/knowton/content_sales_daily",
        "elasticsearch/knowton-users",
        "elasticsearch/knowton-contents",
    }
    modes = {}
    for name in ("reconcile_hourly", "reconcile_daily"):
        schedule = d.resolve_schedule_def(name)
        assert schedule.job_name == "reconcile"
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
        [request] = schedule.evaluate_tick(dg.build_schedule_context()).run_requests or []
        modes[name] = request.run_config["ops"]["reconcile_stores"]["config"]["mode"]
    assert modes == {"reconcile_hourly": "incremental", "reconcile_daily": "full"}


def test_health_checks_cover_every_synced_table_and_the_replication_slot() -> None:
    checks = {(k.asset_key.to_user_string(), k.name) for k in _defs().resolve_asset_graph().asset_check_keys}
    for t in ("User", "Content", "Purchase"):
        assert (f"postgres/public/{t}", "schema_matches_stores") in checks
    assert {
        ("postgres/ops/heartbeat", "replication_slot"),
        ("postgres/ops/heartbeat", "end_to_end_lag_clickhouse"),
        ("postgres/ops/heartbeat", "end_to_end_lag_elasticsearch"),
    } <= checks
    stored = {a for a, name in checks if name == "storage"}
    assert stored == {
        "clickhouse/knowton/users",
        "clickhouse/knowton/contents",
        "clickhouse/knowton/purchases",
        "elasticsearch/knowton-users",
        "elasticsearch/knowton-contents",
    }


def test_maintenance_runs_daily_and_dagster_prunes_its_own_ticks() -> None:
    schedule = _defs().resolve_schedule_def("maintenance_daily")
    assert schedule.job_name == "maintenance" and schedule.cron_schedule == "15 4 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    retention = yaml.safe_load((PROJECT_ROOT / "config" / "dagster.yaml").read_text())["retention"]
    assert retention["schedule"]["purge_after_days"] == 90
    assert set(retention["sensor"]["purge_after_days"]) == {"skipped", "failure", "success"}


def test_sensors_snapshot() -> None:
    d = _defs()
    sensors = {s.name: d.resolve_sensor_def(s.name) for s in d.sensors or []}
    assert set(sensors) == {
        "cdc_lag_sensor",
        "dlq_sensor",
        "connector_health_sensor",
        "replication_lag_sensor",
        "check_failure_alert_sensor",
        "run_failure_alert_sensor",
    }
    for sensor in sensors.values():
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_dagster_yaml_keeps_clickhouse_runs_from_overlapping_and_stores_runs_in_postgres() -> None:
    config = yaml.safe_load((PROJECT_ROOT / "config" / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"] == {"granularity": "run", "default_limit": 1}
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "KNOWTON_PG_PASSWORD"}


def test_instance_from_dagster_yaml_uses_postgres_storage_and_run_pools(stack, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_concurrency_config().pool_config.pool_granularity.value == "run"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_dagster_definitions_validate_passes(stack, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, **settings.export_env(include_secrets=True), "DAGSTER_HOME": str(settings.dagster_home)}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr
