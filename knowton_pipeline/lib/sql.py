"""Load the project's SQL, DDL and mapping files from `sql/` by store and name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knowton_pipeline.lib.settings import PROJECT_ROOT

SQL_ROOT = PROJECT_ROOT / "sql"


def sql_path(store: str, name: str) -> Path:
    path = SQL_ROOT / store / name
    if not path.is_file():
        raise FileNotFoundError(f"no SQL file {name!r} for {store} (looked for {path})")
    return path


def read_sql(store: str, name: str) -> str:
    return sql_path(store, name).read_text()


def read_json(store: str, name: str) -> dict[str, Any]:
    return json.loads(sql_path(store, name).read_text())
