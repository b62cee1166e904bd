"""The reconciliation tests drive the pipeline with the sync tests' fixtures."""

from knowton_pipeline_tests.sync.conftest import apply, caught_up, ch  # noqa: F401
