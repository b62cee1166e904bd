"""The connector health tests check the stores through the sync tests' applier and ClickHouse client."""

from knowton_pipeline_tests.sync.conftest import apply, ch  # noqa: F401
