"""Attacks of a hostile tenant on the local backend (issue #10), each refused with a problem naming the field,
quickly, never a 5xx: other teams' files and the host, path tricks, spec bombs, starving other teams, errors
that echo megabytes. The list of attacks tried, including those that already held, is in docs/operations.md.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.backends import RecordingBackend
from tests.support.config import REPO
from tests.support.tenants import ALPHA, BETA, FAST_S, RECORD, confined_config, refused, spec_reading
from tuneplane.api import create_app
from tuneplane.control.admission import not_readable
from tuneplane.control.reconciler import Reconciler
from tuneplane.spec import TuningSpec, load_spec
from tuneplane.store import Database, Job, Principal, create_job


@pytest.fixture
def api(tenants: dict[str, Path]):
    with TestClient(create_app(confined_config(tenants), run_reconciler=False)) as client:
        yield client


# -- 1. host files and other teams' data --------------------------------------------------------------------


def test_a_team_reads_only_inside_its_data_roots(api: TestClient, tenants: dict[str, Path]) -> None:
    alpha, beta, home = tenants["alpha"], tenants["beta"], tenants["home"]
    outside = [
        str(beta / "train.jsonl"),  # another team's file
        str(beta / "missing.jsonl"),  # ... and one that does not exist: the same answer
        str(alpha / ".." / "beta" / "train.jsonl"),  # '..' resolved first
        str(alpha / "beta-folder" / "train.jsonl"),  # a symlinked folder resolved first
        "/**/*.jsonl",  # the host, enumerated
        "/etc/passwd.jsonl",
        str(home / "token"),  # the platform's own state folder, never readable
        str(home / "jobs" / "*" / "*.jsonl"),
    ]
    for uri in outside:
        for route in ("/v1/jobs", "/v1/validate"):
            r = api.post(route, json=spec_reading(uri), headers=ALPHA)
            answer = r.json()
            problems = answer.get("errors") or answer.get("problems")
            assert r.status_code in (200, 422) and answer.get("ok") is not True, (uri, answer)
            assert {"field": "data.sources[0].uri", "message": not_readable(uri)} in problems, (uri, answer)
    own = api.post("/v1/validate", json=spec_reading(str(alpha / "train.jsonl")), headers=ALPHA).json()
    assert own["ok"] is True, own
    assert (
        api.post("/v1/jobs", json=spec_reading(str(alpha / "train.jsonl")), headers=ALPHA).status_code == 201
    )


def test_a_glob_reaching_out_through_a_symlinked_file_is_refused(
    api: TestClient, tenants: dict[str, Path]
) -> None:
    uri = str(tenants["alpha"] / "*.jsonl")  # matches alpha's own file and link.jsonl -> beta's secret
    answer = api.post("/v1/validate", json=spec_reading(uri), headers=ALPHA).json()
    assert answer["ok"] is False
    assert answer["problems"] == [{"field": "data.sources[0].uri", "message": not_readable(uri)}]
    assert "beta secret" not in json.dumps(answer)


def test_the_reconciler_refuses_what_admission_let_through(tenants: dict[str, Path]) -> None:
    """Admission checks the glob's folder; the reconciler checks every file the glob reaches when the job
    is validated (and again applies the policy: a config may have changed since the submit)."""
    config = confined_config(tenants)
    db = Database(config.database_url)
    db.migrate()
    rec = Reconciler(db, RecordingBackend(), config)
    with db.session() as s:
        spec = TuningSpec.model_validate(spec_reading(str(tenants["alpha"] / "*.jsonl")))
        job_id = create_job(s, Principal("alpha"), spec, 0)[0].id
    rec.run_once()
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == "FAILED" and "outside this team's data roots" in job.message
    db.dispose()


def test_model_folders_are_confined_too(api: TestClient, tenants: dict[str, Path]) -> None:
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), model={"base": str(tenants["beta"])})
    refused(api, spec, "model.base")


# -- 2. names that belong to another team ---------------------------------------------------------------------


def test_a_team_publishes_only_under_its_own_names(tmp_path: Path) -> None:
    """Team A naming team B's model publishes into A's own namespace, never into B's."""
    from mlflow import MlflowClient

    from tuneplane.tracking.run import JobRun
    from tuneplane.tracking.tags import experiment_name, registered_model_name

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    assert registered_model_name(spec, "alpha") == "alpha.tiny-cpu-adapter"
    assert registered_model_name(spec, "beta") == "beta.tiny-cpu-adapter"
    assert experiment_name(spec, "alpha") == "alpha/tiny-cpu" != experiment_name(spec, "beta")
    assert registered_model_name(spec, None) == "tiny-cpu-adapter"  # outside the platform: as written
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [
        JobRun.start(spec, f"job-{t}", tracking, str(tmp_path / "art"), team=t) for t in ("alpha", "beta")
    ]
    client = MlflowClient(tracking_uri=tracking)
    names = {client.get_experiment(client.get_run(r.run_id or "").info.experiment_id).name for r in runs}
    assert names == {"alpha/tiny-cpu", "beta/tiny-cpu"}
    ours = [e for e in client.search_experiments() if e.name in names]
    assert all(
        Path(e.artifact_location.removeprefix("file://")).is_relative_to(tmp_path / "art") for e in ours
    )
    for run in runs:
        run.fail()


