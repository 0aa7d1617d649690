"""Load on the job API over real HTTP: create, list and get latency under concurrent clients.

    python bench/api_load.py [--db sqlite|postgresql|both] [--clients 50] [--requests 20] [--pace 2] [--quick]

For each database (SQLite in a tmp file; PostgreSQL in a temporary database on the local server, dropped at
the end) the API runs under uvicorn in a subprocess on a free loopback port, without the reconciler (nothing
is submitted anywhere). Two phases with the same concurrency: `--clients` clients each send `--requests`
GET /healthz (the no-op baseline), then each does `--requests` rounds of create (POST /v1/jobs with a valid
spec and a unique Idempotency-Key), list (GET /v1/jobs?limit=20) and get (GET /v1/jobs/{id}). Requests/s is
an operation's count over its phase's wall time. Goal: create p99 <= 50 ms.

Clients are paced: each starts a round every `--pace` seconds (first one at a random offset), as 50 busy users
would, so latency is measured below saturation. `--pace 0` sends back to back instead: then latency is just
clients / throughput (a closed loop on 2 cores shared with the load generator) and req/s is the capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("TUNEPLANE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
GOAL_CREATE_P99_MS = 50.0


def serve(overrides_json: str, port: int) -> None:
    """The server side (this file run with --serve): the app on uvicorn, no reconciler."""
    import uvicorn

    from tuneplane.api import create_app
    from tuneplane.config import load_config

    app = create_app(load_config(overrides=json.loads(overrides_json)), run_reconciler=False)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def database(kind: str, home: Path):
    if kind == "sqlite":
        yield f"sqlite:///{home / 'tuneplane.db'}"
        return
    from sqlalchemy import create_engine, text

    name = f"tuneplane_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def api_server(db_url: str, home: Path, token: str):
    from tuneplane.config import hash_token

    overrides = {
        "home": str(home),
        "database_url": db_url,
        # Nothing is ever submitted (no reconciler), so every job created stays waiting: the bench's team may
        # hold them all (the default max_waiting_jobs, 100, would refuse the 101st with 429).
        "teams": [{"name": "bench", "quota": {"max_concurrent_jobs": 1000, "max_waiting_jobs": 1_000_000}}],
        "auth": {"tokens": [{"sha256": hash_token(token), "team": "bench", "role": "member"}]},
    }
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", json.dumps(overrides), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # /readyz: up and migrated
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


async def run_phase(
    base: str, token: str, clients: int, rounds: int, ops: list[str], spec: dict, pace: float
):
    """`clients` concurrent clients, each doing `rounds` rounds of `ops`; latencies in ms, and wall time."""
    samples: dict[str, list[float]] = {op: [] for op in ops}
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as http:

        async def timed(op: str, method: str, url: str, **kwargs) -> httpx.Response:
            started = time.perf_counter()
            response = await http.request(method, url, **kwargs)
            samples[op].append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            return response

        async def client() -> None:
            next_round = time.perf_counter() + random.uniform(0, pace)
            for _ in range(rounds):
                await asyncio.sleep(max(0.0, next_round - time.perf_counter()))
                next_round += pace
                if "no-op" in ops:
                    await timed("no-op", "GET", "/healthz")
                if "create" in ops:
                    key = {"Idempotency-Key": uuid.uuid4().hex}
                    job = (await timed("create", "POST", "/v1/jobs", json=spec, headers=key)).json()
                    await timed("list", "GET", "/v1/jobs", params={"limit": 20})
                    await timed("get", "GET", f"/v1/jobs/{job['id']}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
    return samples, time.perf_counter() - started


def bench(
    kind: str, clients: int, rounds: int, spec: dict, pace: float
) -> list[tuple[str, str, list[float], float]]:
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="tuneplane-bench-") as tmp, database(kind, Path(tmp)) as url:
        rows = []
        with api_server(url, Path(tmp), token) as base:
            asyncio.run(run_phase(base, token, clients, 1, ["create", "list", "get"], spec, 0.0))  # warm up
            for ops in (["no-op"], ["create", "list", "get"]):
                samples, wall = asyncio.run(run_phase(base, token, clients, rounds, ops, spec, pace))
                rows += [(op, kind, samples[op], wall) for op in ops]
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="rounds per client")
    parser.add_argument("--pace", type=float, default=2.0, help="seconds between a client's rounds; 0: none")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 clients x 3 rounds, back to back: a smoke run, not a measurement",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port)

    if args.quick:
        args.clients, args.requests, args.pace = 4, 3, 0.0
    from tuneplane.spec import load_spec

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    rows = [row for kind in kinds for row in bench(kind, args.clients, args.requests, spec, args.pace)]

    table = Table(
        title=f"Job API over HTTP: {args.clients} clients x {args.requests} rounds, "
        + (f"a round every {args.pace:g} s per client" if args.pace else "back to back")
        + ", uvicorn, 1 worker"
    )
    for column in ("operation", "database", "n", "p50 ms", "p99 ms", "req/s", "p50 / no-op p50"):
        table.add_column(column, justify="left" if column in ("operation", "database") else "right")
    noop = {kind: float(np.percentile(ms, 50)) for op, kind, ms, _ in rows if op == "no-op"}
    verdicts = []
    for op, kind, ms, wall in rows:
        p50, p99 = np.percentile(ms, [50, 99])
        table.add_row(op, kind, str(len(ms)), f"{p50:.1f}", f"{p99:.1f}", f"{len(ms) / wall:.0f}",
                      f"{p50 / noop[kind]:.1f}x")  # fmt: skip
        if op == "create":
            verdicts.append(
                f"{kind}: create p99 {p99:.1f} ms -> {'met' if p99 <= GOAL_CREATE_P99_MS else 'NOT met'}"
            )
    console = Console()
    console.print(table)
    console.print(f"Goal: create p99 <= {GOAL_CREATE_P99_MS:.0f} ms. " + "; ".join(verdicts))
    console.print(
        f"Spec body: {len(json.dumps(spec))} bytes. Load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs."
    )


if __name__ == "__main__":
    main()
