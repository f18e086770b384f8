"""What runs on every Ray Train worker: one readable function, top to bottom.

config -> dataset shard -> model (+LoRA) -> deepspeed.initialize -> restore -> loop {train step,
eval, early-stop decision, report + checkpoint} -> export. Helpers below carry the side concerns
(evaluation, checkpoint files, progress). With train.export=best and an earlier checkpoint the
best, the export is the driver's (`trainers.train.launch`), from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from trainers.checkpoints import (
    checkpoint_name,
    raise_if_damaged,
    verify_checkpoint,
    write_manifest,
)
from trainers.config import RunSpec
from trainers.console import say as _say
from trainers.data.prepare import PreparedData
from trainers.device import bind_device, on_device
from trainers.errors import CheckpointError, ConfigError, DivergedError
from trainers.export import export_model, exported_step, summary
from trainers.model import build_model, count_parameters, load_tokenizer
from trainers.stopping import best_evaluation, stop_reason
from trainers.storage import DS_TAG, STATE_FILE
from trainers.tasks import TASKS
from trainers.train.collectives import all_gather_objects, all_reduce, from_rank0
from trainers.train.ds_config import build_ds_config
from trainers.train.plan import fit_problems


@dataclass
class LoopState:
    """What the loop carries across steps, saved with every checkpoint (STATE_FILE) and restored
    on resume: the data position is (epoch, micro-batches consumed in it). `early_stop`
    ({reason, step}) is set once train.early_stopping ends the run, so a resumed run stays ended."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    train_loss: float = float("nan")
    before: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    built_partitioned: bool = False
    early_stop: dict[str, Any] | None = None


