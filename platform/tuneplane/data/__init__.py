"""Streaming instruction data: object storage -> canonical conversations -> masked tokens -> packed batches.

Public surface:
    InstructionStream   per-rank, resumable stream of packed (or padded) batches; `drop=` skips a KeySet
    PreferenceStream    per-rank, resumable stream of (chosen, rejected) pair batches (`PairBatch`)
    Batch               one micro-batch (numpy; `.to_torch()`)
    preflight           scan a spec's data and report (what `tuneplane validate` prints), duplicates and
                        eval contamination included
    build_filter        the training drop-set (duplicates, contaminated records) of a spec: a DataFilter
    KeySet              a set of record keys (`uri:line`), serialisable to bytes
    DataError           a data problem, located as `uri:line`
"""

from tuneplane.data.keyset import KeySet
from tuneplane.data.packing import Batch
from tuneplane.data.preference import PairBatch, PreferenceStream
from tuneplane.data.preflight import PreflightReport, preflight
from tuneplane.data.quality import DataFilter, build_filter
from tuneplane.data.stream import InstructionStream
from tuneplane.errors import DataError

__all__ = [
    "Batch",
    "DataError",
    "DataFilter",
    "InstructionStream",
    "KeySet",
    "PairBatch",
    "PreferenceStream",
    "PreflightReport",
    "build_filter",
    "preflight",
]
