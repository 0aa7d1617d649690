"""Files are checked at open, not before (issue #20): symlinks out of a team's roots, files swapped for a symlink
between a check and the read, FIFOs and devices. In the API (validate), the reconciler's lookup, and a job's
own processes (the local backend hands them the team's roots)."""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.support.tenants import ALPHA, confined_config, spec_reading
from tuneplane.api import create_app
from tuneplane.data.records import read_records
from tuneplane.errors import DataError
from tuneplane.files import Confinement, NotAllowed, confined_to, open_local, pinned_folder

SECRET = "beta secret"


@pytest.fixture
def api(tenants: dict[str, Path]):
    with TestClient(create_app(confined_config(tenants), run_reconciler=False)) as client:
        yield client


def _in_thread(fn, timeout_s: float = 10.0):
    """fn() in a thread; fails the test (instead of hanging it) if it does not return within timeout_s."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn} blocked for more than {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- the opener --------------------------------------------------------------------------------------------------


def test_open_local_reads_only_regular_files_inside_the_roots(tenants: dict[str, Path]) -> None:
    alpha, beta = tenants["alpha"], tenants["beta"]
    os.mkfifo(alpha / "fifo.jsonl")
    with confined_to(Confinement.of([alpha])):
        assert open_local(alpha / "train.jsonl").read().startswith(b"{")
        refused_paths = [
            alpha / "link.jsonl",  # a symlink to beta's file
            alpha / "beta-folder" / "train.jsonl",  # through a symlinked folder
            alpha / ".." / "beta" / "train.jsonl",
            beta / "train.jsonl",
            beta / "missing.jsonl",  # missing outside: the same answer as existing outside
            alpha / "fifo.jsonl",  # would block a reader for ever
            "/dev/zero",
            alpha,  # a folder
        ]
        for path in refused_paths:
            with pytest.raises(NotAllowed) as caught:
                _in_thread(lambda p=path: open_local(p))
            assert str(caught.value) == f"{path}: {NotAllowed.REASON}"
        with pytest.raises(FileNotFoundError):  # missing inside the roots may say so
            open_local(alpha / "missing.jsonl")
    # Without confinement (a developer's own run): anywhere, but still only regular files.
    assert SECRET.encode() in open_local(alpha / "link.jsonl").read()
    with pytest.raises(NotAllowed):
        _in_thread(lambda: open_local(alpha / "fifo.jsonl"))


def _swapper(path: Path, regular: bytes, target: Path, stop: threading.Event) -> threading.Thread:
    """Flips `path` between a regular file and a symlink to `target` until `stop`, as fast as it can."""

    def flip() -> None:
        tmp_file, tmp_link = path.with_suffix(".file"), path.with_suffix(".link")
        while not stop.is_set():
            tmp_file.write_bytes(regular)
            os.replace(tmp_file, path)
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(target)
            os.replace(tmp_link, path)

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    return thread


def test_a_file_swapped_for_a_symlink_is_never_read_through_it(tenants: dict[str, Path]) -> None:
    alpha, beta = tenants["alpha"], tenants["beta"]
    swapped = alpha / "swap.jsonl"
    regular = (alpha / "train.jsonl").read_bytes()
    swapped.write_bytes(regular)
    stop = threading.Event()
    thread = _swapper(swapped, regular, beta / "train.jsonl", stop)
    read, refusals = 0, 0
    try:
        with confined_to(Confinement.of([alpha])):
            for _ in range(3000):
                try:
                    records = list(read_records(str(swapped)))
                except DataError as exc:
                    assert NotAllowed.REASON in str(exc)
                    refusals += 1
                    continue
                except FileNotFoundError:
                    continue  # caught between the two renames
                assert all(SECRET not in json.dumps(r.data) for r in records)
                read += 1
    finally:
        stop.set()
        thread.join(5)
    assert read and refusals, (read, refusals)  # both sides of the race were hit, and beta's never read


def test_a_pinned_model_folder_is_what_the_loader_reads(tenants: dict[str, Path], tiny_dir: Path) -> None:
    from transformers import AutoConfig

    alpha, beta = tenants["alpha"], tenants["beta"]
    model = alpha / "model"
    shutil.copytree(tiny_dir, model)
    (beta / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 7}))
    with confined_to(Confinement.of([alpha])), pinned_folder(model) as view:
        # Swapped after the check: the loader still reads the file that was checked.
        (model / "config.json").unlink()
        (model / "config.json").symlink_to(beta / "config.json")
        assert AutoConfig.from_pretrained(str(view)).hidden_size != 7
    with confined_to(Confinement.of([alpha])), pytest.raises(NotAllowed), pinned_folder(model):
        pass  # the symlink out, now there from the start, is refused


# -- the API: validate and the reconciler's lookup ---------------------------------------------------------------


def _symlinked_model(tenants: dict[str, Path], tiny_dir: Path) -> Path:
    """A model folder in alpha's root whose every file is a symlink into beta's root."""
    beta_model, model = tenants["beta"] / "model", tenants["alpha"] / "model"
    shutil.copytree(tiny_dir, beta_model)
    model.mkdir()
    for file in beta_model.iterdir():
        (model / file.name).symlink_to(file)
    return model


def test_a_model_folder_of_symlinks_out_is_refused(
    api: TestClient,
    tenants: dict[str, Path],
    tiny_dir: Path,
) -> None:
    from tuneplane.control.admission import not_readable, reachability_problems
    from tuneplane.spec import parse_spec

    model = _symlinked_model(tenants, tiny_dir)
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), model={"base": str(model)})
    answer = api.post("/v1/validate", json=spec, headers=ALPHA).json()
    assert answer["ok"] is False
    assert {"field": "model.base", "message": not_readable(str(model))} in answer["problems"], answer
    # The reconciler's lookup before queueing says the same (a submit that got through is failed there).
    config = confined_config(tenants)
    assert ("model.base", not_readable(str(model))) in reachability_problems(
        parse_spec(spec), "alpha", config
    )


def test_validate_never_answers_with_a_swapped_in_file(tenants: dict[str, Path]) -> None:
    alpha, beta = tenants["alpha"], tenants["beta"]
    swapped = alpha / "swap.jsonl"
    regular = (alpha / "train.jsonl").read_bytes()
    swapped.write_bytes(regular)
    spec = spec_reading(str(swapped))
    stop = threading.Event()
    thread = _swapper(swapped, regular, beta / "train.jsonl", stop)
    answers = []
    config = confined_config(tenants, limits={"validations_per_minute": 100})
    try:
        with TestClient(create_app(config, run_reconciler=False)) as api:
            for _ in range(60):
                r = api.post("/v1/validate", json=spec, headers=ALPHA)
                assert r.status_code == 200, r.text
                answers.append(r.text)
    finally:
        stop.set()
        thread.join(5)
    assert not [a for a in answers if SECRET in a]
    assert any('"ok":true' in a for a in answers)  # the race was run on a file that is fine when regular


def test_a_fifo_as_data_holds_no_request(api: TestClient, tenants: dict[str, Path]) -> None:
    from tuneplane.control.admission import not_readable

    fifo = tenants["alpha"] / "pipe.jsonl"
    os.mkfifo(fifo)
    spec = spec_reading(str(fifo))
    started = time.perf_counter()
    answer = _in_thread(lambda: api.post("/v1/validate", json=spec, headers=ALPHA).json())
    assert time.perf_counter() - started < 10
    assert answer["ok"] is False
    assert {"field": "data.sources[0].uri", "message": not_readable(str(fifo))} in answer["problems"]
    # The same FIFO inside a model folder, and as the model's config.json read at submit.
    model = tenants["alpha"] / "model"
    model.mkdir()
    os.mkfifo(model / "config.json")
    spec = spec_reading(str(tenants["alpha"] / "train.jsonl"), model={"base": str(model)})
    answer = _in_thread(lambda: api.post("/v1/validate", json=spec, headers=ALPHA).json())
    assert answer["ok"] is False and any(p["field"] == "model.base" for p in answer["problems"])
    assert _in_thread(lambda: api.post("/v1/jobs", json=spec, headers=ALPHA)).status_code in (201, 422)
    assert api.get("/healthz").status_code == 200


# -- a job's own processes -----------------------------------------------------------------------------------------


def test_a_local_job_gets_only_an_allow_listed_environment(tenants: dict[str, Path]) -> None:
    from tuneplane.backends.base import BackendJob
    from tuneplane.backends.local import job_environment
    from tuneplane.spec import parse_spec

    config = confined_config(tenants, database_url="postgresql+psycopg://u:pw@db/tuneplane")
    api_env = {
        "PATH": "/usr/bin",
        "HOME": "/home/api",
        "AWS_ACCESS_KEY_ID": "storage-key",  # the platform's one storage identity (local backend)
        "TUNEPLANE_DATABASE_URL": "postgresql+psycopg://u:pw@db/tuneplane",
        "TUNEPLANE_CONFIG": "/etc/tuneplane/platform.yaml",
        "TUNEPLANE_TOKEN": "admin-token",
        "MLFLOW_TRACKING_PASSWORD": "admin",
        "PYTHONPATH": "/somewhere/else",
        "LD_PRELOAD": "/tmp/evil.so",
    }
    job = BackendJob(id="j1", team="alpha", namespace="alpha", spec=parse_spec(spec_reading("/x.jsonl")))
    env = job_environment(config, job, api_env)
    for key in ("TUNEPLANE_DATABASE_URL", "TUNEPLANE_CONFIG", "TUNEPLANE_TOKEN", "PYTHONPATH", "LD_PRELOAD"):
        assert key not in env
    assert "pw@" not in json.dumps(env)
    assert env["MLFLOW_TRACKING_URI"] == config.tracking_uri and "MLFLOW_TRACKING_PASSWORD" not in env
    assert {k: env[k] for k in ("PATH", "HOME", "AWS_ACCESS_KEY_ID")} == {
        "PATH": "/usr/bin",
        "HOME": "/home/api",
        "AWS_ACCESS_KEY_ID": "storage-key",
    }
    assert Confinement.from_env(env) == config.confinement(config.team("alpha"))
    other_team = job_environment(config, dataclasses.replace(job, team="beta"), api_env)
    assert env["TUNEPLANE_CACHE"] != other_team["TUNEPLANE_CACHE"]  # no team loads another's copies
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] != job_environment(config, job, api_env)["RAY_AUTH_TOKEN"]  # one per job


@pytest.mark.slow  # a real local job: Ray starts, its workers fail at open
def test_a_job_whose_file_is_swapped_after_queueing_never_reads_it(tenants: dict[str, Path]) -> None:
    """A file swapped for a symlink into another team's root after every API check fails the job instead of
    training on it: the job's sandbox does not show the other root, and the job's processes check at open."""
    from tuneplane.backends.base import BackendJob, RunPhase
    from tuneplane.backends.local import LocalBackend
    from tuneplane.spec import parse_spec

    config = confined_config(tenants)
    backend = LocalBackend(config)
    data = tenants["alpha"] / "queued.jsonl"
    shutil.copy(tenants["alpha"] / "train.jsonl", data)
    spec = parse_spec(spec_reading(str(data)))
    data.unlink()  # queued; then swapped
    data.symlink_to(tenants["beta"] / "train.jsonl")
    job = BackendJob(id="swap-after-queue", team="alpha", namespace="alpha", spec=spec)
    backend.submit(job)
    deadline = time.monotonic() + 300
    while backend.status(job).phase in (RunPhase.RUNNING, RunPhase.PENDING) and time.monotonic() < deadline:
        time.sleep(0.5)
    status = backend.status(job)
    log = (backend.job_dir(job) / "train.log").read_text()
    assert status.phase == RunPhase.FAILED, (status, log[-3000:])
    # Sandboxed, the symlink leads nowhere (beta's root is not there); unsandboxed, the open is refused.
    assert str(data) in status.message, status
    assert NotAllowed.REASON in status.message or "no files match" in status.message, status
    assert SECRET not in log


def test_the_platforms_private_files_are_never_a_teams(tenants: dict[str, Path], tmp_path: Path) -> None:
    """The config file, the tokens file and a SQLite database are refused wherever they lie, even inside a
    team's own root (the embedded default reads the folder the server started in)."""
    from tuneplane.config import load_config

    alpha = tenants["alpha"]
    config_file, tokens = alpha / "platform.yaml", alpha / "tokens.yaml"
    tokens.write_text("[]\n")
    base = confined_config(tenants)
    config_file.write_text(
        yaml.safe_dump(
            {
                "home": str(base.home),
                "teams": [{"name": "alpha", "data_roots": [str(alpha)]}],
                "data_roots": [],
                "database_url": f"sqlite:///{alpha / 'api.db'}",
                "auth": {"tokens_file": str(tokens)},
            }
        )
    )
    config = load_config(config_file)
    confinement = config.confinement(config.team("alpha"))
    assert confinement.allows_path(alpha / "train.jsonl")
    for private in (config_file, tokens, alpha / "api.db", alpha / "api.db-journal"):
        assert not confinement.allows_path(private), private
    with confined_to(confinement), pytest.raises(NotAllowed):
        open_local(config_file)


def test_the_api_never_follows_a_planted_log_symlink(tenants: dict[str, Path], tmp_path: Path) -> None:
    """A job that could write its folder (unsandboxed) once made `train.log` a link to the API's own files."""
    from tuneplane.backends.base import BackendJob
    from tuneplane.backends.local import LocalBackend
    from tuneplane.spec import parse_spec

    secret = tmp_path / "api-secrets.env"
    secret.write_text("MLFLOW_TRACKING_PASSWORD=admin\n")
    backend = LocalBackend(confined_config(tenants))
    job = BackendJob(id="planted", team="alpha", namespace="alpha", spec=parse_spec(spec_reading("/x.jsonl")))
    folder = backend.job_dir(job)
    folder.mkdir(parents=True)
    (folder / "train.log").symlink_to(secret)
    (folder / "pid").write_text("0")  # and a pid that would signal the API's own process group
    assert list(backend.logs(job)) == []
    assert backend.status(job).phase.value == "MISSING"
    backend.cancel(job)  # nothing signalled: this test process is still here
