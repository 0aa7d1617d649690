"""Generation as training renders it, shared by zero-shot evaluation and the model consumers load, so that what
is measured is what consumers get: the same prompt tokens, the same stop tokens, the same decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tuneplane.data.formats import Conversation
from tuneplane.data.templates import IGNORE_INDEX, SegmentTokenizer, render
from tuneplane.spec import TemplateName

GENERATION_BATCH = 8
# End-of-turn markers of the chat templates (chatml, llama3); the tokenizer's EOS is always a stop too.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in vocab] + [tokenizer.eos_token_id]


def prompt_ids(
    conversation: Conversation,
    template: TemplateName,
    tokenizer: Any,
    segments: SegmentTokenizer | None = None,
) -> list[int]:
    """The tokens a model gets to write the conversation's first assistant turn: everything before that
    turn's first trained token, rendered and masked exactly as in training."""
    first = next(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    single = Conversation(conversation.messages[: first + 1])
    ids, labels = (segments or SegmentTokenizer(tokenizer)).encode([render(single, template, tokenizer)])[0]
    return ids[: int(np.argmax(labels != IGNORE_INDEX))].tolist()


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: Any = None,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy answers to a batch of prompts (left-padded, so every row continues from its own last token),
    decoded without special tokens and stripped of surrounding whitespace."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device) if device is not None else ids,
            attention_mask=mask.to(device) if device is not None else mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=pad,
            synced_gpus=synced_gpus,
        )
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True).strip() for row in out]
