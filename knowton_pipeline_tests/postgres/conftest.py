"""The replication and schema tests use the sync tests' applier and ClickHouse client."""

from knowton_pipeline_tests.sync.conftest import apply, ch  # noqa: F401
