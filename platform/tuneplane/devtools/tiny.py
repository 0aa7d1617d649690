"""Build a tiny Llama-architecture model and byte-level BPE tokenizer locally (no hub access needed).

Tests, the demo job and the benchmarks use these; everything downstream loads them with the real
`from_pretrained` code, from a path or an object-storage URI, exactly as it would a real checkpoint.

    python -m tuneplane.devtools.tiny build/tiny-llama
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def build_model(out_dir: str | Path, tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for CPU tests; saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return model


def build(out_dir: str | Path, with_model: bool = True, hidden_size: int = 64, layers: int = 2) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    if with_model:
        build_model(out, tokenizer, hidden_size=hidden_size, layers=layers)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer-only", action="store_true")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    out = build(args.out_dir, not args.tokenizer_only, args.hidden_size, args.layers)
    print(f"tiny Llama written to {out}")


if __name__ == "__main__":
    main()
