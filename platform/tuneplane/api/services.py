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
    problems += _locations(spec, config)
    if problems:
        raise SpecError(problems)
    return spec


def _locations(spec: TuningSpec, config: PlatformConfig) -> list[tuple[str, str]]:
    """Where a spec may point. The control plane looks these up (validation), so only object storage, and local
    paths on the local backend: never http(s) or other schemes, which would let a spec probe the network."""
    out = []
    locations = [(f"{field}.uri", source.uri) for field, source in spec.source_fields()]
    locations += [(f"model.{key}", v) for key in ("base", "tokenizer") if (v := getattr(spec.model, key))]
    for field, uri in locations:
        if not is_local_path(uri):
            scheme = uri.split("://", 1)[0].lower()
            if scheme not in config.storage_schemes:
                out.append((field, f"scheme {scheme}:// is not allowed; use one of {config.storage_schemes}"))
        elif field.startswith("model.") and not uri.startswith(("/", "./", "../", "~")):
            continue  # a hub id such as org/name
        elif config.backend != "local":
            out.append((field, "a local path means nothing to a cluster job; use object storage"))
        elif not uri.startswith("/"):  # the CLI makes a spec file's relative paths absolute before sending
            out.append((field, "a relative path; use an absolute path or a URI"))
    return out


def preflight_report(spec: TuningSpec, max_records: int) -> dict[str, Any]:
    """The data preflight `tuneplane validate` prints (needs the tokenizer; bounded by max_records)."""
    from tuneplane.data import preflight
    from tuneplane.pretrained import load_tokenizer

    return preflight(spec, load_tokenizer(spec.model), max_records=max_records, samples=1).to_dict()
