"""The control loop over a backend that records what it is asked (SQLite and PostgreSQL): validation, quota,
priority, following, cancel, deadline, restart, and two replicas sharing one PostgreSQL database."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.support.backends import RECORDING, RecordingBackend
from tests.support.config import REPO, platform_config
from tuneplane.backends.base import RunPhase, RunStatus
from tuneplane.control.reconciler import Reconciler
from tuneplane.spec import load_spec
from tuneplane.store import Database, Job, Principal, cancel_job, create_job

ALPHA, BETA = Principal("alpha"), Principal("beta")


@pytest.fixture(scope="module")
def spec():
    return load_spec(REPO / "jobs" / "tiny-cpu.yaml")


@pytest.fixture
def plane(tmp_path: Path, db_url: str):
    config = platform_config(tmp_path, db_url)
    db = Database(db_url)
    db.migrate()
    backend = RecordingBackend()
    yield Reconciler(db, backend, config), db, backend
    db.dispose()


def submit(db: Database, who: Principal, spec, priority: int = 0) -> str:
    with db.session() as s:
        return create_job(s, who, spec, priority)[0].id


def states(db: Database) -> dict[str, str]:
    with db.session() as s:
        return {j.id: j.state for j in s.scalars(select(Job))}


def history(db: Database, job_id: str) -> list[str]:
    with db.session() as s:
        return [e.to_state for e in s.get(Job, job_id).events if e.to_state]


def test_a_job_goes_through_every_state_to_success(plane, spec) -> None:
    rec, db, backend = plane
    job = submit(db, ALPHA, spec)
    rec.run_once()
    assert states(db)[job] == "SUBMITTED" and backend.submits[job] == 1
    rec.run_once()
    assert states(db)[job] == "SUBMITTED"  # the backend still says PENDING
    backend.phase[job] = RunStatus(RunPhase.RUNNING)
    rec.run_once()
    backend.phase[job] = RunStatus(RunPhase.SUCCEEDED)
    rec.run_once()
    assert history(db, job) == ["PENDING", "VALIDATING", "QUEUED", "SUBMITTED", "RUNNING", "SUCCEEDED"]
    with db.session() as s:
        record = s.get(Job, job)
        assert record.finished_at is not None and len(record.attempts) == 1
        assert record.attempts[0].outcome == "SUCCEEDED"
    assert backend.submits[job] == 1


def test_unreachable_data_fails_validation_naming_the_field(plane, spec) -> None:
    rec, db, backend = plane
    sources = [
        s.model_copy(update={"uri": "/nowhere/x.jsonl"}) if i == 2 else s
        for i, s in enumerate(spec.data.sources)
    ]
    bad = spec.model_copy(update={"data": spec.data.model_copy(update={"sources": sources})})
    job = submit(db, ALPHA, bad)
    rec.run_once()
    with db.session() as s:
        record = s.get(Job, job)
        assert record.state == "FAILED" and record.message.startswith("data.sources[2].uri: /nowhere/x.jsonl")
    assert not backend.submits


def test_quota_holds_jobs_back_until_the_team_has_room(plane, spec) -> None:
    rec, db, backend = plane  # alpha may run 1 job at once
    first, second = submit(db, ALPHA, spec), submit(db, ALPHA, spec)
    rec.run_once()
    assert states(db) == {first: "SUBMITTED", second: "QUEUED"}
    rec.run_once()
    assert states(db)[second] == "QUEUED" and backend.submits[second] == 0
    backend.phase[first] = RunStatus(RunPhase.FAILED, "worker 0: DataError: x.jsonl:3: bad json")
    rec.run_once()
    assert states(db) == {first: "FAILED", second: "SUBMITTED"}  # terminal jobs release quota
    with db.session() as s:
        assert s.get(Job, first).message == "worker 0: DataError: x.jsonl:3: bad json"


def test_higher_priority_teams_go_first_and_a_full_team_does_not_block_others(tmp_path, db_url, spec) -> None:
    config = platform_config(tmp_path, db_url, backend={"type": "local", "max_concurrent_jobs": 2})
    db = Database(db_url)
    db.migrate()
    backend = RecordingBackend()
    backend.capabilities = replace(RECORDING, max_concurrent_jobs=2)  # a machine-wide limit, as local has
    rec = Reconciler(db, backend, config)
    a1, a2 = submit(db, ALPHA, spec, priority=0), submit(db, ALPHA, spec, priority=0)
    b1, b2, b3 = (submit(db, BETA, spec, priority=10) for _ in range(3))
    rec.run_once()
    assert {j for j, s in states(db).items() if s == "SUBMITTED"} == {b1, b2}  # beta first, 2 slots
    backend.phase[b1] = RunStatus(RunPhase.SUCCEEDED)
    rec.run_once()
    assert states(db)[b3] == "SUBMITTED"  # still beta: higher priority
    backend.phase[b2] = backend.phase[b3] = RunStatus(RunPhase.SUCCEEDED)
    rec.run_once()
    assert states(db)[a1] == "SUBMITTED" and states(db)[a2] == "QUEUED"  # alpha: 1 at once
    db.dispose()


def test_cancel_stops_the_backend_job_then_records_cancelled(plane, spec) -> None:
    rec, db, backend = plane
    job = submit(db, ALPHA, spec)
    rec.run_once()
    backend.phase[job] = RunStatus(RunPhase.RUNNING)
    rec.run_once()
    with db.session() as s:
        assert cancel_job(s, ALPHA, job).state == "RUNNING"  # a running job is stopped by the reconciler
    rec.run_once()
    assert backend.cancels[job] >= 1 and states(db)[job] == "CANCELLED"


def test_a_job_past_its_deadline_is_stopped_and_failed(tmp_path, db_url, spec) -> None:
    config = platform_config(tmp_path, db_url, max_job_duration_s=1)
    db = Database(db_url)
    db.migrate()
    backend = RecordingBackend()
    rec = Reconciler(db, backend, config)
    job = submit(db, ALPHA, spec)
    rec.run_once()
    backend.phase[job] = RunStatus(RunPhase.RUNNING)
    threading.Event().wait(1.5)
    rec.run_once()
    with db.session() as s:
        record = s.get(Job, job)
        assert record.state == "FAILED" and "max_job_duration_s" in record.message
    assert backend.cancels[job] == 1
    db.dispose()


def test_a_job_the_backend_lost_is_failed(plane, spec) -> None:
    rec, db, backend = plane
    job = submit(db, ALPHA, spec)
    rec.run_once()
    del backend.phase[job]
    rec.run_once()
    with db.session() as s:
        assert s.get(Job, job).state == "FAILED"
        assert "no record of this job" in s.get(Job, job).message


def test_a_restarted_control_plane_continues_without_resubmitting(plane, spec) -> None:
    rec, db, backend = plane
    job = submit(db, ALPHA, spec)
    rec.run_once()
    backend.phase[job] = RunStatus(RunPhase.RUNNING)
    restarted = Reconciler(Database(db.url), backend, rec.config)  # a new process: nothing kept in memory
    restarted.run_once()
    backend.phase[job] = RunStatus(RunPhase.SUCCEEDED)
    restarted.run_once()
    assert states(db)[job] == "SUCCEEDED" and backend.submits[job] == 1
    restarted.db.dispose()


def test_two_replicas_on_postgresql_submit_each_job_once_within_quota(tmp_path, postgres_url, spec) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS job_events, attempts, jobs, alembic_version CASCADE"))
    engine.dispose()
    config = platform_config(tmp_path, postgres_url, teams=[
        {"name": "alpha", "quota": {"max_concurrent_jobs": 3, "max_gpus": 0}},
        {"name": "beta", "quota": {"max_concurrent_jobs": 2, "max_gpus": 0}},
    ])  # fmt: skip
    db = Database(postgres_url)
    db.migrate()
    backend = RecordingBackend()
    ids = [submit(db, ALPHA if i % 2 else BETA, spec) for i in range(24)]
    replicas = [Reconciler(Database(postgres_url), backend, config) for _ in range(2)]
    over_quota: list[str] = []

    def finish_some_and_check() -> None:
        with db.session() as s:
            active = Counter(
                j.team for j in s.scalars(select(Job).where(Job.state.in_(["SUBMITTED", "RUNNING"])))
            )
        if active["alpha"] > 3 or active["beta"] > 2:
            over_quota.append(str(active))
        for job_id, status in list(backend.phase.items()):
            if status.phase == RunPhase.PENDING:
                backend.phase[job_id] = RunStatus(RunPhase.SUCCEEDED)

    for _ in range(40):
        threads = [threading.Thread(target=r.run_once) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finish_some_and_check()
        if all(s == "SUCCEEDED" for s in states(db).values()):
            break
    assert all(states(db)[i] == "SUCCEEDED" for i in ids), states(db)
    assert set(backend.submits.values()) == {1}, "a job was submitted twice"
    assert not over_quota
    for r in replicas:
        r.db.dispose()
    db.dispose()


def test_replicas_starting_together_migrate_one_after_the_other(postgres_url) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS job_events, attempts, jobs, alembic_version CASCADE"))
    engine.dispose()
    replicas = [Database(postgres_url) for _ in range(3)]
    errors: list[BaseException] = []

    def start(db: Database) -> None:
        try:
            db.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(db.at_head() for db in replicas)
    for db in replicas:
        db.dispose()


def test_a_job_counts_against_quota_from_the_moment_it_is_picked(plane, spec) -> None:
    """A replica that dies after marking a job SUBMITTED but before the backend accepted it: the job still holds
    its team's quota (no other job slips in), and the next pass hands it over, once."""
    from tuneplane.store import record_submission
    from tuneplane.store.jobs import handed_over

    rec, db, backend = plane  # alpha may run 1 job at once
    first, second = submit(db, ALPHA, spec), submit(db, ALPHA, spec)
    rec.validate_new()
    with db.session() as s:  # what the dead replica got done: the decision, not the hand-over
        record_submission(s, s.get(Job, first), "reconciler@dead", "recording")
    assert not backend.submits
    rec.run_once()
    assert states(db) == {first: "SUBMITTED", second: "QUEUED"}  # quota held by the picked job
    assert backend.submits == Counter({first: 1})
    with db.session() as s:
        job = s.get(Job, first)
        assert handed_over(job) and job.message == "submitted to recording" and len(job.attempts) == 1


