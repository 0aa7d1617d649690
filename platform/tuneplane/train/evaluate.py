"""Evaluation inside the workers: eval loss on held-out data, zero-shot exact match on held-out tasks.

Both are collective: every rank evaluates its share and the results are summed, so they work the same under
ZeRO-3 (where generation must run in lockstep on all ranks: `synced_gpus`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.data import InstructionStream
from tuneplane.data.formats import to_conversation
from tuneplane.data.records import expand, read_records
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer
from tuneplane.errors import FormatError
from tuneplane.generation import GENERATION_BATCH, generate, prompt_ids
from tuneplane.spec import TuningSpec, effective_zero_stage
from tuneplane.train.loss import causal_lm_loss


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
        loss = causal_lm_loss(engine, batch.to_torch(device))
        total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {"eval_loss": (total[0] / total[1]).item() if total[1] > 0 else float("nan")}


def load_zero_shot_examples(spec: TuningSpec, tokenizer: Any) -> dict[str, list[tuple[list[int], str]]]:
    """Per held-out task, up to `eval.max_examples` (prompt tokens, expected answer) pairs."""
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
                    conversation = to_conversation(
                        record.data, source, record.key, spec.hyperparameters.seed, spec.data.system_prompt
                    )
                except FormatError:
                    continue
                prompt = prompt_ids(conversation, spec.data.template, tokenizer, segments)
                examples.append((prompt, conversation.responses[0]))
    return tasks


@torch.no_grad()
def zero_shot(
    engine: Any, spec: TuningSpec, tokenizer: Any, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Greedy generation on tasks never trained on; exact match after stripping whitespace."""
    model = engine.module
    model.eval()
    # ZeRO-3 gathers weights collectively: every rank runs the same number of generate calls, in lockstep.
    synced = effective_zero_stage(spec.distributed, world) == 3 and world > 1
    results: dict[str, float] = {}
    for task, examples in load_zero_shot_examples(spec, tokenizer).items():
        mine = examples[rank::world]
        rounds = math.ceil(math.ceil(len(examples) / world) / GENERATION_BATCH)
        correct = 0
        for r in range(rounds):
            chunk = mine[r * GENERATION_BATCH : (r + 1) * GENERATION_BATCH]
            prompts = [p for p, _ in chunk] or [examples[0][0]]  # a rank with nothing left still generates
            answers = generate(model, tokenizer, prompts, spec.eval.max_new_tokens, device, synced)
            # zip stops at `chunk`: answers to the stand-in prompt of a rank with nothing left are not scored
            correct += sum(int(a == want.strip()) for a, (_, want) in zip(answers, chunk, strict=False))
        counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        results[task] = (counts[0] / counts[1]).item() if counts[1] else 0.0
    if results:
        results["mean"] = float(np.mean(list(results.values())))
    return results
