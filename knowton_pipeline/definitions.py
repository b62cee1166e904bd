"""The code location's one entry point: loads `defs/` and applies project-wide policy."""

import warnings
from pathlib import Path

import dagster as dg

# Dagster itself copies a sensor that targets a job object when it binds the job's resources, and passes the
# beta `owners` parameter while doing so: a warning about Dagster's own call, for a parameter this project never
# sets. Only that message is silenced; any other beta or deprecation warning still shows.
warnings.filterwarnings(
    "ignore", message=r"Parameter `owners` of initializer `SensorDefinition.__init__`", category=dg.BetaWarning
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
