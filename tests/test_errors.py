"""One error vocabulary: every deliberate error is a TuneplaneError that locates itself and survives the trip
from a Ray worker to the driver (pickling) with its location intact."""

from __future__ import annotations

import pickle

import pytest

from tuneplane import errors
from tuneplane.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidTransition,
    SpecError,
    TuneplaneError,
)


@pytest.mark.parametrize(
    "error",
    [
        SpecError([("data.sources[0].uri", "no files match"), ("", "whole spec")], "job.yaml"),
        ConfigError([("teams", "team names must be unique")], "platform.yaml"),
        DataError("s3://b/a.jsonl", "bad json", 12),
        DataError("s3://b/a.jsonl", "no files match"),
        CheckpointError("checkpoint lacks the data state of ranks [1]"),
        InvalidTransition("a SUCCEEDED job cannot become RUNNING"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_with_their_location(error: TuneplaneError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error) and back.problems == error.problems
    assert back.__dict__ == error.__dict__


def test_problems_locate_the_error() -> None:
    assert SpecError([("model.base", "no such folder")], "j.yaml").problems == [
        ("model.base", "no such folder")
    ]
    assert (
        str(SpecError([("model.base", "no such folder")], "j.yaml")) == "j.yaml: model.base: no such folder"
    )
    assert DataError("a.jsonl", "bad json", 3).problems == [("a.jsonl:3", "bad json")]
    assert str(DataError("a.jsonl", "bad json", 3)) == "a.jsonl:3: bad json"
    assert BackendError("cannot reach").problems == [("", "cannot reach")]


def test_every_error_class_derives_from_the_base() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 12
    assert all(issubclass(c, TuneplaneError) for c in classes)
