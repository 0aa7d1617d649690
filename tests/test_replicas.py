"""Exactly-once with two API replicas on one PostgreSQL (the Helm chart runs 2 by default).

Two real `tuneplane serve` processes share a fresh database and the `kuberay` backend, pointed at a fake
Kubernetes API (tests/support/fake_kube.py, a real socket on 127.0.0.1). Three teams with small quotas and
different priorities submit 100 jobs through both replicas; the test plays the KubeRay operator (a new RayJob
becomes Running, then Complete). Midway replica A is SIGKILLed at the worst moment the design must survive:
from inside the fake API, right after a RayJob it asked for was created and before the answer reaches it (the
backend has the job, the database does not say so); then it is restarted. Then:

- every job SUCCEEDED, with one attempt and its state events exactly once, in the legal order;
- each job's RayJob (and spec ConfigMap) was created by exactly one successful POST; a second POST is allowed
  only as the crash recovery the reconciler promises (a submit whose record died with the replica is sent
  again and answered 409), never a second 201;
- no team ever held more than its quota: sampled at every operator step, both as RayJobs still running in
  the team's namespace and as the database's SUBMITTED/RUNNING jobs.

The second test pins down a race the first one found: a data lookup that finished while the other replica held
the job's row was dropped, and the job sat VALIDATING until the takeover.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.support.fake_kube import Create, FakeKubeApi
from tests.support.replicas import ApiReplica, fresh_database
from tuneplane.backends.kuberay import PLURAL
from tuneplane.client import Client
from tuneplane.config import PlatformConfig, hash_token

pytestmark = pytest.mark.slow

# team: (max_concurrent_jobs, priority, jobs submitted)
TEAMS = {"red": (3, 10, 40), "green": (2, 5, 30), "blue": (2, 0, 30)}
TOTAL = sum(n for _, _, n in TEAMS.values())
CHAIN = ["PENDING", "VALIDATING", "QUEUED", "SUBMITTED", "RUNNING", "SUCCEEDED"]
RUN_FOR_S = 0.3  # a RayJob stays Running at least this long
BACKLOG = 30  # submitted but not yet finished, at most: submissions go on while a replica is down
KILL_AFTER = 10  # arm the crash once this many jobs have succeeded
KILL_ANYWAY_S = 8.0  # armed this long without catching A mid-submit: SIGKILL it wherever it is
RESTART_AFTER_S = 1.0
DEADLINE_S = 170
TERMINAL_RAYJOB = ("Complete", "Failed", "ValidationFailed")


def namespace(team: str) -> str:
    return f"tp-{team}"


def token(team: str) -> str:
    return f"tok-{team}"


def job_spec(team: str, i: int) -> dict[str, Any]:
    """A small spec whose data and model are object-storage URIs (the kuberay backend refuses local paths;
    `validate_data: false` means nothing looks them up)."""
    return {
        "apiVersion": "tuneplane/v1",
        "name": f"{team}-{i:03d}",
        "model": {"base": "s3://models/tiny-llama"},
        "data": {
            "sources": [{"uri": f"s3://datasets/{team}/tasks.jsonl", "format": "alpaca"}],
            "template": "alpaca",
        },
        "distributed": {"num_workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1},
        "hyperparameters": {"max_steps": 10},
    }


def platform_config(db_url: str, kube_url: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database_url": db_url,
        "teams": [
            {
                "name": team,
                "namespace": namespace(team),
                "quota": {"max_concurrent_jobs": jobs, "max_gpus": 0},
                "priority": priority,
            }
            for team, (jobs, priority, _) in TEAMS.items()
        ],
        "auth": {"tokens": [{"sha256": hash_token(token(team)), "team": team} for team in TEAMS]},
        "validate_data": False,
        "reconcile_interval_s": 0.2,
        "backend": {"type": "kuberay", "api_server": kube_url, "ttl_seconds_after_finished": 60},
    }
    if "validation_timeout_s" in PlatformConfig.model_fields:
        # A job left VALIDATING by the killed replica is taken over after validation_timeout_s + 30 s (90 s
        # by default); nothing is looked up here, so a short budget only shortens that wait.
        config["validation_timeout_s"] = 5
    return config


def slowest(engine: Any, limit: int = 2) -> str:
    """The events of the jobs that took longest from submission to the end."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT e.job_id, e.at - j.created_at, e.to_state, e.actor, j.message FROM job_events e"
                " JOIN jobs j ON j.id = e.job_id WHERE e.job_id IN (SELECT id FROM jobs"
                " ORDER BY coalesce(finished_at, now()) - created_at DESC LIMIT :n) ORDER BY e.id"
            ),
            {"n": limit},
        ).all()
    return "\n".join(f"  {r[0]} +{r[1].total_seconds():.1f}s {r[2]} by {r[3]} ({r[4]})" for r in rows)


