"""Platform configuration: what the operator decides (teams, quotas, GPU pools, backend, storage, tracking).

One YAML file (the Helm chart mounts it from a ConfigMap; `TUNEPLANE_CONFIG` points at it) plus environment
overrides for the values that come from Secrets (`TUNEPLANE_DATABASE_URL`). With no file at all the embedded
default applies: local backend, SQLite and MLflow under `~/.cache/tuneplane`, one admin team `default`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneplane.errors import ConfigError
from tuneplane.home import DEFAULT_HOME, Home, default_home


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quota(_Strict):
    max_concurrent_jobs: int = Field(2, ge=0, description="Jobs submitted or running at once.")
    max_gpus: int = Field(8, ge=0, description="GPUs held at once by the team's submitted or running jobs.")


class Team(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    namespace: str = Field("", description="Kubernetes namespace of the team's RayJobs (default: the name).")
    quota: Quota = Field(default_factory=Quota)
    gpu_pools: list[str] = Field(default_factory=list, description="GPU pools the team may use.")
    priority: int = Field(0, description="Higher runs first when several teams wait.")

    @model_validator(mode="after")
    def _namespace_defaults_to_name(self) -> Team:
        if not self.namespace:
            self.namespace = self.name
        return self


class Toleration(_Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuPool(_Strict):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resource_name: str = Field("nvidia.com/gpu", description="Extended resource a worker requests.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100.")


class TokenEntry(_Strict):
    """An API token, stored only as the SHA-256 of the token itself."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    team: str
    role: Literal["member", "admin"] = "member"


class AuthConfig(_Strict):
    tokens: list[TokenEntry] = Field(default_factory=list)
    tokens_file: Path | None = Field(
        None, description="YAML list of token entries, e.g. mounted from a Secret; read at start."
    )


class LocalBackend(_Strict):
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs run at once on this machine.")


class Kueue(_Strict):
    enabled: bool = False
    queue_name: str = Field("{team}", description="LocalQueue per team; `{team}` is replaced.")


class SecretRef(_Strict):
    name: str
    key: str


class KubeRayBackend(_Strict):
    image: str = Field("ghcr.io/tuneplane/runtime:0.1.0", description="Training runtime image (pinned tag).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = "2.60.0"
    service_account: str | None = None
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(
        0, ge=0, description="RayJob retries of the whole job (Ray Train retries too)."
    )
    storage_path: str = Field("s3://tuneplane/runs", description="Ray Train storage for checkpoints.")
    storage_env: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="Environment of the job's pods taken from Secrets, e.g. AWS_ACCESS_KEY_ID.",
    )
    tracking_uri: str = Field("http://tuneplane-mlflow:5000", description="MLflow as seen from the cluster.")
    artifact_root: str | None = Field(
        None, description="MLflow artifact location for new experiments (default: the tracking server's)."
    )
    kueue: Kueue = Field(default_factory=Kueue)
    kubeconfig: Path | None = Field(None, description="Outside a cluster; in one, the pod's service account.")
    api_server: str | None = Field(None, description="Kubernetes API URL override (tests).")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")


class PlatformConfig(_Strict):
    backend: Literal["local", "kuberay"] = "local"
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
    storage_path: str = Field("", description="Ray Train storage for local runs; default `home`/runs.")
    teams: list[Team] = Field(default_factory=lambda: [Team(name="default")])
    gpu_pools: dict[str, GpuPool] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    local: LocalBackend = Field(default_factory=LocalBackend)
    kuberay: KubeRayBackend = Field(default_factory=KubeRayBackend)
    storage_schemes: list[str] = Field(
        default_factory=lambda: ["s3", "gs", "gcs", "az", "abfs", "abfss"],
        description="URI schemes a spec may name for data and models. Local paths are accepted only by the "
        "local backend; http(s) is never looked up by the control plane.",
    )
    validate_data: bool = Field(
        True, description="Check that a job's data and model exist before queueing it (needs storage access)."
    )
    reconcile_interval_s: float = Field(2.0, gt=0)
    max_job_duration_s: int = Field(7 * 24 * 3600, gt=0, description="A job running longer is failed.")
    max_request_bytes: int = Field(1 << 20, gt=0)
    auto_migrate: bool = Field(True, description="Apply database migrations at start.")

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
        known = set(self.gpu_pools)
        for team in self.teams:
            unknown = set(team.gpu_pools) - known
            if unknown:
                raise ValueError(f"team {team.name}: unknown gpu_pools {sorted(unknown)}")
        return self

    def team(self, name: str) -> Team | None:
        return next((t for t in self.teams if t.name == name), None)

    def token_entries(self) -> list[TokenEntry]:
        entries = list(self.auth.tokens)
        if self.auth.tokens_file and self.auth.tokens_file.exists():
            raw = yaml.safe_load(self.auth.tokens_file.read_text()) or []
            entries += [TokenEntry.model_validate(e) for e in raw]
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
        return PlatformConfig.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(problems, source) from None
