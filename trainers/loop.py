"""What runs on every Ray Train worker: one readable function, top to bottom.

config -> dataset shard -> model (+LoRA) -> deepspeed.initialize -> restore -> loop {train step,
eval, report + checkpoint} -> export. Helpers below carry the side concerns (schedule, eval,
checkpoint files, export, progress).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from trainers.config import RunSpec
from trainers.data import PreparedData, load_tokenizer
from trainers.ds_config import build_ds_config
from trainers.model import build_model, count_parameters
from trainers.tasks import TASKS

STATE_FILE = "ferry_state.json"
DS_TAG = "ds"


class DivergedError(RuntimeError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker's shard; every rank saves its ZeRO shard at each report."""
    import deepspeed
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = RunSpec.model_validate(config["spec"])
    data = PreparedData(**config["data"])
    plan = config["plan"]  # steps per epoch / total steps, computed once on the driver
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = TASKS[spec.task.type]

    _skip_unused_shm_build()
    # Adopt Ray's process group now: zero.Init (ZeRO-3 model construction) checks the batch
    # arithmetic against deepspeed.comm's world size, which reads 1 until this is called.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    ds_config = build_ds_config(spec)
    tokenizer = load_tokenizer(data.tokenizer_path)
    model = build_model(spec, tokenizer, data.label_names, ds_config)
    trainable, total = count_parameters(model)
    # Under ZeRO-3 the base weights must already be partitioned here (built inside zero.Init),
    # or every rank held the whole model for a moment. LoRA weights are partitioned later.
    built_partitioned = all(hasattr(p, "ds_id") for n, p in model.named_parameters()
                            if "lora_" not in n and "modules_to_save" not in n)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay,
    )
    schedule = _lr_schedule(optimizer, spec, plan["total_steps"])
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        dist_init_required=False,  # Ray Train already created the process group
    )
    state = _restore(engine, ray.train.get_checkpoint(), rank)
    state["built_partitioned"] = built_partitioned
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = _my_validation_batches(ray.train.get_dataset_shard("validation"), task, spec, pad_id, rank, world)
    progress = _Progress(rank, plan["total_steps"], world, state["step"], spec.train.log_every_n_steps)
    if rank == 0:
        _say(f"[ferry] {spec.method} on {trainable:,}/{total:,} trainable parameters, "
              f"ZeRO-{spec.deepspeed.zero_stage}, {world} worker(s), {plan['total_steps']} steps "
              f"({plan['steps_per_epoch']}/epoch), resuming at step {state['step']}")

    if state["step"] == 0 and spec.train.eval_before_training and "before" not in state:
        state["before"] = _evaluate(engine, val_batches, task, data, world, spec, tokenizer)
        ray.train.report({**state["before"], "train/step": 0})

    micro_per_epoch = plan["steps_per_epoch"] * spec.grad_accum
    window_loss, window_n = 0.0, 0
    while state["step"] < plan["total_steps"]:
        engine.train()
        batches = train_shard.iter_torch_batches(
            batch_size=spec.train.micro_batch_size_per_worker, drop_last=True,
            collate_fn=lambda rows: task.collate(rows, pad_id),
            local_shuffle_buffer_size=1024, local_shuffle_seed=spec.run.seed + state["epoch"],
        )
        for micro, batch in enumerate(batches):
            if micro >= micro_per_epoch or state["step"] >= plan["total_steps"]:
                break
            if micro < state["micro_in_epoch"]:
                continue  # resume: skip what this epoch already consumed before the checkpoint
            loss_sum, weight, _ = task.loss_and_outputs(engine, batch)
            loss = loss_sum / weight.clamp(min=1)
            _stop_if_diverged(loss, state["step"])
            engine.backward(loss)
            engine.step()
            state["micro_in_epoch"] = micro + 1
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            progress.add_tokens(int(batch["input_ids"].numel()))
            if not engine.is_gradient_accumulation_boundary() and (micro + 1) % spec.grad_accum:
                continue
            state["step"] += 1
            state["train_loss"] = window_loss / window_n
            progress.step(state["step"], state["train_loss"], schedule.get_last_lr()[0])
            _maybe_inject_fault(state["step"], rank, world)
            last = state["step"] == plan["total_steps"]
            if state["step"] % spec.train.eval_every_n_steps == 0 or last:
                metrics = _evaluate(engine, val_batches, task, data, world, spec, tokenizer)
                metrics.update(_train_metrics(state, progress, schedule))
                window_loss, window_n = 0.0, 0
                _report_with_checkpoint(engine, state, metrics, rank)
                progress.last = time.perf_counter()
        # The epoch is over: its micro-batch budget is spent, training is done, or the shard ran
        # dry (never with Ray's equal split, but a short shard must not replay the epoch forever).
        state["epoch"] += 1
        state["micro_in_epoch"] = 0

    _export(engine, spec, tokenizer, data, state, rank, config["export_dir"])


