"""The `knowton` command: run the local stack, apply schemas, deploy connectors, seed demo data, reconcile."""

from __future__ import annotations

import functools
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from knowton_pipeline.lib.settings import Settings, SettingsError

if TYPE_CHECKING:
    from knowton_pipeline.lib.reconcile.engine import ReconcileResult

EXIT_ERROR = 2


class NameChoice(click.Choice):
    """A choice among names the project declares, looked up only when needed (so `knowton env` stays quick),
    and refused in the project's words: "unknown table 'Nope'; tables are: ..."."""

    def __init__(self, noun: str, names: Callable[[], Iterable[str]]) -> None:
        self.noun, self._names, self.case_sensitive = noun, names, True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return f"unknown {self.noun} {value!r}; {self.noun}s are: {', '.join(self.choices)}"


def _component_names() -> list[str]:
    from knowton_pipeline.stack.components import COMPONENTS

    return [c.name for c in COMPONENTS]


def _schema_stores() -> tuple[str, ...]:
    from knowton_pipeline.lib.schema import STORES

    return STORES


def _table_names() -> list[str]:
    from knowton_pipeline.lib.reconcile.run import table_names

    return ["all", *table_names()]


def _target_names() -> list[str]:
    from knowton_pipeline.lib.reconcile.run import target_names

    return ["all", *target_names()]


def _modes() -> tuple[str, ...]:
    from knowton_pipeline.lib.reconcile.engine import MODES

    return MODES


def pass_settings(command: Callable[..., int]) -> Callable[..., int]:
    """Hand the command its settings, read from the environment when it runs (`--help` needs none)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> int:
        return command(Settings.from_env(), *args, **kwargs)

    return run


def _print_status(statuses: Sequence[Any]) -> None:
    for s in statuses:
        pid = f"pid {s.pid}" if s.pid else ""
        click.echo(f"{s.name:<18} {s.state:<10} {s.address:<52} {pid:<11} {s.detail}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli() -> None:
    """The `knowton` command: run the local stack, apply schemas, deploy connectors, seed demo data, reconcile.

    Settings come from KNOWTON_* environment variables (`knowton env` prints them)."""


# --- stack ----------------------------------------------------------------------------------------------------
components_argument = click.argument(
    "components", nargs=-1, metavar="[COMPONENTS]...", type=NameChoice("component", _component_names)
)


@cli.group()
def stack() -> None:
    """The local stack: up | down | status | logs.

    COMPONENTS: postgres, kafka, connect, elasticsearch (default: all; ClickHouse is embedded)."""


@stack.command("up")
@components_argument
@pass_settings
def stack_up(settings: Settings, components: tuple[str, ...]) -> int:
    """Start the components (and what they depend on) and wait until each is healthy (idempotent)."""
    from knowton_pipeline.stack.manager import Stack

    _print_status(Stack(settings, echo=click.echo).up(components or None))
    return 0


@stack.command("down")
@components_argument
@pass_settings
def stack_down(settings: Settings, components: tuple[str, ...]) -> int:
    """Stop what `up` started."""
    from knowton_pipeline.stack.manager import Stack

    Stack(settings, echo=click.echo).down(components or None)
    return 0


@stack.command("status")
@components_argument
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_settings
def stack_status(settings: Settings, components: tuple[str, ...], as_json: bool) -> int:
    """Report each component; exit 1 when one is not running."""
    from knowton_pipeline.stack.manager import Stack, status_dicts

    statuses = Stack(settings, echo=click.echo).status(components or None)
    if as_json:
        click.echo(json.dumps(status_dicts(statuses), indent=2))
    else:
        _print_status(statuses)
    return 0 if all(s.state in ("running", "embedded", "remote", "in-use") for s in statuses) else 1


@stack.command("logs")
@components_argument
@click.option("-n", "--lines", default=40, show_default=True, type=click.IntRange(min=0), help="Lines per component.")
@pass_settings
def stack_logs(settings: Settings, components: tuple[str, ...], lines: int) -> int:
    """Print the end of each component's log."""
    from knowton_pipeline.stack.manager import Stack, tail

    stack = Stack(settings, echo=click.echo)
    for name in components or stack.components:
        log = stack.components[name].log
        click.echo(f"==> {log} <==")
        click.echo(tail(log, lines))
    return 0


