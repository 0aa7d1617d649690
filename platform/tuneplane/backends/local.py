"""The embedded default: each job runs `python -m tuneplane.train` on this machine, on a local Ray it starts.

Everything about a job lives in its folder (`home/jobs/<id>`: spec, pid, exit code, log), so an API that
restarts finds its running jobs again. The training process runs in a bubblewrap sandbox (`sandbox.py`) with an
allow-listed environment (`job_environment`). A small runner process owns the training process and records its exit
code, which survives the API's death; the job runs in its own process group so a cancel reaches Ray's
processes too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from tuneplane import raylocal
from tuneplane.backends import sandbox
from tuneplane.backends.base import BackendJob, RunPhase, RunStatus
from tuneplane.backends.capabilities import capabilities
from tuneplane.config import PlatformConfig
from tuneplane.errors import BackendError
from tuneplane.files import Confinement
from tuneplane.home import Home
from tuneplane.tracking import auth as mlflow_auth

# What a job inherits from the API's environment: the basics of running Python, and the platform's object-storage
# client settings (the local backend has one storage identity). Nothing else: the API's environment may hold its
# database URL, config path or admin token, which no team's code may see.
INHERITED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "VIRTUAL_ENV",
    "OMP_NUM_THREADS",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    *(
        f"{name}{proxy}"
        for name in ("HTTP", "HTTPS", "NO", "http", "https", "no")
        for proxy in ("_PROXY", "_proxy")
    ),
)
INHERITED_PREFIXES = ("AWS_", "AZURE_STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_")
log = logging.getLogger("tuneplane.backends.local")
_KILL_GRACE_S = 30  # the entrypoint marks its MLflow run KILLED within its own 20 s grace
_WATCH_POLL_S = 1.0


class LocalBackend:
    name = "local"

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.capabilities = capabilities(config)
        self.root = Home(config.home).jobs
        self._closed = threading.Event()
        # ConfigError for several teams that would share an unsandboxed machine unknowingly; else a warning.
        warning = sandbox.check_isolation(config)
        if warning:
            log.warning(warning)
        self.sandboxed = warning is None

    def job_dir(self, job: BackendJob) -> Path:
        return self.root / job.id

    def submit(self, job: BackendJob) -> None:
        folder = self.job_dir(job)
        if (folder / "pid").exists():  # already started: submit is idempotent
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.yaml").write_text(yaml.safe_dump(job.spec.to_dict(), sort_keys=False))
        (folder / "namespace").write_text(job.namespace)
        env = job_environment(self.config, job, os.environ)
        runner = [sys.executable, "-m", "tuneplane.backends.local_runner", str(folder)]
        if self.sandboxed:
            plan = sandbox.plan(self.config, job.id, job.team, job.spec)
            runner += sandbox.bwrap_args(plan, folder / sandbox.WORK)
            # The machine's home folder is read-only in there: caches go to the team's own.
            env["HOME"] = str(Home(self.config.home).team_cache(job.team) / "home")
            Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        try:
            with open(folder / "train.log", "ab") as log:
                proc = subprocess.Popen(
                    runner,
                    cwd=folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: survives the API, cancelled as a whole
                )
        except OSError as exc:
            raise BackendError(f"cannot start the training process: {exc}") from None
        (folder / "pid").write_text(str(proc.pid))
        # Collect the runner's exit whenever it comes, so no zombie is left behind in this process.
        threading.Thread(target=proc.wait, name=f"reap-{job.id}", daemon=True).start()

    def status(self, job: BackendJob) -> RunStatus:
        return _status(self.job_dir(job))

    def watch(self, namespace: str, timeout_seconds: int = 60) -> Iterator[tuple[str, RunStatus]]:
        """Jobs of `namespace` as they end (their runner records an exit code), polled every second."""
        deadline = time.monotonic() + timeout_seconds
        seen = self._ended(namespace)
        while not self._closed.wait(_WATCH_POLL_S) and time.monotonic() < deadline:
            ended = self._ended(namespace)
            for folder in sorted(ended - seen):
                yield folder.name, _status(folder)
            seen = ended

    def _ended(self, namespace: str) -> set[Path]:
        folders = {exit_code.parent for exit_code in self.root.glob("*/exit_code")}
        return {f for f in folders if _read(f / "namespace") == namespace}

    def close(self) -> None:
        self._closed.set()

    def cancel(self, job: BackendJob) -> None:
        folder = self.job_dir(job)
        pid = _pid(folder)
        if pid is None or (folder / "exit_code").exists():
            return
        cancelled = folder / "cancelled"
        first = not cancelled.exists()
        if first:
            cancelled.write_text(str(time.time()))
        since = time.time() - float(cancelled.read_text() or 0)
        sig = signal.SIGTERM if first or since < _KILL_GRACE_S else signal.SIGKILL
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    def logs(self, job: BackendJob, follow: bool = False) -> Iterator[str]:
        path = self.job_dir(job) / "train.log"
        try:  # never through a symlink: an unsandboxed job could have put one there (to the API's own files)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return
        with open(fd, encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line
                    continue
                if not follow or self.status(job).phase not in (RunPhase.RUNNING, RunPhase.PENDING):
                    yield from f  # whatever was written after the last read
                    return
                time.sleep(0.5)
                yield ""  # a heartbeat: a reader may stop here without waiting for the next line


def job_environment(config: PlatformConfig, job: BackendJob, inherited: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a local job: an allow-list of `inherited` (INHERITED_ENV) plus what the
    platform sets for this job (identity, storage, tracking, the team's file confinement, a per-team cache)."""
    home = Home(config.home)
    team = config.team(job.team)
    # A job of a team the config no longer has may read nothing local.
    confinement = config.confinement(team) if team is not None else Confinement(())
    passed = {
        key: value
        for key, value in inherited.items()
        if key in INHERITED_ENV or key.startswith(INHERITED_PREFIXES)
    }
    if config.tracking_auth:  # the job logs to MLflow as its team, never as the API's admin
        passed |= mlflow_auth.job_env(job.team, inherited)
    return (
        passed
        | confinement.to_env()
        | raylocal.job_env()
        | {
            "TUNEPLANE_HOME": str(home.root),
            "TUNEPLANE_CACHE": str(home.team_cache(job.team)),
            "TUNEPLANE_JOB_ID": job.id,
            "TUNEPLANE_TEAM": job.team,
            "TUNEPLANE_STORAGE_PATH": config.storage_path,
            "MLFLOW_TRACKING_URI": config.tracking_uri,
            "TUNEPLANE_ARTIFACT_ROOT": config.artifact_root,
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            # Each local job starts its own Ray: without an address Ray would join any cluster it finds running
            # on this machine (another job's, a developer's), where the job may never get its CPUs.
            "RAY_ADDRESS": "local",
        }
    )


