"""Build a tiny random-weight model and a byte-level BPE tokenizer locally (no hub access needed).

Tests, the demo job and the benchmarks use these; everything downstream loads them with the real
`from_pretrained` code, from a path or an object-storage URI, exactly as it would a real checkpoint. The
default is a Llama; `--family` builds another family's real transformers class (FAMILY_PRESETS, the families
of tuneplane.families), all with the same tokenizer.

    python -m tuneplane.devtools.tiny build/tiny-llama
    python -m tuneplane.devtools.tiny --family gpt-neox build/tiny-gpt-neox
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "jobs" / "data"


def _corpus(data_dir: Path) -> Iterator[str]:
    for path in sorted(data_dir.rglob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                yield from (v for v in _strings(json.loads(line)))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def build_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer (the Llama-3 / GPT-2 family) and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneplane.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_WITH_INPUT

    texts = list(corpus if corpus is not None else _corpus(DEFAULT_DATA))
    texts += [
        ALPACA_PREAMBLE,
        ALPACA_PREAMBLE_WITH_INPUT,
        "### Instruction:\n### Input:\n### Response:\n",
    ] * 50
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
_GEMMA = {"query_pre_attn_scalar": 16, "sliding_window": 64}
# Each family as its checkpoints come: (config.json model_type, what differs from a Llama's config).
FAMILY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("llama", {}),
    "qwen2.5": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", _MOE),
    "qwen3-moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "gemma2": ("gemma2", _GEMMA),
    "gemma3": ("gemma3_text", _GEMMA),
    "gemma3-multimodal": (
        "gemma3",
        _GEMMA,
    ),  # the text config goes inside the wrapper's, beside a vision tower
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "gpt-neox": ("gpt_neox", {}),
    "granite": ("granite", {}),
    "granite-moe": ("granitemoe", _MOE),
}


def family_config(family: str, tokenizer, hidden_size: int = 64, layers: int = 2) -> Any:
    """The transformers config of a tiny model of `family` (a FAMILY_PRESETS key)."""
    from transformers import AutoConfig

    model_type, extra = FAMILY_PRESETS[family]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **extra,
    }
    if model_type != "gemma3":
        return AutoConfig.for_model(model_type, **text)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4,
        tie_word_embeddings=False,
    )


def build_model(
    out_dir: str | Path,
    tokenizer,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    family: str = "llama3",
):
    """A randomly initialised model of `family` sized for CPU tests; saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer, hidden_size, layers))
    model.save_pretrained(str(out_dir))
    return model


def build(
    out_dir: str | Path,
    with_model: bool = True,
    hidden_size: int = 64,
    layers: int = 2,
    family: str = "llama3",
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    if with_model:
        build_model(out, tokenizer, hidden_size=hidden_size, layers=layers, family=family)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer-only", action="store_true")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--family", choices=sorted(FAMILY_PRESETS), default="llama3")
    args = parser.parse_args()
    out = build(args.out_dir, not args.tokenizer_only, args.hidden_size, args.layers, args.family)
    print(f"tiny {args.family} written to {out}")


if __name__ == "__main__":
    main()
