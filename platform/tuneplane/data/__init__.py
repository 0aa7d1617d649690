"""Streaming instruction data: object storage -> canonical conversations -> masked tokens -> packed batches.

Public surface:
    InstructionStream   per-rank, resumable stream of packed (or padded) batches
    Batch               one micro-batch (numpy; `.to_torch()`)
    preflight           scan a spec's data and report (what `tuneplane validate` prints)
    DataError           a data problem, located as `uri:line`
"""

from tuneplane.data.packing import Batch
from tuneplane.data.preflight import PreflightReport, preflight
from tuneplane.data.stream import InstructionStream
from tuneplane.errors import DataError

__all__ = ["Batch", "DataError", "InstructionStream", "PreflightReport", "preflight"]