# --- schema, connectors, seed, sync -----------------------------------------------------------------------------
@cli.group()
def schema() -> None:
    """The stores' schemas."""


@schema.command("apply")
@click.argument("stores", nargs=-1, metavar="[STORES]...", type=NameChoice("store", _schema_stores))
@pass_settings
def schema_apply(settings: Settings, stores: tuple[str, ...]) -> int:
    """Apply the PostgreSQL schema and CDC setup, the Kafka topics, the ClickHouse DDL and the Elasticsearch
    templates (idempotent).

    STORES: postgres, kafka, clickhouse, elasticsearch (default: all)."""
    from knowton_pipeline.lib import schema as schemas

    for line in schemas.apply_all(settings, stores=stores or None):
        click.echo(line)
    return 0


@cli.group()
def connectors() -> None:
    """Kafka Connect connectors, from connectors/*.json."""


@connectors.command("deploy")
@click.option("--dry-run", is_flag=True, help="Report what would change, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Also print the results as JSON.")
@pass_settings
def connectors_deploy(settings: Settings, dry_run: bool, as_json: bool) -> int:
    """Create or update each connector whose config differs; report the changed keys."""
    from knowton_pipeline.lib.connectors import deploy_connectors, load_connector_configs
    from knowton_pipeline.lib.kafka_connect import KafkaConnectClient

    results = deploy_connectors(KafkaConnectClient(settings.connect_url), load_connector_configs(), dry_run=dry_run)
    for r in results:
        click.echo(r.describe())
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


@connectors.command("status")
@pass_settings
def connectors_status(settings: Settings) -> int:
    """GET /connectors?expand=status, as JSON."""
    from knowton_pipeline.lib.kafka_connect import KafkaConnectClient

    click.echo(json.dumps(KafkaConnectClient(settings.connect_url).connectors_with_status(), indent=2))
    return 0


