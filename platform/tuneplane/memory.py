"""How much memory one GPU of a job needs: an estimate from the spec and the model's shape, before anything runs.

`tuneplane validate` and `POST /v1/validate` show it, admission refuses a job its pool's GPUs cannot hold, and
`model.activation_checkpointing: auto` turns checkpointing on exactly when the estimate without it does not fit.
Pure arithmetic on a `ModelShape` (read from the checkpoint's config.json, or a table of well-known
architectures): no torch here, the API image has none.

Per GPU (one data-parallel rank), for `tokens = data.max_seq_len x hyperparameters.micro_batch_size`:

* weights: every parameter in the spec's dtype, split over the ranks under ZeRO-3 (plus what ZeRO-3 gathers at
  once), none on the GPU with `offload_params`;
* gradients: the trainable parameters' (LoRA: the adapters only), split over the ranks from ZeRO-2 on;
* optimizer: fp32 master weights, fp32 step gradient and AdamW's two moments (16 bytes per trainable parameter
  in mixed precision, the moments' 8 in fp32), split from ZeRO-1 on, on the CPU with `offload_optimizer`;
* activations: what each decoder layer keeps for its backward (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", redone for a Llama block with flash/SDPA attention: no seq^2
  term; frozen weights keep no inputs, LoRA adds its dropout and down-projection inputs); with activation
  checkpointing, one hidden state per layer;
* backward: the largest working set of the backward on top of that: one loss chunk (LOSS_CHUNK_TOKENS
  positions of fp32 logits, `train/loss.py`) or one layer's backward (recomputed, with checkpointing);
* overhead: CUDA context, NCCL and DeepSpeed buffers (GPU only).
"""

from __future__ import annotations

import contextvars
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplane.files import open_local
from tuneplane.spec import (
    FullMethod,
    LoraMethod,
    TuningSpec,
    effective_zero_stage,
    model_location_kind,
)

if TYPE_CHECKING:
    from tuneplane.config import PlatformConfig

LOSS_CHUNK_TOKENS = 4096  # positions the training loss projects onto the vocabulary at once (train/loss.py)
# A loss chunk's backward holds three fp32 [chunk x vocab] tensors at its peak: the log-probabilities kept by
# log_softmax, their gradient and the logits' gradient (measured: 3.06x chunk x vocab x 4 bytes, fp32 and bf16).
LOGITS_COPIES = 3
# CUDA context (~0.6 GiB), NCCL communicators, DeepSpeed's reduce/all-gather buckets, cuBLAS workspaces.
GPU_OVERHEAD_BYTES = 3 << 30
HEADROOM = 0.10  # share of a GPU kept free for allocator fragmentation and what the estimate does not see
ZERO3_LIVE_PARAMS = 10**9  # DeepSpeed's stage3_max_live_parameters: gathered parameters held at once
# bitsandbytes NF4 with double quantisation: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CONFIG_BYTES_MAX = 1 << 20  # a config.json is a few KiB
CONFIG_READ_BUDGET_S = 5.0  # object storage that does not answer in this time is not waited for
_FP32 = 4
_GIB, _MIB = 1 << 30, 1 << 20

