"""Prompt templates: a conversation -> token ids and labels, with prompts masked.

A template renders a conversation as *segments*: text pieces marked trainable (assistant responses and
their end-of-turn token) or not. Segments are tokenized separately and concatenated, so the trainable
tokens decode to exactly the responses. Record text is tokenized with special tokens treated as plain
text: data cannot inject control tokens; only the template's own scaffolding produces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneplane.data.formats import Conversation, PreferencePair
from tuneplane.errors import FormatError
from tuneplane.spec import TemplateName

IGNORE_INDEX = -100

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True, slots=True)
class Segment:
    text: str
    trainable: bool
    literal: bool  # record text: special-token strings inside it are NOT turned into special tokens


def render(conversation: Conversation, template: TemplateName, tokenizer: Any) -> list[Segment]:
    if template == "tokenizer":
        return _render_chat_template(conversation, tokenizer)
    return _RENDERERS[template](conversation, tokenizer)


def render_pair(
    pair: PreferencePair, template: TemplateName, tokenizer: Any
) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """A preference pair -> (prompt, chosen, rejected) segments; prompt + side renders as `render` renders
    that side's conversation. Only the final response is trainable: assistant turns inside the context are
    masked. The prompt is taken from the chosen rendering, and the rejected one must render the very same
    prompt (built-in templates always do; a tokenizer chat template that looks at the last answer while
    rendering earlier text is refused), so both sides share identical prompt tokens."""
    prompt, chosen = _split_last_response(render(pair.conversation("chosen"), template, tokenizer))
    other, rejected = _split_last_response(render(pair.conversation("rejected"), template, tokenizer))
    if other != prompt:
        raise FormatError("the template renders the prompt differently for chosen and rejected")
    return [Segment(s.text, False, s.literal) for s in prompt], chosen, rejected


def _split_last_response(segments: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    # Every renderer emits a response's text as one trainable record-text segment; the last one starts the
    # final answer.
    start = max(i for i, s in enumerate(segments) if s.trainable and s.literal)
    return segments[:start], segments[start:]


def _bos(tokenizer: Any) -> list[Segment]:
    return [Segment(tokenizer.bos_token, False, False)] if getattr(tokenizer, "bos_token", None) else []


def _eos(tokenizer: Any) -> Segment:
    if not getattr(tokenizer, "eos_token", None):
        raise FormatError("the tokenizer has no eos_token; responses need one to learn to stop")
    return Segment(tokenizer.eos_token, True, False)


def _render_alpaca(conv: Conversation, tokenizer: Any) -> list[Segment]:
    # Alpaca is single-turn in spirit; later turns are rendered as further Instruction/Response pairs.
    out = _bos(tokenizer)
    system = conv.messages[0].content if conv.messages[0].role == "system" else None
    turns = [m for m in conv.messages if m.role != "system"]
    has_input = any(m.context for m in turns)
    out.append(
        Segment(
            (system or (ALPACA_PREAMBLE_WITH_INPUT if has_input else ALPACA_PREAMBLE)) + "\n\n", False, True
        )
    )
    for message in turns:
        if message.role == "user":
            out += [Segment("### Instruction:\n", False, False), Segment(message.content, False, True)]
            if message.context:
                out += [Segment("\n\n### Input:\n", False, False), Segment(message.context, False, True)]
            out.append(Segment("\n\n### Response:\n", False, False))
        else:
            out += [Segment(message.content, True, True), _eos(tokenizer), Segment("\n\n", False, False)]
    return _drop_trailing_scaffold(out)


def _render_flan(conv: Conversation, tokenizer: Any) -> list[Segment]:
    # FLAN's zero-shot style: the instruction as plain text, the answer right after, no role markers.
    out = _bos(tokenizer)
    for message in conv.messages:
        if message.role == "assistant":
            out += [Segment(message.content, True, True), _eos(tokenizer), Segment("\n\n", False, False)]
        else:
            out += [Segment(message.text(), False, True), Segment("\n\n", False, False)]
    return _drop_trailing_scaffold(out)


def _render_chatml(conv: Conversation, tokenizer: Any) -> list[Segment]:
    out: list[Segment] = []
    for message in conv.messages:
        out.append(Segment(f"<|im_start|>{message.role}\n", False, False))
        if message.role == "assistant":
            out += [
                Segment(message.content, True, True),
                Segment("<|im_end|>", True, False),
                Segment("\n", False, False),
            ]
        else:
            out += [Segment(message.text(), False, True), Segment("<|im_end|>\n", False, False)]
    return _drop_trailing_scaffold(out)


def _render_llama3(conv: Conversation, tokenizer: Any) -> list[Segment]:
    out = [Segment("<|begin_of_text|>", False, False)]
    for message in conv.messages:
        out.append(Segment(f"<|start_header_id|>{message.role}<|end_header_id|>\n\n", False, False))
        if message.role == "assistant":
            out += [Segment(message.content, True, True), Segment("<|eot_id|>", True, False)]
        else:
            out += [Segment(message.text(), False, True), Segment("<|eot_id|>", False, False)]
    return out


def _drop_trailing_scaffold(segments: list[Segment]) -> list[Segment]:
    while segments and not segments[-1].trainable and not segments[-1].literal:
        segments.pop()
    return segments


def _render_chat_template(conv: Conversation, tokenizer: Any) -> list[Segment]:
    """Use the tokenizer's own chat template; response spans are found by rendering prefixes.

    render(messages[:i], add_generation_prompt) must be a prefix of render(messages[:i+1]); the difference is
    the assistant turn. Inside it, the response text and the end-of-turn special token right after it are
    trainable; anything else the template adds stays masked.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError("template 'tokenizer' chosen but the tokenizer has no chat_template")
    msgs = [{"role": m.role, "content": m.text()} for m in conv.messages]
    out: list[Segment] = []
    done = ""
    specials = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    for i, message in enumerate(conv.messages):
        if message.role != "assistant":
            continue
        prompt = _apply_chat_template(tokenizer, msgs[:i], add_generation_prompt=True)
        full = _apply_chat_template(tokenizer, msgs[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FormatError(
                "the tokenizer's chat template is not prefix-stable; choose a built-in template"
            )
        out.append(Segment(prompt[len(done) :], False, False))
        turn = full[len(prompt) :]
        content = message.content if message.content in turn else message.content.strip()
        start = turn.find(content)
        if start < 0:
            raise FormatError(
                "the tokenizer's chat template rewrites the response text; choose a built-in template"
            )
        after = turn[start + len(content) :]
        end = next((len(tok) for tok in specials if after.lstrip(" ").startswith(tok)), 0)
        end += len(after) - len(after.lstrip(" ")) if end else 0
        out += [
            Segment(turn[:start], False, False),
            Segment(content, True, True),
            Segment(after[:end], True, False),
            Segment(after[end:], False, False),
        ]
        done = full
    return [s for s in out if s.text]


def _apply_chat_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """The tokenizer's chat template rendered: a team's own Jinja, which transformers renders in Jinja's
    immutable sandbox (tested); a template that fails or reaches for Python's internals is a bad record."""
    import jinja2

    try:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except jinja2.TemplateError as exc:
        raise FormatError(f"the tokenizer's chat template failed: {type(exc).__name__}: {exc}") from None
    return text


_RENDERERS = {
    "alpaca": _render_alpaca,
    "flan": _render_flan,
    "chatml": _render_chatml,
    "llama3": _render_llama3,
}


# -- the same templates as Jinja chat templates, for consumers that render prompts themselves ---------------
# Written into the published tokenizer, so vLLM, TGI or `tokenizer.apply_chat_template` prompt the tuned model
# exactly as training did. Exact (same text) for a generation prompt and for a conversation that ends with an
# assistant turn; alpaca's `input` travels as an extra `input` key of a user message. Not reproducible in
# Jinja: record text is tokenized with special-token strings as plain text, so a message that contains
# "<|im_end|>" gets different ids from a chat template (which turns it into the special token).

_INPUT = "(m['input'] is defined and m['input'])"
_BOS = "{%- if bos_token %}{{ bos_token }}{% endif %}"  # as `_bos`: only a tokenizer that has one
_TEXT = f"(m['content'] + ('\\n\\n' + m['input'] if {_INPUT} else ''))"  # Message.text()

_CHAT_TEMPLATES = {
    "alpaca": (
        "{%- set ns = namespace(has_input=false) -%}"
        f"{{%- for m in messages if m['role'] != 'system' and {_INPUT} %}}{{% set ns.has_input = true %}}"
        "{% endfor -%}"
        f"{_BOS}"
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] %}"
        "{{ messages[0]['content'] }}"
        f"{{%- elif ns.has_input %}}{{{{ {ALPACA_PREAMBLE_WITH_INPUT!r} }}}}"
        f"{{%- else %}}{{{{ {ALPACA_PREAMBLE!r} }}}}{{%- endif %}}"
        "{{ '\\n\\n' }}"
        "{%- for m in messages if m['role'] != 'system' %}"
        "{%- if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] }}"
        f"{{%- if {_INPUT} %}}{{{{ '\\n\\n### Input:\\n' + m['input'] }}}}{{%- endif %}}"
        "{%- else %}{{ '\\n\\n### Response:\\n' + m['content'] + eos_token }}"
        "{%- if not loop.last %}{{ '\\n\\n' }}{% endif %}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "flan": (
        f"{_BOS}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{%- if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        f"{{%- else %}}{{{{ {_TEXT} }}}}"
        "{%- if not loop.last or add_generation_prompt %}{{ '\\n\\n' }}{% endif %}{%- endif %}"
        "{%- endfor %}"
    ),
    "chatml": (
        "{%- for m in messages %}"
        "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>' }}"
        "{%- if not loop.last %}{{ '\\n' }}{% endif %}"
        f"{{%- else %}}{{{{ '<|im_start|>' + m['role'] + '\\n' + {_TEXT} + '<|im_end|>\\n' }}}}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{%- for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if m['role'] == 'assistant' %}{{ m['content'] }}"
        f"{{%- else %}}{{{{ {_TEXT} }}}}{{%- endif %}}"
        "{{ '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def chat_template(template: TemplateName, tokenizer: Any, system_prompt: str | None = None) -> str | None:
    """A Jinja chat template that renders as `render` does (see above); for `tokenizer`, the tokenizer's own.
    With `system_prompt` (the spec's `data.system_prompt`) it adds that system message where a conversation
    has none, as training did."""
    found = (
        getattr(tokenizer, "chat_template", None) if template == "tokenizer" else _CHAT_TEMPLATES[template]
    )
    if not found or not system_prompt:
        return found or None
    # repr() is a valid Jinja string literal: Jinja decodes its escapes as Python does.
    default = f"[{{'role': 'system', 'content': {system_prompt!r}}}] + messages"
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = {default} %}}{{%- endif %}}" + found
    )


