"""Partitioning shared by the mirror, index and aggregate assets: days of row creation, in UTC."""

import dagster as dg

DAILY = dg.DailyPartitionsDefinition(start_date="2025-01-01", timezone="UTC", end_offset=1)
