"""What one team may hold of the API at once, so that no team's requests slow another's, and probes never wait.

Quick routes (list, get, submit, cancel) run on the default worker threads. Work a team can make long runs
apart, on thread budgets of its own, and is bounded per team:

- a dry-run validation reads the team's data for up to its budget: at most `validations_per_team` at once and
  `validations_per_minute` a minute per team (429 with Retry-After past either); admission on `heavy` threads,
  the data preflight (CPU-bound: it would hold this process's interpreter lock) in a pool of
  `validation_processes` worker processes, niced below the API, shared by the process's apps;
- a followed log stays open as long as its job runs: at most `log_streams_per_team` at once per team (429),
  each read step on `stream` threads, never a default one, and the route itself waits on the event loop.

The probes (`/healthz`, `/readyz`) run on the event loop and threads of their own.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import CapacityLimiter

from tuneplane.api.problems import Problem
from tuneplane.config import ApiLimits

T = TypeVar("T")


class TeamSlots:
    """At most `per_team` of something held at once by each team."""

    def __init__(self, what: str, per_team: int):
        self.what, self.per_team = what, per_team
        self._held: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, team: str, retry_after_s: int) -> Callable[[], None]:
        """Take one slot (429 naming the limit when the team holds them all); returns what gives it back, once."""
        with self._lock:
            if self._held[team] >= self.per_team:
                raise Problem(
                    429,
                    "too many requests",
                    f"at most {self.per_team} {self.what} at once per team; retry when one ends",
                    headers={"Retry-After": str(retry_after_s)},
                )
            self._held[team] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._held[team] -= 1

        return release


@dataclass
class RateLimit:
    """At most `per_minute` events per team in any sliding minute."""

    what: str
    per_minute: int
    _times: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, team: str, now: float | None = None) -> None:
        """Count one event of `team`; 429 with the seconds until the oldest leaves the window, past the limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._times[team]
            while times and now - times[0] >= 60:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = max(1, math.ceil(60 - (now - times[0])))
                raise Problem(
                    429,
                    "too many requests",
                    f"at most {self.per_minute} {self.what} a minute per team",
                    headers={"Retry-After": str(wait)},
                )
            times.append(now)


class Limits:
    """The API's limits, built once per app from the platform config."""

    def __init__(self, config: ApiLimits):
        self.validations = TeamSlots("validations", config.validations_per_team)
        self.validation_rate = RateLimit("validations", config.validations_per_minute)
        self.log_streams = TeamSlots("followed logs", config.log_streams_per_team)
        self.heavy = CapacityLimiter(config.heavy_threads)
        self.stream = CapacityLimiter(config.stream_threads)
        self.probes = CapacityLimiter(2)
        self.processes = config.validation_processes
        self.timeout_s = config.validation_timeout_s

    async def run_dry(self, release: Callable[[], None], fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the validation processes; `release` runs when it is done (or never started), however
        the request ends. 503 when the pool broke (a worker killed, e.g. out of memory): the next call gets a
        new one."""
        pool = _pool(self.processes)
        try:
            future = pool.submit(fn, *args)
        except BaseException:
            release()
            raise
        future.add_done_callback(lambda _: release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:  # a read that hangs below every budget: the workers go, a new pool comes
            _drop_pool(self.processes, pool, kill=True)
            raise Problem(503, "validation unavailable", f"no answer within {self.timeout_s:g} s") from None
        except BrokenProcessPool:
            _drop_pool(self.processes, pool)
            raise Problem(503, "validation unavailable", "the validation worker stopped; retry") from None


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(size: int) -> ProcessPoolExecutor:
    """The process's pool of `size` validation workers, started on first use (spawned: never a fork of a
    threaded server)."""
    with _POOLS_LOCK:
        if size not in _POOLS:
            context = multiprocessing.get_context("spawn")
            _POOLS[size] = ProcessPoolExecutor(size, mp_context=context, initializer=_below_the_api)
        return _POOLS[size]


def _drop_pool(size: int, pool: ProcessPoolExecutor, kill: bool = False) -> None:
    with _POOLS_LOCK:
        if _POOLS.get(size) is pool:
            del _POOLS[size]
    workers = list((pool._processes or {}).values()) if kill else []  # the executor's own table of them
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()


def _below_the_api() -> None:
    """A validation worker yields the CPU to the API process (the kernel serves quick requests first) and dies
    with it, however it dies: a watchdog ends the worker once it is orphaned. (Linux's parent-death signal
    would fire when the *thread* that started the worker ends, which is any request's.)"""
    os.nice(10)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
