"""What the routes do, apart from HTTP: admission policy, dry-run validation, MLflow reads."""

from __future__ import annotations

from typing import Any

from tuneplane.config import PlatformConfig
from tuneplane.spec import SpecError, TuningSpec, is_local_path, parse_spec
from tuneplane.store import Principal


def admit(raw: Any, principal: Principal, config: PlatformConfig) -> TuningSpec:
    """Parse a submitted spec and check it against the team's policy; SpecError names each field at fault."""
    spec = parse_spec(raw)
    team = config.team(principal.team)
    problems: list[tuple[str, str]] = []
    if team is None:
        raise SpecError([("", f"team {principal.team} is not configured")])
    dist = spec.distributed
    gpus = dist.num_workers * dist.gpus_per_worker
    if dist.gpu_pool and dist.gpu_pool not in config.gpu_pools:
        problems.append(
            ("distributed.gpu_pool", f"unknown pool {dist.gpu_pool!r}; known: {sorted(config.gpu_pools)}")
        )
    elif dist.gpu_pool and dist.gpu_pool not in team.gpu_pools:
        problems.append(("distributed.gpu_pool", f"team {team.name} may not use pool {dist.gpu_pool!r}"))
    if gpus > team.quota.max_gpus:
        problems.append(
            ("distributed.gpus_per_worker", f"the job needs {gpus} GPUs; team quota is {team.quota.max_gpus}")
        )
    if gpus and config.backend == "local":
        problems.append(("distributed.gpus_per_worker", "the local backend runs on CPUs only"))
    problems += _relative_paths(spec)
    if problems:
        raise SpecError(problems)
    return spec


def _relative_paths(spec: TuningSpec) -> list[tuple[str, str]]:
    """A relative path means nothing on the server: the CLI resolves them against the spec file."""
    out = []
    groups = {
        "data.sources": spec.data.sources,
        "data.eval_sources": spec.data.eval_sources,
        "eval.zero_shot_sources": spec.eval.zero_shot_sources,
    }
    for field, sources in groups.items():
        for i, source in enumerate(sources):
            if is_local_path(source.uri) and not source.uri.startswith("/"):
                out.append((f"{field}[{i}].uri", "a relative path; use an absolute path or a URI"))
    if spec.model.base.startswith(("./", "../", "~")):
        out.append(("model.base", "a relative path; use an absolute path, a URI or a hub id"))
    return out


def preflight_report(spec: TuningSpec, max_records: int) -> dict[str, Any]:
    """The data preflight `tuneplane validate` prints (needs the tokenizer; bounded by max_records)."""
    from tuneplane.data import preflight
    from tuneplane.pretrained import load_tokenizer

    return preflight(spec, load_tokenizer(spec.model), max_records=max_records, samples=1).to_dict()
