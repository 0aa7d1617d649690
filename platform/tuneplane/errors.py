"""Every error Tuneplane raises on purpose, in one place.

They all derive from `TuneplaneError`, whose `problems` locate what went wrong: (where, message) pairs, `where`
being a field path (`data.sources[0].uri`), a record (`s3://bucket/a.jsonl:12`) or "" for the input as a whole.
Their text is safe to show a user: no secrets, no stack traces. The API answers them as problem+json
(`api/problems.py` maps each class to its HTTP status), the CLI as a message and an exit code.

Errors raised inside a Ray worker travel to the driver pickled; `TuneplaneError` pickles its attributes, so a
`DataError` arrives with its `uri:line` intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_ECHO = 300  # characters of user data (a record value, a field) an error message may quote


# (field or `uri:line`, message) pairs: what every check answers and every located error holds.
Problems = list[tuple[str, str]]


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters: an error quoting a 10 MB record value must not become a 10 MB answer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class TuneplaneError(Exception):
    """Base of every deliberate error; `problems` holds (where, message) pairs."""

    def __init__(self, message: str):
        super().__init__(message)

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [("", str(self))]

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than Exception.args holds: rebuild without __init__.
        return (_restore, (type(self), self.args, self.__dict__))


def _restore(cls: type[TuneplaneError], args: tuple[Any, ...], state: dict[str, Any]) -> TuneplaneError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


def describe(problems: Sequence[tuple[str, str]], source: str | None = None) -> str:
    """Problems as lines of text, `[source: ]field: message`."""
    prefix = f"{source}: " if source else ""
    return "\n".join(f"{prefix}{where}: {msg}" if where else f"{prefix}{msg}" for where, msg in problems)


class InputError(TuneplaneError):
    """A document that cannot be accepted; every problem names its field. `source` is the file, if any."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None):
        self._problems = list(problems)
        self.source = source
        super().__init__(describe(self._problems, source))

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self._problems


class SpecError(InputError, ValueError):
    """A tuning spec that cannot be accepted (including the team's policy for it)."""


class ConfigError(InputError):
    """A platform config that cannot be loaded."""


class DataError(TuneplaneError, ValueError):
    """A problem in the data, located as `uri:line` when it concerns one record."""

    def __init__(self, uri: str, reason: str, line: int | None = None):
        self.uri, self.reason, self.line = clip(uri, 1000), clip(reason), line
        super().__init__(f"{uri}:{line}: {reason}" if line is not None else f"{uri}: {reason}")

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [(f"{self.uri}:{self.line}" if self.line is not None else self.uri, self.reason)]


class FormatError(TuneplaneError, ValueError):
    """A record that does not fit its declared format; the message names the record's field."""

    def __init__(self, message: str):
        super().__init__(clip(message))


class PretrainedError(TuneplaneError):
    """A base model or tokenizer that cannot be found or loaded; the message starts with its location."""


class CheckpointError(TuneplaneError):
    """A checkpoint or saved model that must not be used: incomplete, from another run shape, or empty."""


class TrainingFailed(TuneplaneError):
    """A run that failed for good; the message is the first worker's error, without Ray's wrapping."""


class BackendError(TuneplaneError):
    """A backend could not do what was asked (start, inspect, stop a job)."""


class NotFound(TuneplaneError):
    """No such job for this caller (another team's job is not found either)."""


class Conflict(TuneplaneError):
    """The request contradicts the record: an Idempotency-Key reused for another spec, a job already ended."""


class QuotaExceeded(TuneplaneError):
    """The team may not have more of something at once (waiting jobs)."""


class InvalidTransition(Conflict):
    """A job state change the state machine does not allow."""
