"""What a checkpoint holds and how it is checked: DeepSpeed shards, each rank's data cursor and RNG state, and
the recipe's own state; plus the final model a run publishes.

A training checkpoint is only used whole: the loader refuses one without its meta file or without every rank's
data state. One written by another number of workers is refused too, unless the job is elastic.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.data.reshard import reshard
from tuneplane.errors import CheckpointError
from tuneplane.spec import LoraMethod, TuningSpec, effective_zero_stage

CHECKPOINT_META = "tuneplane-checkpoint.json"
FINAL_METRICS = "final.json"  # present only in the last checkpoint of a finished run
MODEL_DIR = "model"


def write(
    folder: Path,
    engine: Any,
    stream_state: dict[str, Any],
    rank: int,
    world: int,
    meta: dict,
    frozen_base: bool = False,
) -> None:
    """This rank's part of a training checkpoint; rank 0 also writes the meta file. With `frozen_base` (LoRA:
    `trains_adapter`) the frozen parameters are left out of the DeepSpeed files: the base model (and a DPO
    reference adapter) are rebuilt from the spec on resume, identical, so a checkpoint holds only what trains
    (the adapter, modules_to_save copies) with its optimizer state. Without it every checkpoint held the whole
    base: in the module state dict (ZeRO-0/1/2), as frozen-parameter fragments (ZeRO-2/3; per rank under 3).
    Measured on both loads, same world size and resized (universal checkpoint): exact, ZeRO-2 and ZeRO-3."""
    engine.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=frozen_base)
    (folder / "data").mkdir(exist_ok=True)
    rank_state = {"stream": stream_state, "rng": _rng_state()}
    (folder / "data" / f"rank{rank}.json").write_text(json.dumps(rank_state))
    if rank == 0:
        (folder / CHECKPOINT_META).write_text(json.dumps({"world_size": world, **meta}))


def read(
    folder: Path, engine: Any, rank: int, world: int, elastic: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the engine and this rank's RNG; returns (this rank's data cursor, the recipe's meta with the
    `world_size` that wrote it). A checkpoint
    of another number of workers is refused, unless the job is elastic: then the model and optimizer states are
    re-partitioned exactly (DeepSpeed universal checkpoint) and the data position re-sharded (data/reshard.py)."""
    meta_path = folder / CHECKPOINT_META
    if not meta_path.exists():
        raise CheckpointError(
            f"checkpoint {folder} has no {CHECKPOINT_META}: incomplete, refusing to resume from it"
        )
    meta = json.loads(meta_path.read_text())
    written_by = meta["world_size"]
    if written_by != world and not elastic:
        raise CheckpointError(
            f"checkpoint was written by {written_by} workers, this run has {world} "
            "(set distributed.min_workers to let a job resume on another number of workers)"
        )
    missing = [r for r in range(written_by) if not (folder / "data" / f"rank{r}.json").exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint lacks the data state of ranks {missing}: refusing to resume from it"
        )
    if written_by == world:
        engine.load_checkpoint(str(folder / "deepspeed"), tag="state", custom_load_fn=_load_module)
        mine = json.loads((folder / "data" / f"rank{rank}.json").read_text())
        _restore_rng(mine["rng"])
        return mine["stream"], meta
    states = [json.loads((folder / "data" / f"rank{r}.json").read_text()) for r in range(written_by)]
    _load_resized(folder / "deepspeed", engine, rank)
    _restore_rng(states[rank % written_by]["rng"])  # dropout masks only: any old rank's stream of draws
    return reshard([s["stream"] for s in states], world)[rank], meta


def _load_module(src: dict[str, Any], dst: torch.nn.Module) -> None:
    """DeepSpeed's module load, strict except for frozen parameters: a LoRA checkpoint lacks them (see `write`)
    and they keep the values the model was built with (DeepSpeed restores frozen-parameter fragments only
    when the checkpoint has them). A missing trained weight or an unknown key is still an error."""
    frozen = {name for name, param in dst.named_parameters() if not param.requires_grad}
    result = dst.load_state_dict(src, strict=False)
    missing = [key for key in result.missing_keys if key not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _load_resized(deepspeed_dir: Path, engine: Any, rank: int) -> None:
    """Model, optimizer and LR schedule from a checkpoint of another world size, through DeepSpeed's universal
    checkpoint (one folder per parameter: fp32 weights and Adam moments), which loads onto any partitioning.
    Each rank converts its own copy (checkpoints are downloaded per worker): cheap for adapters, heavy for the
    full fine-tuning of a large model, where a conversion per node would be wanted. Measured exact: the next steps' losses and weights equal an uninterrupted run's (< 1e-7)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    with tempfile.TemporaryDirectory(prefix=f"tuneplane-universal-{rank}-") as out:
        args = argparse.Namespace(
            input_folder=str(deepspeed_dir / "state"),
            output_folder=str(Path(out) / "state"),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our checkpoints carry no Megatron universal-checkpoint info
        )
        with contextlib.redirect_stdout(io.StringIO()):
            to_universal(args)
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads the switch at load time
        try:
            engine.load_checkpoint(out, tag="state")
        finally:
            engine._config.load_universal_checkpoint = False  # later checkpoints are ordinary ones


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate()[1],
        "numpy": np.random.get_state()[1].tolist(),  # type: ignore[index]
        "torch": torch.get_rng_state().tolist(),
    }


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def final_metrics(folder: Path) -> dict[str, Any] | None:
    """The final metrics when `folder` is the last checkpoint of a finished run, else None."""
    path = folder / FINAL_METRICS
    return json.loads(path.read_text()) if path.exists() else None


def trains_adapter(spec: TuningSpec) -> bool:
    """The method trains a LoRA adapter on a frozen base (SFT LoRA, DPO/ORPO on LoRA)."""
    return isinstance(spec.method.trained_weights(), LoraMethod)


def save_model(engine: Any, spec: TuningSpec, tokenizer: Any, out: Path, rank: int, world: int) -> None:
    """Rank 0 writes the adapter (LoRA) or the weights (full/partial). Under ZeRO-3 parameters are partitioned:
    every rank must enter the gather, or rank 0 would write empty tensors."""
    import deepspeed

    module = engine.module
    if effective_zero_stage(spec.distributed, world) == 3:
        wanted = (
            [p for p in module.parameters() if p.requires_grad]
            if trains_adapter(spec)
            else list(module.parameters())
        )
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None):
            if rank == 0:
                _write_model(module, tokenizer, out)
    elif rank == 0:
        _write_model(module, tokenizer, out)
    if rank == 0:
        check_not_empty(out)
    dist.barrier()


def _write_model(module: Any, tokenizer: Any, out: Path) -> None:
    # A PeftModel writes only the trained adapter (adapter_model.safetensors + adapter_config.json; not DPO's
    # frozen `reference` adapter); a plain model writes all its weights. Inside GatheredParameters the state
    # dict holds full, not partitioned, tensors.
    out.mkdir(parents=True, exist_ok=True)
    adapters = {"selected_adapters": ["default"]} if hasattr(module, "peft_config") else {}
    module.save_pretrained(str(out), safe_serialization=True, **adapters)
    tokenizer.save_pretrained(str(out))


def check_not_empty(folder: Path) -> None:
    """Fail loudly if a saved model has empty tensors (ZeRO-3 without gathering writes shape-(0,) tensors)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights written to {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = handle.get_slice(name).get_shape()
                if shape in ([], [0]) or 0 in shape:
                    raise CheckpointError(
                        f"{file.name}: tensor {name} is empty; refusing to publish this model"
                    )
