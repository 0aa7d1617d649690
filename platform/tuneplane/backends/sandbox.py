"""The local backend's sandbox: bubblewrap around each job's training process, so that code running in a job
(a library bug, a team's trick) sees only what the job may see.

Inside, the machine is read-only, /tmp and /run are its own; the platform's state folder is replaced by an empty
one holding only this job's folder (read-only: its control files are the runner's and the API's) with its `work`
folder, its run and model folders, its team's cache and the local MLflow store (read-write); every other job's
run folders and other teams' artifacts and data roots are hidden, and what the job's spec reads shown again
read-only; the platform's private files (config, tokens file, SQLite database) read empty; the job has its own
PID namespace (no other process is visible, none outlives the sandbox) and dies with the runner that started
it. What the job could still reach is listed in docs/operations.md (the network, shared data roots, the
platform's one storage identity, a local SQLite MLflow's other runs).

`plan` decides what to show; `bwrap_args` writes it as bubblewrap's command line; `problem` says why a sandbox
cannot run here (no bubblewrap, a kernel without user namespaces, a state folder of an older layout), which the
API checks once at start (`check_isolation`).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tuneplane.config import PlatformConfig
from tuneplane.errors import ConfigError
from tuneplane.files import Confinement, resolved
from tuneplane.home import Home, run_folders, sqlite_path
from tuneplane.spec import TuningSpec, is_local_path, static_prefix

TEMP = Path("/tmp")  # private to each sandbox (Ray's session files live there)
WORK = "work"  # the one folder of its job folder a job writes (its working directory)
SYSTEM_SOCKETS = ("/run", "/var/run")


@dataclass(frozen=True)
class Plan:
    """What one job's sandbox shows (all real, absolute paths): other teams' roots hidden, the team's own roots
    shown again where they lie inside one of those, the state folder hidden, the job's folders read-write, and
    files hidden wherever they are."""

    hidden: tuple[Path, ...]
    reshown: tuple[Path, ...]
    state: Path
    readonly: tuple[Path, ...]
    writable: tuple[Path, ...]
    hidden_files: tuple[Path, ...] = field(default=())
    empty: Path = Path("/dev/null")  # an empty file of the platform's, read in place of each hidden file


def plan(config: PlatformConfig, job_id: str, team: str, spec: TuningSpec) -> Plan:
    """The sandbox of job `job_id` of `team` running `spec` under `config` (folders it writes are created
    here)."""
    home = Home(config.home)
    job = home.jobs / job_id
    # The job folder's control files (pid, exit code, log, spec) are the runner's and the API's: the job reads
    # them, and writes only its work folder inside.
    writable = [job / WORK, home.team_cache(team)]
    hidden: set[Path] = set()
    if is_local_path(config.storage_path):  # every job's checkpoints and models: only its own are there
        writable += run_folders(config.storage_path, job_id)
        hidden.add(resolved(config.storage_path))
    store = _mlflow_store(config)
    if store is not None:
        writable.append(store)
    artifacts = _local(config.artifact_root)
    if artifacts is not None and not config.tracking_uri.startswith(("http://", "https://")):
        # The team's experiments keep their artifacts here (tracking/run.py).
        writable.append(artifacts / team)
        hidden.add(resolved(artifacts))
    own = config.team(team)
    readable = config.confinement(own).roots if own is not None else ()
    others = {root for t in config.teams if t.name != team for root in config.confinement(t).roots}
    hidden |= others - set(readable)
    # Host services' sockets (the user's D-Bus and systemd, a Docker socket) would reach outside the sandbox.
    hidden |= {p for p in map(Path, SYSTEM_SOCKETS) if p.is_dir() and not p.is_symlink()}
    for folder in writable:
        folder.mkdir(parents=True, exist_ok=True)
    empty = home.root / ".empty"  # what a hidden file reads as
    empty.touch()
    return Plan(
        hidden=tuple(sorted(hidden)),
        reshown=_reshown(spec, config.confinement(own) if own is not None else None, [*hidden, TEMP]),
        state=resolved(home.root),
        readonly=(resolved(job),),
        writable=tuple(resolved(p) for p in writable),
        hidden_files=tuple(resolved(p) for p in config.private_files() if p.exists()),
        empty=resolved(empty),
    )


def _reshown(spec: TuningSpec, confinement: Confinement | None, covered: list[Path]) -> tuple[Path, ...]:
    """What the spec reads that the team may read but the sandbox covered with an empty folder (another
    team's root around it, or the private /tmp): shown again, read-only, and nothing else of those folders.
    Anything the team may not read stays unseen (its open is refused anyway)."""
    found = set()
    for _, location, kind in spec.locations():
        if kind != "path" or confinement is None:
            continue
        prefix = static_prefix(os.path.expanduser(location))
        if confinement.allows_path(prefix):
            real = resolved(Path(prefix))
            inside = any(c in real.parents for c in covered)
            # Never a folder holding a covered one (a glob over all of /tmp): that would show it again.
            if inside and not any(real == c or real in c.parents for c in covered):
                found.add(real)
    return tuple(sorted(found))


def bwrap_args(sandbox: Plan, workdir: Path) -> list[str]:
    """bubblewrap's command line for `sandbox` (the command to run follows it). Mounts apply in order, each on
    top of the ones before: the machine read-only; other teams' roots hidden, the team's own shown again; the
    state folder hidden; the job folder read-only and the job's own folders read-write; hidden files."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", str(TEMP)]
    for folder in sandbox.hidden:
        args += ["--tmpfs", str(folder)]
    for folder in sandbox.reshown:
        args += ["--ro-bind-try", str(folder), str(folder)]
    args += ["--tmpfs", str(sandbox.state)]
    for folder in sandbox.readonly:
        args += ["--ro-bind", str(folder), str(folder)]
    for folder in sandbox.writable:
        args += ["--bind", str(folder), str(folder)]
    for file in sandbox.hidden_files:
        args += ["--ro-bind", str(sandbox.empty), str(file)]
    # Its own PID namespace (it sees and outlives no other process); it dies with the runner. The process group
    # is kept: a cancel's SIGTERM reaches the training process, which ends its run KILLED.
    args += ["--unshare-pid", "--die-with-parent", "--chdir", str(workdir), "--"]
    return args


def problem(config: PlatformConfig) -> str | None:
    """Why local jobs cannot run sandboxed here, or None when they can."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (`bwrap`) is not installed: apt-get install bubblewrap"
    if not _bwrap_runs():
        return (
            "bubblewrap cannot start a sandbox here (user namespaces disabled, or a container without them)"
        )
    home = resolved(Home(config.home).root)
    for what, folder in (("database", _mlflow_store(config)), ("artifacts", _local(config.artifact_root))):
        if folder is not None and (home == resolved(folder) or resolved(folder) in home.parents):
            return (
                f"the local MLflow {what} lies in the state folder itself ({folder}, an older layout): move "
                f"mlflow.db into {home / 'mlflow'} (docs/operations.md), or use a new home"
            )
    return None


def check_isolation(config: PlatformConfig) -> str | None:
    """At API start, for the local backend: None when jobs will run sandboxed; a warning to log when they will
    not and may (one team, or `backend.isolation: none`); ConfigError when several teams would share an
    unsandboxed machine without the config saying so."""
    if config.local is not None and config.local.isolation == "none":
        return "backend.isolation is none: local jobs run without a sandbox and can read what the API can"
    why = problem(config)
    if why is None:
        return None
    if len(config.teams) > 1:
        raise ConfigError(
            [
                (
                    "backend.isolation",
                    f"{len(config.teams)} teams share this machine and local jobs cannot be sandboxed: {why}. "
                    "Fix that, or set backend.isolation: none to run them unsandboxed knowingly",
                )
            ]
        )
    return f"local jobs run without a sandbox: {why}"


def _mlflow_store(config: PlatformConfig) -> Path | None:
    """The folder of a local MLflow database, which jobs write."""
    database = sqlite_path(config.tracking_uri)
    return database.parent if database is not None else None


def _local(location: str) -> Path | None:
    return Path(location).expanduser() if location and is_local_path(location) else None


@functools.cache
def _bwrap_runs() -> bool:
    try:
        probe = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid", "true"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