def test_a_backend_refusal_is_retried_and_a_cancel_before_hand_over_is_final(plane, spec) -> None:
    from tuneplane.errors import BackendError

    rec, db, backend = plane
    refusals = iter([BackendError("cannot reach the Kubernetes API")])
    real_submit = backend.submit

    def flaky_submit(job):
        if (error := next(refusals, None)) is not None:
            raise error
        real_submit(job)

    backend.submit = flaky_submit
    job = submit(db, ALPHA, spec)
    rec.run_once()
    with db.session() as s:
        assert s.get(Job, job).state == "SUBMITTED"
        assert s.get(Job, job).message.startswith("submit failed, will retry: cannot reach")
    rec.run_once()
    assert backend.submits[job] == 1 and states(db)[job] == "SUBMITTED"

    refusals = iter([BackendError("down")])
    other = submit(db, BETA, spec)
    rec.run_once()  # beta's job is picked, the backend refuses it
    with db.session() as s:
        cancel_job(s, BETA, other)
    rec.run_once()
    assert states(db)[other] == "CANCELLED" and backend.submits[other] == 0


def test_a_lost_race_on_an_idempotency_key_answers_as_the_retry_it_is(plane, spec, monkeypatch) -> None:
    """Two requests with one Idempotency-Key can both pass the lookup (replicas on PostgreSQL; found by the API
    fuzzer as a 500 on SQLite): the database's unique index decides, and the loser gets the winner's job."""
    from tuneplane.errors import Conflict
    from tuneplane.store import jobs as store_jobs

    _, db, _ = plane
    with db.session() as s:
        first = create_job(s, ALPHA, spec, 0, "key-1")[0].id
    real, calls = store_jobs._by_key, []

    def blind_once(*args):  # the lookup of the request that lost the race saw nothing yet
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(store_jobs, "_by_key", blind_once)
    with db.session() as s:
        job, created = create_job(s, ALPHA, spec, 0, "key-1")
        assert (job.id, created) == (first, False)
    calls.clear()
    other = spec.model_copy(update={"name": "other"})
    with db.session() as s, pytest.raises(Conflict, match="different spec"):
        create_job(s, ALPHA, other, 0, "key-1")
    assert list(states(db)) == [first]