# -- 3. names that are paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../escape", "a/b", "..", "x..y", "/abs", "-lead", "a" * 129, "bad name"]
)
@pytest.mark.parametrize("field", ["experiment", "registered_model_name"])
def test_tracking_names_are_never_paths(
    api: TestClient, tenants: dict[str, Path], name: str, field: str
) -> None:
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), tracking={field: name})
    refused(api, spec, f"tracking.{field}")


# -- 4. memory and CPU bombs ----------------------------------------------------------------------------------


def _alpha_spec(tenants: dict[str, Path]) -> dict:
    return spec_reading(str(tenants["alpha"] / "train.jsonl"))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda s: s["data"]["sources"].append(_labeled("{number:>999999999}")),
            "data.sources[1].templates[0].prompt",
        ),
        (
            lambda s: s["data"]["sources"].append(_labeled("{number!r}")),
            "data.sources[1].templates[0].prompt",
        ),
        (lambda s: s["hyperparameters"].update(seed=10**30), "hyperparameters.seed"),
        (lambda s: s["hyperparameters"].update(max_steps=10**12), "hyperparameters.max_steps"),
        (lambda s: s["data"].update(pack_buffer=10**9), "data.pack_buffer"),
        (lambda s: s["data"].update(sources=s["data"]["sources"] * 65), "data.sources"),
        (lambda s: s["data"].update(system_prompt="x" * 40_000), "data.system_prompt"),
    ],
)
def test_spec_bombs_are_refused_at_submit(
    api: TestClient, tenants: dict[str, Path], edit, field: str
) -> None:
    spec = _alpha_spec(tenants)
    edit(spec)
    refused(api, spec, field)


def _labeled(template: str) -> dict:
    return {"uri": "s3://b/x.jsonl", "format": "labeled", "templates": [{"prompt": template}]}


@pytest.mark.parametrize(
    ("path", "literal", "field"),
    [
        (("data", "sources", 0, "weight"), "Infinity", "data.sources[0].weight"),
        (("hyperparameters", "max_grad_norm"), "NaN", "hyperparameters.max_grad_norm"),
        (("hyperparameters", "weight_decay"), "-Infinity", "hyperparameters.weight_decay"),
    ],
)
def test_floats_are_finite(
    api: TestClient, tenants: dict[str, Path], path: tuple, literal: str, field: str
) -> None:
    spec = _alpha_spec(tenants)
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__BOMB__"
    refused(api, json.dumps(spec).replace('"__BOMB__"', literal), field, raw=True)


