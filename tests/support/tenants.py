"""Two teams sharing a local backend, for the hostile-tenant tests: their data folders (alpha's holding symlinks
into beta's), a platform config confining each to its own, and helpers to send specs that read somewhere."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tests.support.config import REPO, bearer, platform_config
from tuneplane.spec import load_spec

ALPHA, BETA = bearer("tok-alpha"), bearer("tok-beta")
RECORD = {"instruction": "Say hi.", "input": "", "output": "hi"}
# A hostile spec is refused at once (5-20 ms measured here); the bound leaves room for a loaded CI machine,
# while a bomb that got through would take minutes or never answer.
FAST_S = 5.0


def make_tenants(tmp_path: Path) -> dict[str, Path]:
    """Two teams' data folders, and in alpha's a symlinked file and a symlinked folder into beta's."""
    alpha, beta = tmp_path / "data" / "alpha", tmp_path / "data" / "beta"
    for folder, text in ((alpha, "alpha"), (beta, "beta secret")):
        folder.mkdir(parents=True)
        lines = [json.dumps({**RECORD, "output": f"{text} {i}"}) for i in range(8)]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (alpha / "link.jsonl").symlink_to(beta / "train.jsonl")
    (alpha / "beta-folder").symlink_to(beta)
    return {"alpha": alpha, "beta": beta, "home": tmp_path / "home"}


def confined_config(tenants: dict[str, Path], **overrides: object):
    """Shared root: the repo (the tiny model); each team its own data folder."""
    teams = [
        {"name": "alpha", "quota": {"max_concurrent_jobs": 1}, "data_roots": [str(tenants["alpha"])]},
        {"name": "beta", "quota": {"max_concurrent_jobs": 2}, "data_roots": [str(tenants["beta"])]},
    ]
    home = tenants["home"]
    db = f"sqlite:///{home / 'tuneplane.db'}"
    settings: dict[str, object] = {"teams": teams, "data_roots": [str(REPO)], "gpu_pools": {}} | overrides
    return platform_config(home, db, **settings)


def spec_reading(uri: str, **sections: dict) -> dict:
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    spec["data"].update(sources=[{"uri": uri, "format": "alpaca"}], eval_sources=[], holdout_fraction=0.0)
    spec["eval"].update(zero_shot_sources=[], gate=None, lm_eval=None)
    for name, values in sections.items():
        spec[name].update(values)
    return spec


def refused(api: TestClient, body: object, field: str, raw: bool = False) -> dict:
    """POST /v1/jobs must answer 422 naming `field`, fast; returns that problem."""
    started = time.perf_counter()
    if raw:
        r = api.post("/v1/jobs", content=body, headers={**ALPHA, "content-type": "application/json"})
    else:
        r = api.post("/v1/jobs", json=body, headers=ALPHA)
    assert time.perf_counter() - started < FAST_S
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = next((e for e in r.json()["errors"] if e["field"] == field), None)
    assert problem is not None, r.json()
    return problem
