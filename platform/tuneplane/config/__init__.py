"""Platform configuration: what the operator decides (teams, quotas, GPU pools, backend, storage, tracking).

One YAML file (the Helm chart mounts it from a ConfigMap; `TUNEPLANE_CONFIG` points at it) plus environment
overrides for the values that come from Secrets (`TUNEPLANE_DATABASE_URL`). With no file at all the embedded
default applies: local backend, SQLite and MLflow under `~/.cache/tuneplane`, one admin team `default`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from tuneplane.config._strict import Strict
from tuneplane.config.kuberay import KubeRayBackend
from tuneplane.errors import ConfigError
from tuneplane.files import Confinement
from tuneplane.home import DEFAULT_HOME, Home, default_home, sqlite_path
from tuneplane.quantity import QUANTITY_SCHEMA, check_quantity, quantity_bytes


class Quota(Strict):
    max_concurrent_jobs: int = Field(2, ge=0, description="Jobs submitted or running at once.")
    max_gpus: int = Field(8, ge=0, description="GPUs held at once by the team's submitted or running jobs.")
    max_waiting_jobs: int = Field(
        100, ge=0, description="Jobs waiting (pending, validating or queued) at once; more are refused (429)."
    )


class Team(Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    namespace: str = Field(
        "",
        pattern=r"^$|^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="Kubernetes namespace of the team's RayJobs (default: the name).",
    )
    quota: Quota = Field(default_factory=Quota)
    gpu_pools: list[str] = Field(default_factory=list, description="GPU pools the team may use.")
    priority: int = Field(0, description="Higher runs first when several teams wait.")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Local folders only this team's specs may read (local backend), besides `data_roots`.",
    )

    @model_validator(mode="after")
    def _namespace_defaults_to_name(self) -> Team:
        if not self.namespace:
            self.namespace = self.name
        return self


class Toleration(Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuPool(Strict):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resource_name: str = Field(
        "nvidia.com/gpu",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="Extended resource a worker requests.",
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100.")
    # The node shape: with `gpus_per_node` set the KubeRay backend packs a job's workers into node-sized pods
    # (one Ray worker pod per node) and admission refuses a worker that cannot fit one node.
    gpus_per_node: int | None = Field(
        None, ge=1, le=64, description="GPUs of one node of the pool; set it to get one Ray pod per node."
    )
    cpus_per_node: float | None = Field(
        None, gt=0, description="CPUs of one node a job may use (allocatable, less the daemons' share)."
    )
    memory_per_node: str | None = Field(
        None,
        description="Memory of one node a job may use, as a Kubernetes quantity, e.g. '1800Gi'.",
        json_schema_extra=QUANTITY_SCHEMA,
    )
    gpu_memory: str | None = Field(
        None,
        description="Memory of ONE GPU of the pool, as a Kubernetes quantity, e.g. '80Gi'.",
        json_schema_extra=QUANTITY_SCHEMA,
    )

    @field_validator("memory_per_node", "gpu_memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return check_quantity(value)

    def gpu_memory_bytes(self) -> int | None:
        """Bytes of one GPU's memory, or None when the pool does not say."""
        return quantity_bytes(self.gpu_memory) if self.gpu_memory is not None else None

    def memory_per_node_bytes(self) -> int | None:
        """Bytes of one node's memory a job may use, or None when the pool does not say."""
        return quantity_bytes(self.memory_per_node) if self.memory_per_node is not None else None


class TokenEntry(Strict):
    """An API token, stored only as the SHA-256 of the token itself."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    team: str
    role: Literal["member", "admin"] = "member"


class AuthConfig(Strict):
    tokens: list[TokenEntry] = Field(default_factory=list)
    tokens_file: Path | None = Field(
        None,
        description="YAML list of token entries, e.g. mounted from a Secret; re-read when it changes "
        "(rotation without a restart).",
    )


def read_tokens_file(path: Path) -> list[TokenEntry]:
    """The token entries of a tokens file (none when it does not exist). A malformed file is a ConfigError
    whose problems name the entry and field at fault, never a value: the file holds token digests, and a
    mistaken one may hold a raw token."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {type(exc).__name__}")], str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The error's own text quotes the offending line: give only where it is.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([("", f"not valid YAML{where}")], str(path)) from None
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError([("", f"expected a list of token entries, got {type(raw).__name__}")], str(path))
    entries, problems = [], []
    for i, item in enumerate(raw):
        try:
            entries.append(TokenEntry.model_validate(item))
        except ValidationError as exc:
            # pydantic's `msg` describes the rule (e.g. the pattern), not the input; an unknown key is not
            # named either (it might be a token pasted in the wrong place).
            for e in exc.errors(include_input=False):
                loc = [str(p) if p in TokenEntry.model_fields else "<unknown field>" for p in e["loc"]]
                problems.append((".".join([str(i), *loc]), e["msg"]))
    if problems:
        raise ConfigError(problems, str(path))
    return entries