PARTS = ("weights", "reference", "gradients", "optimizer", "activations", "backward", "overhead")
# The linears of one decoder layer, by the input they share (LoRA's dropout and down-projection keep one
# tensor per distinct input when dropout is 0, one per adapted linear otherwise).
_INPUTS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_act",
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a Llama-family decoder (Llama, Mistral, Qwen2...)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any] | object) -> ModelShape:
        """From a HF config.json dict or a transformers config object. ValueError when it is not a dense
        decoder this estimate describes (a mixture of experts, a config without the usual fields)."""

        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        if get("num_local_experts") or get("num_experts"):
            raise ValueError("a mixture-of-experts model: the estimate covers dense decoders only")
        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            return cls(
                layers=int(get("num_hidden_layers")),
                hidden=hidden,
                intermediate=int(get("intermediate_size")),
                heads=heads,
                kv_heads=int(get("num_key_value_heads") or heads),
                vocab=int(get("vocab_size")),
                head_dim=int(get("head_dim") or hidden // heads),
                tied_embeddings=bool(get("tie_word_embeddings", False)),
                attention_bias=bool(get("attention_bias", False)) or get("model_type") == "qwen2",
            )
        except (TypeError, ValueError):
            raise ValueError(
                "config without hidden_size, num_hidden_layers, intermediate_size, ..."
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        i = self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden + bias

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden + head


# Well-known architectures, for a model whose config.json cannot be read (a hub id; object storage the control
# plane cannot reach): matched on the location's last path segment, case-insensitively.
_LLAMA3_8B = ModelShape(32, 4096, 14336, 32, 8, 128256, 128)
_LLAMA3_70B = ModelShape(80, 8192, 28672, 64, 8, 128256, 128)
KNOWN_SHAPES: dict[str, tuple[str, ModelShape]] = {
    "llama-3-8b": (r"(meta-)?llama-3(\.\d)?-8b\b", _LLAMA3_8B),
    "llama-3-70b": (r"(meta-)?llama-3(\.\d)?-70b\b", _LLAMA3_70B),
    "llama-2-7b": (r"(meta-)?llama-2-7b\b", ModelShape(32, 4096, 11008, 32, 32, 32000, 128)),
    "llama-2-13b": (r"(meta-)?llama-2-13b\b", ModelShape(40, 5120, 13824, 40, 40, 32000, 128)),
    "mistral-7b": (r"mistral-7b\b", ModelShape(32, 4096, 14336, 32, 8, 32768, 128)),
    "qwen2.5-7b": (r"qwen2\.5-7b\b", ModelShape(28, 3584, 18944, 28, 4, 152064, 128, attention_bias=True)),
}


def known_shape(location: str) -> tuple[str, ModelShape] | None:
    """(name, shape) of the well-known architecture a model location names, by its last path segment."""
    last = location.rstrip("/").rsplit("/", 1)[-1].lower()
    for name, (pattern, shape) in KNOWN_SHAPES.items():
        if re.match(pattern, last):
            return name, shape
    return None


def read_model_config(location: str, budget_s: float = CONFIG_READ_BUDGET_S) -> dict[str, Any]:
    """The config.json of a local folder or object-storage checkpoint (never the hub), read within `budget_s`.
    OSError (or TimeoutError) when it cannot be read, ValueError when it is no JSON object."""
    if model_location_kind(location) == "hub":
        raise OSError("a hub id: the control plane does not reach the hub")
    found: dict[str, Any] = {}

    def read() -> None:
        try:
            found["text"] = _read_config_text(location)
        except Exception as exc:  # the storage client's own errors (credentials, network)
            found["error"] = exc

    # A hung connection must not hold the caller; the thread reads with the caller's confinement (files.py).
    worker = threading.Thread(target=contextvars.copy_context().run, args=(read,), daemon=True)
    worker.start()
    worker.join(budget_s)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {budget_s:g} s")
    if "error" in found:
        raise OSError(f"{type(found['error']).__name__}: {found['error']}")
    data = json.loads(found["text"])
    if not isinstance(data, dict):
        raise ValueError("config.json is not a JSON object")
    return data


def _read_config_text(location: str) -> bytes:
    if model_location_kind(location) == "path":
        with open_local(Path(location).expanduser() / "config.json") as fh:
            return fh.read(CONFIG_BYTES_MAX)
    import fsspec  # core dependency, imported only when object storage is read

    with fsspec.open(f"{location.rstrip('/')}/config.json", "rb") as fh:
        return fh.read(CONFIG_BYTES_MAX)


def find_shape(location: str, may_read: bool = True) -> tuple[ModelShape | None, str]:
    """The shape of the model at `location` and where it came from (or why it is unknown): its config.json when
    `may_read`, else (or when that cannot be read) the table of well-known architectures."""
    why = "not read"
    if may_read and model_location_kind(location) != "hub":
        try:
            return ModelShape.from_config(read_model_config(location)), f"{location}/config.json"
        except (OSError, ValueError) as exc:
            why = f"config.json unreadable ({str(exc)[:120]})"
    known = known_shape(location)
    if known is not None:
        return known[1], f"well-known architecture {known[0]}"
    return None, f"model shape unknown: {why}, and {location} matches no well-known architecture"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by part (PARTS), for one rank of the job."""

    parts: dict[str, int]
    checkpointing: bool
    zero_stage: int
    world_size: int
    tokens: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self, device_bytes: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total_bytes": self.total,
            "parts_bytes": dict(self.parts),
            "activation_checkpointing": self.checkpointing,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "tokens_per_micro_batch": self.tokens,
        }
        if device_bytes is not None:
            out.update(device_bytes=device_bytes, fits=fits(self.total, device_bytes))
        return out

    def summary(self) -> str:
        """'31.2 GiB (weights 15.0, activations 8.4, ...)': the total and its parts, in GiB (MiB under 1 GiB)."""
        unit, name = (_GIB, "GiB") if self.total >= _GIB else (_MIB, "MiB")
        parts = ", ".join(f"{part} {n / unit:.1f}" for part, n in self.parts.items() if n)
        return f"{self.total / unit:.1f} {name} ({parts})"


@dataclass(frozen=True)
class MemoryCheck:
    """A spec's estimate per GPU and the memory of one GPU of its pool, or why there is no estimate."""

    estimate: MemoryEstimate | None
    device_bytes: int | None  # one GPU of the spec's pool, when the pool declares `gpu_memory`
    source: str  # where the model's shape came from, or why it is unknown

    def to_dict(self) -> dict[str, Any] | None:
        if self.estimate is None:
            return None
        summary = self.estimate.summary()
        return {**self.estimate.to_dict(self.device_bytes), "shape_source": self.source, "summary": summary}


def check_memory(spec: TuningSpec, device_bytes: int | None, *, may_read: bool = True) -> MemoryCheck:
    """The estimate for `spec` with activation checkpointing as the run decides it on a GPU of `device_bytes`;
    the model's config.json is read when `may_read` (see find_shape)."""
    shape, source = find_shape(spec.model.base, may_read=may_read)
    if shape is None:
        return MemoryCheck(None, device_bytes, source)
    dist = spec.distributed
    # An elastic job may shrink to min_workers: ZeRO then splits the states over fewer ranks.
    world = dist.min_workers if dist.elastic and dist.min_workers else dist.num_workers
    checkpointing = checkpointing_enabled(spec, shape, world, device_bytes)
    return MemoryCheck(estimate(spec, shape, world, checkpointing=checkpointing), device_bytes, source)


def pool_gpu_memory(spec: TuningSpec, config: PlatformConfig) -> int | None:
    """Bytes of one GPU of the pool a GPU spec names, when the platform config declares it."""
    dist = spec.distributed
    pool = config.gpu_pools.get(dist.gpu_pool) if dist.gpu_pool and dist.gpus_per_worker else None
    return pool.gpu_memory_bytes() if pool is not None else None


def gib(count: int) -> str:
    """Bytes as GiB, or MiB under one GiB."""
    return f"{count / _GIB:.1f} GiB" if count >= _GIB else f"{count / _MIB:.1f} MiB"


def fits(total: int, device_bytes: int) -> bool:
    """Whether `total` bytes fit a device of `device_bytes`, keeping HEADROOM of it free."""
    return total <= device_bytes * (1 - HEADROOM)


def estimate(
    spec: TuningSpec, shape: ModelShape, world_size: int, *, checkpointing: bool, on_gpu: bool | None = None
) -> MemoryEstimate:
    """Peak bytes on one GPU (one CPU worker when `on_gpu` is False; default: whether the spec asks for GPUs)
    of a training step of `spec` on a model of `shape` over `world_size` data-parallel ranks."""
    on_gpu = spec.distributed.gpus_per_worker > 0 if on_gpu is None else on_gpu
    w = _dtype_bytes(spec, on_gpu)
    dist, hp = spec.distributed, spec.hyperparameters
    stage = effective_zero_stage(dist, world_size)
    # A preference micro-batch holds both sides of each pair: twice the rows (the reference forward keeps none).
    pair_sides = 2 if spec.method.data_kind == "preference" else 1
    tokens = spec.data.max_seq_len * hp.micro_batch_size * pair_sides
    trainable, extra = _trainable_params(spec, shape)
    weights = (shape.params + extra) * w
    if isinstance(spec.method, LoraMethod) and spec.method.quantize == "4bit":  # QLoRA: NF4 decoder linears
        linears = shape.layers * sum(a * b for a, b in shape.linears().values())
        weights -= linears * w - int(linears * NF4_BYTES)
    if stage == 3:
        live = max(min(shape.params, ZERO3_LIVE_PARAMS), shape.vocab * shape.hidden) * w
        weights = live + (0 if dist.offload_params else weights // world_size)
    optimizer = 0 if dist.offload_optimizer else trainable * (2 * _FP32 if w == _FP32 else 4 * _FP32)
    parts = {
        "weights": weights,
        "reference": _reference_bytes(spec, shape, w, extra, world_size, stage),
        "gradients": trainable * w // (world_size if stage >= 2 else 1),
        "optimizer": optimizer // (world_size if stage >= 1 else 1),
        **_activation_parts(spec, shape, tokens, w, on_gpu, checkpointing),
        "overhead": GPU_OVERHEAD_BYTES if on_gpu else 0,
    }
    return MemoryEstimate(parts, checkpointing, stage, world_size, tokens)


def checkpointing_enabled(
    spec: TuningSpec,
    model_config: ModelShape | dict[str, Any] | object,
    world_size: int,
    device_memory_bytes: int | None,
) -> bool:
    """Whether the run checkpoints activations: `model.activation_checkpointing` on/off as written; `auto` turns
    it on iff the estimate without it does not fit `device_memory_bytes` (None, a CPU or an unknown device, and
    a model the estimate cannot describe: off)."""
    mode = spec.model.activation_checkpointing
    if mode != "auto":
        return mode == "on"
    if device_memory_bytes is None:
        return False
    try:
        shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    except ValueError:
        return False
    without = estimate(spec, shape, world_size, checkpointing=False)
    return not fits(without.total, device_memory_bytes)


def _dtype_bytes(spec: TuningSpec, on_gpu: bool) -> int:
    dtype = spec.model.dtype
    if dtype == "auto":  # bfloat16 on GPU, float32 on CPU (train/builders.torch_dtype)
        return 2 if on_gpu else _FP32
    return _FP32 if dtype == "float32" else 2


def _lora_targets(method: LoraMethod) -> set[str]:
    """The per-layer linears (and `lm_head`) PEFT adapts: a key matches a module whose name ends with it."""
    if method.target_modules == "all-linear":
        return set(_INPUTS)
    return {key.rsplit(".", 1)[-1] for key in method.target_modules} & {*_INPUTS, "lm_head"}


def _reference_bytes(
    spec: TuningSpec, shape: ModelShape, w: int, adapter: int, world: int, stage: int
) -> int:
    """DPO's frozen reference (train/reference.py): a whole copy of the weights for full fine-tuning, split over
    the ranks under ZeRO-3 (it is gathered layer by layer, within the live budget already counted); a second
    copy of the adapter when it continues `model.adapter`; nothing when the adapter is simply switched off."""
    kind = spec.method.reference_kind(starts_from_adapter=spec.model.adapter is not None)
    if kind == "frozen_copy":
        copy = shape.params * w
        return 0 if spec.distributed.offload_params and stage == 3 else copy // (world if stage == 3 else 1)
    return adapter * w if kind == "starting_adapter" else 0


def _trainable_params(spec: TuningSpec, shape: ModelShape) -> tuple[int, int]:
    """(trainable parameters, parameters added to the base model: LoRA adapters and saved-module copies)."""
    method, head = spec.method.trained_weights(), shape.vocab * shape.hidden
    if isinstance(method, FullMethod):
        return shape.params, 0
    if isinstance(method, LoraMethod):
        targets = _lora_targets(method)
        # r x (in + out) per adapted linear; DoRA adds a magnitude per output feature
        per_linear = {
            name: method.r * (a + b) + (b if method.use_dora else 0)
            for name, (a, b) in shape.linears().items()
        }
        adapters = shape.layers * sum(n for name, n in per_linear.items() if name in targets)
        adapters += method.r * (shape.hidden + shape.vocab) if "lm_head" in targets else 0
        saved = sum(
            head for name in method.modules_to_save if name.rsplit(".", 1)[-1] in {"lm_head", "embed_tokens"}
        )
        return adapters + saved, adapters + saved
    layers = min(method.last_n_layers, shape.layers) * shape.layer_params
    return layers + shape.hidden + (head if method.train_lm_head else 0), 0


def _activation_parts(
    spec: TuningSpec, shape: ModelShape, tokens: int, w: int, on_gpu: bool, checkpointing: bool
) -> dict[str, int]:
    """`activations`: what the forward keeps for the backward, in every layer that sees a gradient (frozen
    layers before the first trained one keep nothing), or with checkpointing each such layer's input.
    `backward`: the largest working set on top of them, measured to be the larger of the loss phase (the final
    norm, the hidden states the loss projects, and one loss chunk: fp32 logits, the log-probabilities' gradient
    and the logits' gradient) and one layer's backward (its recomputed activations with checkpointing, and the
    gradients in flight through its MLP)."""
    method, h = spec.method.trained_weights(), shape.hidden
    kept = shape.layers
    if not isinstance(method, FullMethod | LoraMethod):
        kept = min(method.last_n_layers, shape.layers)
    layer = tokens * _layer_bytes_per_token(shape, method, w, on_gpu)
    in_flight = tokens * (3 * shape.intermediate + 2 * h) * w
    loss = tokens * h * (_FP32 + 3 * w) + min(tokens, LOSS_CHUNK_TOKENS) * shape.vocab * _FP32 * LOGITS_COPIES
    if checkpointing:
        return {"activations": tokens * kept * h * w, "backward": max(loss, layer + in_flight)}
    return {"activations": kept * layer, "backward": max(loss, in_flight)}


def _layer_bytes_per_token(shape: ModelShape, method: Any, w: int, on_gpu: bool) -> int:
    """One decoder layer, per token. Each RMSNorm keeps its input upcast to fp32 and 1/rms; attention keeps
    q, k, v, its output and the log-sum-exp; the SwiGLU MLP the gate (SiLU input), SiLU output and up
    projection. Trained weights also keep their inputs (the norms' normalised x and output, the MLP product)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = 2 * (h * _FP32 + _FP32) + (2 * q + 2 * kv) * w + shape.heads * _FP32 + 3 * i * w
    if not isinstance(method, LoraMethod):
        return out + 2 * 2 * h * w + i * w
    widths = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_act": i}
    targets = _lora_targets(method) - {"lm_head"}
    out += len(targets) * method.r * w  # lora_A's output, kept by lora_B
    if method.use_dora:  # the base and adapter outputs the magnitude scales (measured: 2 outputs per linear)
        out += 2 * sum(shape.linears()[name][1] for name in targets) * w
    if (
        method.dropout > 0
    ):  # each adapter drops its own copy of the input; CUDA keeps a 1-byte mask, CPU a w-byte one
        mask = 1 if on_gpu else w
        return out + sum(widths[_INPUTS[name]] * (w + mask) for name in targets)
    inputs = {_INPUTS[name] for name in targets} - {"attn_out"}  # attention keeps its output anyway
    return out + sum(widths[name] * w for name in inputs)