def _lr_schedule(optimizer, spec: RunSpec, total_steps: int):
    warmup = int(spec.train.warmup_ratio * total_steps)
    kind = spec.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _stop_if_diverged(loss: torch.Tensor, step: int) -> None:
    # All ranks agree, so none is left waiting in a collective when another stops.
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item():
        raise DivergedError(
            f"training loss became {loss.item()} at step {step + 1}: stopped; the last good "
            "checkpoint is kept. Lower train.learning_rate or raise train.warmup_ratio."
        )


def _my_validation_batches(val_data, task, spec: RunSpec, pad_id, rank, world) -> list:
    """This rank's share of the validation set (every world-th batch), read once and kept in
    memory: re-running a Ray Data pipeline at every evaluation costs seconds each time."""
    bs = spec.train.eval_batch_size_per_worker
    batches = val_data.iter_torch_batches(batch_size=bs, collate_fn=lambda r: task.collate(r, pad_id))
    mine, spare = [], None
    for i, b in enumerate(batches):
        spare = spare if spare is not None else b
        if i % world == rank:
            mine.append(b)
    return mine, spare


@torch.no_grad()
def _evaluate(engine, val_batches: tuple, task, data: PreparedData, world: int,
              spec: RunSpec | None = None, tokenizer=None):
    """Loss and task metrics over the whole validation set: each rank evaluates its batches,
    sums are all-reduced, predictions gathered. Ranks run the same number of forward passes
    (a rank short of a batch repeats one, uncounted) because ZeRO-3 gathers parameters
    collectively inside forward. Generative tasks (`task.generate`, needs spec and tokenizer)
    decode every row with the `generation:` settings; a spare batch is decoded too."""
    engine.eval()
    val_batches, spare = val_batches
    rounds = len(val_batches)
    if dist.is_initialized():
        n = torch.tensor([rounds])
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        rounds = int(n.item())
    generate = None
    if hasattr(task, "generate") and spec is not None:
        synced = spec.deepspeed.zero_stage == 3 and world > 1
        generate = lambda b: task.generate(engine, b, tokenizer, spec.generation, synced)  # noqa: E731
    loss_sum, weight, preds, labels = 0.0, 0.0, [], []
    for batch in val_batches:
        ls, w, p = task.loss_and_outputs(engine, batch)
        loss_sum, weight = loss_sum + ls.item(), weight + w.item()
        generated = generate(batch) if generate else None
        p = generated if generated is not None else p
        if p is not None:
            preds += p.tolist() if torch.is_tensor(p) else list(p)
            labels += task.references(batch) if hasattr(task, "references") else batch["labels"].tolist()
    for _ in range(rounds - len(val_batches)):
        task.loss_and_outputs(engine, spare)
        if generate:
            generate(spare)
    sums = torch.tensor([loss_sum, weight], dtype=torch.float64)
    gathered: list = [None] * world
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_gather_object(gathered, (preds, labels))
    else:
        gathered = [(preds, labels)]
    all_preds = [x for g in gathered for x in g[0]]
    all_labels = [x for g in gathered for x in g[1]]
    engine.train()
    return task.metrics(sums[0].item(), sums[1].item(), all_preds, all_labels, data.label_names)


def _train_metrics(state, progress, schedule) -> dict[str, float]:
    return {
        "train/loss": state["train_loss"],
        "train/step": state["step"],
        "train/epoch": state["epoch"],
        "train/lr": schedule.get_last_lr()[0],
        "train/tokens_per_s": progress.tokens_per_s(),
        "train/step_time_s": progress.median_step_time(),
        "train/elapsed_s": progress.elapsed(),
    }


