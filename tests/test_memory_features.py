"""Memory features of the training runtime: the chunked causal-LM loss (HF's value and gradients, far smaller
peak), activation checkpointing, DoRA / rsLoRA, and QLoRA's refusals. ZeRO-3 (two ranks) is the slow test."""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuneplane.data import InstructionStream
from tuneplane.errors import SpecError
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec, parse_spec
from tuneplane.train.builders import load_model
from tuneplane.train.loss import causal_lm_loss

DATA = Path(__file__).resolve().parents[1] / "jobs" / "data" / "tasks-alpaca.jsonl"


def _spec(tiny_dir: Path, method: dict[str, Any] | None = None, **model: Any) -> TuningSpec:
    lora = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    return parse_spec(
        {
            "name": "m",
            "model": {"base": str(tiny_dir), **model},
            "data": {"sources": [{"uri": str(DATA), "format": "alpaca"}]},
            "method": lora | (method or {}),
            "distributed": {"gpus_per_worker": 0},
        }
    )


def _batch(tokenizer: Any, packed: bool) -> dict[str, torch.Tensor]:
    """Three rows of alpaca records with masked prompts: packed (position restarts) or padded (attention mask)."""
    spec = DataSpec(sources=[SourceSpec(uri=str(DATA), format="alpaca")], packing=packed, max_seq_len=128)
    batch = next(iter(InstructionStream(spec, tokenizer, micro_batch_size=3)))
    assert 0 < batch.num_trained_tokens < batch.num_tokens  # prompts are masked
    return batch.to_torch()


def _lora_model(tiny_dir: Path, **method: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(_spec(tiny_dir, method), on_gpu=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the adapters (and their gradients) something to do
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    return model


def _loss_and_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_chunked_loss_equals_hf_loss_and_gradients(tiny_dir, tokenizer, packed) -> None:
    model, batch = _lora_model(tiny_dir), _batch(tokenizer, packed)
    hf, hf_grads = _loss_and_grads(model, model(**batch, use_cache=False).loss)
    ours, grads = _loss_and_grads(
        model, causal_lm_loss(model, batch, chunk_tokens=7)
    )  # several chunks + rest
    assert ours == pytest.approx(hf, abs=1e-5)
    assert grads.keys() == hf_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # eval loss: same value, nothing recomputed
        assert causal_lm_loss(model, batch, chunk_tokens=7).item() == pytest.approx(hf, abs=1e-5)


class _PeakTensors(TorchDispatchMode):
    """Peak bytes of live tensor storage created by torch ops, and the most rows of any [*, vocab] tensor
    (views of the model's weights, such as the head's transpose, are not counted)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.vocab, self.now, self.peak, self.vocab_rows = model.config.vocab_size, 0, 0, 0
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors using it]
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.numel():
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key in self.weights:
            return
        if t.dim() and t.shape[-1] == self.vocab:
            self.vocab_rows = max(self.vocab_rows, t.numel() // self.vocab)
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += self.live[key][0]
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def _peak(model: torch.nn.Module, step: Any) -> _PeakTensors:
    mode = _PeakTensors(model)
    with mode:
        step().backward()
    model.zero_grad()
    return mode


def test_chunked_loss_never_holds_the_full_logits(tiny_dir, tokenizer) -> None:
    model, batch = _lora_model(tiny_dir), _batch(tokenizer, packed=True)
    tokens = batch["input_ids"].numel()
    hf = _peak(model, lambda: model(**batch, use_cache=False).loss)
    ours = _peak(model, lambda: causal_lm_loss(model, batch, chunk_tokens=32))
    assert hf.vocab_rows == tokens  # HF projects every position
    assert ours.vocab_rows <= 32  # one chunk of scored positions at a time
    full_logits = tokens * model.config.vocab_size * 4  # one fp32 [tokens x vocab] tensor
    assert hf.peak - ours.peak > 1.5 * full_logits, (hf.peak, ours.peak)  # HF: logits, log-softmax, gradient


def test_activation_checkpointing_recomputes_with_the_same_gradients(tiny_dir, tokenizer) -> None:
    batch = _batch(tokenizer, packed=True)
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = load_model(_spec(tiny_dir, activation_checkpointing=mode), on_gpu=False)
        layers = model.get_base_model().model.layers
        assert all(layer.gradient_checkpointing == (mode == "on") for layer in layers)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.train()
        results[mode] = _loss_and_grads(model, causal_lm_loss(model, batch))
    assert results["on"][0] == pytest.approx(results["off"][0], abs=1e-6)
    for name, grad in results["on"][1].items():
        torch.testing.assert_close(grad, results["off"][1][name], rtol=1e-5, atol=1e-7, msg=name)
    auto = load_model(_spec(tiny_dir), on_gpu=False)  # `auto` on CPU: device memory unknown, so off
    assert not any(getattr(m, "gradient_checkpointing", False) for m in auto.modules())


def test_dora_and_rslora_train_a_step_and_say_so_in_the_adapter(tiny_dir, tokenizer, tmp_path) -> None:
    model = _lora_model(tiny_dir, use_dora=True, use_rslora=True, r=16, alpha=8)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(16))  # rsLoRA: alpha / sqrt(r)
    magnitude = q_proj.lora_magnitude_vector["default"].weight  # DoRA's trained magnitude
    before = magnitude.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tokenizer, packed=True)
    first = causal_lm_loss(model, batch)
    first.backward()
    optimizer.step()
    assert not torch.equal(magnitude.detach(), before)
    with torch.no_grad():
        assert causal_lm_loss(model, batch).item() < first.item()
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True and config["r"] == 16


def test_qlora_is_refused_where_it_cannot_run(tiny_dir) -> None:
    qlora = {"method": {"type": "lora", "quantize": "4bit"}}
    base = {
        "name": "q",
        "model": {"base": "/m"},
        "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
    }
    for distributed, says in [
        ({"gpus_per_worker": 0}, "needs GPU workers"),
        ({"zero_stage": 3}, "cannot run under ZeRO-3"),
    ]:
        with pytest.raises(SpecError) as info:
            parse_spec(base | qlora | {"distributed": distributed})
        assert info.value.problems[0][0] == "method.quantize" and says in info.value.problems[0][1]
    spec = parse_spec(base | qlora | {"model": {"base": str(tiny_dir)}})  # GPUs asked for, none here
    with pytest.raises(SpecError, match="needs a CUDA GPU") as info:
        load_model(spec, on_gpu=torch.cuda.is_available())
    assert info.value.problems[0][0] == "method.quantize"


# ---------------------------------------------------------------------------------------- ZeRO-3, two ranks


def _zero3_rank(rank: int, port: int, tiny_dir: str, results: Any) -> None:
    """One of two gloo ranks: ZeRO-3, each rank with its own batch size (so a different number of loss chunks),
    three steps with HF's loss and three with ours, for a trained tied head and for DoRA + checkpointing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    data = DataSpec(sources=[SourceSpec(uri=str(DATA), format="alpaca")], packing=False, max_seq_len=128)

    def tied() -> torch.nn.Module:
        config = AutoConfig.from_pretrained(tiny_dir)
        config.tie_word_embeddings = True
        return AutoModelForCausalLM.from_config(config)

    def dora() -> torch.nn.Module:
        method = {"use_dora": True, "target_modules": ["q_proj", "v_proj", "lm_head"]}
        return load_model(_spec(Path(tiny_dir), method, activation_checkpointing="on"), on_gpu=False)

    for name, build in [("tied", tied), ("dora", dora)]:
        for loss_name in ("hf", "ours"):
            torch.manual_seed(0)
            model = build()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "zero_force_ds_cpu_optimizer": False,
                "zero_allow_untested_optimizer": True,
            }
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            engine.train()
            stream = iter(
                InstructionStream(data, tokenizer, micro_batch_size=1 + 2 * rank, rank=rank, world_size=2)
            )
            for _ in range(3):
                batch = next(stream).to_torch()
                if loss_name == "hf":
                    loss = engine(**batch, use_cache=False).loss
                else:
                    loss = causal_lm_loss(engine, batch, chunk_tokens=16)
                engine.backward(loss)
                engine.step()
                results.append((rank, name, loss_name, loss.item()))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_chunked_loss_under_zero3_trains_exactly_like_hf(tiny_dir) -> None:
    import torch.multiprocessing as mp

    from tests.support.config import free_port

    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_zero3_rank, args=(free_port(), str(tiny_dir), results), nprocs=2, join=True)
        rows = list(results)
    for rank in (0, 1):
        for name in ("tied", "dora"):
            hf = [v for r, n, loss, v in rows if (r, n, loss) == (rank, name, "hf")]
            ours = [v for r, n, loss, v in rows if (r, n, loss) == (rank, name, "ours")]
            assert len(hf) == 3 and ours == pytest.approx(hf, abs=1e-5), (rank, name, hf, ours)


