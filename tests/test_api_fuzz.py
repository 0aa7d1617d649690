"""Property-based fuzzing of the job API against its own OpenAPI document (schemathesis).

Every operation is called with schema-conforming (positive) and schema-violating (negative) inputs and a valid
bearer token; the operations on one job also get the id of a real job, and the spec-body operations also get
near-valid specs (a valid spec with sections and source URIs swapped for generated ones), since a spec drawn
from the JSON schema alone almost never passes admission. No response may be a 5xx, and every 4xx must be
RFC 9457 problem+json with `title` and `status`. One app per module (a fixture): SQLite in a tmp home, no
reconciler.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fsspec.registry import known_implementations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from tests.support.backends import RECORDING
from tests.support.config import DATA, REPO, TOKENS, bearer, platform_config
from tuneplane.api import create_app
from tuneplane.backends import BackendJob, RunPhase, RunStatus
from tuneplane.spec import load_spec

MAX_EXAMPLES = 30
VALID_SPEC = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
SPEC_BODY_OPERATIONS = {"POST /v1/jobs", "POST /v1/validate"}


def hoist_defs(openapi: dict[str, Any]) -> dict[str, Any]:
    """The spec bodies' schema keeps its own `$defs` (refs `#/$defs/X`, scoped by its `$id`): valid OpenAPI
    3.1, but schemathesis 4.32 does not resolve them and silently generates no body at all. Hoist them into
    `components/schemas` of a copy; the app's own document is unchanged."""
    doc = json.loads(json.dumps(openapi))
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for operations in doc["paths"].values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                body = media["schema"]
                for name, definition in body.pop("$defs", {}).items():
                    assert components.get(name, definition) == definition, f"two schemas named {name}"
                    components[name] = definition
                body.pop("$id", None)
    return json.loads(json.dumps(doc).replace('"#/$defs/', '"#/components/schemas/'))


# The operations parametrize the test, so they are known at collection, before any app exists: from the
# committed OpenAPI document, which tests/test_refdocs.py keeps equal to the app's (`api_schema` checks it
# too). Not schemathesis' own `@schema.parametrize()`: under pytest 9.2 its items all get the same node id
# ("test_x", no operation), so one operation could be neither selected nor marked; and its fixture-provided
# schema (`schemathesis.pytest.from_fixture`) fails there outright (`_nodeid`).
OPENAPI_DOC = REPO / "docs" / "reference" / "openapi.json"
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, operations in json.loads(OPENAPI_DOC.read_text())["paths"].items()
    for method in operations
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    home = tmp_path_factory.mktemp("fuzz")  # outlives the module, as the lifespan may
    return create_app(platform_config(home, f"sqlite:///{home / 'tuneplane.db'}"), run_reconciler=False)


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(hoist_defs(app.openapi()))
    schema.app = app  # calls go through schemathesis' ASGI transport, which runs the app's lifespan
    operations = [result.ok() for result in schema.get_all_operations()]
    assert [op.label for op in operations] == OPERATIONS, f"{OPENAPI_DOC} is stale: make schema"
    assert {op.label for op in operations if op.body} == SPEC_BODY_OPERATIONS
    return schema


@pytest.fixture(scope="module")
def job_id(app: FastAPI) -> Iterator[str]:
    """Starts the lifespan (which migrates the database) and submits one real job for the job routes."""
    with asgi.get_client(app) as client:
        assert app.state.services.db.at_head(), "the lifespan did not migrate the database"
        created = client.post("/v1/jobs", json=VALID_SPEC, headers=bearer("tok-root"))
        assert created.status_code == 201, created.text
        yield created.json()["id"]


# Source URIs: the spec's own files, globs and names under its data folder, and schemes fsspec does not know
# or cannot load here. Never a network filesystem (s3, http, ...): no calls leave the machine.
_LOCAL_SCHEMES = st.sampled_from(["file", "memory", "gs", "abfs", "hdfs"])
_UNKNOWN_SCHEMES = st.from_regex(r"[a-z][a-z0-9+.-]{1,6}", fullmatch=True).filter(
    lambda s: s not in known_implementations
)
URIS = st.one_of(
    st.sampled_from([s["uri"] for s in VALID_SPEC["data"]["sources"]]),
    st.from_regex(r"[\w*?-]{1,12}(\.jsonl)?", fullmatch=True).map(lambda name: f"{DATA}/{name}"),
    st.tuples(
        st.one_of(_LOCAL_SCHEMES, _UNKNOWN_SCHEMES), st.from_regex(r"[\w/*.-]{0,20}", fullmatch=True)
    ).map(lambda parts: f"{parts[0]}://{parts[1]}"),
)


