"""The fault drill's pure accounting (benchmarks/fault_drills.py): which writes fall in a fault, which count as lost,
which alerts are the pipeline's, and the table it prints."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from knowton_pipeline.lib.settings import PROJECT_ROOT


def _drill() -> ModuleType:
    path = PROJECT_ROOT / "benchmarks" / "fault_drills.py"
    spec = importlib.util.spec_from_file_location("fault_drills", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_drills", module)
    spec.loader.exec_module(module)
    return module


drill = _drill()


def test_only_writes_inside_the_fault_window_are_counted() -> None:
    writes = [drill.Write(t, f"k{t}", "insert") for t in (1.0, 2.0, 3.0, 4.0)]
    assert [w.key for w in drill.writes_between(writes, 2.0, 3.0)] == ["k2.0", "k3.0"]


def test_a_row_is_lost_only_when_written_during_the_fault_and_still_differing() -> None:
    written = [drill.Write(1.0, "a", "insert"), drill.Write(2.0, "a", "update"), drill.Write(3.0, "b", "delete")]
    assert drill.rows_lost(written, []) == 0
    assert drill.rows_lost(written, ["a", "z"]) == 1  # "z" is drift the fault did not write: not its loss
    assert drill.rows_lost(written, ["a", "b"]) == 2


def test_the_observers_failed_checks_and_their_recoveries_are_not_the_pipelines_alerts() -> None:
    alerts = [
        drill.Received(1.0, "Check matches_postgres on clickhouse/knowton/users failed", "observer-run"),
        drill.Received(2.0, "Recovered: Check matches_postgres on clickhouse/knowton/users", ""),
        drill.Received(3.0, "Connector postgres-cdc-source-connector FAILED", ""),
        drill.Received(4.0, "Recovered: Check end_to_end_lag_elasticsearch on postgres/ops/heartbeat", ""),
    ]
    kept = drill.alerts_of_the_pipeline(alerts, {"observer-run"})
    assert [a.at for a in kept] == [3.0, 4.0]


def test_the_table_shows_seconds_from_injection_and_from_the_cause_removed() -> None:
    healed = drill.Outcome("es-stopped", injected=100.0, cause_removed=160.0, detected=131.0, healed=190.0)
    healed.detected_by, healed.writes, healed.lost, healed.alerts = "check end_to_end_lag failed", 900, 0, 2
    stuck = drill.Outcome("slot-dropped", injected=10.0)
    table = drill.format_table([healed, stuck]).splitlines()
    assert table[0].startswith("| fault") and set(table[1]) <= {"|", "-"}
    assert [c.strip() for c in table[2].strip("|").split("|")] == [
        "es-stopped",
        "31 s",
        "check end_to_end_lag failed",
        "90 s",
        "30 s",
        "900",
        "0",
        "2",
    ]
    assert "not healed" in table[3] and "| ?" in table[3]