def _pid(folder: Path) -> int | None:
    """The runner's pid the backend wrote, or None (not started, or not a pid: never 0 or 1, which would
    signal the API's own process group or every process)."""
    text = _read(folder / "pid").strip()
    return int(text) if text.isdigit() and int(text) > 1 else None


def _status(folder: Path) -> RunStatus:
    exit_file = folder / "exit_code"
    pid = _pid(folder)
    if pid is None:
        return RunStatus(RunPhase.MISSING)
    ended = exit_file.exists() or not _alive(pid)
    if not ended:
        return RunStatus(RunPhase.RUNNING)
    if (folder / "cancelled").exists():
        return RunStatus(RunPhase.STOPPED, "cancelled")
    if not exit_file.exists():
        return RunStatus(RunPhase.FAILED, "the training process ended without an exit code (killed?)")
    code = int(exit_file.read_text().strip() or "1")
    if code == 0:
        return RunStatus(RunPhase.SUCCEEDED)
    return RunStatus(RunPhase.FAILED, _failure_message(folder / "train.log", code))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child, not yet reaped) counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _failure_message(log: Path, code: int) -> str:
    """The entrypoint's own one-line reason ('training failed: worker 0: DataError: uri:line: ...')."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 64_000))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith(("training failed:", "invalid spec")):
            return line.strip()
    return f"the training process exited with code {code}"