def timeline(engine: Any) -> str:
    """Mean and max seconds each state move took so far (a slow run says where it waited)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT from_state, to_state, count(*), avg(dt), max(dt) FROM ("
                " SELECT from_state, to_state,"
                "  extract(epoch FROM at - lag(at) OVER (PARTITION BY job_id ORDER BY id)) AS dt"
                " FROM job_events WHERE kind = 'state') e"
                " WHERE from_state IS NOT NULL GROUP BY from_state, to_state ORDER BY 3 DESC"
            )
        ).all()
    return "; ".join(f"{a}->{b}: n={n} mean={avg:.2f}s max={mx:.2f}s" for a, b, n, avg, mx in rows)


class Operator:
    """Plays the KubeRay operator on the fake API (in process): a new RayJob becomes Running; one Running for
    RUN_FOR_S whose job record already says RUNNING becomes Complete/SUCCEEDED. (Waiting for the record keeps
    the expected chain deterministic: a RayJob completed before any replica saw it running would legally go
    SUBMITTED -> SUCCEEDED.)"""

    def __init__(self, kube: FakeKubeApi):
        self.kube = kube
        self.running_since: dict[str, float] = {}

    def rayjobs(self, ns: str) -> list[dict[str, Any]]:
        return self.kube.objects(PLURAL, ns)

    def step(self, ns: str, items: list[dict[str, Any]], job_states: dict[str, str], now: float) -> None:
        for obj in items:
            name = obj["metadata"]["name"]
            deployment = (obj.get("status") or {}).get("jobDeploymentStatus")
            if not deployment:
                self._set(ns, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
                self.running_since[name] = now
            elif (
                deployment == "Running"
                and now - self.running_since.get(name, now) >= RUN_FOR_S
                and job_states.get(name) == "RUNNING"
            ):
                self._set(ns, name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")

    def _set(self, ns: str, name: str, **status: str) -> None:
        self.kube.patch_status(PLURAL, ns, name, status)


class CrashMidSubmit:
    """The fake API's `on_create` hook: once armed, the first RayJob created at the victim's request SIGKILLs
    the victim before the answer is sent, i.e. after `Backend.submit` and before the submission is recorded.
    The victim's open transaction (its whole scheduling pass) dies with it."""

    def __init__(self, victim: ApiReplica, api_port: int):
        self.victim, self.api_port = victim, api_port
        self.lock = threading.Lock()
        self.armed_at: float | None = None
        self.killed_at: float | None = None
        self.job: str | None = None  # the RayJob whose creation triggered the kill (None: killed anyway)

    def arm(self) -> None:
        self.armed_at = time.monotonic()

    def __call__(self, create: Create, client: tuple[str, int]) -> None:
        if create.plural != PLURAL or create.status != 201 or self.armed_at is None:
            return
        with self.lock:
            if self.killed_at is None and client[1] in self._victim_ports():
                self._kill(create.name)

    def kill_if_overdue(self) -> None:
        with self.lock:
            armed_for = time.monotonic() - self.armed_at if self.armed_at is not None else 0.0
            if self.killed_at is None and armed_for > KILL_ANYWAY_S:
                self._kill(None)

    def _kill(self, job: str | None) -> None:
        assert self.victim.proc is not None
        self.victim.proc.send_signal(signal.SIGKILL)
        self.killed_at, self.job = time.monotonic(), job

    def _victim_ports(self) -> set[int]:
        assert self.victim.proc is not None
        try:
            proc = psutil.Process(self.victim.proc.pid)
            conns = (
                proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
            )
        except psutil.Error:
            return set()
        # The victim's end of its connections to the fake API (an ephemeral port may be in use at once by
        # another process's connection to somewhere else).
        return {c.laddr.port for c in conns if c.raddr and c.raddr.port == self.api_port}


