"""The Python SDK: `Client` talks to the job-submission API; the CLI is built on it.

from tuneplane.client import Client
client = Client("https://tuneplane.example.com", token="...")
job = client.submit("jobs/tiny-cpu.yaml")
final = client.wait(job["id"])
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tuneplane.errors import TuneplaneError
from tuneplane.home import Home
from tuneplane.spec import TuningSpec, load_spec
from tuneplane.states import TERMINAL, JobState

DEFAULT_URL = "http://127.0.0.1:8421"


class ApiError(TuneplaneError):
    """A problem+json answer: `status`, `title`, and `errors` naming each field at fault."""

    def __init__(self, status: int, title: str, detail: str = "", errors: list[dict[str, str]] | None = None):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [(e.get("field", ""), e.get("message", "")) for e in self.errors] or [("", str(self))]


def _default_token() -> str | None:
    if os.environ.get("TUNEPLANE_TOKEN"):
        return os.environ["TUNEPLANE_TOKEN"]
    path = Home.default().token  # written by a local `tuneplane serve`
    return path.read_text().strip() if path.exists() else None


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("TUNEPLANE_URL") or DEFAULT_URL).rstrip("/")
        token = token or _default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- jobs -------------------------------------------------------------------------------------------

    def submit(
        self, spec: TuningSpec | dict[str, Any] | str | Path, idempotency_key: str | None = None
    ) -> dict:
        """Submit a spec (a file's relative paths are made absolute first). Network errors are retried with
        the same Idempotency-Key, so a retry never creates a second job."""
        body = _spec_body(spec)
        key = idempotency_key or str(uuid.uuid4())
        for attempt in range(4):
            try:
                return self._call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                if attempt == 3:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def jobs(self, state: list[str] | None = None, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/v1/jobs", params={"state": state or [], "limit": limit, "offset": offset})

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/events")

    def metrics(self, job_id: str, history: bool = False) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params={"history": history})

    def logs(self, job_id: str, follow: bool = False, tail: int | None = None) -> Iterator[str]:
        params: dict[str, Any] = {"follow": follow}
        if tail:
            params["tail"] = tail
        with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            yield from r.iter_lines()

    def validate(self, spec: TuningSpec | dict[str, Any] | str | Path, max_records: int = 200) -> dict:
        return self._call("POST", "/v1/validate", json=_spec_body(spec), params={"max_records": max_records})

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")

    def wait(
        self, job_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
        on_progress: Callable[[dict, dict], None] | None = None,
    ) -> dict:  # fmt: skip
        """Poll until the job ends; `on_progress(job, metrics)` is called on every poll."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while True:
            job = self.job(job_id)
            if on_progress:
                metrics = self.metrics(job_id) if job["state"] in (JobState.RUNNING, *TERMINAL) else {}
                on_progress(job, metrics)
            if job["state"] in TERMINAL:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()


def _spec_body(spec: TuningSpec | dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(spec, (str, Path)):
        return load_spec(spec).to_dict()
    if isinstance(spec, TuningSpec):
        return spec.to_dict()
    return spec


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.reason_phrase, response.text[:500])
    return ApiError(response.status_code, body.get("title", ""), body.get("detail", ""), body.get("errors"))
