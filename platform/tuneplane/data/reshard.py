"""Carry a data position over to another number of ranks (elastic training): every example of the epoch is still
trained exactly once.

The stream's state is per rank: for each source, how far the rank's reader got (pass, file, line, records seen),
plus the examples it read but has not trained yet (the packing buffer). Which records a rank owns follows from
the world size (record striding `j % world`, or whole files when the files divide evenly), so each old rank's
cursor says exactly which records of the pass it has taken: that is a `Handover`.

After `reshard`, every new rank reads the source again from the start of the earliest pass any old rank was
in, skips the records the old world took (`Handover.taken`), and owns the rest by striding over the new world
(`j % new_world`). Once past the last pass an old rank reached, the reader is back to the new world's normal
sharding. The old ranks' unread buffers are dealt out round-robin. A rank that has itself resumed from a
handover can be resharded again: handovers nest.

Re-reading the earliest pass from its start costs at most one pass over the source per resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any


def shards_by_file(files: int, world: int) -> bool:
    """The sharding rule: whole files per rank when they divide evenly among several ranks, else record
    striding (record j of a pass to rank j % world)."""
    return world > 1 and files % world == 0


@dataclass(frozen=True)
class OldCursor:
    pass_no: int
    file_index: int
    line: int
    seen: int


@dataclass(frozen=True)
class Handover:
    """What a previous world of `world` ranks took of one source (their cursors, by rank)."""

    world: int
    cursors: tuple[OldCursor, ...]
    before: Handover | None = None  # the handover those ranks had themselves resumed from, if any

    @cached_property
    def last_pass(self) -> int:
        """The last pass this handover (or one it nests) still governs."""
        mine = max(c.pass_no for c in self.cursors)
        return max(mine, self.before.last_pass) if self.before else mine

    def governs(self, pass_no: int) -> bool:
        return pass_no <= self.last_pass

    def taken(self, pass_no: int, file_pos: int, line: int, record_no: int, files: int) -> bool:
        """Whether the old world already took a record: pass `pass_no`, file at position `file_pos` of the
        pass's full file order (`files` files), line `line` (1-based), the `record_no`-th record of the pass."""
        if self.before is not None and self.before.taken(pass_no, file_pos, line, record_no, files):
            return True
        if self._by_file(pass_no, files):
            rank, nth_file = file_pos % self.world, file_pos // self.world
            c = self.cursors[rank]
            return pass_no < c.pass_no or (
                pass_no == c.pass_no
                and (nth_file < c.file_index or (nth_file == c.file_index and line <= c.line))
            )
        c = self.cursors[record_no % self.world]
        return pass_no < c.pass_no or (pass_no == c.pass_no and record_no < c.seen)

    def _by_file(self, pass_no: int, files: int) -> bool:
        """How the old ranks sharded this pass: whole files when they divide evenly (as `SourceReader` does),
        except in passes they were themselves taking over, which are read record by record."""
        if self.before is not None and self.before.governs(pass_no):
            return False
        return shards_by_file(files, self.world)

    def to_state(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "cursors": [c.__dict__ for c in self.cursors],
            "before": self.before.to_state() if self.before else None,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Handover | None:
        if state is None:
            return None
        cursors = tuple(OldCursor(**c) for c in state["cursors"])
        return cls(state["world"], cursors, cls.from_state(state["before"]))


def reshard(states: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """The data states of `world` new ranks continuing where the old ranks' `states` (one per old rank, in rank
    order, all from the same checkpoint) stopped."""
    if not states or world < 1:
        raise ValueError("reshard needs the old ranks' states and a world size of at least 1")
    epochs = {s["epoch"] for s in states}
    if len(epochs) != 1:
        raise ValueError(f"old ranks are in different epochs {sorted(epochs)}: not one checkpoint")
    cursors = [
        _new_cursor(len(states), [s["cursors"][i] for s in states]) for i in range(len(states[0]["cursors"]))
    ]
    pending = [example for s in states for example in s["pending"]]
    draws = max(s["draws"] for s in states)
    return [
        {
            "version": states[0]["version"],
            "epoch": states[0]["epoch"],
            # Mixing draws restart their counter-based sequence per rank: any fixed value keeps re-runs exact.
            "draws": draws,
            "cursors": [dict(c) for c in cursors],
            "pending": pending[rank::world],
            # Counters are summed once (on rank 0), so the run's totals stay right.
            "stats": _summed_stats(states) if rank == 0 else _zero_stats(states),
        }
        for rank in range(world)
    ]


def _new_cursor(old_world: int, old: list[dict[str, Any]]) -> dict[str, Any]:
    """One source's cursor for every new rank: back to the start of the earliest pass an old rank was in."""
    # A rank drops its handover once past the handover's last pass, others may still hold it: all that do
    # hold the same one (a rank without it took nothing the handover describes differently).
    befores = {repr(c["handover"]) for c in old if c.get("handover") is not None}
    if len(befores) > 1:
        raise ValueError("old ranks resumed from different handovers: not one checkpoint")
    before = next((c["handover"] for c in old if c.get("handover") is not None), None)
    handover = Handover(
        old_world,
        tuple(OldCursor(c["pass_no"], c["file_index"], c["line"], c["seen"]) for c in old),
        Handover.from_state(before),
    )
    return {
        "pass_no": min(c["pass_no"] for c in old),
        "file_index": 0,
        "line": 0,
        "seen": 0,
        # The epoch's pass of this source is over only if every old rank had finished it.
        "done_in_epoch": all(c["done_in_epoch"] for c in old),
        "owned_in_pass": 0,
        "handover": handover.to_state(),
    }


_COUNTERS = ("records", "errors", "examples", "truncated", "dropped_no_response", "tokens", "trained_tokens")


def _summed_stats(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summed = []
    for i, first in enumerate(states[0]["stats"]):
        item = dict(first)
        for key in _COUNTERS:
            item[key] = sum(s["stats"][i][key] for s in states)
        item["error_samples"] = [e for s in states for e in s["stats"][i]["error_samples"]][:20]
        summed.append(item)
    return summed


def _zero_stats(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": s["name"], "error_samples": [], **dict.fromkeys(_COUNTERS, 0)} for s in states[0]["stats"]
    ]
