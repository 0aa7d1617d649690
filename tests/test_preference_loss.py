"""Preference losses (train/preference_loss.py): the chunked sequence log-probs, the three kinds of reference
(train/reference.py), and DPO / IPO / conservative DPO / RPO / ORPO values equal to TRL's own code on the same batch and model."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any

import pytest
import torch

from tuneplane.data.templates import IGNORE_INDEX
from tuneplane.spec import ReferenceKind, parse_spec
from tuneplane.train import reference as reference_model
from tuneplane.train.builders import load_model
from tuneplane.train.checkpointing import _write_model
from tuneplane.train.loss import causal_lm_loss
from tuneplane.train.preference_loss import (
    SequenceLogps,
    orpo_loss,
    preference_loss,
    preference_metrics,
    sequence_logps,
)

PAIRS = [  # (prompt, chosen, rejected): responses of different lengths, so IPO's normalisation matters
    ("Name a primary colour.", " Red is a primary colour.", " Green."),
    ("What is two plus two?", " Four.", " It is five, I believe, or maybe six."),
    ("Say hello in French.", " Bonjour!", " Hola, amigo."),
]


LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _spec(tiny_dir: Path, method: dict[str, Any]) -> Any:
    return parse_spec(
        {
            "name": "p",
            "model": {"base": str(tiny_dir)},
            "data": {"sources": [{"uri": "a.jsonl", "format": "alpaca"}]},
            "method": method,
            "distributed": {"gpus_per_worker": 0},
        }
    )


def _policy(tiny_dir: Path, adapter: Path | None = None) -> Any:
    """A PEFT LoRA model whose adapters are not the identity (PEFT starts lora_B at zero), so policy != ref;
    with `adapter`, the one the recipe builds for `model.adapter` (that adapter, trainable)."""
    torch.manual_seed(0)
    model = load_model(_spec(tiny_dir, LORA), on_gpu=False, adapter=adapter)
    if adapter is not None:
        return model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    model.train()
    return model


def _pairs(tokenizer: Any) -> dict[str, torch.Tensor]:
    """Rows [chosen...; rejected...], right-padded; labels score the response only, as TRL's completion_mask."""
    rows = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    ids, masks = [], []
    for prompt, response in rows:
        prompt_ids = tokenizer(prompt).input_ids
        response_ids = [*tokenizer(response).input_ids, tokenizer.eos_token_id]
        ids.append(prompt_ids + response_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(response_ids))
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    completion = torch.tensor([row + [0] * (width - len(row)) for row in masks])
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    labels = input_ids.masked_fill(completion == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "completion_mask": completion,
    }


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


def _accelerator() -> SimpleNamespace:
    same = lambda tensor: tensor  # noqa: E731 -- one process: gathering is the identity
    return SimpleNamespace(
        device=torch.device("cpu"), unwrap_model=same, gather=same, gather_for_metrics=same
    )


def _trl_dpo(model: Any, batch: dict[str, torch.Tensor], loss_types: list[str], weights: list[float], **kw):
    """TRL's `DPOTrainer._compute_loss`, called unbound on a namespace holding the attributes it reads (a real
    trainer would need a dataset, TrainingArguments and an Accelerator). Returns (loss, logged metrics)."""
    pytest.importorskip("trl")  # the dev extra
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_trl_fused", False):  # what DPOTrainer.__init__ does to a PEFT model
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        model._trl_fused = True
    trainer = SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=_accelerator(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **kw,
    )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _reference(kind: ReferenceKind, model: Any, adapter: Path | None = None) -> reference_model.Reference:
    """Built as the recipe builds it: prepared before DeepSpeed, placed after (ZeRO-0 here: no engine)."""
    ref = reference_model.prepare(kind, model, adapter)
    ref.place(model, {"zero_optimization": {"stage": 0}}, torch.device("cpu"))
    return ref