@dataclass(frozen=True)
class KillAfterStep:
    """Fault injection for resume tests: after optimizer step `step` the last rank kills its own
    process once (a file at `marker` records that it did), the way a lost node would. It waits
    `delay_s` first so Ray registers the previous checkpoint (report() returns before the
    controller commits it)."""

    step: int
    marker: str
    delay_s: float = 4.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker's shard; every rank saves its ZeRO shard at each report."""
    clock = _StartupClock()
    import deepspeed
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = RunSpec.model_validate(config["spec"])
    data = PreparedData(**config["data"])
    # Steps per epoch and in total: computed once on the driver (trainers.preflight.plan_for).
    per_epoch, total = config["steps_per_epoch"], config["total_steps"]
    fault: KillAfterStep | None = config.get("fault")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = TASKS[spec.task.type]

    clock.mark("imports")
    skip_unused_shm_build()
    device = bind_device()
    if device.type == "cuda":  # before any collective (see bind_device)
        torch.cuda.reset_peak_memory_stats()  # train/peak_memory_gib: this rank's whole run
    # Adopt Ray's process group now: zero.Init (ZeRO-3 model construction) checks the batch
    # arithmetic against deepspeed.comm's world size, which reads 1 until this is called.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    ds_config = build_ds_config(spec)
    tokenizer = load_tokenizer(data.tokenizer_path)
    if spec.scaling.gpus_per_worker and torch.cuda.is_available():
        # Before any weights load; rank 0 decides for all, so every rank raises the same error.
        gpu = torch.cuda.mem_get_info()[1]
        mine = fit_problems(spec, gpu, world, tokenizer) if rank == 0 else []
        if problems := from_rank0(mine, device):
            raise ConfigError(problems)
    clock.mark("process group")
    model = build_model(spec, tokenizer, data.label_names, ds_config)
    clock.mark("model")
    trainable, total_params = count_parameters(model)
    # Under ZeRO-3 the base weights must already be partitioned here (built inside zero.Init),
    # or every rank held the whole model for a moment. LoRA weights are partitioned later.
    built_partitioned = all(
        hasattr(p, "ds_id")
        for n, p in model.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.train.learning_rate,
        weight_decay=spec.train.weight_decay,
    )
    schedule = lr_schedule(optimizer, spec, total)
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
        dist_init_required=False,  # Ray Train already created the process group
    )
    clock.mark("DeepSpeed engine")
    state = _restore(engine, ray.train.get_checkpoint(), rank, world)
    clock.mark("restore")
    state.built_partitioned = built_partitioned
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = validation_batches(
        ray.train.get_dataset_shard("validation"), task, spec, pad_id, rank, world
    )
    clock.mark("validation data")
    progress = _Progress(rank, total, world, state.step, spec.train.log_every_n_steps)
    if rank == 0:
        _say(
            f"[ferry] {spec.method} on {trainable:,}/{total_params:,} trainable parameters, "
            f"ZeRO-{spec.deepspeed.zero_stage}, {world} worker(s), {total} steps "
            f"({per_epoch}/epoch), resuming at step {state.step}; worker ready in {clock}"
        )

    if state.step == 0 and state.before is None:
        if spec.train.eval_before_training:
            state.before = evaluate(engine, val_batches, task, data, world, spec, tokenizer)
        # The driver's frozen probe (trainers.features.probe) joins the step-0 report, so the
        # history, MLflow and TensorBoard hold it beside the starting model's metrics.
        probe = config.get("probe") or {}
        if state.before is not None or probe:
            ray.train.report({**(state.before or {}), **probe, "train/step": 0})

    micro_per_epoch = per_epoch * spec.grad_accum
    # The window's loss sum and the divergence watch stay on the device: reading them costs a
    # host sync, paid once per log line and once before each checkpoint, not per micro-step.
    window_loss, window_n = torch.zeros((), device=engine.device), 0
    watch = _DivergenceWatch(engine, spec)
    while state.step < total and state.early_stop is None:
        engine.train()
        batches = train_batches(train_shard, task, spec, pad_id, state.epoch)
        for micro, batch in enumerate(progress.timed(batches)):
            if micro >= micro_per_epoch or state.step >= total:
                break
            if micro < state.micro_in_epoch:
                continue  # resume: skip what this epoch already consumed before the checkpoint
            loss = train_micro_step(engine, task, batch, watch, state.step + 1)
            state.micro_in_epoch = micro + 1
            window_loss, window_n = window_loss + loss, window_n + 1
            progress.add_tokens(int(batch["input_ids"].numel()))
            if not engine.is_gradient_accumulation_boundary() and (micro + 1) % spec.grad_accum:
                continue
            state.step += 1
            watch.grad_norm(state.step)
            evaluating = state.step % spec.train.eval_every_n_steps == 0 or state.step == total
            if evaluating or progress.logs(state.step):
                watch.stop_if_diverged(state)
                state.train_loss = window_loss.item() / window_n
            progress.step(state.step, state.train_loss, schedule.get_last_lr()[0])
            if fault is not None:
                _inject(fault, state.step, rank, world)
            if evaluating:
                metrics = evaluate(engine, val_batches, task, data, world, spec, tokenizer)
                # Before the checkpoint is reported: a diverged state is never kept.
                watch.stop_if_diverged(state, metrics)
                metrics.update(_train_metrics(state, progress, schedule, engine.device))
                window_loss, window_n = torch.zeros((), device=engine.device), 0
                state.history.append({k: v for k, v in metrics.items() if _is_number(v)})
                state.early_stop = _early_stop(spec, state, total, rank, engine.device)
                # The checkpoint of the stopping step is reported too: resume and export see
                # the run exactly where it ended.
                _report_with_checkpoint(engine, state, metrics, rank, world)
                progress.restart_window()
                if state.early_stop:
                    break
        # The epoch is over: its micro-batch budget is spent, training is done, or the shard ran
        # dry (never with Ray's equal split, but a short shard must not replay the epoch forever).
        state.epoch += 1
        state.micro_in_epoch = 0

    # Rank 0's history decides (the best metric may be each rank's own train/loss): all ranks
    # must agree, because the ZeRO-3 export gathers the weights collectively.
    if from_rank0(exported_step(spec, state.history) == state.step, engine.device):
        _export(engine, spec, tokenizer, data, state, rank)


