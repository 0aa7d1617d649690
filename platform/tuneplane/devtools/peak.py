"""Peak memory of one training step on a CPU, where torch has no `max_memory_allocated`.

The peak is the bytes alive before the step (parameter storages and AdamW's moments, which exist after a first
step) plus the most the step itself held at once, read from torch.profiler's allocator events ('Total
Allocated' counts from the profiler's start). RSS is no use: it counts freed-but-cached pages and the imports.
tests/test_memory_estimate.py checks the memory estimate against it; bench/scale.py reports it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def training_step_peak(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> int:
    """Peak bytes of a steady-state step (forward + backward + AdamW step) of `model`, `loss_of()` giving the
    step's loss; the model's trainable parameters are updated twice."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW creates its moments in the first step
    held = sum(p.untyped_storage().nbytes() for p in model.parameters())
    held += sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values() if t.dim())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory(prefix="tuneplane-peak-") as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return held + max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
