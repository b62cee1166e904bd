"""The differences of a reconciliation as a DataFrame, one row per key, written to CSV or Parquet and read back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from knowton_pipeline.lib.reconcile.bisect import BisectStats, Differences
from knowton_pipeline.lib.reconcile.differences import (
    COLUMNS,
    check_export_path,
    differences_frame,
    export_differences,
    result_frame,
)
from knowton_pipeline.lib.reconcile.engine import ReconcileResult
from knowton_pipeline.lib.reconcile.flow import PairOutcome
from knowton_pipeline.lib.reconcile.repair import RepairResult


def _result(table: str, target: str, differences: Differences, **extra: object) -> ReconcileResult:
    return ReconcileResult(
        table=table,
        target=target,
        mode="checksum",
        source_rows=100,
        target_rows=100,
        differences=differences,
        stats=BisectStats(),
        seconds=0.5,
        **extra,  # type: ignore[arg-type]
    )


def _drifted_users() -> ReconcileResult:
    return _result(
        "User",
        "clickhouse",
        Differences(
            missing_in_target=["0xaaa"],
            extra_in_target=["0xbbb"],
            different={"0xccc": ["reputation", "bio"], "0xddd": ["username"]},
        ),
        lagging={"0xddd": 75.0},
    )


def test_every_differing_key_is_one_row_with_its_kind_and_columns() -> None:
    frame = result_frame(_drifted_users(), reconcile_id=7)
    assert list(frame.columns) == list(COLUMNS)
    assert frame[["kind", "key", "differing_columns"]].astype(str).values.tolist() == [
        ["missing_in_target", "0xaaa", ""],
        ["extra_in_target", "0xbbb", ""],
        ["different", "0xccc", "reputation, bio"],
        ["different", "0xddd", "username"],
    ]
    assert set(frame["reconcile_id"]) == {7} and set(frame["table"]) == {"User"}
    assert frame.set_index("key")["lagging_seconds"].dropna().to_dict() == {"0xddd": 75.0}
    assert frame["verified_after_repair"].isna().all()  # no repair ran
    assert frame["kind"].value_counts().to_dict() == {"different": 2, "missing_in_target": 1, "extra_in_target": 1}


def test_outcomes_concatenate_and_a_repair_marks_what_it_verified() -> None:
    purchases = _result("Purchase", "clickhouse", Differences(different={41: ["amount"], 42: ["amount"]}))
    repaired = RepairResult("Purchase", "clickhouse", requested=2, still_different=[42])
    aggregate = _result("content_sales_daily", "clickhouse", Differences(missing_in_target=[("2025-03-01", 5, "ETH")]))
    frame = differences_frame(
        [
            PairOutcome("User", "clickhouse", result=_drifted_users()),  # not recorded
            PairOutcome("User", "elasticsearch", error="no verdict"),  # a store failed: nothing to list
            PairOutcome("Purchase", "clickhouse", result=purchases, reconcile_id=3, repair=repaired),
            PairOutcome("content_sales_daily", "clickhouse", result=aggregate, reconcile_id=4),
        ]
    )
    assert len(frame) == 4 + 2 + 1
    assert frame.groupby("table", observed=True).size().to_dict() == {
        "User": 4,
        "Purchase": 2,
        "content_sales_daily": 1,
    }
    assert frame["reconcile_id"].isna().sum() == 4
    purchase_rows = frame[frame["table"] == "Purchase"].set_index("key")
    assert purchase_rows["verified_after_repair"].to_dict() == {"41": True, "42": False}
    assert frame[frame["table"] == "content_sales_daily"]["key"].tolist() == ["2025-03-01|5|ETH"]


def test_a_clean_result_gives_an_empty_frame_with_the_same_columns() -> None:
    empty = differences_frame([PairOutcome("User", "clickhouse", result=_result("User", "clickhouse", Differences()))])
    assert empty.empty and list(empty.columns) == list(COLUMNS)
    assert empty.dtypes.to_dict() == result_frame(_drifted_users()).dtypes.to_dict()


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".CSV"])
def test_export_by_suffix_reads_back_the_same_rows(tmp_path: Path, suffix: str) -> None:
    frame = result_frame(_drifted_users(), reconcile_id=7)
    path = export_differences(frame, tmp_path / f"diffs{suffix}")
    if suffix.lower() == ".parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    else:
        back = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert list(back.columns) == list(COLUMNS)
        assert back[["kind", "key", "differing_columns", "lagging_seconds"]].values.tolist() == [
            ["missing_in_target", "0xaaa", "", ""],
            ["extra_in_target", "0xbbb", "", ""],
            ["different", "0xccc", "reputation, bio", ""],
            ["different", "0xddd", "username", "75.0"],
        ]


def test_an_empty_frame_exports_its_header(tmp_path: Path) -> None:
    path = export_differences(differences_frame([]), tmp_path / "clean.csv")
    assert path.read_text().strip() == ",".join(COLUMNS)
    assert pd.read_parquet(export_differences(differences_frame([]), tmp_path / "clean.parquet")).empty


@pytest.mark.parametrize("name", ["diffs.xlsx", "diffs", "diffs.csv.gz", "diffs.json"])
def test_an_unknown_suffix_is_refused_naming_the_formats(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"cannot write differences to .*unknown suffix.*use one of \.csv, \.parquet"):
        check_export_path(tmp_path / name)
    with pytest.raises(ValueError, match="unknown suffix"):
        export_differences(result_frame(_drifted_users()), tmp_path / name)
    assert not (tmp_path / name).exists()
