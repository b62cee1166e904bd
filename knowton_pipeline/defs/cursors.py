"""Sensor cursors as small typed models, kept as JSON: a cursor that does not parse (an older format, a hand
edit) starts over from the model's defaults instead of failing every tick."""

from __future__ import annotations

from typing import Any, Self

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SensorCursor(BaseModel):
    """The base of every sensor cursor: unknown fields are dropped, missing ones take their defaults."""

    model_config = ConfigDict(extra="ignore")

    @classmethod
    def load(cls, context: dg.SensorEvaluationContext) -> Self:
        if not context.cursor:
            return cls()
        try:
            return cls.model_validate_json(context.cursor)
        except ValidationError as exc:
            context.log.warning(f"the cursor is not a {cls.__name__} ({exc.errors()[0]['msg']}): starting over")
            return cls()

    def dump(self) -> str:
        return self.model_dump_json()


class AlertCursor(SensorCursor):
    """A sensor that alerts: the state of its alerts (lib.health.alerts.AlertBook, as JSON)."""

    alerts: dict[str, Any] = Field(default_factory=dict)


class ReplicationCursor(AlertCursor):
    """`replication_lag_sensor`: its alerts, and when it last recorded each store's assets as up to date."""

    up_to_date_at: dict[str, float] = Field(default_factory=dict)


class RunCounterCursor(SensorCursor):
    """How many runs the sensor has requested: the next run key is `<prefix>-<requested + 1>`."""

    requested: int = 0

    @model_validator(mode="before")
    @classmethod
    def _from_bare_count(cls, data: Any) -> Any:
        # The earlier cursor was the bare count; starting over from 0 would reuse run keys Dagster already
        # launched, and it would skip those requests.
        return {"requested": data} if isinstance(data, int) else data