class LocalBackend(Strict):
    """Jobs as processes on this machine, each on a Ray of its own (the embedded default)."""

    type: Literal["local"] = "local"
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs run at once on this machine.")
    isolation: Literal["sandbox", "none"] = Field(
        "sandbox",
        description="`sandbox`: each job runs under bubblewrap, seeing only its team's data and its own "
        "folders (backends/sandbox.py). Where that cannot run, a config with several teams is refused at "
        "start unless this says `none`.",
    )
    memory: str | None = Field(
        None,
        description="Memory one local job may use, as a Kubernetes quantity, e.g. '16Gi' (default: this "
        "machine's total). A job whose estimate for all its workers does not fit is refused at submit.",
        json_schema_extra=QUANTITY_SCHEMA,
    )

    _quantity = field_validator("memory")(lambda cls, value: check_quantity(value))

    def memory_bytes(self) -> int:
        """Bytes one local job may use: `memory`, else this machine's physical memory."""
        if self.memory is not None:
            return quantity_bytes(self.memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ApiLimits(Strict):
    """What one team may hold of the API at once, so that no team's requests slow another's (api/limits.py)."""

    validations_per_team: int = Field(2, ge=1, description="Dry-run validations one team may run at once.")
    validations_per_minute: int = Field(
        30, ge=1, description="Dry-run validations one team may start a minute."
    )
    log_streams_per_team: int = Field(
        8, ge=1, description="Followed job logs one team may hold open at once."
    )
    heavy_threads: int = Field(
        8, ge=1, description="Threads admitting validations, apart from quick requests."
    )
    validation_processes: int = Field(
        2, ge=1, le=64, description="Worker processes running validations' data preflights (niced)."
    )
    validation_timeout_s: float = Field(
        90.0,
        gt=0,
        le=3600,
        description="A validation answering no sooner is stopped (its workers killed): 503.",
    )
    stream_threads: int = Field(64, ge=1, description="Threads for log streams, apart from quick requests.")


# Where jobs run: one section, tagged by `type` (a new backend is one more class here and its module in backends/).
BackendConfig = Annotated[LocalBackend | KubeRayBackend, Field(discriminator="type")]


class PlatformConfig(Strict):
    backend: BackendConfig = Field(
        default_factory=LocalBackend,
        description="Where jobs run and that backend's settings: `type: local` (this machine) or "
        "`type: kuberay` (RayJobs on Kubernetes).",
    )
    home: Path = Field(
        default_factory=default_home,
        description="Where the embedded default keeps its database, runs and logs. Env: TUNEPLANE_HOME.",
        json_schema_extra={"default": DEFAULT_HOME},  # not this machine's home folder
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; default SQLite in `home`. Env: TUNEPLANE_DATABASE_URL."
    )
    tracking_uri: str = Field("", description="MLflow the API reads; default SQLite in `home`.")
    artifact_root: str = Field("", description="MLflow artifact location for new experiments.")
    tracking_auth: bool = Field(
        False,
        description="MLflow runs its authentication app (`--app-name basic-auth`, default permission "
        "NO_PERMISSIONS): the API, holding the admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
        "makes one MLflow user per team and gives it only its own experiments and registered models; jobs "
        "log as their team (tracking/auth.py).",
    )
    storage_path: str = Field("", description="Ray Train storage for local runs; default `home`/runs.")
    teams: list[Team] = Field(default_factory=lambda: [Team(name="default")])
    gpu_pools: dict[str, GpuPool] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage_schemes: list[str] = Field(
        default_factory=lambda: ["s3", "gs", "gcs", "az", "abfs", "abfss"],
        description="URI schemes a spec may name for data and models. Local paths are accepted only by the "
        "local backend; http(s) is never looked up by the control plane.",
    )
    data_roots: list[Path] | None = Field(
        None,
        description="Local folders every team's specs may read, data and models (local backend only; symlinks "
        "and '..' are resolved first, `home` is never readable). Default: the user's home folder and the "
        "folder the server started in; set it when several teams share a local backend.",
    )
    validate_data: bool = Field(
        True, description="Check that a job's data and model exist before queueing it (needs storage access)."
    )
    validation_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Time budget of one job's data lookup; past it the job fails."
    )
    reconcile_interval_s: float = Field(
        2.0, gt=0, description="Seconds between reconciler passes (a backend's watch wakes it sooner)."
    )
    max_job_duration_s: int = Field(7 * 24 * 3600, gt=0, description="A job running longer is failed.")
    max_request_bytes: int = Field(1 << 20, gt=0, description="Largest accepted request body (bytes).")
    limits: ApiLimits = Field(default_factory=ApiLimits)
    auto_migrate: bool = Field(True, description="Apply database migrations at start.")
    _source: Path | None = PrivateAttr(None)  # the file this config was read from (`private_files`)

    @model_validator(mode="before")
    @classmethod
    def _one_backend_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and (
            "local" in data or "kuberay" in data or isinstance(data.get("backend"), str)
        ):
            raise ValueError(
                "backend: one section, tagged by its type: `backend: {type: local, ...}` or "
                "`backend: {type: kuberay, ...}`; the settings of a `local:` or `kuberay:` section go inside it"
            )
        return data

    @field_validator("teams")
    @classmethod
    def _unique_teams(cls, teams: list[Team]) -> list[Team]:
        names = [t.name for t in teams]
        if len(names) != len(set(names)):
            raise ValueError("team names must be unique")
        return teams

    @model_validator(mode="after")
    def _fill_defaults(self) -> PlatformConfig:
        self.home = self.home.expanduser()
        home = Home(self.home)
        self.database_url = self.database_url or home.database_url
        self.tracking_uri = self.tracking_uri or home.tracking_uri
        self.artifact_root = self.artifact_root or str(home.artifact_root)
        self.storage_path = self.storage_path or str(home.runs)
        if self.tracking_auth and self.tracking_uri.startswith(("sqlite:", "file:")):
            raise ValueError("tracking_auth: needs an MLflow tracking server (http(s)://), not a local store")
        if self.tracking_auth and self.kuberay is not None and not self.kuberay.tracking_secret:
            raise ValueError(
                "tracking_auth: the kuberay backend needs backend.tracking_secret (team credentials)"
            )
        if self.local is not None and len(self.teams) > 1 and self.data_roots is None:
            raise ValueError(
                "data_roots: several teams share the local backend; say which folders they all may read (the "
                "default, the user's home folder and the server's, would give every team the API user's files)"
            )
        known = set(self.gpu_pools)
        for team in self.teams:
            unknown = set(team.gpu_pools) - known
            if unknown:
                raise ValueError(f"team {team.name}: unknown gpu_pools {sorted(unknown)}")
        return self

    def job_artifact_root(self) -> str | None:
        """Where a job's new MLflow experiments keep artifacts, as its backend tells the job (None: the
        tracking server's default)."""
        return self.kuberay.artifact_root if self.kuberay is not None else self.artifact_root

    @property
    def local(self) -> LocalBackend | None:
        """The backend's settings when jobs run on this machine, else None."""
        return self.backend if isinstance(self.backend, LocalBackend) else None

    @property
    def kuberay(self) -> KubeRayBackend | None:
        """The backend's settings when jobs run on KubeRay, else None."""
        return self.backend if isinstance(self.backend, KubeRayBackend) else None

    def team(self, name: str) -> Team | None:
        return next((t for t in self.teams if t.name == name), None)

    def readable_roots(self, team: Team) -> list[Path]:
        """The local folders a team's specs may read, resolved (symlinks, '~', '..')."""
        shared = self.data_roots if self.data_roots is not None else [Path.home(), Path.cwd()]
        return [Path(os.path.realpath(root.expanduser())) for root in [*shared, *team.data_roots]]

    def confinement(self, team: Team) -> Confinement:
        """Where a team's local files may lie: its data roots, never the platform's own state folder (tokens,
        other teams' jobs and artifacts) or its private files. The API checks with it; the local backend hands
        it to the team's jobs, whose every open checks it on the descriptor (`tuneplane.files`)."""
        return Confinement.of(self.readable_roots(team), [self.home, *self.private_files()])

    def private_files(self) -> list[Path]:
        """Files of the platform no team may read wherever they lie: this config file, the tokens file, and a
        SQLite database (with its journal files)."""
        files = [p for p in (self._source, self.auth.tokens_file) if p is not None]
        database = sqlite_path(self.database_url)
        if database is not None:
            files += [
                database,
                *(database.with_name(database.name + s) for s in ("-journal", "-wal", "-shm")),
            ]
        return [Path(p).expanduser() for p in files]

    def token_entries(self) -> list[TokenEntry]:
        """`auth.tokens` plus the tokens file as it is now (ConfigError when that file is malformed)."""
        entries = list(self.auth.tokens)
        if self.auth.tokens_file:
            entries += read_tokens_file(self.auth.tokens_file)
        return entries


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PlatformConfig:
    """The config file (argument, else TUNEPLANE_CONFIG, else none) + env overrides; errors name the field."""
    path = path or os.environ.get("TUNEPLANE_CONFIG")
    data: dict[str, Any] = {}
    source = "<default config>"
    if path:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError([("", f"cannot read config: {exc}")], source) from None
    if os.environ.get("TUNEPLANE_DATABASE_URL"):
        data["database_url"] = os.environ["TUNEPLANE_DATABASE_URL"]
    data.update(overrides or {})
    try:
        config = PlatformConfig.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(problems, source) from None
    config._source = Path(path).resolve() if path else None
    return config