class TaskCollate(NumpyBatchCollateFn):
    """A task's `collate(rows, pad_id)` as the collate class Ray Data wants (the function form
    is deprecated since Ray 2.47). It runs on Ray Data's prefetch thread, so collation overlaps
    the step; Ray then moves the tensors to the worker's device there too."""

    def __init__(self, task, pad_id: int):
        self.task, self.pad_id = task, pad_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.task.collate(batch, self.pad_id)


def train_batches(train_shard, task, spec: RunSpec, pad_id: int, epoch: int):
    """One epoch of this worker's micro-batches, shuffled by (run.seed, epoch). The same seed
    yields the same batches in the same order on every run: a resume skips the micro-batches its
    checkpoint already consumed by count, so the order must not depend on thread timing (the
    train split is ordered for this: `launch.dataset_config`)."""
    return train_shard.iter_torch_batches(
        batch_size=spec.train.micro_batch_size_per_worker,
        drop_last=True,
        collate_fn=TaskCollate(task, pad_id),
        prefetch_batches=spec.train.prefetch_batches,
        local_shuffle_buffer_size=1024,
        local_shuffle_seed=spec.run.seed + epoch,
    )


def train_micro_step(engine, task, batch: dict, watch: _DivergenceWatch, step: int):
    """Forward and backward of one micro-batch, and the optimizer step when it ends the
    accumulation; the loss comes back detached, on the device. Nothing here reads a tensor on the
    host (no `.item()`, no NaN check that needs the value): a GPU never waits for the CPU here
    (tests/test_train.py counts the syncs against the bare DeepSpeed engine's)."""
    batch = on_device(batch, engine.device)
    loss_sum, weight, _ = task.loss_and_outputs(engine, batch)
    loss = loss_sum / weight.clamp(min=1)
    watch.loss(loss, step)
    engine.backward(loss)
    engine.step()
    return loss.detach()


