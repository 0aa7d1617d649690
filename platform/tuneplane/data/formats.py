"""Record layouts -> one canonical conversation.

Every supported format (alpaca, OpenAI messages, ShareGPT, prompt/completion, FLAN-style labeled records)
becomes a `Conversation`: an optional system prompt and alternating user/assistant turns. Templates then
render only this one shape. A `preference` record becomes a `PreferencePair`: the context (a conversation
ending with a user turn) and two responses, chosen and rejected.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tuneplane.errors import FormatError
from tuneplane.spec import SourceSpec

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    # Alpaca's optional `input`: kept apart so the alpaca template can give it its own section.
    context: str = ""

    def text(self) -> str:
        return f"{self.content}\n\n{self.context}" if self.context else self.content


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]

    @property
    def responses(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "assistant"]


@dataclass(frozen=True, slots=True)
class PreferencePair:
    context: Conversation  # ends with the user turn both responses answer
    chosen: str
    rejected: str

    def conversation(self, side: Literal["chosen", "rejected"] = "chosen") -> Conversation:
        response = self.chosen if side == "chosen" else self.rejected
        return Conversation((*self.context.messages, Message("assistant", response)))


_SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}


def to_conversation(
    record: Mapping[str, Any], source: SourceSpec, key: str, seed: int, system_prompt: str | None = None
) -> Conversation:
    """Convert one decoded record; `key` (uri:line) seeds the template draw so it is order-independent."""
    fmt = source.format
    if fmt == "alpaca":
        messages = [
            Message(
                "user", _text(record, source, "instruction"), _text(record, source, "input", required=False)
            ),
            Message("assistant", _text(record, source, "output")),
        ]
    elif fmt == "prompt_completion":
        messages = [
            Message("user", _text(record, source, "prompt", strip=False)),
            Message("assistant", _text(record, source, "completion", strip=False)),
        ]
    elif fmt == "messages":
        messages = _turns(_field(record, source, "messages"), source, "messages", "role", "content", None)
    elif fmt == "sharegpt":
        messages = _turns(
            _field(record, source, "conversations"), source, "conversations", "from", "value", _SHAREGPT_ROLES
        )
    elif fmt == "labeled":
        messages = _from_template(record, source, key, seed)
    elif fmt == "preference":
        # As one conversation a pair is its chosen side: what duplicate and contamination checks compare.
        return to_preference(record, source, key, seed, system_prompt).conversation("chosen")
    else:  # pragma: no cover - the spec's Literal already restricts this
        raise FormatError(f"unknown format {fmt!r}")
    if system_prompt and messages[0].role != "system":
        messages.insert(0, Message("system", system_prompt))
    _check_turn_order(messages, source)
    return Conversation(tuple(messages))


def to_preference(
    record: Mapping[str, Any], source: SourceSpec, key: str, seed: int, system_prompt: str | None = None
) -> PreferencePair:
    """A `preference` record: `prompt` (a string) or `messages` (turns ending with a user turn), plus `chosen`
    and `rejected`, each a string or an assistant message. `key` and `seed` are unused (the signature matches
    `to_conversation`)."""
    if _name(source, "messages") in record:
        messages = _turns(_field(record, source, "messages"), source, "messages", "role", "content", None)
    elif _name(source, "prompt") in record:
        messages = [Message("user", _text(record, source, "prompt", strip=False))]
    else:
        raise FormatError(f"missing field '{_name(source, 'prompt')}' (or '{_name(source, 'messages')}')")
    if system_prompt and messages[0].role != "system":
        messages.insert(0, Message("system", system_prompt))
    _check_turn_order(messages, source, last="user")
    chosen, rejected = _response(record, source, "chosen"), _response(record, source, "rejected")
    if chosen == rejected:
        raise FormatError(
            f"'{_name(source, 'chosen')}' and '{_name(source, 'rejected')}' are identical: nothing to prefer"
        )
    return PreferencePair(Conversation(tuple(messages)), chosen, rejected)


def _response(record: Mapping[str, Any], source: SourceSpec, field: str) -> str:
    """One side of a pair: a string, or an OpenAI-style assistant message {role, content}."""
    name = _name(source, field)
    value = record.get(name)
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise FormatError(f"{name}.role: expected 'assistant', got {value.get('role')!r}")
        value = value.get("content")
        name = f"{name}.content"
    if value is None:
        raise FormatError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise FormatError(
            f"field '{name}' must be a string or an assistant message, got {type(value).__name__}"
        )
    if not value.strip():
        raise FormatError(f"field '{name}' is empty")
    return value


def _name(source: SourceSpec, field: str) -> str:
    return source.fields.get(field, field)


def _field(record: Mapping[str, Any], source: SourceSpec, field: str) -> Any:
    name = _name(source, field)
    if name not in record:
        raise FormatError(f"missing field '{name}'")
    return record[name]


def _text(
    record: Mapping[str, Any], source: SourceSpec, field: str, required: bool = True, strip: bool = True
) -> str:
    name = _name(source, field)
    value = record.get(name)
    if value is None:
        if required:
            raise FormatError(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise FormatError(f"field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise FormatError(f"field '{name}' is empty")
    return value.strip() if strip else value


def _turns(
    value: Any, source: SourceSpec, field: str, role_key: str, text_key: str, role_map: dict[str, Role] | None
) -> list[Message]:
    name = _name(source, field)
    if not isinstance(value, list) or not value:
        raise FormatError(f"field '{name}' must be a non-empty list of turns")
    out: list[Message] = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise FormatError(f"{where} must be an object, got {type(turn).__name__}")
        raw_role, text = turn.get(role_key), turn.get(text_key)
        role = (role_map or {"system": "system", "user": "user", "assistant": "assistant"}).get(str(raw_role))
        if role is None:
            raise FormatError(f"{where}.{role_key}: unknown role {raw_role!r}")
        if not isinstance(text, str):
            raise FormatError(f"{where}.{text_key} must be a string, got {type(text).__name__}")
        if role == "assistant" and not text.strip():
            raise FormatError(f"{where}.{text_key}: empty response")
        out.append(Message(role, text))
    return out


def _check_turn_order(
    messages: list[Message], source: SourceSpec, last: Literal["user", "assistant"] = "assistant"
) -> None:
    body = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise FormatError("a system message may only come first")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise FormatError(
                f"turn {i + 1} should be '{expected}', got '{message.role}' (turns must alternate)"
            )
    if not body or body[-1].role != last:
        ends = (
            "an assistant response" if last == "assistant" else "a user turn (the one the responses answer)"
        )
        raise FormatError(f"the conversation must end with {ends}")


def _from_template(record: Mapping[str, Any], source: SourceSpec, key: str, seed: int) -> list[Message]:
    # A stable per-record draw: the same record gets the same template whatever the read order or rank.
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    template = random.Random(int.from_bytes(digest, "little")).choice(source.templates)
    missing = [f for f in template.fields() if _name(source, f) not in record]
    if missing:
        raise FormatError(f"missing field '{_name(source, missing[0])}' used by the template")
    values = {f: _stringify(record[_name(source, f)]) for f in template.fields()}
    prompt, response = template.prompt.format(**values), template.response.format(**values)
    if not response.strip():
        raise FormatError("empty response after applying the template")
    return [Message("user", prompt), Message("assistant", response)]


def _stringify(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