class SegmentTokenizer:
    """Batch-tokenizes segment lists with the fast (Rust) tokenizer: two calls per batch, not one per segment."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            raise TypeError("a fast (Rust-backed) Hugging Face tokenizer is required")
        self._scaffold = backend
        # A copy that treats special-token strings in record text as ordinary text.
        self._literal = type(backend).from_str(backend.to_str())
        self._literal.encode_special_tokens = True

    def encode(self, examples: Sequence[list[Segment]]) -> list[tuple[np.ndarray, np.ndarray]]:
        flat = [(i, s) for i, segments in enumerate(examples) for s in segments]
        literal_texts = [s.text for _, s in flat if s.literal]
        scaffold_texts = [s.text for _, s in flat if not s.literal]
        literal_ids = iter(_encode(self._literal, literal_texts))
        scaffold_ids = iter(_encode(self._scaffold, scaffold_texts))
        ids: list[list[int]] = [[] for _ in examples]
        train: list[list[bool]] = [[] for _ in examples]
        for i, segment in flat:
            piece = next(literal_ids) if segment.literal else next(scaffold_ids)
            ids[i].extend(piece)
            train[i].extend([segment.trainable] * len(piece))
        out = []
        for example_ids, example_train in zip(ids, train, strict=True):
            input_ids = np.asarray(example_ids, dtype=np.int32)
            labels = np.where(np.asarray(example_train, dtype=bool), input_ids, IGNORE_INDEX).astype(np.int32)
            out.append((input_ids, labels))
        return out


def _encode(backend: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    fast = getattr(backend, "encode_batch_fast", None)
    encodings = (fast or backend.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encodings]
