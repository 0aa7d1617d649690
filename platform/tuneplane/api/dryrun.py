"""The dry run behind `POST /v1/validate`: where the spec's data and model are, the memory estimate, and a
bounded data preflight, answered as a ValidationReport.

The preflight reads and tokenizes a team's data for up to its budget (30 s, 512 MiB), CPU-bound work that would
hold the API process's interpreter lock and slow every other team's requests. So it runs in a small pool of
worker processes of its own, niced below the API (`Limits.run_dry`); this module is what they import.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from tuneplane.api.problems import field_errors
from tuneplane.api.schemas import ValidationReport
from tuneplane.config import PlatformConfig
from tuneplane.control.admission import memory_check, preflight_report, reachability_problems
from tuneplane.errors import TuneplaneError, clip
from tuneplane.spec import TuningSpec


def dry_run(spec: TuningSpec, team: str, config: PlatformConfig, max_records: int) -> ValidationReport:
    """What `POST /v1/validate` answers for a spec admission accepted."""
    spec_dict = spec.to_dict()
    problems = reachability_problems(spec, team, config)
    if problems:
        return report(False, spec_dict, problems)
    owner = config.team(team)
    assert owner is not None  # admit() refuses callers of unknown teams
    memory = memory_check(spec, owner, config)
    notes = [] if memory.estimate else [f"memory estimate skipped: {memory.source}"]
    answer = partial(report, spec=spec_dict, memory=memory.to_dict())
    try:
        data = preflight_report(spec, owner, config, max_records)
    except ImportError as exc:  # an API image without the training extra
        return answer(True, notes=[*notes, f"data preflight skipped: {exc.name} is not installed here"])
    except Exception as exc:  # the tokenizer or data could not be read: say which
        failed = exc.problems if isinstance(exc, TuneplaneError) else [("", f"{type(exc).__name__}: {exc}")]
        return answer(False, problems=[(field or "model", clip(message)) for field, message in failed])
    if data is None:
        skipped = (
            "data preflight skipped: the tokenizer is a hub id and the control plane does not reach the hub"
        )
        return answer(True, notes=[*notes, skipped])
    return answer(bool(data.get("ok")), data=data, notes=notes)


def report(
    ok: bool,
    spec: dict[str, Any],
    problems: Sequence[tuple[str, str]] = (),
    data: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    memory: dict[str, Any] | None = None,
) -> ValidationReport:
    return ValidationReport.model_validate(
        {
            "ok": ok,
            "spec": spec,
            "problems": field_errors(problems),
            "data": data,
            "notes": list(notes),
            "memory": memory,
        }
    )