def test_two_replicas_run_every_job_exactly_once_within_quota(tmp_path: Path) -> None:
    started = time.monotonic()
    with fresh_database() as db_url, contextlib.ExitStack() as stack:
        kube = FakeKubeApi()
        stack.callback(kube.stop)
        config = platform_config(db_url, kube.url)
        replicas = [ApiReplica(name, tmp_path / name, config) for name in ("api-a", "api-b")]
        for replica in replicas:
            replica.start()
            stack.callback(replica.stop)
        for replica in replicas:
            replica.wait_ready()
        victim, survivor = replicas
        crash = CrashMidSubmit(victim, kube.port)
        kube.on_create = crash
        engine = create_engine(db_url)
        stack.callback(engine.dispose)
        operator = Operator(kube)

        clients: dict[tuple[str, str], Client] = {}

        def client(replica: ApiReplica, team: str) -> Client:
            key = (replica.name, team)
            if key not in clients:
                clients[key] = Client(replica.url, token=token(team), timeout=30)
            return clients[key]

        def forget_clients(replica: ApiReplica) -> None:
            for key in [k for k in clients if k[0] == replica.name]:
                clients.pop(key).close()

        stack.callback(lambda: [c.close() for c in clients.values()])

        def submit(n: int, team: str, i: int) -> tuple[dict[str, Any], str]:
            """Alternate between the replicas that are up. A submit caught by the crash goes to the other
            replica with the same Idempotency-Key: the job exists once whichever of them created it."""
            target = replicas[n % 2] if up[replicas[n % 2].name] else survivor
            key = f"{team}-{i:03d}"
            try:
                return client(target, team).submit(job_spec(team, i), idempotency_key=key), target.name
            except httpx.TransportError:
                assert target is victim and crash.killed_at is not None
                return client(survivor, team).submit(job_spec(team, i), idempotency_key=key), survivor.name

        plan = [(team, i) for team, (_, _, n) in TEAMS.items() for i in range(n)]
        random.Random(7).shuffle(plan)
        submitted: dict[str, tuple[str, str]] = {}  # job id -> (team, replica)
        up = {r.name: True for r in replicas}
        peaks_kube: Counter[str] = Counter()
        peaks_db: Counter[str] = Counter()
        over_quota: list[str] = []
        down_at = restarted_at = back_at = None
        states: dict[str, str] = {}
        steps = 0

        while True:
            now = time.monotonic()
            steps += 1
            # -- sample: RayJobs still running per namespace, active jobs per team in the database
            items = {team: operator.rayjobs(namespace(team)) for team in TEAMS}
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT id, team, state, message FROM jobs")).all()
            states = {r.id: r.state for r in rows}
            active_db = Counter(r.team for r in rows if r.state in ("SUBMITTED", "RUNNING"))
            for team, (quota, _, _) in TEAMS.items():
                live = [
                    o["metadata"]["name"]
                    for o in items[team]
                    if (o.get("status") or {}).get("jobDeploymentStatus") not in TERMINAL_RAYJOB
                ]
                peaks_kube[team] = max(peaks_kube[team], len(live))
                peaks_db[team] = max(peaks_db[team], active_db[team])
                at = f"t={now - started:.1f}s {team}"
                if len(live) > quota:
                    db = {name: states.get(name) for name in live}
                    over_quota.append(f"{at}: {len(live)} RayJobs running (quota {quota}), db says {db}")
                if active_db[team] > quota:
                    over_quota.append(f"{at}: {active_db[team]} active in the db (quota {quota})")
            # -- the operator's move
            for team in TEAMS:
                operator.step(namespace(team), items[team], states, now)
            # -- progress
            bad = [f"{r.id}: {r.state} {r.message}" for r in rows if r.state in ("FAILED", "CANCELLED")]
            assert not bad, f"jobs that did not succeed: {bad}"
            done = sum(1 for s in states.values() if s == "SUCCEEDED")
            if done == TOTAL and len(submitted) == TOTAL:
                break
            if now - started > DEADLINE_S:
                pytest.fail(
                    f"{done}/{TOTAL} succeeded after {DEADLINE_S} s; states {Counter(states.values())}; "
                    f"{steps} operator steps\n{timeline(engine)}\n{slowest(engine)}\n"
                    + "\n".join(f"--- {r.name}\n{r.log_tail()}" for r in replicas)
                )
            # -- the crash (armed midway, fired by the fake API) and the restart a moment later
            if crash.armed_at is None and done >= KILL_AFTER:
                crash.arm()
            crash.kill_if_overdue()
            if crash.killed_at is not None and down_at is None:
                assert victim.proc is not None
                victim.proc.wait(10)
                up[victim.name], down_at = False, now
                forget_clients(victim)
            elif down_at is not None and restarted_at is None and now - down_at >= RESTART_AFTER_S:
                victim.start()
                restarted_at = now
            elif restarted_at is not None and back_at is None and victim.ready():
                up[victim.name], back_at = True, now
            # -- submissions
            for _ in range(10):
                if len(submitted) == TOTAL or len(submitted) - done >= BACKLOG:
                    break
                team, i = plan[len(submitted)]
                job, via = submit(len(submitted), team, i)
                submitted[job["id"]] = (team, via)
            time.sleep(0.1)

        finished = time.monotonic()
        killed_at = crash.killed_at
        assert killed_at is not None and back_at is not None, "the crash and the restart did not happen"

        # -- quotas held at every sample
        assert not over_quota, "\n".join(over_quota)

        # -- one successful create per job (its RayJob and the objects created before it)
        assert set(states) == set(submitted) and len(submitted) == TOTAL
        plurals = [PLURAL, "configmaps"] + (["networkpolicies"] if kube.creates("networkpolicies") else [])
        again_after_crash: set[str] = set()
        for plural in plurals:
            by_job = defaultdict(list)
            for c in kube.creates(plural):
                by_job[c.name.removesuffix("-spec").removesuffix("-network")].append(c)
            assert set(by_job) == set(submitted), f"{plural} created for unknown or missing jobs"
            for job_id, cs in by_job.items():
                ok = [c for c in cs if c.status == 201]
                assert len(ok) == 1, f"{plural} of {job_id} created {len(ok)} times: {cs}"
                for again in (c for c in cs if c is not ok[0]):
                    # Only the crash recovery may POST again: a submit sent before the kill, whose record
                    # died with the replica, is sent again after it and finds the object (409).
                    assert again.status == 409 and ok[0].at < killed_at < again.at, (job_id, cs, killed_at)
                    again_after_crash.add(job_id)
        if crash.job is not None:  # caught mid-submit: that job was handed to the backend again, and found
            assert crash.job in again_after_crash

        # -- events: each job's state events are the legal chain, once; no other events
        with engine.connect() as conn:
            events = conn.execute(
                text("SELECT job_id, kind, from_state, to_state, actor FROM job_events ORDER BY id")
            ).all()
            attempts = dict(conn.execute(text("SELECT job_id, count(*) FROM attempts GROUP BY job_id")).all())
        chains: dict[str, list[tuple[str | None, str | None]]] = defaultdict(list)
        for e in events:
            assert e.kind == "state", e
            chains[e.job_id].append((e.from_state, e.to_state))
        expected = list(zip([None, *CHAIN[:-1]], CHAIN, strict=True))
        wrong = {job_id: chain for job_id, chain in chains.items() if chain != expected}
        assert not wrong, f"{len(wrong)} jobs with other state events, e.g. {next(iter(wrong.items()))}"
        assert set(chains) == set(submitted)
        assert attempts == dict.fromkeys(submitted, 1)

        # -- and the same seen through the API of either replica
        for n, (job_id, (team, _)) in enumerate(sorted(submitted.items())):
            job = client(replicas[n % 2], team).job(job_id)
            assert (job["state"], job["attempts"]) == ("SUCCEEDED", 1), job

        actors = Counter(e.actor.rsplit(":", 1)[-1] for e in events if e.actor.startswith("reconciler@"))
        pids = {str(pid): f"{r.name}#{k}" for r in replicas for k, pid in enumerate(r.pids)}
        print(
            f"\n{TOTAL} jobs in {finished - started:.1f} s ({steps} operator steps); "
            f"killed at {killed_at - started:.1f} s "
            f"({f'mid-submit of {crash.job}' if crash.job else 'not caught mid-submit'}), "
            f"back at {back_at - started:.1f} s; sent again and found (409): {sorted(again_after_crash)}; "
            f"peak RayJobs {dict(peaks_kube)}, peak db {dict(peaks_db)}; "
            f"reconciler events by process: { {pids.get(p, p): n for p, n in actors.items()} }; "
            f"submitted via: {dict(Counter(r for _, r in submitted.values()))}\n{timeline(engine)}\n"
            f"slowest jobs:\n{slowest(engine)}"
        )


