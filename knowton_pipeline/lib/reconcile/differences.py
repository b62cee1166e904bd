"""The differences of reconciliations as one pandas DataFrame, a row per differing key, written to CSV or Parquet
(`knowton reconcile --output diffs.csv`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd

from knowton_pipeline.lib.reconcile.bisect import Key
from knowton_pipeline.lib.reconcile.engine import ReconcileResult
from knowton_pipeline.lib.reconcile.flow import PairOutcome
from knowton_pipeline.lib.reconcile.record import key_text

KINDS = ("missing_in_target", "extra_in_target", "different")
# One row per differing key. `key` is spelled as ops.reconcile_diffs stores it (a composite key joined by "|");
# `differing_columns` is empty for a missing or extra key; `lagging_seconds` is set for a key whose target stood
# still while its source changed; `verified_after_repair` only when the run repaired.
COLUMNS: dict[str, str | pd.CategoricalDtype] = {
    "reconcile_id": "Int64",
    "table": "string",
    "target": "string",
    "mode": "string",
    "kind": pd.CategoricalDtype(KINDS, ordered=True),
    "key": "string",
    "differing_columns": "string",
    "lagging_seconds": "Float64",
    "verified_after_repair": "boolean",
}

EXPORTERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    ".csv": lambda frame, path: frame.to_csv(path, index=False),
    ".parquet": lambda frame, path: frame.to_parquet(path, index=False, engine="pyarrow"),
}


def _empty() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in COLUMNS.items()})


def result_frame(
    result: ReconcileResult, *, reconcile_id: int | None = None, still_different: Sequence[Key] | None = None
) -> pd.DataFrame:
    """The differing keys of one reconciliation. `still_different`: what a repair left, when one ran."""
    d = result.differences
    keyed: list[tuple[str, Key, str]] = [("missing_in_target", k, "") for k in d.missing_in_target]
    keyed += [("extra_in_target", k, "") for k in d.extra_in_target]
    keyed += [("different", k, ", ".join(cols)) for k, cols in d.different.items()]
    if not keyed:
        return _empty()
    still = None if still_different is None else set(still_different)
    frame = pd.DataFrame(
        {
            "reconcile_id": reconcile_id,
            "table": result.table,
            "target": result.target,
            "mode": result.mode,
            "kind": [kind for kind, _, _ in keyed],
            "key": [key_text(k) for _, k, _ in keyed],
            "differing_columns": [cols for _, _, cols in keyed],
            "lagging_seconds": [result.lagging.get(k) for _, k, _ in keyed],
            "verified_after_repair": [None if still is None else k not in still for _, k, _ in keyed],
        }
    )
    return frame.astype(COLUMNS)


def differences_frame(outcomes: Iterable[PairOutcome]) -> pd.DataFrame:
    """Every differing key of the outcomes that have a verdict, in order."""
    frames = [
        result_frame(
            o.result,
            reconcile_id=o.reconcile_id,
            still_different=o.repair.still_different if o.repair is not None else None,
        )
        for o in outcomes
        if o.result is not None
    ]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True).astype(COLUMNS) if frames else _empty()


def check_export_path(path: Path | str) -> Path:
    """`path` if its suffix names a format differences can be written in; otherwise a ValueError saying which do."""
    path = Path(path)
    if path.suffix.lower() not in EXPORTERS:
        raise ValueError(
            f"cannot write differences to {path.name!r}: unknown suffix {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(EXPORTERS)}"
        )
    return path


def export_differences(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write `frame` in the format its suffix names (.csv or .parquet)."""
    path = check_export_path(path)
    EXPORTERS[path.suffix.lower()](frame, path)
    return path


__all__ = ["COLUMNS", "KINDS", "check_export_path", "differences_frame", "export_differences", "result_frame"]
