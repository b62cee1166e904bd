"""Dagster definitions, one folder per system; loaded by `knowton_pipeline.definitions`."""