@cli.command()
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(min=0))
@click.option("--contents", default=20_000, show_default=True, type=click.IntRange(min=0))
@click.option("--purchases", default=100_000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=42, show_default=True, help="Random seed: the same seed gives the same rows.")
@click.option("--replace", is_flag=True, help="Truncate the tables first.")
@click.option("--if-empty", is_flag=True, help="Do nothing when the tables already hold data.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pass_settings
def seed(
    settings: Settings,
    users: int,
    contents: int,
    purchases: int,
    seed: int,
    replace: bool,
    if_empty: bool,
    quiet: bool,
) -> int:
    """Load deterministic demo data into PostgreSQL (COPY)."""
    import psycopg

    from knowton_pipeline.lib.seed import SeedError, SeedSize, seed_demo_data

    size = SeedSize(users=users, contents=contents, purchases=purchases)
    with psycopg.connect(**settings.pg_conninfo()) as conn:  # type: ignore[arg-type]
        try:
            report = seed_demo_data(conn, size, seed=seed, replace=replace, progress=not quiet)
        except SeedError as exc:
            if not if_empty:
                raise
            click.echo(f"kept the existing data ({exc})")
            return 0
    total = report.users + report.contents + report.purchases
    click.echo(
        f"seeded {report.users} users, {report.contents} contents, {report.purchases} purchases "
        f"in {report.seconds:.1f} s ({total / max(report.seconds, 1e-9):,.0f} rows/s)"
    )
    return 0


def _store_names() -> list[str]:
    from knowton_pipeline.lib.stores import TARGETS

    return list(TARGETS)


@cli.group()
def sink() -> None:
    """The sinks: one per target store, each in its own Kafka consumer group (`knowton-sink-<store>`)."""


@sink.command("run")
@click.option(
    "--store",
    "stores",
    multiple=True,
    required=True,
    type=NameChoice("store", _store_names),
    help="The store to write; repeat for several (each its own sink and group, side by side).",
)
@click.option("--once", is_flag=True, help="Stop when caught up instead of running until stopped.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Changes per batch. Default: the store's own (ClickHouse 20000, Elasticsearch 2000).",
)
@click.option("--status-file", type=click.Path(path_type=Path), help="Where the sink reports its state (health).")
@click.option("--supervise", is_flag=True, help="Run the sink as a child process and start it again if it dies.")
@pass_settings
def sink_run(
    settings: Settings,
    stores: tuple[str, ...],
    once: bool,
    batch_size: int | None,
    status_file: Path | None,
    supervise: bool,
) -> int:
    """Consume the cdc-* topics and write the given store(s) until stopped (SIGTERM finishes the batch first).

    Several processes of one store share the topics' partitions through its consumer group."""
    import threading

    from knowton_pipeline.lib.sync import service

    stores = tuple(dict.fromkeys(stores))
    if "clickhouse" in stores and settings.clickhouse_dsn.startswith("chdb://") and not once:
        click.echo(
            "note: the embedded ClickHouse stays open in this sink while it runs, so Dagster runs that use "
            "ClickHouse wait for it to stop; with a ClickHouse server (http://...) they do not.",
            err=True,
        )
    stop = service.stop_on_signals()
    if supervise:
        if len(stores) != 1 or once or status_file is None:
            raise click.UsageError("--supervise runs one continuous sink: give one --store and a --status-file")
        return service.supervise(
            service.service_argv(stores[0], status_file, *(("--batch-size", str(batch_size)) if batch_size else ())),
            stop,
            echo=click.echo,
        )
    if once:
        from knowton_pipeline.lib.stores import TARGETS
        from knowton_pipeline.lib.sync.apply import ApplyConfig, SideBySide

        with ExitStack() as opened:
            clients = {store: opened.enter_context(TARGETS[store].connect(settings)) for store in stores}
            stats = SideBySide.of(
                ApplyConfig(bootstrap=settings.kafka_bootstrap, batch_size=batch_size),
                clients,
                settings.pg_conninfo(),
                on_progress=lambda stats: click.echo(stats.summary()),
            ).run(until_caught_up=True, stop=stop)
        click.echo(f"caught up: {stats.summary()}")
        return 0
    if len(stores) > 1 and status_file is not None:
        raise click.UsageError("--status-file belongs to one store's sink; give one --store")
    threads = [
        threading.Thread(
            target=service.serve,
            args=(store, settings),
            kwargs={"status_path": status_file, "stop": stop, "batch_size": batch_size, "echo": click.echo},
            name=f"sink-{store}",
        )
        for store in stores
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    return 0


# --- reconcile --------------------------------------------------------------------------------------------------
def _print_result(r: ReconcileResult) -> None:
    d = r.differences
    verdict = "clean" if r.clean else f"DRIFT: {d.total} key(s)"
    click.echo(
        f"{r.table} -> {r.target} ({r.mode}): {verdict}  ({r.source_rows} rows in PostgreSQL, {r.target_rows} in "
        f"{r.target}; {r.stats.segments_checked} segments, {r.stats.rows_compared} rows compared, {r.seconds:.2f} s)"
    )
    for label, keys in (("missing in target", d.missing_in_target), ("extra in target", d.extra_in_target)):
        if keys:
            more = " ..." if len(keys) > 10 else ""
            click.echo(f"  {label}: {len(keys)}: {', '.join(map(str, keys[:10]))}{more}")
    for key, columns in list(d.different.items())[:10]:
        click.echo(f"  different: {key}: {', '.join(columns)}")
    if len(d.different) > 10:
        click.echo(f"  ... and {len(d.different) - 10} more different")
    for key, age in list(r.lagging.items())[:10]:
        click.echo(f"  lagging: {key}: the source changed while the target stood still for {age:.0f} s")
    if r.in_flight:
        click.echo(f"  in flight (still changing, not reported): {len(r.in_flight)}")
    for day, (s, t) in sorted(r.day_counts.items(), key=str)[:10]:
        click.echo(f"  day {day}: {s} rows in PostgreSQL, {t} in {r.target}")


def _export_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Refuse a file the differences cannot be written to before any store is read."""
    if value is None:
        return None
    from knowton_pipeline.lib.reconcile.differences import check_export_path

    try:
        path = check_export_path(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if not path.parent.is_dir():
        raise click.BadParameter(f"folder {str(path.parent)!r} does not exist", ctx, param)
    return path


def _mode(mode: str | None, full: bool, incremental: bool) -> str:
    chosen = {m for m, on in (("full", full), ("incremental", incremental), (mode, mode is not None)) if on}
    if len(chosen) > 1:
        raise click.UsageError(f"choose one mode, not {' and '.join(sorted(map(str, chosen)))}")
    return str(chosen.pop()) if chosen else "checksum"


@cli.command(short_help="Compare PostgreSQL with ClickHouse and Elasticsearch: exit 0 clean, 1 drift, 2 error.")
@click.option(
    "--table",
    "tables",
    multiple=True,
    default=("all",),
    show_default=True,
    type=NameChoice("table", _table_names),
    help="A synced table or an aggregate; repeat for several.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    default=("all",),
    show_default=True,
    type=NameChoice("target", _target_names),
    help="The store compared with PostgreSQL; repeat for several.",
)
@click.option(
    "--mode",
    type=NameChoice("mode", _modes),
    help="incremental: rows changed in the window; checksum (default): every row; full: also hash every search document.",
)
@click.option("--full", is_flag=True, help="Same as --mode full.")
@click.option("--incremental", is_flag=True, help="Same as --mode incremental.")
@click.option(
    "--window-minutes",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Incremental window (plus a 5 min margin).",
)
@click.option(
    "--threshold", default=256, show_default=True, type=click.IntRange(min=1), help="Segment size compared row by row."
)
@click.option(
    "--settle",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Re-check differences (0: never): at the sinks' known position, or, when Kafka cannot tell, after this "
    "many seconds.",
)
@click.option(
    "--stuck",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="A key whose source changes while its target stands still this many seconds is reported as lagging.",
)
@click.option("--repair", is_flag=True, help="Re-sync the differing keys from PostgreSQL and re-verify them.")
@click.option(
    "--max-repair-keys",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Refuse to repair more keys than this.",
)
@click.option("--no-record", is_flag=True, help="Do not store the result in ops.reconcile_runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_export_path,
    help="Write every differing key (table, target, key, kind, differing columns, ...) to this .csv or .parquet file.",
)
@pass_settings
def reconcile(
    settings: Settings,
    tables: tuple[str, ...],
    targets: tuple[str, ...],
    mode: str | None,
    full: bool,
    incremental: bool,
    window_minutes: float,
    threshold: int,
    settle: float,
    stuck: float,
    repair: bool,
    max_repair_keys: int,
    no_record: bool,
    as_json: bool,
    output: Path | None,
) -> int:
    """Compare PostgreSQL with ClickHouse and Elasticsearch and list the exact differing keys.

    Exit code 0: clean; 1: drift found (with --repair: drift that repair did not fix); 2: error, no verdict."""
    import psycopg

    from knowton_pipeline.lib.reconcile.differences import differences_frame, export_differences
    from knowton_pipeline.lib.reconcile.flow import Connections, PairOutcome, ReconcileRequest, reconcile_pairs
    from knowton_pipeline.lib.reconcile.run import plan_pairs
    from knowton_pipeline.lib.stores import TARGETS
    from knowton_pipeline.lib.sync.apply import ApplyConfig, CdcSink, SinkTurns

    try:
        pairs = plan_pairs(None if "all" in tables else list(tables), None if "all" in targets else list(targets))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    request = ReconcileRequest(
        mode=_mode(mode, full, incremental),  # type: ignore[arg-type]
        threshold=threshold,
        window_minutes=window_minutes,
        settle_seconds=settle,
        stuck_seconds=stuck,
        record=not no_record,
        repair=repair,
        max_repair_keys=max_repair_keys,
        repair_reason="knowton reconcile --repair",
    )
    say: Callable[[str], None] = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    reports: list[dict[str, Any]] = []
    outcomes: list[PairOutcome] = []
    with ExitStack() as opened:
        conn = opened.enter_context(psycopg.connect(**settings.pg_conninfo(), autocommit=True))  # type: ignore[arg-type]
        # A client for each target store the pairs reconcile with, and only those.
        clients = {
            name: opened.enter_context(TARGETS[name].connect(settings)) for name in dict.fromkeys(t for _, t in pairs)
        }
        connections = Connections(conn, clients, settings.kafka_bootstrap)
        turns: SinkTurns | None = None
        if "clickhouse" in clients and settings.clickhouse_dsn.startswith("chdb://"):
            # This process holds the embedded engine, so the ClickHouse sink cannot run elsewhere meanwhile: it takes
            # its turns here, between the steps and while a re-check waits for it to apply past its position.
            turns = SinkTurns(
                CdcSink(
                    ApplyConfig(bootstrap=settings.kafka_bootstrap, max_retry_seconds=10.0),
                    store="clickhouse",
                    client=clients["clickhouse"],
                    pg_conninfo=settings.pg_conninfo(),
                ),
                every=5.0,
            )

        def progress(message: str) -> None:
            say(message)
            if turns is not None:
                turns()

        for outcome in reconcile_pairs(connections, pairs, request, on_progress=progress):
            result = outcome.result
            if result is None or outcome.repair_refused:
                click.echo(f"error: {outcome.error or outcome.repair_refused}", err=True)
                return EXIT_ERROR
            outcomes.append(outcome)
            report = result.as_dict()
            if outcome.reconcile_id is not None:
                report["reconcile_id"] = outcome.reconcile_id
            if not as_json:
                _print_result(result)
            if outcome.repair is not None:
                report["repair"] = outcome.repair.as_dict()
                if not as_json:
                    repaired = outcome.repair
                    state = "verified clean" if repaired.verified else f"{len(repaired.still_different)} still differ"
                    click.echo(f"  repaired {repaired.requested} key(s) at LSN {repaired.snapshot_lsn}: {state}")
            reports.append(report)
    if output is not None:
        frame = differences_frame(outcomes)
        export_differences(frame, output)
        if not as_json:
            click.echo(f"{len(frame)} differing key(s) written to {output}")
    if as_json:
        click.echo(json.dumps(reports, indent=2))
    return 1 if any(o.remaining_drift for o in outcomes) else 0


# --- env --------------------------------------------------------------------------------------------------------
@cli.command()
@pass_settings
def env(settings: Settings) -> int:
    """Print `export` lines for the settings and DAGSTER_HOME: `eval "$(knowton env)"` before dagster commands."""
    values = settings.export_env(include_secrets=True)
    values["DAGSTER_HOME"] = str(settings.dagster_home)
    for k, v in sorted(values.items()):
        click.echo(f"export {k}={shlex.quote(v)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: the process's); return its exit code."""
    from knowton_pipeline.catalog import UnknownTableError
    from knowton_pipeline.lib.clickhouse import ClickHouseLockedError
    from knowton_pipeline.stack.components import StackError

    t0 = time.monotonic()
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="knowton", standalone_mode=False)
        return int(code or 0)
    except click.ClickException as exc:  # a usage error: the message and the usage line, exit 2
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo(f"interrupted after {time.monotonic() - t0:.1f} s", err=True)
        return 130
    except (SettingsError, StackError, ClickHouseLockedError, UnknownTableError) as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_ERROR
    except Exception as exc:  # a store that is down, a bad file: one clear line, not a traceback
        from knowton_pipeline.lib.errors import describe_error

        click.echo(f"error: {describe_error(exc)}", err=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
