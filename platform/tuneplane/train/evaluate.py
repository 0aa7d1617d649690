"""Evaluation inside the workers: eval loss on held-out data, zero-shot exact match on held-out tasks.

Both are collective: every rank evaluates its share and the results are summed, so they work the same under
ZeRO-3 (where generation must run in lockstep on all ranks: `synced_gpus`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.data import InstructionStream
from tuneplane.data.formats import Conversation, FormatError, to_conversation
from tuneplane.data.records import expand, read_records
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
from tuneplane.spec import SourceSpec, TuningSpec

GENERATION_BATCH = 8
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


@torch.no_grad()
def eval_loss(
    engine: Any, spec: TuningSpec, tokenizer: Any, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Token-weighted mean loss over the eval split (eval_sources, or the holdout share of the sources)."""
    engine.eval()
    stream = InstructionStream(
        spec.data,
        tokenizer,
        seed=spec.hyperparameters.seed,
        rank=rank,
        world_size=world,
        micro_batch_size=spec.hyperparameters.micro_batch_size,
        split="eval",
    )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter(stream)
    limit = spec.eval.max_batches or 10**9
    for _ in range(limit):
        batch = next(batches, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            break
        assert batch is not None
        tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        loss = engine(**batch.to_torch(device), use_cache=False).loss
        total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {"eval_loss": (total[0] / total[1]).item() if total[1] > 0 else float("nan")}


def _prompt_and_answer(
    record: dict[str, Any],
    source: SourceSpec,
    key: str,
    spec: TuningSpec,
    tokenizer: Any,
    segments: SegmentTokenizer,
) -> tuple[list[int], str]:
    conversation = to_conversation(record, source, key, spec.hyperparameters.seed, spec.data.system_prompt)
    first_answer = next(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    single = Conversation(conversation.messages[: first_answer + 1])
    ids, labels = segments.encode([render(single, spec.data.template, tokenizer)])[0]
    start = int(np.argmax(labels != IGNORE_INDEX))
    return ids[:start].tolist(), single.responses[0]


def load_zero_shot_examples(spec: TuningSpec, tokenizer: Any) -> dict[str, list[tuple[list[int], str]]]:
    segments = SegmentTokenizer(tokenizer)
    tasks: dict[str, list[tuple[list[int], str]]] = {}
    for source in spec.eval.zero_shot_sources:
        examples = tasks.setdefault(source.display_name, [])
        for uri in expand(source.uri):
            for record in read_records(uri):
                if len(examples) >= spec.eval.max_examples:
                    break
                if record.data is None:
                    continue
                try:
                    examples.append(
                        _prompt_and_answer(record.data, source, record.key, spec, tokenizer, segments)
                    )
                except FormatError:
                    continue
    return tasks


@torch.no_grad()
def zero_shot(
    engine: Any, spec: TuningSpec, tokenizer: Any, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Greedy generation on tasks never trained on; exact match after stripping whitespace."""
    model = engine.module
    model.eval()
    stop = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tokenizer.get_vocab()]
    stop.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[str, float] = {}
    for task, examples in load_zero_shot_examples(spec, tokenizer).items():
        mine = examples[rank::world]
        per_rank = -(-len(examples) // world)
        rounds = -(-per_rank // GENERATION_BATCH)
        correct = 0
        for r in range(rounds):
            chunk = mine[r * GENERATION_BATCH : (r + 1) * GENERATION_BATCH]
            # Every rank runs the same number of generate calls (ZeRO-3 gathers weights collectively).
            prompts = [p for p, _ in chunk] or [examples[0][0]]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding, so every row generates from its last token
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=spec.eval.max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=pad,
                synced_gpus=spec.distributed.zero_stage == 3 and world > 1,
            )
            for i, (_, answer) in enumerate(chunk):
                text = tokenizer.decode(out[i, width:].tolist(), skip_special_tokens=True)
                correct += int(text.strip() == answer.strip())
        counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        results[task] = (counts[0] / counts[1]).item() if counts[1] else 0.0
    if results:
        results["mean"] = float(np.mean(list(results.values())))
    return results


def check_not_empty(folder: Path) -> None:
    """Fail loudly if a saved model has empty tensors (ZeRO-3 without gathering writes shape-(0,) tensors)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no weights written to {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if handle.get_slice(name).get_shape() in ([], [0]) or 0 in handle.get_slice(name).get_shape():
                    raise RuntimeError(f"{file.name}: tensor {name} is empty; refusing to publish this model")