def _report_with_checkpoint(engine, state, metrics, rank) -> None:
    """Every rank writes its own ZeRO shard, RNG state and node id; Ray merges all ranks' files
    into one checkpoint folder and commits it only after every rank has uploaded."""
    import ray
    import ray.train

    state["history"] = state.get("history", []) + [{k: v for k, v in metrics.items() if isinstance(v, (int, float))}]
    with tempfile.TemporaryDirectory(prefix="ferry-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        torch.save(torch.get_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        # Which node wrote this rank's shard: shows where a multi-node run's pieces came from.
        with open(os.path.join(tmp, f"node_rank{rank}.txt"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step_{state['step']:07d}",
        )


def _restore(engine, checkpoint, rank) -> dict[str, Any]:
    fresh = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "train_loss": float("nan")}
    if checkpoint is None:
        return fresh
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
        load_path, _ = engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state for rank {rank}")
        rng = os.path.join(d, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            torch.set_rng_state(torch.load(rng))
    if rank == 0:
        _say(f"[ferry] resumed from {checkpoint.path} at step {state['step']} "
              f"(epoch {state['epoch']}, micro-batch {state['micro_in_epoch']})")
    return state


def _export(engine, spec: RunSpec, tokenizer, data: PreparedData, state, rank, export_dir: str) -> None:
    """HF-format model (LoRA adapter or full weights), tokenizer, labels and metrics, loadable by
    plain transformers/peft. Under ZeRO-3 the full state dict is gathered collectively first."""
    import pyarrow.fs as pafs

    if spec.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="ferry-export-") as tmp:
        state_dict = {k: v.detach().to(torch.float32).cpu() for k, v in state_dict.items()}
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if spec.method == "lora":
            _check_adapter_nonempty(tmp)
            if spec.model.preset:
                _save_preset_base(engine.module, state_dict, tmp, export_dir)
        tokenizer.save_pretrained(tmp)
        if data.label_names:
            with open(os.path.join(tmp, "labels.json"), "w") as f:
                json.dump(data.label_names, f)
        final = {k: v for k, v in state["history"][-1].items()} if state.get("history") else {}
        summary = {"final": final, "before": state.get("before"), "steps": state["step"],
                   "method": spec.method, "task": spec.task.type}
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(tmp, "ferry_run.yaml"), "w") as f:
            from trainers.config import dump_spec

            f.write(dump_spec(spec))
        fs, path = pafs.FileSystem.from_uri(export_dir if "://" in export_dir else os.path.abspath(export_dir))
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)
    _say(f"[ferry] exported to {export_dir}")


def _save_preset_base(peft_model, state_dict, folder: str, export_dir: str) -> None:
    """A preset's random-init base exists nowhere else, so the adapter alone could not be loaded:
    save the (frozen, hence unchanged) base weights to <export>/base and point the adapter at it."""
    base = {}
    for key, value in state_dict.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        base[key.replace(".original_module.", ".")] = value
    model = type(peft_model.get_base_model())(peft_model.get_base_model().config)
    # strict: every base weight accounted for. Tied weights (lm_head) may be absent from the dict.
    missing, unexpected = model.load_state_dict(base, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"cannot rebuild the preset base model: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(os.path.join(folder, "base"), safe_serialization=True)
    cfg_path = os.path.join(folder, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    # PEFT resolves the base relative to the working directory, so a local export gets an
    # absolute path; a remote export keeps the portable relative name.
    local = "://" not in export_dir
    cfg["base_model_name_or_path"] = os.path.join(os.path.abspath(export_dir), "base") if local else "base"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _check_adapter_nonempty(folder: str) -> None:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    if not lora or any(v.numel() == 0 for v in lora.values()):
        raise RuntimeError(
            "exported LoRA adapter is empty (ZeRO-3 parameters were not gathered before saving)"
        )


def _maybe_inject_fault(step: int, rank: int, world: int) -> None:
    """Fault injection for resume tests: FERRY_FAULT_KILL_AT_STEP=N kills the last rank once
    (FERRY_FAULT_MARKER records it) after step N, the way a lost node would. The sleep lets Ray
    register the previous checkpoint first (report() returns before the controller commits it)."""
    at = os.environ.get("FERRY_FAULT_KILL_AT_STEP")
    marker = os.environ.get("FERRY_FAULT_MARKER")
    if not at or not marker or step != int(at) or rank != world - 1 or os.path.exists(marker):
        return
    open(marker, "w").close()
    time.sleep(float(os.environ.get("FERRY_FAULT_DELAY_S", "4")))
    os.kill(os.getpid(), signal.SIGKILL)


def _skip_unused_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (~130 s on first start) that gloo training
    on CPU never uses. Replacing its builder with a no-op skips that compile; isolated here."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: that statement binds the real `torch`.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op") and not torch.cuda.is_available():
        ds_torch_comm.build_shm_op = lambda: None


def _say(message: str) -> None:
    """One line on the driver's terminal. Ray Train patches print() into a logger and also tees it
    to sys.stdout when a library has wrapped that stream, which printed every line twice."""
    print(message, file=sys.__stdout__, flush=True)


class _Progress:
    """Rank 0 prints step/total, loss, lr, tokens/s and ETA every train.log_every_n_steps."""

    def __init__(self, rank: int, total: int, world: int, start_step: int, every: int):
        self.rank, self.total, self.world, self.every = rank, total, world, every
        self.t0, self.tokens, self.start_step = time.perf_counter(), 0, start_step
        self.last, self.step_times = self.t0, []

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def tokens_per_s(self) -> float:
        return self.tokens * self.world / max(self.elapsed(), 1e-9)

    def median_step_time(self) -> float:
        """Median optimizer-step time since the last call (evaluation and checkpoint time excluded)."""
        times, self.step_times = sorted(self.step_times), []
        return times[len(times) // 2] if times else float("nan")

    def step(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now
        if self.rank != 0 or (step % self.every and step != self.total):
            return
        done = step - self.start_step
        eta = self.elapsed() / max(done, 1) * (self.total - step)
        _say(f"[ferry] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
              f"{self.tokens_per_s():,.0f} tok/s | ETA {eta:,.0f}s")
