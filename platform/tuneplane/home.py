"""The state folder of the embedded default, and what lives in it: the one place these paths are spelled.

`TUNEPLANE_HOME` moves the whole folder (default `~/.cache/tuneplane`); a platform config's `home` does the same
for a server. `TUNEPLANE_CACHE` moves only the copies of pretrained checkpoints (e.g. to a node's local disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.cache/tuneplane"


def default_home() -> Path:
    """The home folder now: `TUNEPLANE_HOME`, else ~/.cache/tuneplane (read at call time, not import time)."""
    return Path(os.environ.get("TUNEPLANE_HOME") or DEFAULT_HOME).expanduser()


@dataclass(frozen=True)
class Home:
    """The layout of a home folder."""

    root: Path

    @classmethod
    def default(cls) -> Home:
        return cls(default_home())

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'tuneplane.db'}"

    @property
    def tracking_db(self) -> Path:
        """The local MLflow database: in a folder of its own (`mlflow/`), which a sandboxed job may write
        without seeing the rest of the state folder. A home made before keeps it at the top (`mlflow.db`)."""
        legacy = self.root / "mlflow.db"
        return legacy if legacy.exists() else self.root / "mlflow" / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"

    @property
    def artifact_root(self) -> Path:
        """MLflow's artifacts beside its database (`mlflow/artifacts`; `mlartifacts` in a home made before)."""
        legacy = self.root / "mlartifacts"
        return legacy if legacy.exists() else self.root / "mlflow" / "artifacts"

    @property
    def runs(self) -> Path:
        """Ray Train run storage: checkpoints, and the published copy of each job's model."""
        return self.root / "runs"

    @property
    def jobs(self) -> Path:
        """One folder per local job: spec, pid, exit code, log."""
        return self.root / "jobs"

    def team_cache(self, team: str) -> Path:
        """A team's own cache (`TUNEPLANE_CACHE` of its local jobs): copies of checkpoints one team's job made
        are never what another team's job loads."""
        return self.root / "cache" / team

    @property
    def token(self) -> Path:
        """The local server's admin token, which the CLI finds."""
        return self.root / "token"


def pretrained_cache() -> Path:
    """Where checkpoints from object storage are copied, once per node."""
    base = os.environ.get("TUNEPLANE_CACHE")
    return (Path(base).expanduser() if base else default_home()) / "pretrained"


def run_folders(storage_path: str, job_id: str) -> tuple[Path, Path]:
    """The local folders a job's run writes under a local `storage_path`: Ray Train's run (checkpoints) and
    the final model copied for publishing. The launcher writes them; a sandbox lets the job write only them."""
    root = Path(storage_path).expanduser()
    return root / job_id, root / "models" / job_id


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite database URL (`sqlite:///...`, SQLAlchemy's or MLflow's), else None."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix)).expanduser()
    return None


def ensure_sqlite_folder(uri: str) -> None:
    """Create the folder of a `sqlite:///` database (SQLite creates the file, not its folder)."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
