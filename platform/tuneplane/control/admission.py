"""Admission: may this team run this spec here, and can its data and model be found?

The API calls it on submit and on dry-run validation; the reconciler calls the reachability check before it
queues a job. Every check answers `(field, message)` pairs naming the field at fault, never a bare string.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from tuneplane.backends.capabilities import backend_problems, capabilities
from tuneplane.config import PlatformConfig, Team
from tuneplane.errors import DataError, NotFound, Problems, SpecError
from tuneplane.families import spec_problems
from tuneplane.files import confined_to, may_read, pinned_folder
from tuneplane.memory import (
    HEADROOM,
    MemoryCheck,
    MemoryEstimate,
    check_memory,
    fits,
    gib,
    pool_gpu_memory,
    read_model_config,
)
from tuneplane.spec import (
    TuningSpec,
    adapter_is_job_id,
    is_local_path,
    model_location_kind,
    parse_spec,
    registered_team,
    static_prefix,
)
from tuneplane.store import Principal

# A job id -> (its state, the model version it registered or None); NotFound for a job the caller may not see.
JobLookup = Callable[[str], tuple[str, str | None]]


def admit(raw: Any, principal: Principal, config: PlatformConfig, find_job: JobLookup) -> TuningSpec:
    """Parse a submitted spec, pin a `model.adapter` job id to its version (with `find_job`, the store's view
    of the caller's jobs) and check it against the team's policy; SpecError names each field at fault."""
    spec = pin_adapter(parse_spec(raw), find_job)
    problems = policy_problems(spec, principal.team, config)
    if problems:
        raise SpecError(problems)
    return spec


def pin_adapter(spec: TuningSpec, find_job: JobLookup) -> TuningSpec:
    """`model.adapter: <job id>` becomes the `models:/` version that job registered, so the stored spec says
    exactly what the job starts from (a later version of the same name changes nothing)."""
    job_id = spec.model.adapter
    if not job_id or not adapter_is_job_id(job_id):
        return spec
    try:
        state, model_uri = find_job(job_id)
    except NotFound:
        raise SpecError([("model.adapter", f"job {job_id} not found")]) from None
    if not model_uri:
        why = (
            "it registered no model" if state == "SUCCEEDED" else f"it is {state} and has registered no model"
        )
        raise SpecError([("model.adapter", f"job {job_id}: {why}")])
    raw = spec.to_dict()
    raw["model"]["adapter"] = model_uri
    return parse_spec(raw)


def policy_problems(spec: TuningSpec, team_name: str, config: PlatformConfig) -> Problems:
    """What the team's quota, GPU pools and the platform's storage rules refuse in this spec."""
    team = config.team(team_name)
    if team is None:
        return [("", f"team {team_name} is not configured")]
    problems: Problems = []
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
    problems += backend_problems(
        spec, config
    )  # e.g. a worker that fits no node of its pool would wait for ever
    if spec.model.adapter and registered_team(spec.model.adapter) != team.name:
        # A team builds on its own registered versions only (`<team>.<name>`): never reads another's weights.
        problems.append(("model.adapter", f"{spec.model.adapter} is not a model of team {team.name}"))
    locations = _location_problems(spec, team, config)
    if not locations and capabilities(config).reads_local_paths:  # a local tasks folder is small: read it now
        problems += tasks_problems(spec, team, config, local=True)
    if not locations:
        problems += model_problems(spec, team, config)
    return problems + locations + memory_problems(spec, team, config)


def _location_problems(spec: TuningSpec, team: Team, config: PlatformConfig) -> Problems:
    """Where a spec may point. The control plane looks these up (validation), so only object storage, and local
    paths on the local backend inside the team's data roots: never http(s) or other schemes, which would let a
    spec probe the network, and never a host file the team was not given."""
    out = []
    for field, location, kind in spec.locations():
        if kind == "uri":
            scheme = location.split("://", 1)[0].lower()
            if scheme not in config.storage_schemes:
                out.append((field, f"scheme {scheme}:// is not allowed; use one of {config.storage_schemes}"))
        elif kind == "hub":
            continue
        elif not capabilities(config).reads_local_paths:
            out.append((field, "a local path means nothing to a cluster job; use object storage"))
        elif not location.startswith("/"):
            # the CLI makes a spec file's relative paths absolute before sending
            out.append((field, "a relative path; use an absolute path or a URI"))
        elif not readable(static_prefix(location), team, config):
            out.append((field, not_readable(location)))
    return out


def not_readable(location: str) -> str:
    """One answer for a local path outside the team's data roots and one that does not exist, so that a
    refusal never tells whether a path exists."""
    return f"{location}: no readable data here (missing, or outside this team's data roots)"


def readable(path: str, team: Team, config: PlatformConfig) -> bool:
    """Whether a local path, resolved now (symlinks, '..', '~'), lies where the team may read: an early answer
    for messages; every open checks again on its descriptor (`tuneplane.files`)."""
    return config.confinement(team).allows_path(path)


def tasks_problems(spec: TuningSpec, team: Team, config: PlatformConfig, local: bool) -> Problems:
    """What the lm-eval task files of `spec` say that no job may run (code, files outside the folder), for a
    local tasks folder (`local`) or one in object storage (not `local`), read as the team."""
    from tuneplane.data import eval_tasks

    lm_eval = spec.eval.lm_eval
    if lm_eval is None or is_local_path(lm_eval.tasks_dir) != local:
        return []
    with confined_to(config.confinement(team)):
        return eval_tasks.problems(lm_eval.tasks_dir)


def reachability_problems(spec: TuningSpec, team_name: str, config: PlatformConfig) -> Problems:
    """The spec's data sources and local model folder that cannot be found (object storage is listed), and
    local files a glob or symlink reaches outside the team's data roots."""
    team = config.team(team_name)
    if team is None:
        return [("", f"team {team_name} is not configured")]
    with confined_to(config.confinement(team)):
        return _reachability_problems(spec, team, config)


def _reachability_problems(spec: TuningSpec, team: Team, config: PlatformConfig) -> Problems:
    from tuneplane.data.records import expand

    problems: Problems = []
    for field, source in spec.source_fields():
        try:
            files = expand(source.uri)
        except DataError as exc:
            problems.append((f"{field}.uri", str(exc)))
            continue
        except Exception as exc:  # the storage client's own errors (credentials, network)
            problems.append((f"{field}.uri", f"{source.uri}: cannot list: {type(exc).__name__}: {exc}"))
            continue
        if is_local_path(source.uri) and not all(may_read(f) and os.path.isfile(f) for f in files):
            problems.append((f"{field}.uri", not_readable(source.uri)))  # not a regular file, or outside
    for field, location, kind in spec.locations():
        if field.endswith(".uri") or kind != "path":  # sources were expanded above
            continue
        if not (readable(location, team, config) and os.path.isdir(os.path.expanduser(location))):
            problems.append((field, not_readable(location)))
        elif field.startswith("model.") and not _every_file_readable(location):
            problems.append((field, not_readable(location)))  # e.g. a weights file symlinked out of the roots
    return problems + tasks_problems(spec, team, config, local=False)


def _every_file_readable(folder: str) -> bool:
    """Whether every file of a local model folder opens as a regular file inside the current confinement."""
    try:
        with pinned_folder(folder):
            return True
    except OSError:  # NotAllowed included
        return False


def model_problems(spec: TuningSpec, team: Team, config: PlatformConfig) -> Problems:
    """What the model the spec names cannot do of what the spec asks (tuneplane.families), read from its
    config.json where the control plane may read it; an unreadable config is no refusal here (the location
    checks and the job's own loading say why)."""
    if not _may_read(spec.model.base, team, config):
        return []
    with confined_to(config.confinement(team)):
        try:
            model_config = read_model_config(spec.model.base)
        except (OSError, ValueError):
            return []
    return spec_problems(spec, model_config)


def memory_check(spec: TuningSpec, team: Team, config: PlatformConfig) -> MemoryCheck:
    """The estimate per GPU of `spec` on its pool. The model's config.json is read only where the control plane
    may read (`_may_read`); elsewhere the shape comes from the table of well-known architectures."""
    may_read = _may_read(spec.model.base, team, config)
    with confined_to(config.confinement(team)):
        return check_memory(spec, pool_gpu_memory(spec, config), may_read=may_read)


def _may_read(location: str, team: Team, config: PlatformConfig) -> bool:
    """Object storage of an allowed scheme, or (local backend) a folder inside the team's data roots."""
    kind = model_location_kind(location)
    if kind == "uri":
        return location.split("://", 1)[0].lower() in config.storage_schemes
    return kind == "path" and capabilities(config).reads_local_paths and readable(location, team, config)


def memory_problems(spec: TuningSpec, team: Team, config: PlatformConfig) -> Problems:
    """A GPU job whose estimate does not fit one GPU of its pool, naming what to change. Only when the pool
    declares `gpu_memory` and the model's shape is known: an unknown model is never refused."""
    device = pool_gpu_memory(spec, config)
    if device is None:
        return host_memory_problems(spec, team, config)
    found = memory_check(spec, team, config).estimate
    if found is None or fits(found.total, device):
        return []
    field, levers = _memory_levers(spec, found)
    usable = int(device * (1 - HEADROOM))
    return [
        (
            field,
            f"estimated {found.summary()} per GPU, over the {gib(usable)} usable of the pool's {gib(device)} "
            f"GPUs; to fit: {'; '.join(levers)}",
        )
    ]


def host_memory_problems(spec: TuningSpec, team: Team, config: PlatformConfig) -> Problems:
    """A CPU job on a backend that runs all its workers on one machine whose estimate for all of them does not
    fit that machine's memory (`backend.memory`), as GPU jobs are checked against one GPU of their pool."""
    host = capabilities(config).host_memory_bytes
    if host is None or spec.distributed.gpus_per_worker:
        return []
    found = memory_check(spec, team, config).estimate
    workers = spec.distributed.num_workers
    if found is None or fits(found.total * workers, host):
        return []
    field, levers = _memory_levers(spec, found)
    levers = [lever for lever in levers if not lever.startswith("distributed.num_workers")]
    usable = int(host * (1 - HEADROOM))
    return [
        (
            field,
            f"estimated {found.summary()} per worker, {gib(found.total * workers)} for its {workers} workers, "
            f"over the {gib(usable)} usable of this machine's {gib(host)}; to fit: {'; '.join(levers)}",
        )
    ]


def _memory_levers(spec: TuningSpec, found: MemoryEstimate) -> tuple[str, list[str]]:
    """(the field to change first, every change that lowers the estimate): activation settings first when
    activations weigh more than the model states, ZeRO and offload first otherwise."""
    dist, parts, batch = spec.distributed, found.parts, spec.hyperparameters.micro_batch_size
    activation = [
        (not found.checkpointing, "model.activation_checkpointing", "set it to on"),
        (batch > 1, "hyperparameters.micro_batch_size", f"lower it from {batch}"),
        (True, "data.max_seq_len", f"lower it from {spec.data.max_seq_len}"),
    ]
    states = [
        (dist.zero_stage < 3, "distributed.zero_stage", f"raise it from {dist.zero_stage} to 3"),
        (not dist.offload_optimizer, "distributed.offload_optimizer", "set it"),
        (dist.zero_stage == 3 and not dist.offload_params, "distributed.offload_params", "set it"),
        (True, "distributed.num_workers", f"raise it from {dist.num_workers}"),
    ]
    model_states = parts["weights"] + parts["gradients"] + parts["optimizer"]
    first, then = (
        (states, activation)
        if model_states > parts["activations"] + parts["backward"]
        else (activation, states)
    )
    levers = [(field, f"{field}: {text}") for applies, field, text in first + then if applies]
    return levers[0][0], [text for _, text in levers]


PREFLIGHT_BUDGET_S = 30.0  # a dry run answers within this, whatever the spec asks it to read
PREFLIGHT_READ_BYTES = 512 << 20  # ... and reads at most this much, decompressed (a gzip bomb is cut short)
_LOADING = threading.Lock()  # transformers' lazy imports are not safe when two first calls race


def preflight_report(
    spec: TuningSpec, team: Team, config: PlatformConfig, max_records: int
) -> dict[str, Any] | None:
    """The data preflight `tuneplane validate` prints (needs the tokenizer; bounded by max_records), read as
    `team` (its files only), or None when the tokenizer is a hub id: the control plane never reaches the
    internet."""
    from tuneplane.data import preflight
    from tuneplane.pretrained import load_tokenizer

    if model_location_kind(spec.model.tokenizer_location) == "hub":
        return None
    with confined_to(config.confinement(team)):
        with _LOADING:
            tokenizer = load_tokenizer(spec.model)
        return preflight(
            spec,
            tokenizer,
            max_records=max_records,
            samples=1,
            time_budget_s=PREFLIGHT_BUDGET_S,
            max_read_bytes=PREFLIGHT_READ_BYTES,
        ).to_dict()