def test_deeply_nested_bodies_are_refused(api: TestClient) -> None:
    body = '{"a": ' * 50_000 + "1" + "}" * 50_000
    r = api.post("/v1/jobs", content=body, headers={**ALPHA, "content-type": "application/json"})
    assert r.status_code in (400, 422) and r.headers["content-type"] == "application/problem+json"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tuneplane.cli import app

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    out = CliRunner().invoke(app, ["validate", "--spec-only", str(tmp_path / "bomb.yaml")])
    assert time.perf_counter() - started < FAST_S
    assert out.exit_code == 2 and "aliases expand to more than" in out.output
    # Aliases within the bound still work: the shipped tiny job shares its templates that way.
    assert (
        CliRunner().invoke(app, ["validate", "--spec-only", str(REPO / "jobs" / "tiny-cpu.yaml")]).exit_code
        == 0
    )


# -- 5. one tenant slowing everyone -------------------------------------------------------------------------


def test_a_team_at_quota_with_a_long_queue_blocks_no_one(tenants: dict[str, Path]) -> None:
    teams = [
        {"name": "alpha", "quota": {"max_concurrent_jobs": 0, "max_waiting_jobs": 1000}},
        {"name": "beta", "quota": {"max_concurrent_jobs": 1}},
    ]
    config = confined_config(tenants, teams=teams)
    db = Database(config.database_url)
    db.migrate()
    backend = RecordingBackend()
    rec = Reconciler(db, backend, config)
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    with db.session() as s:
        for _ in range(201):  # older than beta's job, same priority
            create_job(s, Principal("alpha"), spec, 0)
    with db.session() as s:
        beta_job = create_job(s, Principal("beta"), spec, 0)[0].id
    with db.session() as s:  # as if validated: only scheduling is under test
        for job in s.query(Job):
            job.state = "QUEUED"
    # Before scheduling, beta's job is next: alpha's 201 older jobs can never start, so none is ahead of it
    # (it once read "202nd"), and a member of beta learns nothing of them.
    with TestClient(create_app(config, backend=RecordingBackend(), run_reconciler=False)) as api:
        seen = api.get(f"/v1/jobs/{beta_job}", headers=BETA).json()
        assert seen["queue_position"] == 1, seen
        assert {j["queue_position"] for j in api.get("/v1/jobs", headers=ALPHA).json()["items"]} == {None}
    rec.schedule()
    assert list(backend.submits) == [beta_job]
    db.dispose()