def test_a_finished_lookup_is_recorded_even_if_another_replica_held_the_row() -> None:
    """Replica A's data lookup finishes while replica B holds the job's row (B's pass locks each waiting job
    for a moment to look at it). A must still record the result. Found by the test above: with SKIP LOCKED
    there, A dropped the result and the job sat VALIDATING until the takeover (validation_timeout_s + 30 s);
    e.g. blue-028 went VALIDATING at +0.1 s on the live replica and QUEUED at +70.3 s."""
    from sqlalchemy import select

    from tuneplane.backends.base import Backend
    from tuneplane.control.reconciler import Reconciler
    from tuneplane.spec import parse_spec
    from tuneplane.store import Database, Job, Principal, create_job

    with fresh_database() as db_url:
        db = Database(db_url)
        try:
            db.migrate()
            config = PlatformConfig.model_validate(platform_config(db_url, "http://127.0.0.1:9"))
            backend: Backend = None  # type: ignore[assignment]  # validation never calls the backend
            replica_a = Reconciler(db, backend, config)
            release = threading.Event()
            replica_a._problems = lambda spec, team: [] if release.wait(10) else [("", "never released")]  # type: ignore[method-assign]
            with db.session() as s:
                job_id = create_job(s, Principal("red"), parse_spec(job_spec("red", 0)), priority=10)[0].id

            def state() -> str:
                with db.session(readonly=True) as s:
                    return s.scalar(select(Job.state).where(Job.id == job_id)) or ""

            first_pass = threading.Thread(target=replica_a.validate_new)
            first_pass.start()
            deadline = time.monotonic() + 10
            while state() != "VALIDATING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state() == "VALIDATING"
            with db.session() as replica_b:  # B looks at the job (FOR UPDATE) just as A's lookup finishes
                replica_b.scalar(select(Job).where(Job.id == job_id).with_for_update())
                release.set()
                time.sleep(0.5)  # A tries to record meanwhile
            first_pass.join(10)
            for _ in range(2):  # B let go: A records the lookup (in that pass, or at worst its next ones)
                if state() == "VALIDATING":
                    replica_a.validate_new()
            assert state() == "QUEUED", f"job still {state()} after A's lookup finished"
        finally:
            db.dispose()
