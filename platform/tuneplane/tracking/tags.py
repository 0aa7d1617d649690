"""The tag vocabulary Tuneplane writes on MLflow runs and model versions, and where a job's experiment and
registered model live. Pure: names in, names out; the writers (`run`, `publishing`) and readers (`registry`)
all take them from here."""

from __future__ import annotations

from tuneplane.spec import TuningSpec

JOB_TAG = "tuneplane.job_id"
ATTEMPTS_TAG = "tuneplane.attempts"
SPEC_HASH_TAG = "tuneplane.spec_hash"  # tuneplane.spec.spec_hash: the same value the job record holds
METHOD_TAG = "tuneplane.method"
BASE_MODEL_TAG = "tuneplane.base_model"
PARENT_TAG = "tuneplane.parent_model"  # the registered adapter a job started from (`model.adapter`)
FINGERPRINT_TAG = "tuneplane.dataset_fingerprint"
GATE_TAG = "tuneplane.publishing.gate"  # passed | failed | none, on the run and on a registered version
GATE_FAILURES_TAG = "tuneplane.publishing.gate.failures"  # one failed condition a line, with the numbers
SCORE_TAG_PREFIX = "tuneplane.score."  # a version's headline scores: tuneplane.score.zero_shot/mean = 0.42
DATA_TAG_PREFIX = "tuneplane.data."  # the data filter's headline counts (publishing.publish.data_tags)


def experiment_name(spec: TuningSpec, team: str | None) -> str:
    """A job's MLflow experiment, `<team>/<name>` (the spec's `tracking.experiment`, else its name): one MLflow
    serves every team, and a team's names live under its own prefix, so no team can write into another team's
    experiment. A run outside the platform (no team) uses the name as it is."""
    name = spec.tracking.experiment or spec.name
    return f"{team}/{name}" if team else name


def registered_model_name(spec: TuningSpec, team: str | None) -> str | None:
    """Where a job registers its model: `<team>.<tracking.registered_model_name>`. Consumers load
    `models:/<team>.<name>/<version>` trusting the team in the name; no other team can publish a version there."""
    name = spec.tracking.registered_model_name
    return f"{team}.{name}" if name and team else name