def test_a_slow_lookup_holds_up_no_other_team(
    tenants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuneplane.control.reconciler as reconciler_module

    release = threading.Event()
    real = reconciler_module.reachability_problems

    def slow_for_alpha(spec, team, config):
        if team == "alpha":
            release.wait(30)  # a glob over a huge tree, a storage endpoint that hangs
        return real(spec, team, config)

    monkeypatch.setattr(reconciler_module, "reachability_problems", slow_for_alpha)
    config = confined_config(tenants, validation_timeout_s=3)
    db = Database(config.database_url)
    db.migrate()
    backend = RecordingBackend()
    rec = Reconciler(db, backend, config)
    with db.session() as s:
        slow = create_job(s, Principal("alpha"), load_spec(REPO / "jobs" / "tiny-cpu.yaml"), 0)[0].id
        quick = create_job(s, Principal("beta"), load_spec(REPO / "jobs" / "tiny-cpu.yaml"), 0)[0].id
    started = time.perf_counter()
    rec.run_once()
    assert time.perf_counter() - started < 10  # the pass did not wait for alpha's 30 s lookup
    assert backend.submits[quick] == 1
    time.sleep(3.2)
    rec.run_once()  # alpha's lookup is past its budget: the job fails, saying why
    with db.session() as s:
        job = s.get(Job, slow)
        assert job.state == "FAILED" and "longer than 3 s" in job.message
    release.set()
    rec.validations.close()
    db.dispose()


def test_a_team_may_have_only_so_many_jobs_waiting(tenants: dict[str, Path]) -> None:
    teams = [{"name": "alpha", "quota": {"max_waiting_jobs": 2}, "data_roots": [str(tenants["alpha"])]}]
    with TestClient(create_app(confined_config(tenants, teams=teams), run_reconciler=False)) as api:
        spec = _alpha_spec(tenants)
        codes = [api.post("/v1/jobs", json=spec, headers=ALPHA).status_code for _ in range(3)]
        assert codes == [201, 201, 429]
        # a retry of an accepted request is still answered with its job, not refused
        key = {**ALPHA, "Idempotency-Key": "k"}
        assert api.post("/v1/jobs", json=spec, headers=key).status_code == 429
        cancelled = api.get("/v1/jobs", headers=ALPHA).json()["items"][0]["id"]
        api.post(f"/v1/jobs/{cancelled}/cancel", headers=ALPHA)
        assert api.post("/v1/jobs", json=spec, headers=key).status_code == 201
        assert api.post("/v1/jobs", json=spec, headers=key).status_code == 200


def test_errors_never_echo_megabytes(api: TestClient, tenants: dict[str, Path]) -> None:
    huge = "x" * 10_000_000
    record = {"messages": [{"role": huge, "content": "hi"}, {"role": "assistant", "content": huge}]}
    (tenants["alpha"] / "huge.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(RECORD) + "\n")
    spec = spec_reading(str(tenants["alpha"] / "huge.jsonl"))
    spec["data"]["sources"][0].update(format="messages", on_error="skip", max_error_fraction=1.0)
    r = api.post("/v1/validate", json=spec, headers=ALPHA)
    assert r.status_code == 200 and len(r.content) < 100_000, len(r.content)
    source = r.json()["data"]["sources"][0]
    assert source["bad_records"] == 2 and all(len(s) < 1000 for s in source["bad_record_samples"])


# -- 7. smaller ---------------------------------------------------------------------------------------------


def test_an_over_limit_body_is_413_with_the_security_headers(tenants: dict[str, Path]) -> None:
    with TestClient(
        create_app(confined_config(tenants, max_request_bytes=1000), run_reconciler=False)
    ) as api:
        chunks = (b'{"name": "' + b"x" * 400 + b'",' for _ in range(5))
        r = api.post("/v1/jobs", content=chunks, headers={**ALPHA, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["title"] == "request too large"
        assert api.get("/v1/jobs", headers=ALPHA).json()["items"] == []
        declared = api.post("/v1/jobs", content=b"{" + b" " * 2000 + b"}", headers=ALPHA)
        nul = api.get("/v1/jobs?name=%00", headers=ALPHA)
        for answer in (r, declared, nul, api.get("/openapi.json"), api.get("/v1/jobs", headers=ALPHA)):
            assert answer.headers["content-security-policy"].startswith("default-src 'none'"), answer
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["cache-control"] == "no-store"
        # Swagger UI and ReDoc would load scripts from a CDN: not served (the schema is).
        assert api.get("/docs").status_code == 404 and api.get("/redoc").status_code == 404
        assert api.get("/openapi.json").json()["info"]["title"] == "Tuneplane"


def test_a_json_syntax_error_names_its_position_not_a_field(api: TestClient) -> None:
    r = api.post("/v1/jobs", content='{"name": ', headers={**ALPHA, "content-type": "application/json"})
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert error["field"] == "" and error["message"].startswith("invalid JSON at character")


def test_validate_never_reaches_the_hub(tenants: dict[str, Path], monkeypatch) -> None:
    import tuneplane.pretrained

    def no_network(*args, **kwargs):
        raise AssertionError("the control plane tried to load a model")

    monkeypatch.setattr(tuneplane.pretrained, "from_pretrained", no_network)
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), model={"base": "meta-llama/Llama-3.1-8B"})
    # A machine an 8B model fits on, so that only the hub is in question.
    config = confined_config(tenants, backend={"type": "local", "memory": "4Ti"})
    with TestClient(create_app(config, run_reconciler=False)) as api:
        answer = api.post("/v1/validate", json=spec, headers=ALPHA).json()
    assert answer["ok"] is True and answer["data"] is None
    assert "hub" in answer["notes"][0]


def test_first_validations_racing_each_other_both_answer(tenants: dict[str, Path]) -> None:
    spec = _alpha_spec(tenants)
    answers: list[dict] = []
    config = confined_config(tenants, limits={"validations_per_team": 3})
    with TestClient(create_app(config, run_reconciler=False)) as api:
        threads = [
            threading.Thread(
                target=lambda: answers.append(api.post("/v1/validate", json=spec, headers=ALPHA).json())
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [a["ok"] for a in answers] == [True, True, True], answers


def test_the_embedded_default_reads_the_users_folders(
    tenants: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no data roots configured: the user's home folder and the folder the server started in."""
    from tuneplane.config import load_config
    from tuneplane.control.admission import policy_problems

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    monkeypatch.setenv("HOME", str(tenants["home"]))
    monkeypatch.chdir(REPO)  # `make demo` from the repo
    config = load_config(overrides={"home": str(tenants["home"] / ".cache" / "tuneplane")})
    assert config.data_roots is None and policy_problems(spec, "default", config) == []
    monkeypatch.chdir(tenants["alpha"])  # started elsewhere: the repo is not the user's
    assert {field for field, _ in policy_problems(spec, "default", config)} >= {
        "data.sources[0].uri",
        "model.base",
    }
    monkeypatch.setenv("HOME", str(REPO))  # ... unless it is under their home folder
    assert policy_problems(spec, "default", config) == []


def test_a_glob_may_match_only_so_many_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tuneplane.data.records as records
    from tuneplane.errors import DataError

    monkeypatch.setattr(records, "MAX_FILES", 3)
    for i in range(5):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(RECORD) + "\n")
    with pytest.raises(DataError, match="matches 5 files, more than the 3 one source may have"):
        records.expand(str(tmp_path / "*.jsonl"))


def test_a_dry_runs_preflight_stops_at_its_time_budget(tokenizer) -> None:
    from tuneplane.data import preflight

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    report = preflight(spec, tokenizer, time_budget_s=0.0)
    assert report.ok and all(s.time_limited and s.stats.records == 0 for s in report.sources)
    assert preflight(spec, tokenizer, max_records=20, time_budget_s=60).sources[0].stats.records == 20


@pytest.mark.parametrize("where", ["uri", "name", "system_prompt"])
def test_a_nul_byte_is_refused_naming_the_field_on_every_database(
    tenants: dict[str, Path], db_url: str, where: str
) -> None:
    """PostgreSQL cannot store a NUL: it once gave a 500, and a job stuck in VALIDATING for ever."""
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"))
    field = {"uri": "data.sources[0].uri", "name": "name", "system_prompt": "data.system_prompt"}[where]
    if where == "uri":
        spec["data"]["sources"][0]["uri"] += "\x00.jsonl"
    elif where == "name":
        spec["name"] = "tiny\x00"
    else:
        spec["data"]["system_prompt"] = "Be kind.\x00"
    with TestClient(create_app(confined_config(tenants, database_url=db_url), run_reconciler=False)) as api:
        problem = refused(api, spec, field)
        assert "NUL" in problem["message"]
        answer = api.post("/v1/validate", json=spec, headers=ALPHA)
        assert answer.status_code == 200 and answer.json()["ok"] is False
        assert field in {p["field"] for p in answer.json()["problems"]}
        for url in ("/v1/jobs/tiny%00", "/v1/jobs?name=a%00b", "/v1/usage?team=%00", "/v1/jobs/x%00/events"):
            assert api.get(url, headers=ALPHA).status_code in (404, 422), url
        assert api.get("/v1/jobs", headers=ALPHA).json()["items"] == []  # nothing stored


def test_a_cpu_job_must_fit_the_machine_it_runs_on(tenants: dict[str, Path]) -> None:
    """A 1M-token sequence with packing once passed with a 44.5 GiB estimate on a 24 GiB machine."""
    spec = _alpha_spec(tenants)
    huge = {**spec, "data": {**spec["data"], "max_seq_len": 1_048_576}}
    for config in (
        confined_config(tenants),
        confined_config(tenants, backend={"type": "local", "memory": "4Gi"}),
    ):
        with TestClient(create_app(config, run_reconciler=False)) as api:
            problem = refused(api, huge, "model.activation_checkpointing")
            assert "per worker" in problem["message"] and "usable of this machine's" in problem["message"]
            assert "data.max_seq_len: lower it from 1048576" in problem["message"]
            assert api.post("/v1/jobs", json=spec, headers=ALPHA).status_code == 201  # the tiny job fits


def test_a_gzip_bomb_is_cut_at_the_read_budget(api: TestClient, tenants: dict[str, Path]) -> None:
    """One line of 1 GiB, 1 MB compressed: a dry run once read it through for 34 s, past its 30 s budget."""
    import gzip

    from tuneplane.control.admission import PREFLIGHT_READ_BYTES

    bomb = tenants["alpha"] / "bomb.jsonl.gz"
    chunk = b"a" * (64 << 20)
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        for _ in range((2 * PREFLIGHT_READ_BYTES) // len(chunk)):
            f.write(chunk)
    started = time.perf_counter()
    answer = api.post("/v1/validate", json=spec_reading(str(bomb)), headers=ALPHA).json()
    assert time.perf_counter() - started < 20, "cut by bytes, well before the time budget"
    [source] = answer["data"]["sources"]
    assert source["time_limited"] and source["records"] == 0, source
    assert "read budget ran out" in answer["data"]["quality"]["covers"]


def test_validations_are_limited_per_team(tenants: dict[str, Path]) -> None:
    config = confined_config(tenants, limits={"validations_per_minute": 3})
    with TestClient(create_app(config, run_reconciler=False)) as api:
        spec = _alpha_spec(tenants)
        assert [api.post("/v1/validate", json=spec, headers=ALPHA).status_code for _ in range(3)] == [200] * 3
        refused = api.post("/v1/validate", json=spec, headers=ALPHA)
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["detail"] == "at most 3 validations a minute per team"
        beta_spec = spec_reading(str(tenants["beta"] / "train.jsonl"))
        assert api.post("/v1/validate", json=beta_spec, headers=BETA).json()["ok"] is True  # beta unaffected


def test_team_slots_and_rate_limits() -> None:
    from tuneplane.api.limits import RateLimit, TeamSlots
    from tuneplane.api.problems import Problem

    slots = TeamSlots("followed logs", per_team=2)
    first, _ = slots.acquire("alpha", 30), slots.acquire("alpha", 30)
    with pytest.raises(Problem) as caught:
        slots.acquire("alpha", 30)
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "30"}
    slots.acquire("beta", 30)  # another team's slots are its own
    first()
    first()  # giving back twice gives back once
    slots.acquire("alpha", 30)
    with pytest.raises(Problem):
        slots.acquire("alpha", 30)

    rate = RateLimit("validations", per_minute=2)
    rate.take("alpha", now=0.0)
    rate.take("alpha", now=10.0)
    with pytest.raises(Problem) as caught:
        rate.take("alpha", now=15.0)
    assert caught.value.headers == {"Retry-After": "45"}  # when the first leaves the window
    rate.take("beta", now=15.0)
    rate.take("alpha", now=60.0)  # the first has left the window


def test_several_local_teams_must_name_their_data_roots(tenants: dict[str, Path]) -> None:
    from tuneplane.config import load_config
    from tuneplane.errors import ConfigError

    teams = [{"name": "alpha"}, {"name": "beta"}]
    with pytest.raises(ConfigError, match="data_roots: several teams share the local backend"):
        load_config(overrides={"home": str(tenants["home"]), "teams": teams})
    assert load_config(overrides={"home": str(tenants["home"]), "teams": teams[:1]}).data_roots is None


def test_a_validation_that_never_answers_is_stopped(tenants: dict[str, Path]) -> None:
    """A read hanging below every budget holds no worker for ever: past validation_timeout_s the workers are
    killed (503) and the next validation gets new ones."""
    spec = _alpha_spec(tenants)
    with TestClient(create_app(confined_config(tenants, limits={"validation_timeout_s": 0.01}))) as api:
        stopped = api.post("/v1/validate", json=spec, headers=ALPHA)
        assert stopped.status_code == 503 and "no answer within 0.01 s" in stopped.json()["detail"]
    with TestClient(create_app(confined_config(tenants), run_reconciler=False)) as api:
        assert api.post("/v1/validate", json=spec, headers=ALPHA).json()["ok"] is True