def lr_schedule(optimizer, spec: RunSpec, total_steps: int):
    """transformers' schedule of the configured name (linear, cosine, constant), with linear
    warmup over train.warmup_ratio of the steps."""
    from transformers import get_scheduler

    kind = spec.train.lr_schedule
    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(spec.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


class _DivergenceWatch:
    """Whether training diverged: a non-finite training loss on any rank, a non-finite gradient
    norm (not under fp16, whose loss scaler skips such steps by design), or a non-finite
    evaluation loss. The first two are collected on the device as they happen (no host sync)
    and read by `stop_if_diverged`, which every rank calls at the same steps: one all-reduce,
    so all ranks stop together and none is left waiting in a collective."""

    def __init__(self, engine, spec: RunSpec):
        self.engine, self.device = engine, engine.device
        self.watch_grads = spec.train.precision != "fp16"
        # Step numbers of the first non-finite loss / gradient norm seen (inf: none yet).
        self.first_bad = torch.full((2,), float("inf"), device=self.device)

    def loss(self, loss: torch.Tensor, step: int) -> None:
        self._mark(0, loss.detach(), step)

    def grad_norm(self, step: int) -> None:
        norm = self.engine.get_global_grad_norm() if self.watch_grads else None
        if norm is not None:
            self._mark(1, torch.as_tensor(norm, device=self.device, dtype=torch.float32), step)

    def _mark(self, which: int, value: torch.Tensor, step: int) -> None:
        """Record `step` in slot `which` if `value` is non-finite and none was recorded before
        (on the device: no host sync)."""
        first = self.first_bad[which]
        self.first_bad[which] = torch.where(
            ~torch.isfinite(value), torch.clamp(first, max=step), first
        )

    def stop_if_diverged(self, state: LoopState, metrics: dict | None = None) -> None:
        first = all_reduce(self.first_bad.clone(), self.device, "min")
        eval_loss = (metrics or {}).get("eval/loss")
        reason = divergence_reason(first.tolist(), eval_loss, state.step)
        if reason is not None:
            raise DivergedError(f"{reason}: stopped; {kept_checkpoint(state)}. {_DIVERGED_FIX}")


_DIVERGED_FIX = "Lower train.learning_rate, raise train.warmup_ratio or set train.max_grad_norm"


def divergence_reason(first_bad: list[float], eval_loss: float | None, step: int) -> str | None:
    """What diverged, from the step numbers of the first non-finite training loss and gradient
    norm (inf: none) and this step's evaluation loss; None when all are finite."""
    loss_step, grad_step = first_bad
    if loss_step != float("inf"):
        return f"training loss became non-finite (nan/inf) at step {int(loss_step)}"
    if grad_step != float("inf"):
        return f"gradient norm became non-finite (nan/inf) at step {int(grad_step)}"
    if isinstance(eval_loss, float) and not math.isfinite(eval_loss):
        return f"evaluation loss became {eval_loss} at step {step}"
    return None


def kept_checkpoint(state: LoopState) -> str:
    """Which checkpoint a diverged run keeps: the last one reported, whose metrics were checked
    before it was (every evaluation reports one)."""
    saved = [h for h in state.history if "train/step" in h]
    if not saved:
        return "no checkpoint was saved before it"
    step = int(saved[-1]["train/step"])
    return f"the last good checkpoint is kept: {checkpoint_name(step)} (step {step})"


def validation_batches(val_data, task, spec: RunSpec, pad_id, rank, world) -> tuple[list, Any]:
    """This rank's share of the validation set (every world-th batch), read once and kept in
    memory: re-running a Ray Data pipeline at every evaluation costs seconds each time. Also a
    spare batch, for ranks with fewer batches than others (see `evaluate`)."""
    bs = spec.train.eval_batch_size_per_worker
    batches = val_data.iter_torch_batches(batch_size=bs, collate_fn=TaskCollate(task, pad_id))
    mine, spare = [], None
    for i, b in enumerate(batches):
        spare = spare if spare is not None else b
        if i % world == rank:
            mine.append(b)
    return mine, spare


@torch.no_grad()
def evaluate(
    engine,
    val_batches: tuple,
    task,
    data: PreparedData,
    world: int,
    spec: RunSpec | None = None,
    tokenizer=None,
) -> dict[str, float]:
    """Loss and task metrics over the whole validation set: each rank evaluates its batches,
    sums are all-reduced, predictions gathered. Ranks run the same number of forward passes
    (a rank short of a batch repeats one, uncounted) because ZeRO-3 gathers parameters
    collectively inside forward. Generative tasks (`task.generate`, needs spec and tokenizer)
    decode every row with the `generation:` settings; a spare batch is decoded too."""
    engine.eval()
    val_batches, spare = val_batches
    rounds = len(val_batches)
    # Every tensor of a collective on the model's device: NCCL refuses CPU tensors. (A
    # DeepSpeed engine names it; `ferry eval` passes a plain model.)
    device = getattr(engine, "device", None) or next(engine.parameters()).device
    rounds = int(all_reduce(torch.tensor([rounds], device=device), device, "max").item())
    generate = None
    if hasattr(task, "generate") and spec is not None:
        synced = spec.deepspeed.zero_stage == 3 and world > 1
        generate = lambda b: task.generate(  # noqa: E731
            engine, b, tokenizer, spec.generation, synced
        )
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, weight
    preds, labels = [], []
    for batch in val_batches:
        batch = on_device(batch, device)
        ls, w, p = task.loss_and_outputs(engine, batch)
        sums += torch.stack([ls.detach().double(), w.detach().double()])
        generated = generate(batch) if generate else None
        p = generated if generated is not None else p
        if p is not None:
            preds += p.tolist() if torch.is_tensor(p) else list(p)
            labels += (
                task.references(batch) if hasattr(task, "references") else batch["labels"].tolist()
            )
    for _ in range(rounds - len(val_batches)):
        task.loss_and_outputs(engine, on_device(spare, device))
        if generate:
            generate(on_device(spare, device))
    sums = all_reduce(sums, device)
    gathered = all_gather_objects((preds, labels), device)
    all_preds = [x for g in gathered for x in g[0]]
    all_labels = [x for g in gathered for x in g[1]]
    engine.train()
    loss_sum, weight = sums.tolist()
    return task.metrics(loss_sum, weight, all_preds, all_labels, data.label_names)


def _train_metrics(state: LoopState, progress, schedule, device) -> dict[str, float]:
    # The rank's peak since the worker started (reset there): model, optimizer states,
    # activations and the allocator's leftovers, what `ferry plan` estimates.
    peak = (
        {"train/peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
        if device.type == "cuda"
        else {}
    )
    return {
        **peak,
        "train/loss": state.train_loss,
        "train/step": state.step,
        "train/epoch": state.epoch,
        "train/lr": schedule.get_last_lr()[0],
        "train/tokens_per_s": progress.tokens_per_s(),
        "train/step_time_s": progress.median_step_time(),
        "train/ingest_wait_share": progress.ingest_wait_share(),
        "train/elapsed_s": progress.elapsed(),
    }


def _early_stop(
    spec: RunSpec, state: LoopState, total: int, rank: int, device
) -> dict[str, Any] | None:
    """{reason, step} when train.early_stopping ends the run after this evaluation, else None.

    Rank 0 decides from its history and every rank follows: the evaluation metrics are
    all-reduced, but train/loss is each rank's own, so ranks could disagree, and a rank that left
    the loop alone would leave the others waiting in their next collective. A resumed run
    restores rank 0's history and the decision with it."""
    cfg, t = spec.train.early_stopping, spec.train
    if cfg is None or not cfg.enabled or state.step >= total:
        return None  # the same on every rank: none of them joins the broadcast below
    mine = stop_reason(state.history, cfg, t.best_metric, t.best_metric_mode) if rank == 0 else None
    reason = from_rank0(mine, device)
    if reason is None:
        return None
    if rank == 0:
        best = best_evaluation(state.history, t.best_metric, t.best_metric_mode)
        where = (
            f"best {t.best_metric}={best[t.best_metric]:.4g} at step {int(best['train/step'])}"
            if best
            else f"no finite {t.best_metric}"
        )
        _say(f"[ferry] early stop at step {state.step}: {reason} ({where})")
    return {"reason": reason, "step": state.step}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float)


def _report_with_checkpoint(engine, state: LoopState, metrics, rank, world) -> None:
    """Every rank writes its own ZeRO shard, RNG state and node id, and last the manifest of
    those files (`trainers.checkpoints`); Ray merges all ranks' files into one checkpoint folder
    and commits it only after every rank has uploaded."""
    import ray
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ferry-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        torch.save(torch.get_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        # Which node wrote this rank's shard: shows where a multi-node run's pieces came from.
        with open(os.path.join(tmp, f"node_rank{rank}.txt"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(dataclasses.asdict(state), f)
        write_manifest(tmp, rank, world, state.step)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(state.step),
        )


def _restore(engine, checkpoint, rank: int, world: int) -> LoopState:
    """The loop state and this rank's DeepSpeed state and RNG from `checkpoint` (None: a new
    run). Each rank first checks its own files against its manifest, and all ranks agree before
    any loads: a rank that raised alone would leave the others waiting in DeepSpeed's load."""
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as d:
        problems = verify_checkpoint(d, rank=rank, world=world)
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if not os.path.exists(rng) and not any("rng_rank" in p for p in problems):
            problems.append(f"rng_rank{rank}.pt is missing")  # an exact resume needs it
        everyone = all_gather_objects(problems, engine.device)
        raise_if_damaged(checkpoint.path, [p for ps in everyone for p in ps])
        with open(os.path.join(d, STATE_FILE)) as f:
            saved = json.load(f)
        known = {f.name for f in dataclasses.fields(LoopState)}
        state = LoopState(**{k: v for k, v in saved.items() if k in known})
        load_path, _ = engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} has no DeepSpeed state for rank {rank}"
            )
        torch.set_rng_state(torch.load(rng))
    if rank == 0:
        stopped = state.early_stop
        _say(
            f"[ferry] resumed from {checkpoint.path} at step {state.step} "
            f"(epoch {state.epoch}, micro-batch {state.micro_in_epoch})"
            + (f"; the run stopped early there ({stopped['reason']})" if stopped else "")
        )
    return state


def _export(
    engine, spec: RunSpec, tokenizer, data: PreparedData, state: LoopState, rank: int
) -> None:
    """The last state through the one export writer (train.export=last, or best when the last
    evaluation is the best). Under ZeRO-3 the full state dict is gathered collectively first
    (every rank calls), then rank 0 writes."""
    if spec.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    metrics = summary(
        spec,
        state.history,
        state.before,
        state.step,
        data,
        exported_step=state.step,
        early_stop=state.early_stop,
    )
    export_model(
        engine.module, state_dict, spec, tokenizer, data.label_names, metrics, spec.export_dir
    )
    _say(f"[ferry] exported to {spec.export_dir}")


def _inject(fault: KillAfterStep, step: int, rank: int, world: int) -> None:
    if step != fault.step or rank != world - 1 or os.path.exists(fault.marker):
        return
    open(fault.marker, "w").close()
    time.sleep(fault.delay_s)
    os.kill(os.getpid(), signal.SIGKILL)


def skip_unused_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (~130 s on first start) that gloo training
    on CPU never uses. Replacing its builder with a no-op skips that compile; isolated here."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: that statement binds the real `torch`.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op") and not torch.cuda.is_available():
        ds_torch_comm.build_shm_op = lambda: None


