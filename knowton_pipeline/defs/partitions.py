"""Partitioning shared by the mirror, index and aggregate assets (days of row creation, in UTC), and the freshness
the sinks keep the mirrors and indices to."""

from datetime import timedelta

import dagster as dg

DAILY = dg.DailyPartitionsDefinition(start_date="2025-01-01", timezone="UTC", end_offset=1)

# Kept by `replication_lag_sensor`, which records a store's assets as up to date each minute its sink is caught up:
# WARN after three minutes without that, FAIL after ten.
SYNCED = dg.FreshnessPolicy.time_window(fail_window=timedelta(minutes=10), warn_window=timedelta(minutes=3))
