"""Under load from one team, another team's requests stay fast (issue #20): the API in its own process (uvicorn,
SQLite, local backend), one team holding 50 followed logs of a running job and sending 20 validations at a time
of a slow source, while another team lists its jobs and a probe asks for health. Once, 48 followed logs slowed
every other request to 8 s and 43 validations hung the whole API.

Bounds from the issue, on 2 cores shared with the load generator: the other team's GET /v1/jobs p99 < 200 ms,
/healthz p99 < 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.support.config import DATA_ROOTS, REPO, TOKENS, free_port, wait_for_http
from tests.support.tenants import RECORD, spec_reading
from tuneplane.config import hash_token

pytestmark = pytest.mark.slow  # an API process under load for ~20 s

STREAMS, VALIDATIONS = 50, 20
MEASURE_S = 12.0
GOAL_LIST_P99_MS, GOAL_HEALTH_P99_MS = 200.0, 50.0


def _running_job(home: Path, db_url: str) -> tuple[str, subprocess.Popen]:
    """A job of alpha's the local backend sees running (its folder, a live pid, a log) and the store says so."""
    from tuneplane.spec import parse_spec
    from tuneplane.store import Database, Principal, create_job

    db = Database(db_url)
    db.migrate()
    with db.session() as s:
        job = create_job(s, Principal("alpha"), parse_spec(spec_reading("/x.jsonl")), 0)[0]
        job.state = "RUNNING"
        job_id = job.id
    db.dispose()
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    folder = home / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "pid").write_text(str(sleeper.pid))
    (folder / "namespace").write_text("alpha")
    (folder / "train.log").write_text("".join(f"step {i} loss 1.0\n" for i in range(200)))
    return job_id, sleeper


def _slow_source(folder: Path, records: int = 60_000) -> Path:
    """Enough records that a validation of 10,000 of them keeps a thread busy for seconds."""
    path = folder / "big.jsonl"
    with path.open("w") as f:
        for i in range(records):
            f.write(
                json.dumps({**RECORD, "instruction": f"Say hi to person number {i}.", "output": f"hi {i}"})
            )
            f.write("\n")
    return path


async def _attack(base: str, job_id: str, spec: dict, stop: asyncio.Event, seen: dict) -> None:
    headers = {"Authorization": "Bearer tok-alpha"}
    limits = httpx.Limits(max_connections=STREAMS + VALIDATIONS + 10)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=120) as http:

        async def follow() -> None:
            async with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as r:
                seen["streams"].append(r.status_code)
                if r.status_code == 200:
                    async for _ in r.aiter_lines():
                        if stop.is_set():
                            return

        async def validate() -> None:
            while not stop.is_set():
                r = await http.post("/v1/validate", json=spec, params={"max_records": 10_000})
                seen["validations"].append(r.status_code)
                if r.status_code == 429:
                    seen["retry_after"].add(r.headers.get("retry-after"))
                    await asyncio.sleep(0.2)  # hostile: far sooner than Retry-After says

        tasks = [asyncio.create_task(follow()) for _ in range(STREAMS)]
        tasks += [asyncio.create_task(validate()) for _ in range(VALIDATIONS)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _measure(base: str) -> tuple[list[float], list[float]]:
    """Beta lists its jobs and a probe asks for health, one request every 50 ms each, for MEASURE_S."""
    lists, health = [], []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        deadline = time.monotonic() + MEASURE_S
        while time.monotonic() < deadline:
            for url, out, headers in (
                ("/v1/jobs", lists, {"Authorization": "Bearer tok-beta"}),
                ("/healthz", health, {}),
            ):
                started = time.perf_counter()
                r = await http.get(url, headers=headers)
                out.append((time.perf_counter() - started) * 1000)
                assert r.status_code == 200, r.text
            await asyncio.sleep(0.05)
    return lists, health


def test_one_teams_load_does_not_slow_another(tmp_path: Path) -> None:
    home, alpha = tmp_path / "home", tmp_path / "data" / "alpha"
    alpha.mkdir(parents=True)
    db_url = f"sqlite:///{home / 'tuneplane.db'}"
    home.mkdir()
    config = home / "platform.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "home": str(home),
                "database_url": db_url,
                "teams": [{"name": "alpha", "data_roots": [str(alpha)]}, {"name": "beta"}],
                "auth": {
                    "tokens": [{"sha256": hash_token(t), "team": team} for t, (team, _) in TOKENS.items()]
                },
                "data_roots": DATA_ROOTS,
            }
        )
    )
    job_id, sleeper = _running_job(home, db_url)
    spec = spec_reading(str(_slow_source(alpha)))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.app_server", str(config), str(port)], cwd=REPO
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/readyz", server, 60, "the API")
        seen: dict = {"streams": [], "validations": [], "retry_after": set()}

        async def scenario() -> tuple[list[float], list[float]]:
            stop = asyncio.Event()
            attack = asyncio.create_task(_attack(base, job_id, spec, stop, seen))
            await asyncio.sleep(3)  # streams open, the first validations under way
            try:
                return await _measure(base)
            finally:
                stop.set()
                await attack

        lists, health = asyncio.run(scenario())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        os.killpg(sleeper.pid, signal.SIGKILL)
    list_p99, health_p99 = np.percentile(lists, 99), np.percentile(health, 99)
    print(f"\nbeta GET /v1/jobs p50 {np.percentile(lists, 50):.1f} ms p99 {list_p99:.1f} ms (n={len(lists)}); "
          f"/healthz p50 {np.percentile(health, 50):.1f} ms p99 {health_p99:.1f} ms (n={len(health)}); "
          f"alpha: streams {sorted(set(seen['streams']))}, validations {len(seen['validations'])}")  # fmt: skip
    # The attack was what it says: the team's streams capped (8 open, the rest 429), validations running
    # and refused with a Retry-After.
    assert seen["streams"].count(200) == 8 and seen["streams"].count(429) == STREAMS - 8, seen["streams"]
    assert 200 in seen["validations"] and 429 in seen["validations"], seen["validations"]
    assert seen["retry_after"] and all(v and v.isdigit() for v in seen["retry_after"])
    assert list_p99 < GOAL_LIST_P99_MS, lists
    assert health_p99 < GOAL_HEALTH_P99_MS, health
