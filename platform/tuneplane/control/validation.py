"""Data lookups of new jobs, run beside the reconciler's pass instead of inside it.

A lookup can be slow (a glob over many files, a storage endpoint that hangs), and a tenant decides what it
looks up. So lookups run in a small thread pool, one in flight per team (a team with many new jobs waits for
its own, not everyone's), and each has a time budget: past it the job fails with a message that says so.
A thread stuck past its budget is left to finish on its own; its answer is dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass

from tuneplane.errors import Problems

WORKERS = 4


@dataclass
class _Lookup:
    team: str
    future: cf.Future[Problems]
    started: float


class ValidationPool:
    def __init__(self, timeout_s: float, workers: int = WORKERS):
        self.timeout_s = timeout_s
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate")
        self._lookups: dict[str, _Lookup] = {}

    def has(self, job_id: str) -> bool:
        return job_id in self._lookups

    def in_flight(self) -> bool:
        return bool(self._lookups)

    def team_busy(self, team: str) -> bool:
        return any(lookup.team == team for lookup in self._lookups.values())

    def start(self, job_id: str, team: str, check: Callable[[], Problems]) -> None:
        self._lookups[job_id] = _Lookup(team, self._pool.submit(_guarded, check), time.monotonic())

    def collect(self, wait_s: float = 0.0) -> list[tuple[str, Problems]]:
        """(job id, problems) of every lookup that finished or ran out of time, waiting up to `wait_s` for the
        first of those in flight to finish."""
        if self._lookups and wait_s > 0:
            futures = [lookup.future for lookup in self._lookups.values()]
            cf.wait(futures, timeout=wait_s, return_when=cf.FIRST_COMPLETED)
        now, done = time.monotonic(), []
        for job_id, lookup in list(self._lookups.items()):
            if lookup.future.done():
                done.append((job_id, lookup.future.result()))
            elif now - lookup.started > self.timeout_s:
                lookup.future.cancel()
                limit = f"{self.timeout_s:g}"
                done.append((job_id, [("data", f"looking up the data took longer than {limit} s; stopped")]))
            else:
                continue
            del self._lookups[job_id]
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _guarded(check: Callable[[], Problems]) -> Problems:
    try:
        return check()
    except Exception as exc:  # a lookup that crashes fails its job, never the loop
        return [("", f"the data lookup failed: {type(exc).__name__}: {exc}")]