@st.composite
def near_valid_specs(draw: st.DrawFn, operation: schemathesis.APIOperation) -> dict[str, Any]:
    generated = draw(operation.as_strategy(GenerationMode.POSITIVE)).body
    spec = copy.deepcopy(VALID_SPEC)
    for section in draw(st.sets(st.sampled_from(sorted(generated)), max_size=2)):
        spec[section] = generated[section]
    sources = spec["data"]["sources"]
    for i in draw(st.sets(st.integers(0, len(sources) - 1), max_size=2)) if sources else ():
        sources[i]["uri"] = draw(URIS)
    return spec


def cases_for(operation: schemathesis.APIOperation, job_id: str) -> st.SearchStrategy[schemathesis.Case]:
    cases = [operation.as_strategy(mode) for mode in GenerationMode]
    if "{job_id}" in operation.path:
        cases.append(operation.as_strategy(path_parameters={"job_id": job_id}))
    if operation.label in SPEC_BODY_OPERATIONS:
        specs = near_valid_specs(operation)
        cases.append(specs.flatmap(lambda spec: operation.as_strategy(GenerationMode.POSITIVE, body=spec)))
    return st.one_of(cases)


def check_problem_json(response: schemathesis.Response) -> None:
    if not 400 <= response.status_code < 500:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == "application/problem+json", (
        f"{response.status_code} with content-type {content_type!r}: {response.text[:300]}"
    )
    body: Any = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("title"), str) and body["title"], body
    assert body.get("status") == response.status_code, body


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_fuzz(label: str, api_schema: schemathesis.BaseSchema, job_id: str) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label

    @given(case=cases_for(operation, job_id), token=st.sampled_from(sorted(TOKENS)))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case, token: str) -> None:
        # In-process, an unhandled server error is raised by this call (Starlette re-raises after its 500).
        response = case.call(headers=bearer(token), timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        check_problem_json(response)

    fuzz()


# -- regressions: server errors the fuzzing found (fixed in 43a5bcb) --------------------------------------------


def _with_uri(uri: str) -> dict[str, Any]:
    spec = copy.deepcopy(VALID_SPEC)
    spec["data"]["sources"] = [{"uri": uri, "format": "alpaca"}]
    return spec


@pytest.mark.parametrize("uri", ["zz://bucket/x.jsonl", "gs://bucket/x.jsonl", "abfs://c/x.jsonl"])
def test_validate_unloadable_uri_scheme_is_a_report_not_500(uri: str, tmp_path: Path) -> None:
    """An unknown protocol (ValueError), a filesystem whose driver is not installed (ImportError): once escaped
    `check_reachable` from fsspec's `url_to_fs`, outside `expand`'s try, as a 500."""
    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'tuneplane.db'}")
    with TestClient(create_app(config, run_reconciler=False), raise_server_exceptions=False) as client:
        response = client.post("/v1/validate", json=_with_uri(uri), headers=bearer("tok-alpha"))
    assert response.status_code < 500, response.text
    assert response.json()["ok"] is False


class _IdleBackend:
    """Accepts jobs and runs nothing: the reconciler may schedule, nothing trains."""

    name = "stub"
    capabilities = RECORDING

    def submit(self, job: BackendJob) -> None:
        pass

    def status(self, job: BackendJob) -> RunStatus:
        return RunStatus(RunPhase.PENDING)

    def cancel(self, job: BackendJob) -> None:
        pass

    def logs(self, job: BackendJob, follow: bool = False) -> Iterator[str]:
        return iter(())

    def watch(self, namespace: str, timeout_seconds: int = 60) -> Iterator[tuple[str, RunStatus]]:
        return iter(())

    def close(self) -> None:
        pass


def test_unloadable_uri_scheme_fails_the_job_without_stalling_the_reconciler(tmp_path: Path) -> None:
    """The same exception once escaped `Reconciler.validate_new`: the job stayed VALIDATING and every pass
    ended before `follow_active`/`schedule`, stalling every team's jobs."""
    config = platform_config(tmp_path, f"sqlite:///{tmp_path / 'tuneplane.db'}")
    app = create_app(config, backend=_IdleBackend(), run_reconciler=False)
    with TestClient(app) as client:
        # gs:// is an allowed scheme whose filesystem package (gcsfs) is not installed here
        bad = client.post("/v1/jobs", json=_with_uri("gs://bucket/x.jsonl"), headers=bearer("tok-alpha"))
        good = client.post("/v1/jobs", json=VALID_SPEC, headers=bearer("tok-beta"))
        assert bad.status_code == good.status_code == 201
        app.state.services.reconciler.run_once()
        bad_state, good_state = (
            client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer("tok-root")).json()["state"]
            for r in (bad, good)
        )
    assert bad_state == "FAILED"
    assert good_state in ("QUEUED", "SUBMITTED")