class _StartupClock:
    """Where a worker's start-up goes, phase by phase; printed on the worker's first line (slow
    starts are a cost users pay on every run and every retry)."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.phases)
        return f"{self.last - self.t0:.1f}s ({parts})"


class _Progress:
    """Rank 0 prints step/total, loss, lr, tokens/s and ETA every train.log_every_n_steps."""

    def __init__(self, rank: int, total: int, world: int, start_step: int, every: int):
        self.rank, self.total, self.world, self.every = rank, total, world, every
        self.t0, self.tokens, self.start_step = time.perf_counter(), 0, start_step
        self.last, self.step_times = self.t0, []
        # Time blocked on the data iterator, and the window it is a share of (since the last
        # evaluation's report): train/ingest_wait_share.
        self.waited, self.window_start = 0.0, self.t0

    def timed(self, batches):
        """`batches`, adding the time each `next()` blocks to the ingest wait."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            yield batch

    def ingest_wait_share(self) -> float:
        """Share of the window's training time (up to its last step: the evaluation is not
        training) spent waiting for the next batch."""
        return self.waited / max(self.last - self.window_start, 1e-9)

    def restart_window(self) -> None:
        """After an evaluation and its checkpoint: step times and the ingest wait start over."""
        self.last = self.window_start = time.perf_counter()
        self.waited = 0.0

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def tokens_per_s(self) -> float:
        return self.tokens * self.world / max(self.elapsed(), 1e-9)

    def median_step_time(self) -> float:
        """Median optimizer-step time since the last call (evaluation and checkpoint time
        excluded)."""
        times, self.step_times = sorted(self.step_times), []
        return times[len(times) // 2] if times else float("nan")

    def logs(self, step: int) -> bool:
        """Whether `step` gets a progress line (the same answer on every rank)."""
        return step % self.every == 0 or step == self.total

    def step(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now
        if self.rank != 0 or not self.logs(step):
            return
        done = step - self.start_step
        eta = self.elapsed() / max(done, 1) * (self.total - step)
        _say(
            f"[ferry] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{self.tokens_per_s():,.0f} tok/s | ETA {eta:,.0f}s"
        )
