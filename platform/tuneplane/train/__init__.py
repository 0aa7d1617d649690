"""The training runtime: `python -m tuneplane.train --spec FILE` (the fixed entrypoint every backend runs).

Public surface:
    RunSettings   what the platform decides for a run (job id, storage, tracking, Ray address)
    RunResult     final metrics, the registered model URI, the saved model folder
    run           spec + settings -> a Ray Train job, followed to the end and published
    TrainingFailed  raised when the run fails for good, with the first worker's error as its message
    Cancelled     raised when a SIGTERM (a cancel) ended the run, which is marked KILLED
"""

from tuneplane.errors import TrainingFailed
from tuneplane.train.launcher import Cancelled, RunResult, RunSettings, run

__all__ = ["Cancelled", "RunResult", "RunSettings", "TrainingFailed", "run"]