def test_per_source_tally_splits_the_same_loss_by_source(tiny_dir, tokenizer) -> None:
    """The mixture actually trained: per-source loss sums and target counts, taken from the loss's own per-token
    values, equal a direct computation from the full logits grouped by each token's source."""
    import numpy as np
    import torch.nn.functional as F

    from tuneplane.train.loss import SourceTally

    other = DATA.with_name("tasks-messages.jsonl")
    data = DataSpec(
        sources=[SourceSpec(uri=str(DATA), format="alpaca"), SourceSpec(uri=str(other), format="messages")],
        max_seq_len=256,
    )
    batch = next(iter(InstructionStream(data, tokenizer, micro_batch_size=3)))
    rows = batch.to_torch()
    tally = SourceTally(batch.target_sources(), 2, torch.device("cpu"))
    model = _lora_model(tiny_dir)
    with torch.no_grad():
        mean = causal_lm_loss(model, rows, chunk_tokens=7, tally=tally).item()
        logits = model(**rows, use_cache=False).logits.float()
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), rows["labels"][:, 1:].reshape(-1), reduction="none"
    ).reshape(logits.shape[0], -1)
    scored = batch.labels[:, 1:] != -100
    source = batch.sources[:, 1:]
    assert set(np.unique(source[scored]).tolist()) == {0, 1}  # both sources trained in this batch
    for i in range(2):
        mine = scored & (source == i)
        assert tally.count[i].item() == mine.sum()
        assert tally.loss[i].item() == pytest.approx(per_token[torch.from_numpy(mine)].sum().item(), rel=1e-5)
    assert tally.loss.sum().item() / tally.count.sum().item() == pytest.approx(mean, rel=1e-6)