def _ours(model: Any, batch: dict[str, torch.Tensor]) -> tuple[SequenceLogps, ...]:
    inputs = _model_inputs(batch)
    ref_chosen, ref_rejected = _reference("adapter_disabled", model).logps(inputs).split()
    policy_chosen, policy_rejected = sequence_logps(model, inputs, chunk_tokens=5).split()
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_chunked_logps_equal_a_full_logits_gather_and_train_only_lora(tiny_dir, tokenizer) -> None:
    model, batch = _policy(tiny_dir), _pairs(tokenizer)
    ours = sequence_logps(model, _model_inputs(batch), chunk_tokens=5)  # several chunks and a remainder
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    scored = targets != IGNORE_INDEX
    # Sums of ~16 tokens at ~-7 each: 1e-6 relative is a few fp32 ulps of the sum.
    torch.testing.assert_close(ours.logps.detach(), (per_token * scored).sum(1), rtol=1e-6, atol=1e-5)
    assert ours.tokens.tolist() == scored.sum(1).tolist()
    assert torch.equal(ours.tokens, batch["completion_mask"].sum(1))  # no response starts at position 0

    ours.logps.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    assert all(grad.abs().max() > 0 for grad in grads.values())
    assert len(grads) == sum(p.requires_grad for p in model.parameters())


def test_which_reference_each_method_gets() -> None:
    from tuneplane.spec import DpoMethod, FullMethod, LoraMethod, OrpoMethod

    table = [
        (DpoMethod(), False, "adapter_disabled"),
        (DpoMethod(), True, "starting_adapter"),
        (DpoMethod(base="full"), False, "frozen_copy"),
        (DpoMethod(base="full"), True, "frozen_copy"),  # the copy is taken after the adapter is merged
        (OrpoMethod(), True, None),
        (LoraMethod(), False, None),
        (FullMethod(), False, None),
    ]
    for method, from_adapter, kind in table:
        assert method.reference_kind(starts_from_adapter=from_adapter) == kind, (method, from_adapter)


def test_adapter_disabled_reference_is_the_base_model_without_gradients(tiny_dir, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model, batch = _policy(tiny_dir), _model_inputs(_pairs(tokenizer))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    ref = _reference("adapter_disabled", model).logps(batch)
    assert not ref.logps.requires_grad
    torch.testing.assert_close(ref.logps, sequence_logps(base, batch).logps.detach(), rtol=1e-6, atol=1e-5)
    policy = sequence_logps(model, batch).logps.detach()
    assert (policy - ref.logps).abs().min() > 1e-3  # the adapters are back on after the reference pass


def test_starting_adapter_reference_stays_the_sft_model_while_the_policy_trains(
    tiny_dir, tokenizer, tmp_path
) -> None:
    """SFT -> DPO: the reference is base + the SFT adapter (not the raw base), frozen; only the trained copy
    gets gradients, and only it is saved."""
    sft = _policy(tiny_dir)
    sft.save_pretrained(str(tmp_path / "sft"))
    batch = _model_inputs(_pairs(tokenizer))
    sft_logps = sequence_logps(sft, batch).logps.detach()
    config = tmp_path / "sft" / "adapter_config.json"  # as SFT jobs train: with LoRA dropout
    config.write_text(json.dumps(json.loads(config.read_text()) | {"lora_dropout": 0.5}))

    model = _policy(tiny_dir, adapter=tmp_path / "sft")
    ref = _reference("starting_adapter", model, tmp_path / "sft")
    model.train()  # as the recipe trains it (PEFT's load_adapter left it in eval mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    torch.testing.assert_close(ref.logps(batch).logps, sft_logps, rtol=1e-6, atol=1e-5)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # reference pass first, as the recipe does, then the policy's forward and backward
        ref_logps = ref.logps(batch).logps
        sequence_logps(model, batch).logps.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(ref_logps, sft_logps, rtol=1e-6, atol=1e-5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert (sequence_logps(model, batch).logps.detach() - sft_logps).abs().max() > 1e-2  # the policy moved

    _write_model(model, tokenizer, tmp_path / "out")
    saved = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("adapter_*")}
    assert saved == {"adapter_model.safetensors", "adapter_config.json"}  # not the frozen reference


def test_frozen_copy_reference_keeps_the_starting_weights_of_a_full_finetune(tiny_dir, tokenizer) -> None:
    torch.manual_seed(0)
    model = load_model(_spec(tiny_dir, {"type": "full"}), on_gpu=False).train()
    batch = _model_inputs(_pairs(tokenizer))
    start = sequence_logps(model, batch).logps.detach()
    ref = _reference("frozen_copy", model)
    assert ref.model is not model and not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    torch.testing.assert_close(ref.logps(batch).logps, start, rtol=1e-6, atol=1e-5)
    assert (sequence_logps(model, batch).logps.detach() - start).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("loss", "sft_weight", "beta"), [("sigmoid", 0.0, 0.1), ("ipo", 0.0, 0.5), ("sigmoid", 0.7, 0.2)]
)
def test_dpo_ipo_and_rpo_equal_trl(tiny_dir, tokenizer, loss, sft_weight, beta) -> None:
    model, batch = _policy(tiny_dir), _pairs(tokenizer)
    terms = preference_loss(*_ours(model, batch), beta=beta, loss=loss, sft_weight=sft_weight)
    types, weights = ([loss, "sft"], [1.0, sft_weight]) if sft_weight else ([loss], [1.0])
    trl_loss, trl = _trl_dpo(model, batch, types, weights, beta=beta, label_smoothing=0.0)
    assert terms.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    mine = preference_metrics(terms)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert mine[name] == pytest.approx(trl[name], abs=1e-5), name
    assert mine["rewards/margin"] == pytest.approx(trl["rewards/margins"], abs=1e-5)
    assert mine["rewards/accuracy"] == trl["rewards/accuracies"]
    assert 0 < mine["rewards/accuracy"] < 1 or loss == "ipo"  # the adapters prefer some pairs, not all
    assert (terms.nll is not None) == bool(sft_weight)


