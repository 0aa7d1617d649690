"""The instruction-tuning recipe: what every Ray Train worker runs, top to bottom (anchor: torchtune's
`recipes/lora_finetune_distributed.py`).

    setup            distributed init, tokenizer, model + method, DeepSpeed engine, resume from a checkpoint,
                     and the untouched base model's zero-shot scores (first attempt only)
    train            packed batches from this rank's data stream, ZeRO steps, metrics, checkpoints
    evaluate         eval loss on held-out data, zero-shot accuracy on held-out tasks
    save_checkpoint  DeepSpeed shards + this rank's data cursor and RNG + `RecipeState`, reported to Ray
    save_final       the tuned adapter (gathered under ZeRO-3) and the final metrics, as the last checkpoint
    cleanup          wait for every rank before the process group goes away

The worker gets the spec and a `WorkerSettings` from the launcher; nothing comes from the environment except
what Ray and torch.distributed set up. Which recipe a method runs is `recipes.RECIPES`' answer; a method that
trains differently subclasses this one (`preference_recipe.py`) and overrides its hooks. What a recipe asks of
Ray Train is `worker.py`; builders live in `builders.py`, metrics maths in `metrics.py`, checkpoint layout in
`checkpointing.py`, evaluation in `evaluate.py`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneplane.data import Batch, InstructionStream, KeySet
from tuneplane.errors import SpecError
from tuneplane.files import Confinement
from tuneplane.pretrained import download_adapter, load_tokenizer
from tuneplane.spec import TuningSpec
from tuneplane.tracking.run import JobRun
from tuneplane.train import checkpointing, evaluate, worker
from tuneplane.train.builders import ScheduleClock, build_optimizer, deepspeed_config, load_model
from tuneplane.train.loss import SourceTally, causal_lm_loss
from tuneplane.train.metrics import StepWindow, count_params, flops_per_token, source_names


@dataclass(frozen=True)
class WorkerSettings:
    """What the launcher (never the spec) tells every worker."""

    run_id: str | None = None  # the job's MLflow run; rank 0 reports to it
    tracking_uri: str | None = None
    # Optional audit trail: which records each rank trained on at each step (data-exposure audits, tests).
    example_log_dir: str | None = None
    drop: bytes | None = None  # the driver's data filter (data.dedup / data.decontaminate): keys to skip
    adapter_at: str | None = None  # where `model.adapter` lies in MLflow's artifact store (the driver looked)
    confinement: Confinement | None = None  # where the team's local files may lie (tuneplane.files)


@dataclass
class RecipeState:
    """What a checkpoint carries besides model, optimizer and data cursors: restored on resume."""

    step: int = 0  # optimizer steps done
    epochs: int = 0  # passes over the data completed
    tokens: int = 0  # tokens trained on
    resumes: int = 0  # times training resumed from a checkpoint (worker or node lost, driver re-run)
    base_zero_shot: dict[str, float] | None = None  # the base model's scores, measured once
    base_eval_loss: float | None = None  # the base model's eval loss, measured once
    source_tokens: list[float] | None = None  # trained tokens per training source so far
    schedule: dict[str, float] | None = None  # the LR schedule's clock (builders.ScheduleClock)


class InstructionTuningRecipe:
    """Supervised instruction tuning (LoRA, full, partial): next-token loss on the responses."""

    WINDOW_EXTRAS: tuple[str, ...] = ()  # method-specific step metrics a subclass records (see StepWindow)

    def __init__(self, spec: TuningSpec, settings: WorkerSettings):
        self.spec, self.settings = spec, settings
        self.state = RecipeState()
        self.step_keys: list[str] = []  # records in the optimizer step being accumulated (it may span epochs)
        self.step_batches = 0  # this rank's micro-batches with data in that step

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> bool:
        """Everything training needs; False when the checkpoint to resume from is a finished run's last one."""
        import deepspeed

        spec, hp = self.spec, self.spec.hyperparameters
        on_gpu = torch.cuda.is_available() and spec.distributed.gpus_per_worker > 0
        where = worker.placement(on_gpu)
        self.rank, self.world, self.node_id, self.device = (
            where.rank,
            where.world,
            where.node_id,
            where.device,
        )
        # The shared-memory comm op would be JIT-compiled on first use (+30 s, ~3 GB); gloo/nccl are enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        _seed_everything(hp.seed)  # same seed on every rank: identical LoRA init before DeepSpeed broadcasts
        checkpoint = worker.latest_checkpoint()
        if checkpoint and self._republish_if_final(checkpoint):
            return False
        self.run = JobRun(self.settings.tracking_uri, self.settings.run_id) if self.rank == 0 else JobRun()
        self.tokenizer = load_tokenizer(spec.model)
        self.drop = KeySet.from_bytes(self.settings.drop) if self.settings.drop else None
        self.adapter = self._fetch_adapter()
        model = load_model(spec, on_gpu, adapter=self.adapter)
        params = count_params(model)
        self.run.log_params({"model.params.total": params.total, "model.params.trainable": params.trainable})
        self._model_built(model)
        self.total_steps = hp.max_steps or self._steps_for_epochs()
        self.clock = ScheduleClock(self.total_steps)  # a resume restores it, an elastic resize may stretch it
        optimizer, self.scheduler = build_optimizer(model, spec, self.total_steps, self.clock)
        ds_config = deepspeed_config(spec, on_gpu, self.world)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=ds_config
        )
        self._engine_built(ds_config)
        if self.world == 1:
            # Averaging gradients over one rank changes nothing, but DeepSpeed would still flatten every gradient
            # into buckets and all-reduce them each step.
            self.engine.enable_backward_allreduce = False
        data_state = self._resume(checkpoint) if checkpoint else None
        self.stream = self._stream(state=data_state)
        self.sources = source_names(spec.data)
        self.window = StepWindow(
            self.device, self.world, flops_per_token(spec, params), self.sources, self.state.source_tokens,
            self.WINDOW_EXTRAS,
        )  # fmt: skip
        self._measure_base()
        return True

    def _model_built(self, model: torch.nn.Module) -> None:
        """Hook: the policy is built and DeepSpeed has not wrapped it yet (the preference recipe adds its
        reference here)."""

    def _engine_built(self, ds_config: dict[str, Any]) -> None:
        """Hook: `self.engine` exists; nothing has been resumed or measured yet."""

    def _measure_base(self) -> None:
        """The untouched model's eval loss and zero-shot scores, once per job (a resumed run keeps them)."""
        if self.state.base_eval_loss is None and self._has_eval_data():
            self.state.base_eval_loss = self._eval_loss()["eval_loss"]
            self.run.report({"eval_loss_base": self.state.base_eval_loss}, step=0)
        if self.state.base_zero_shot is None and self.spec.eval.zero_shot_sources:
            self.state.base_zero_shot = self._zero_shot()
            self.run.report({f"zero_shot_base/{k}": v for k, v in self.state.base_zero_shot.items()}, step=0)
        self.engine.train()

    def _has_eval_data(self) -> bool:
        return bool(self.spec.data.eval_sources) or self.spec.data.holdout_fraction > 0

    def _fetch_adapter(self) -> Path | None:
        """The registered adapter this job starts from (`model.adapter`), in a folder kept for the run: each
        worker copies it from the artifact store the driver found it in (no registry query per worker)."""
        if not self.spec.model.adapter:
            return None
        self._adapter_dir = tempfile.TemporaryDirectory(prefix="tuneplane-adapter-")
        assert self.settings.adapter_at is not None, "the launcher locates model.adapter"
        return download_adapter(
            self.settings.adapter_at,
            self.spec.model,
            self.settings.tracking_uri,
            Path(self._adapter_dir.name),
        )

    def _stream(self, state: dict[str, Any] | None = None) -> InstructionStream:
        hp = self.spec.hyperparameters
        return InstructionStream(
            self.spec.data, self.tokenizer, seed=hp.seed, rank=self.rank, world_size=self.world,
            micro_batch_size=hp.micro_batch_size, state=state, drop=self.drop,
        )  # fmt: skip

    def _steps_for_epochs(self) -> int:
        """Optimizer steps in `epochs` passes: each rank counts its own batches; an epoch lasts as long as the
        rank with the most (the others idle meanwhile). Gradient accumulation runs on across epochs; a last
        partial accumulation is completed with idle micro-batches (`_finish_accumulation`), hence the ceil."""
        hp = self.spec.hyperparameters
        self.epoch_batches = self._batches_left()
        return max(1, math.ceil(self.epoch_batches * (hp.epochs or 1) / hp.gradient_accumulation_steps))

    def _batches_left(self, state: dict[str, Any] | None = None) -> int:
        """Micro-batches of the rank with the most in the rest of the epoch from data `state` (None: a whole)."""
        count = torch.tensor([sum(1 for _ in self._stream(state=state))])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    def _resume(self, checkpoint: Any) -> dict[str, Any]:
        with worker.opened(checkpoint) as folder:
            data_state, meta = checkpointing.read(
                folder, self.engine, self.rank, self.world, elastic=self.spec.distributed.elastic
            )
        known = {f.name for f in fields(RecipeState)}
        self.state = RecipeState(**{k: v for k, v in meta.items() if k in known})
        for name, value in (self.state.schedule or {}).items():
            setattr(self.clock, name, value)  # in place: the scheduler's lambda reads this clock
        if meta["world_size"] != self.world and not self.spec.hyperparameters.max_steps:
            self._replan_after_resize(data_state)
        self.state.resumes += 1
        self.run.report({"resumes": self.state.resumes}, self.state.step)
        self._log(f"resumed from step {self.state.step}")
        return data_state

    def _replan_after_resize(self, data_state: dict[str, Any]) -> None:
        """An `epochs` run resumed by another number of workers: the data left (the rest of this epoch,
        re-sharded, and the later epochs) makes another number of steps than planned. The run's total becomes
        what is really left, and the LR schedule keeps its position at this step and reaches its end at that
        total (`ScheduleClock.stretch`): the remaining fraction of the schedule is spread over the remaining
        steps, as the remaining fraction of the data is. Rebuilding the schedule for the new world's own total
        instead would move the LR at once (the restored scheduler keeps its step count) and end the run
        elsewhere on the curve than its end."""
        hp = self.spec.hyperparameters
        later = self.epoch_batches * ((hp.epochs or 1) - self.state.epochs - 1)
        left = self._batches_left(data_state) + later
        self.total_steps = self.state.step + math.ceil(left / hp.gradient_accumulation_steps)
        self.clock.stretch(self.state.step, self.total_steps)

    # ---------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        """With max_steps the data repeats as needed; otherwise `epochs` passes (default 1). The epoch count
        advances identically on every rank (all stop an epoch together), never from a rank's own stream."""
        hp = self.spec.hyperparameters
        max_epochs = hp.epochs or (None if hp.max_steps else 1)
        self.engine.train()
        while self.state.step < self.total_steps and (max_epochs is None or self.state.epochs < max_epochs):
            micro_steps_before = self.engine.micro_steps
            self._train_epoch()
            # An epoch shorter than one accumulation is fine (accumulation runs on into the next): only an
            # epoch without a single micro-batch could never reach the next step.
            if self.engine.micro_steps == micro_steps_before and self.state.step < self.total_steps:
                raise SpecError(
                    [("data.sources", "an epoch produced no micro-batch: too little data for the batch size")]
                )
        self._finish_accumulation()

    def _finish_accumulation(self) -> None:
        """After the last epoch, the engine may be mid-accumulation (the epochs' micro-batches are not a multiple
        of gradient_accumulation_steps): idle micro-batches (nothing trained, as in `_train_epoch`) complete it,
        so the last optimizer step trains the remaining real micro-batches, each weighed as in any other step.
        A max_steps run ends on a step: nothing to do."""
        while self.engine.micro_steps % self.engine.gradient_accumulation_steps():
            loss, _ = self.loss(self.idle_batch())
            self.engine.backward(loss * 0.0)
            before = self.engine.global_steps
            self.engine.step()
            if self.engine.global_steps != before:
                self._after_step()

    def _train_epoch(self) -> None:
        """The rest of this epoch, or until the last step. Ranks pack differently and run dry a few batches
        apart: one that is done steps on idle batches (nothing trained) until every rank is, so each example of
        the epoch is trained, once; only then do all start the next epoch together."""
        batches = iter(self.stream)
        while self.state.step < self.total_steps:
            batch = next(batches, None)
            active = _ranks_with_data(batch is not None, self.device)
            if not active:
                self.stream.next_epoch()
                self.state.epochs += 1
                return
            idle = batch is None
            loss, record = self.loss(batch if batch is not None else self.idle_batch())
            # DeepSpeed averages gradients over all ranks: weigh the ones with data so the update is their mean.
            self.engine.backward(loss * (0.0 if idle else self.world / active))
            before = self.engine.global_steps
            self.engine.step()
            if batch is not None:
                record()
                self.step_keys += [key for row in batch.keys for key in row]
                self.step_batches += 1
            if self.engine.global_steps != before:  # an optimizer step, not only an accumulation
                self._after_step()

    def idle_batch(self) -> Batch:
        return Batch.idle(self.stream.pad_id, self.spec.data.packing)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, Callable[[], None]]:
        """The micro-batch's loss, and what to record into the step window once it has been stepped on."""
        real = batch.num_tokens > 0  # an idle batch has no source to tally
        tally = SourceTally(batch.target_sources(), len(self.sources), self.device) if real else None
        loss = causal_lm_loss(self.engine, batch.to_torch(self.device), tally=tally)
        return loss, lambda: self.window.add(loss.item(), batch.num_tokens, tally)

    def _after_step(self) -> None:
        spec, step = self.spec, self.engine.global_steps
        self.state.step = step
        self._log_examples(step)
        metrics = self.window.close(self.engine, self.scheduler)
        self.state.tokens += int(metrics["tokens"])
        if step % spec.tracking.log_every_n_steps == 0 or step == self.total_steps:
            self.run.report(metrics, step)
            self._log(
                f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"{metrics['tokens_per_s']:.0f} tok/s"
            )
        if step % spec.checkpointing.every_n_steps == 0 and step < self.total_steps:
            self.save_checkpoint(metrics)
        if spec.eval.every_n_steps and step % spec.eval.every_n_steps == 0:
            self.run.report(self._eval_loss(), step)
            self.engine.train()

    def _log_examples(self, step: int) -> None:
        if self.settings.example_log_dir:
            with (Path(self.settings.example_log_dir) / f"rank{self.rank}.jsonl").open("a") as fh:
                entry = {
                    "step": step,
                    "attempt": self.state.resumes,
                    "node": self.node_id,
                    "keys": self.step_keys,
                    "micro_batches": self.step_batches,
                }
                fh.write(json.dumps(entry) + "\n")
        self.step_keys, self.step_batches = [], 0

    # ------------------------------------------------------------------------------------------- evaluate

    def evaluate(self) -> dict[str, Any]:
        """The final metrics: eval loss when there is held-out data, zero-shot accuracy before and after."""
        final: dict[str, Any] = {"step": self.state.step, "tokens": self.state.tokens}
        final |= {
            f"source_tokens/{n}": t for n, t in zip(self.sources, self.window.source_totals, strict=True)
        }
        if self._has_eval_data():
            final.update(self._eval_loss())
            if self.state.base_eval_loss is not None:
                final["eval_loss_base"] = self.state.base_eval_loss
        if self.spec.eval.zero_shot_sources:
            final.update({f"zero_shot/{k}": v for k, v in self._zero_shot().items()})
            final.update({f"zero_shot_base/{k}": v for k, v in (self.state.base_zero_shot or {}).items()})
        self.run.report({k: v for k, v in final.items() if isinstance(v, float)}, self.state.step)
        return final

    def _eval_loss(self) -> dict[str, float]:
        return evaluate.eval_loss(self.engine, self.spec, self.tokenizer, self.rank, self.world, self.device)

    def _zero_shot(self) -> dict[str, float]:
        return evaluate.zero_shot(self.engine, self.spec, self.tokenizer, self.rank, self.world, self.device)

    # -------------------------------------------------------------------------------------------- save

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank's part of the checkpoint, reported together (none is used until all have reported)."""
        stream_state = self.stream.state_dict()
        self.state.source_tokens = list(self.window.source_totals)
        self.state.schedule = asdict(self.clock)
        with worker.report_folder("ckpt") as folder:
            checkpointing.write(
                folder, self.engine, stream_state, self.rank, self.world, asdict(self.state),
                frozen_base=checkpointing.trains_adapter(self.spec),
            )  # fmt: skip
            worker.report(metrics | {"step": self.state.step}, folder)

    def save_final(self, final: dict[str, Any]) -> None:
        """The tuned model and the final metrics, reported as the run's last checkpoint."""
        with worker.report_folder("final") as folder:
            checkpointing.save_model(
                self.engine,
                self.spec,
                self.tokenizer,
                folder / checkpointing.MODEL_DIR,
                self.rank,
                self.world,
            )
            if self.rank == 0:
                metrics = final | {"base_zero_shot": self.state.base_zero_shot}
                (folder / checkpointing.FINAL_METRICS).write_text(json.dumps(metrics))
            worker.report({"step": self.state.step, "final": 1}, folder)

    def _republish_if_final(self, checkpoint: Any) -> bool:
        """The last checkpoint of a finished run holds the final model: report it again as this run's result."""
        with worker.opened(checkpoint) as folder, worker.report_folder("final") as out:
            final = checkpointing.final_metrics(folder)
            if final is None:
                return False
            if self.rank == 0:
                shutil.copytree(folder, out, dirs_exist_ok=True)
            self._log(f"job already finished at step {final['step']}: republishing its final checkpoint")
            worker.report({"step": final["step"], "final": 1}, out)
        return True

    def cleanup(self) -> None:
        dist.barrier()

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[tuneplane] {message}", flush=True)


# -------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ranks_with_data(flag: bool, device: torch.device) -> int:
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value)
    return int(value.item())
