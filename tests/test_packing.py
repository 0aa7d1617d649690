"""Packing: rows never overflow, every example lands exactly once, and packed examples never see each other."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.config import REPO
from tuneplane.data import InstructionStream
from tuneplane.data.packing import BestFitPacker, Example, collate
from tuneplane.data.templates import IGNORE_INDEX
from tuneplane.spec import load_spec


def _example(i: int, n: int, trained_from: int = 0) -> Example:
    ids = np.arange(1, n + 1, dtype=np.int32) + i
    labels = np.where(np.arange(n) >= trained_from, ids, IGNORE_INDEX).astype(np.int32)
    return Example(f"k:{i}", 0, ids, labels)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=120),
    max_len=st.integers(64, 200),
    buffer=st.integers(1, 50),
)
def test_best_fit_packing_properties(lengths, max_len, buffer) -> None:
    packer = BestFitPacker(max_len, buffer)
    rows = []
    for i, n in enumerate(lengths):
        packer.add(_example(i, n, trained_from=n // 2))
        if packer.full():
            rows.append(packer.pop_row())
    while len(packer):
        rows.append(packer.pop_row())
    keys = [e.key for row in rows for e in row]
    assert sorted(keys) == sorted(f"k:{i}" for i in range(len(lengths)))  # each example exactly once
    assert all(sum(len(e) for e in row) <= max_len for row in rows)

    batch = collate(rows, pad_id=0, packed=True, length=max_len)
    assert batch.attention_mask is None
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            assert (batch.position_ids[r, at : at + n] == np.arange(n)).all()  # restart per example
            assert batch.labels[r, at] == IGNORE_INDEX  # never predict across the boundary
            expected = e.labels[1:]
            assert (batch.labels[r, at + 1 : at + n] == expected).all()
            at += n
        assert (batch.labels[r, at:] == IGNORE_INDEX).all()  # padding untrained
    assert batch.num_tokens == sum(lengths)


def test_state_round_trip_keeps_examples_exact() -> None:
    packer = BestFitPacker(100, 10)
    for i, n in enumerate([5, 17, 3, 40]):
        packer.add(_example(i, n, trained_from=2))
    clone = BestFitPacker(100, 10)
    clone.load(packer.state())
    a, b = packer.pop_row(), clone.pop_row()
    assert [e.key for e in a] == [e.key for e in b]
    for x, y in zip(a, b, strict=True):
        assert (x.input_ids == y.input_ids).all() and (x.labels == y.labels).all()


def test_packed_rows_compute_exactly_what_separate_examples_do(tiny_dir) -> None:
    """The block-diagonal attention, end to end through a real Llama with SDPA on CPU."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="sdpa").eval()
    examples = [_example(i, n, trained_from=2) for i, n in enumerate([7, 12, 5])]
    packed = collate([examples], pad_id=0, packed=True, length=30).to_torch()
    with torch.no_grad():
        packed_logits = model(**packed, use_cache=False).logits[0]
        at = 0
        for e in examples:
            alone = model(
                input_ids=torch.from_numpy(e.input_ids.astype(np.int64))[None], use_cache=False
            ).logits[0]
            torch.testing.assert_close(packed_logits[at : at + len(e)], alone, atol=1e-5, rtol=1e-4)
            at += len(e)


def test_packing_efficiency_on_the_shipped_mix(tokenizer) -> None:
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    stream = InstructionStream(spec.data, tokenizer, micro_batch_size=4)
    real = slots = 0
    for batch in stream:
        real += batch.num_tokens
        slots += batch.num_slots
    assert real / slots > 0.95