def test_conservative_dpo_equals_trl_label_smoothing_per_pair(tiny_dir, tokenizer) -> None:
    """TRL 1.16's `sigmoid` ignores label_smoothing; its `aot` loss is the conservative-DPO expression, and on
    a single pair its sorting is the identity, so each pair is checked on its own."""
    model, batch = _policy(tiny_dir), _pairs(tokenizer)
    terms = preference_loss(*_ours(model, batch), beta=0.3, loss="sigmoid", label_smoothing=0.2)
    plain = preference_loss(*_ours(model, batch), beta=0.3, loss="sigmoid")
    assert not torch.allclose(terms.losses, plain.losses)
    pairs = len(PAIRS)
    for i in range(pairs):
        one = {key: value[[i, pairs + i]] for key, value in batch.items()}
        trl_loss, trl = _trl_dpo(model, one, ["aot"], [1.0], beta=0.3, label_smoothing=0.2)
        assert terms.losses[i].item() == pytest.approx(trl_loss.item(), abs=1e-5)
        assert terms.chosen_rewards[i].item() == pytest.approx(trl["rewards/chosen"], abs=1e-5)
        assert terms.rejected_rewards[i].item() == pytest.approx(trl["rewards/rejected"], abs=1e-5)


def test_orpo_equals_trl(tiny_dir, tokenizer) -> None:
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model, batch = _policy(tiny_dir), _pairs(tokenizer)
    pairs = len(PAIRS)
    chosen, rejected = sequence_logps(model, _model_inputs(batch), chunk_tokens=5).split()
    # TRL's ORPO scores the chosen NLL over prompt and response (the paper: response only); the caller decides.
    whole = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    nll = causal_lm_loss(model, {"input_ids": batch["input_ids"][:pairs], "labels": whole[:pairs]})
    terms = orpo_loss(chosen.mean(), rejected.mean(), nll, beta=0.25)

    trainer = SimpleNamespace(
        beta=0.25,
        is_encoder_decoder=False,
        padding_value=tokenizer.pad_token_id,
        aux_loss_enabled=False,
        accelerator=_accelerator(),
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    trainer.concatenated_forward = MethodType(ORPOTrainer.concatenated_forward, trainer)
    trainer.odds_ratio_loss = MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    inputs = {
        f"{side}_{key}": batch[key][rows]
        for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None)))
        for key in ("input_ids", "attention_mask", "labels")
    }
    trl_loss, trl = ORPOTrainer.get_batch_loss_metrics(trainer, model, inputs)
    assert terms.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    mine = preference_metrics(terms)
    assert mine["nll"] == pytest.approx(trl["nll_loss"], abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert mine[name] == pytest.approx(trl[name], abs=1e-5), name
