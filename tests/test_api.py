"""The job-submission API over its ASGI interface: errors, idempotency, isolation, probes (SQLite + PostgreSQL)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.config import REPO, bearer, platform_config
from tuneplane.api import create_app
from tuneplane.spec import load_spec

ALPHA, BETA, ROOT = bearer("tok-alpha"), bearer("tok-beta"), bearer("tok-root")


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()


@pytest.fixture
def api(tmp_path: Path, db_url: str):
    app = create_app(platform_config(tmp_path, db_url), run_reconciler=False)
    with TestClient(app) as client:
        yield client


def test_submit_returns_a_pending_job_and_records_the_event(api: TestClient, spec: dict) -> None:
    r = api.post("/v1/jobs", json=spec, headers=ALPHA)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "PENDING" and job["team"] == "alpha" and job["name"] == "tiny-cpu"
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert api.get(f"/v1/jobs/{job['id']}", headers=ALPHA).json()["spec"] == spec
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=ALPHA).json()
    assert [(e["to_state"], e["actor"]) for e in events] == [("PENDING", "alpha")]


def test_idempotency_key_never_creates_a_second_job(api: TestClient, spec: dict) -> None:
    headers = {**ALPHA, "Idempotency-Key": "retry-1"}
    first = api.post("/v1/jobs", json=spec, headers=headers)
    again = api.post("/v1/jobs", json=spec, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len(api.get("/v1/jobs", headers=ALPHA).json()["items"]) == 1
    other = copy.deepcopy(spec)
    other["hyperparameters"]["max_steps"] = 7
    clash = api.post("/v1/jobs", json=other, headers=headers)
    assert clash.status_code == 409 and "Idempotency-Key" in clash.json()["detail"]
    # The same key from another team is another request.
    assert api.post("/v1/jobs", json=spec, headers={**BETA, "Idempotency-Key": "retry-1"}).status_code == 201


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s["distributed"].update(num_workers=0), "distributed.num_workers"),
        (lambda s: s["data"]["sources"][0].update(uri="data/x.jsonl"), "data.sources[0].uri"),
        (lambda s: s.update(command="rm -rf /"), "command"),
        (lambda s: s["hyperparameters"].update(learning_rate="fast"), "hyperparameters.learning_rate"),
        (lambda s: s["distributed"].update(gpu_pool="a100"), "distributed.gpu_pool"),
    ],
)
def test_bad_specs_are_422_problems_naming_the_field(api: TestClient, spec: dict, edit, field: str) -> None:
    bad = copy.deepcopy(spec)
    edit(bad)
    r = api.post("/v1/jobs", json=bad, headers=ALPHA)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in r.json()["errors"]], r.json()
    assert api.get("/v1/jobs", headers=ALPHA).json()["items"] == []  # nothing was created


def test_team_policy_pools_and_gpu_quota(tmp_path: Path, spec: dict) -> None:
    config = platform_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'db'}",
        backend={"type": "kuberay", "api_server": "http://127.0.0.1:9"},
    )
    gpu = load_spec(REPO / "jobs" / "llama3-8b-lora-zero2.yaml").to_dict()  # data and model on S3
    gpu["distributed"].update(gpus_per_worker=1, gpu_pool="h100", num_workers=2)
    with TestClient(create_app(config, run_reconciler=False)) as api:
        assert api.post("/v1/jobs", json=gpu, headers=ALPHA).status_code == 201
        refused = api.post("/v1/jobs", json=gpu, headers=BETA)  # beta may not use h100 and has 0 GPUs
        assert refused.status_code == 422
        fields = {e["field"]: e["message"] for e in refused.json()["errors"]}
        assert "may not use pool" in fields["distributed.gpu_pool"]
        assert "quota is 0" in fields["distributed.gpus_per_worker"]
        # A cluster job cannot read the API host's disk: local paths are refused by name.
        local = api.post("/v1/jobs", json=spec, headers=ALPHA)
        assert local.status_code == 422
        assert (
            "a local path means nothing to a cluster job"
            in {e["field"]: e["message"] for e in local.json()["errors"]}["data.sources[0].uri"]
        )


@pytest.mark.parametrize(
    "uri", ["http://169.254.169.254/latest/meta-data", "ftp://127.0.0.1:21/x.jsonl", "zz://b/x"]
)
def test_specs_cannot_make_the_control_plane_probe_the_network(api: TestClient, spec: dict, uri: str) -> None:
    bad = copy.deepcopy(spec)
    bad["data"]["sources"][3]["uri"] = uri
    for path in ("/v1/jobs", "/v1/validate"):
        r = api.post(path, json=bad, headers=ALPHA)
        problems = r.json()["errors"] if r.status_code == 422 else r.json()["problems"]
        assert not r.json().get("ok"), r.text
        assert any(p["field"] == "data.sources[3].uri" and "is not allowed" in p["message"] for p in problems)


def test_malformed_bodies_and_size_limit(api: TestClient) -> None:
    r = api.post("/v1/jobs", content=b"{not json", headers={**ALPHA, "content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert api.post("/v1/jobs", json=[1, 2], headers=ALPHA).status_code == 422
    huge = api.post("/v1/jobs", content=b"x" * (2 << 20), headers=ALPHA)
    assert huge.status_code == 413 and huge.json()["title"] == "request too large"


def test_authentication_is_required(api: TestClient, spec: dict) -> None:
    refused = api.get("/v1/jobs")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert api.get("/v1/jobs", headers=bearer("nope")).status_code == 401
    assert api.post("/v1/jobs", json=spec, headers={"Authorization": "Basic abc"}).status_code == 401
    assert api.get("/healthz").status_code == 200  # probes are open


def test_teams_are_isolated_and_admins_see_all(api: TestClient, spec: dict) -> None:
    a = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
    b = api.post("/v1/jobs", json=spec, headers=BETA).json()["id"]
    assert [j["id"] for j in api.get("/v1/jobs", headers=ALPHA).json()["items"]] == [a]
    assert [j["id"] for j in api.get("/v1/jobs", headers=BETA).json()["items"]] == [b]
    for path in (f"/v1/jobs/{a}", f"/v1/jobs/{a}/events", f"/v1/jobs/{a}/logs", f"/v1/jobs/{a}/metrics"):
        assert api.get(path, headers=BETA).status_code == 404, path  # same answer as for a missing job
    assert api.post(f"/v1/jobs/{a}/cancel", headers=BETA).status_code == 404
    assert api.get(f"/v1/jobs/{a}", headers=ALPHA).json()["state"] == "PENDING"
    assert {j["id"] for j in api.get("/v1/jobs", headers=ROOT).json()["items"]} == {a, b}
    assert [j["id"] for j in api.get("/v1/jobs?team=beta", headers=ROOT).json()["items"]] == [b]


def test_listing_filters_and_pages(api: TestClient, spec: dict) -> None:
    ids = [api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"] for _ in range(5)]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=ALPHA)
    page1 = api.get("/v1/jobs?limit=2", headers=ALPHA).json()
    page2 = api.get(f"/v1/jobs?limit=2&offset={page1['next_offset']}", headers=ALPHA).json()
    page3 = api.get(f"/v1/jobs?limit=2&offset={page2['next_offset']}", headers=ALPHA).json()
    seen = [j["id"] for p in (page1, page2, page3) for j in p["items"]]
    assert sorted(seen) == sorted(ids) and page3["next_offset"] is None
    cancelled = api.get("/v1/jobs?state=CANCELLED", headers=ALPHA).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert api.get("/v1/jobs?state=BOGUS", headers=ALPHA).status_code == 422


def test_cancel_of_a_waiting_job_is_immediate_and_final(api: TestClient, spec: dict) -> None:
    job = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
    r = api.post(f"/v1/jobs/{job}/cancel", headers=ALPHA)
    assert r.status_code == 202 and r.json()["state"] == "CANCELLED"
    assert api.post(f"/v1/jobs/{job}/cancel", headers=ALPHA).json()["state"] == "CANCELLED"  # idempotent
    events = api.get(f"/v1/jobs/{job}/events", headers=ALPHA).json()
    assert [e["to_state"] for e in events] == ["PENDING", "CANCELLED"]


def test_probes_metrics_and_openapi(api: TestClient, spec: dict) -> None:
    api.post("/v1/jobs", json=spec, headers=ALPHA)
    assert api.get("/readyz").status_code == 200
    text = api.get("/metrics").text
    assert 'tuneplane_jobs{state="PENDING"} 1.0' in text
    assert "tuneplane_http_requests_total" in text
    schema = api.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/cancel", "/v1/validate", "/v1/models"} <= set(schema["paths"])
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "hyperparameters" in body["properties"]  # the spec's own JSON Schema is published


def test_validate_is_a_dry_run(api: TestClient, spec: dict) -> None:
    r = api.post("/v1/validate?max_records=50", json=spec, headers=ALPHA)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] and report["data"]["sources"], report["problems"]
    quality = report["data"]["quality"]  # duplicates and eval overlap, as `tuneplane validate` shows them
    assert "duplicates" in quality["summary"] and "parity-labeled-eval" in quality["contamination"]
    missing = copy.deepcopy(spec)
    missing["data"]["sources"][1]["uri"] = "/nonexistent/tasks.jsonl"
    bad = api.post("/v1/validate", json=missing, headers=ALPHA).json()
    assert not bad["ok"] and bad["problems"][0]["field"] == "data.sources[1].uri"
    assert api.get("/v1/jobs", headers=ALPHA).json()["items"] == []


def test_model_adapter_by_job_id_is_pinned_to_the_version_that_job_registered(
    api: TestClient, spec: dict, db_url: str
) -> None:
    """SFT -> DPO by job id: the stored spec names the `models:/` version, so later versions change nothing;
    a job of another team, one still running and one that registered nothing are refused, naming the field."""
    from tuneplane.store import Database
    from tuneplane.store.models import Job

    sft = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
    ungated = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
    theirs = api.post("/v1/jobs", json=spec, headers=BETA).json()["id"]
    db = Database(db_url)
    with db.session() as s:
        for job_id, uri in [(sft, "models:/alpha.tiny-cpu-adapter/3"), (ungated, None)]:
            job = s.get(Job, job_id)
            assert job is not None
            job.state, job.model_uri = "SUCCEEDED", uri
    db.engine.dispose()

    def with_adapter(adapter: str) -> dict:
        return spec | {"model": spec["model"] | {"adapter": adapter}}

    r = api.post("/v1/jobs", json=with_adapter(sft), headers=ALPHA)
    assert r.status_code == 201, r.text
    stored = api.get(f"/v1/jobs/{r.json()['id']}", headers=ALPHA).json()["spec"]
    assert stored["model"]["adapter"] == "models:/alpha.tiny-cpu-adapter/3"
    report = api.post("/v1/validate", json=with_adapter(sft), headers=ALPHA).json()
    assert report["spec"]["model"]["adapter"] == "models:/alpha.tiny-cpu-adapter/3", report

    queued = api.post("/v1/jobs", json=spec, headers=ALPHA).json()["id"]
    for adapter, message in [
        (theirs, f"job {theirs} not found"),  # another team's job reads as a missing one
        (queued, f"job {queued}: it is PENDING and has registered no model"),
        (ungated, f"job {ungated}: it registered no model"),
    ]:
        r = api.post("/v1/jobs", json=with_adapter(adapter), headers=ALPHA)
        assert r.status_code == 422, r.text
        assert {"field": "model.adapter", "message": message} in [
            {k: e[k] for k in ("field", "message")} for e in r.json()["errors"]
        ], r.json()
    assert (
        api.post("/v1/jobs", json=with_adapter(theirs), headers=BETA).status_code == 422
    )  # no version either


def test_me_usage_and_queue_positions_for_the_console(api: TestClient, spec: dict, db_url: str) -> None:
    from tuneplane.store import Database
    from tuneplane.store.models import Job

    assert api.get("/v1/me", headers=ALPHA).json() == {"team": "alpha", "role": "member"}
    assert api.get("/v1/me", headers=ROOT).json() == {"team": "alpha", "role": "admin"}
    ids = [api.post("/v1/jobs", json=spec, headers=h).json()["id"] for h in (ALPHA, ALPHA, BETA, BETA)]
    db = Database(db_url)
    with db.session() as s:  # alpha's two are queued, beta's first runs (2 GPUs), its second waits
        for job_id, state in zip(ids, ["QUEUED", "QUEUED", "RUNNING", "PENDING"], strict=True):
            job = s.get(Job, job_id)
            assert job is not None
            job.state = state
            job.gpus = 2 if state == "RUNNING" else 0
    db.engine.dispose()
    # beta's priority (10) puts nothing of its own in the queue; alpha's oldest goes first
    places = {j["id"]: j["queue_position"] for j in api.get("/v1/jobs", headers=ROOT).json()["items"]}
    assert places == {ids[0]: 1, ids[1]: 2, ids[2]: None, ids[3]: None}
    assert api.get(f"/v1/jobs/{ids[1]}", headers=ALPHA).json()["queue_position"] == 2

    alpha = api.get("/v1/usage", headers=ALPHA).json()
    assert alpha == {
        "team": "alpha",
        "jobs": {"in_use": 0, "allowed": 1},
        "gpus": {"in_use": 0, "allowed": 8},
        "waiting": {"in_use": 2, "allowed": 100},
    }
    assert api.get("/v1/usage?team=beta", headers=ALPHA).json()["team"] == "alpha"  # members see their own
    beta = api.get("/v1/usage?team=beta", headers=ROOT).json()
    assert (beta["jobs"], beta["gpus"], beta["waiting"]["in_use"]) == (
        {"in_use": 1, "allowed": 2},
        {"in_use": 2, "allowed": 0},
        1,
    )
    assert api.get("/v1/usage?team=nope", headers=ROOT).status_code == 404
