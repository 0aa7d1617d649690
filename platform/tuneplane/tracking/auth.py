"""Teams as MLflow users, when MLflow runs its own authentication app (`mlflow server --app-name basic-auth`;
platform config `tracking_auth: true`).

One tracking server serves every team. Without authentication a job could write any team's runs and register
versions into any team's models. With it:

- The API holds the MLflow admin's credentials (`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` in its
  environment, from a Secret); no job ever gets them.
- Each team is one MLflow user, `tuneplane-<team>`, whose password is derived from the admin's (HMAC-SHA256),
  so the platform stores none, and a rotated admin password rotates them all (`ensure_users` resets them).
- Before a job starts, the platform claims its names for its team (`claim`): it creates the job's experiment
  `<team>/<name>` when missing and gives the team's user MANAGE on it and on the registered model
  `<team>.<name>`, and takes every other team's permission there away (a name another team created first).
- The job gets its team's credentials (`job_env`). MLflow's `default_permission` must be NO_PERMISSIONS (the
  chart's configuration sets it): a team's user then reads and writes only what it was given, and MLflow
  itself refuses the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Any

USER_PREFIX = "tuneplane-"
_ADMIN_USER, _ADMIN_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class TrackingAuthError(RuntimeError):
    """The admin credentials are missing, or MLflow refused what the platform asked as admin."""


def team_user(team: str) -> str:
    return f"{USER_PREFIX}{team}"


def team_password(team: str, environ: Mapping[str, str] | None = None) -> str:
    """The team's MLflow password, derived from the admin's: the same on every API replica, stored nowhere."""
    secret = _admin(environ)[1]
    return hmac.new(secret.encode(), f"tuneplane-team:{team}".encode(), hashlib.sha256).hexdigest()[:40]


def job_env(team: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a job of `team` talks to MLflow as: its team's user, never the admin."""
    return {_ADMIN_USER: team_user(team), _ADMIN_PASSWORD: team_password(team, environ)}


def ensure_users(tracking_uri: str, teams: Iterable[str]) -> None:
    """Create each team's MLflow user, or reset its password to the derived one (the admin's rotated)."""
    with _admin_http(tracking_uri) as http:
        for team in teams:
            user, password = team_user(team), team_password(team)
            created = http.post("/api/2.0/mlflow/users/create", json={"username": user, "password": password})
            if created.status_code == 200:
                continue
            if _error_code(created) != "RESOURCE_ALREADY_EXISTS":
                raise TrackingAuthError(f"cannot create MLflow user {user}: {_said(created)}")
            reset = {"username": user, "password": password}
            _checked(http.patch("/api/2.0/mlflow/users/update-password", json=reset), f"reset {user}")


def claim(tracking_uri: str, team: str, experiment_id: str, model_name: str | None) -> None:
    """Give `team` MANAGE on the experiment and registered model of one of its jobs, and no other team
    anything there (a name another team's job created first is taken back)."""
    mine = team_user(team)
    with _admin_http(tracking_uri) as http:
        listed = _checked(http.get("/api/2.0/mlflow/users/list"), "list users").json()
        others = [u["username"] for u in listed.get("users", []) if u["username"].startswith(USER_PREFIX)]
        resources = [("experiment", experiment_id)] + (
            [("registered_model", model_name)] if model_name else []
        )
        for kind, resource in resources:
            grant = {"username": mine, "resource_type": kind, "resource_id": resource, "permission": "MANAGE"}
            _checked(http.post("/api/3.0/mlflow/users/permissions/grant", json=grant), f"grant {kind}")
            for user in (u for u in others if u != mine):
                revoke = {"username": user, "resource_type": kind, "resource_id": resource}
                http.post("/api/3.0/mlflow/users/permissions/revoke", json=revoke)  # none to revoke: fine


def _admin_http(tracking_uri: str) -> Any:
    import httpx

    user, password = _admin(None)
    return httpx.Client(base_url=tracking_uri.rstrip("/"), auth=(user, password), timeout=30)


def _checked(response: Any, what: str) -> Any:
    if response.status_code != 200:
        raise TrackingAuthError(f"MLflow refused to {what}: {_said(response)}")
    return response


def _error_code(response: Any) -> str:
    try:
        return str(response.json().get("error_code", ""))
    except ValueError:
        return ""


def _said(response: Any) -> str:
    return f"{response.status_code} {response.text[:200]}"


def _admin(environ: Mapping[str, str] | None) -> tuple[str, str]:
    env = os.environ if environ is None else environ
    user, password = env.get(_ADMIN_USER), env.get(_ADMIN_PASSWORD)
    if not user or not password:
        raise TrackingAuthError(
            f"tracking_auth is on but {_ADMIN_USER} / {_ADMIN_PASSWORD} (the MLflow admin, from a Secret) "
            "are not set in the API's environment"
        )
    return user, password
