"""Driver side of a training run: a checked `RunPlan` -> Ray Train fit -> export.

The workers export the last state themselves; with train.export=best and an earlier checkpoint
the best, the driver exports that checkpoint after the fit (`export_checkpoint`: its DeepSpeed
files consolidated here, ZeRO-3 shards included).

`train` is the entry point (the CLI, stages and the tuner call it with a plan from
`trainers.preflight`). It expects Ray to be initialized (cluster/ owns the connection). It holds
the run's lease (`trainers.lease`) from before the first file it writes to the end, so a second
driver of the same run folder is refused. A worker error that a retry would raise again
(trainers.errors.NOT_RETRIED) ends the run without the retries of scaling.max_failures
(`trainers.train.fail_fast`) and is raised on the driver as itself.
"""

from __future__ import annotations

import json
import logging

from trainers.checkpoints import recover_run
from trainers.data.prepare import PreparedData
from trainers.errors import ConfigError, on_full_disk, run_error
from trainers.export import (
    TrainOutcome,
    export_checkpoint,
    export_dtype,
    exported_step,
    find_checkpoint,
)
from trainers.features.probe import Probe, probe_gain, probe_verdict, run_probe, wants_probe
from trainers.lease import hold_run
from trainers.preflight import RunPlan, record_config
from trainers.saved import merge_adapter, read_export_metrics
from trainers.storage import absolute, filesystem, join, write_bytes
from trainers.train.features import train_features
from trainers.train.loop import KillAfterStep, train_loop_per_worker

log = logging.getLogger("ferry.launch")


def train(
    plan: RunPlan,
    merge: bool = False,
    callbacks: list | None = None,
    worker_env: dict[str, str] | None = None,
    fault: KillAfterStep | None = None,
    tracking_parent: str | None = None,
) -> TrainOutcome:
    """Run one checked job end to end on the connected Ray cluster (method=feature_extraction:
    `trainers.train.features.train_features`), recorded by `trainers.tracking.track_run`
    (history, curves, and MLflow/TensorBoard when the config turns them on).

    Args:
        plan: the checked run (`trainers.preflight`).
        merge: also write the LoRA-merged model.
        callbacks: more Ray Train callbacks (a tune trial's `TuneReportCallback`).
        worker_env: environment variables for the training workers.
        fault: fault injection for resume tests.
        tracking_parent: the MLflow run of the search this run is a trial of.

    Raises:
        ConfigError: another driver is writing this run (`trainers.lease`), or no committed
            checkpoint of it verifies (`trainers.checkpoints.recover_run`).
        DivergedError, CheckpointError, DataError: a worker's own error (not retried).
        TrainingFailedError: the run started and failed.
        DiskFullError: the disk under run.storage_path filled up: on the driver (the run's
            config, its export), a worker or Ray's controller (not retried).
    """
    with hold_run(plan.spec.run_dir, plan.spec.run.name):
        return _train(plan, merge, callbacks, worker_env, fault, tracking_parent)


def _train(
    plan: RunPlan,
    merge: bool,
    callbacks: list | None,
    worker_env: dict[str, str] | None,
    fault: KillAfterStep | None,
    tracking_parent: str | None,
) -> TrainOutcome:
    import ray.train
    from ray.train.torch import TorchTrainer

    # Here, like ray.train: these callback classes load Ray Train, which `ferry validate` skips.
    from trainers.tracking import track_run
    from trainers.train.fail_fast import FailFast

    spec, data = plan.spec, plan.data
    record_config(spec)
    if spec.method == "feature_extraction":
        # No checkpoints to resume: a rerun reuses the cached features and retrains the head.
        with track_run(spec, None, tracking_parent) as tracking:
            outcome = train_features(plan)
        outcome.tracking = tracking.summary()
        return outcome
    # A damaged latest checkpoint is set aside here, before any worker could be handed it.
    recover_run(spec)
    probe = run_probe(spec, data) if wants_probe(spec) else None
    with track_run(spec, plan.total_steps, tracking_parent) as tracking:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.model_dump(),
                "data": data.to_dict(),
                "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps,
                "fault": fault,
                "probe": probe.metrics if probe else None,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=spec.scaling.num_workers,
                use_gpu=spec.scaling.gpus_per_worker > 0,
                resources_per_worker=spec.scaling.resources_per_worker,
                placement_strategy=spec.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=spec.run.name,
                storage_path=absolute(spec.run.storage_path),
                failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=spec.train.keep_best_checkpoints,
                    checkpoint_score_attribute=spec.train.best_metric,
                    checkpoint_score_order=spec.train.best_metric_mode,
                ),
                # FailFast last: the others see a worker's error before it ends the run.
                callbacks=[*(callbacks or []), tracking.callback, FailFast()],
                worker_runtime_env={"env_vars": worker_env} if worker_env else None,
            ),
            datasets=ray_datasets(data),
            dataset_config=dataset_config(),
        )
        # A worker or Ray's controller that met a full disk under run.storage_path: one
        # message naming it (the checkpoint it was writing is never committed).
        with on_full_disk("run.storage_path", spec.run.storage_path, spec.run_dir):
            try:
                result = trainer.fit()
            except Exception as e:  # Ray wraps the worker's exception; surface the worker's own
                raise run_error(e) from e
            if result.error is not None:
                raise run_error(result.error)
        _, _, latest = find_checkpoint(spec, "last")
        step = exported_step(spec, latest["history"])
        if step != latest["step"]:  # the loop left the export of an earlier, better step to us
            _, best, _ = find_checkpoint(spec, step)
            with on_full_disk("run.storage_path", spec.run.storage_path, spec.export_dir):
                export_checkpoint(
                    spec, data, best, spec.export_dir, run_state=latest, export="best"
                )
            log.info(
                "exported the best checkpoint (step %d of %d) to %s",
                step,
                latest["step"],
                spec.export_dir,
            )
    metrics = read_export_metrics(spec.export_dir)
    if probe is not None:
        metrics = _with_probe(spec, metrics, probe)
    if merge and spec.method == "lora":
        with on_full_disk("run.storage_path", spec.run.storage_path, spec.export_dir):
            merge_adapter(spec.export_dir, export_dtype(spec, adapter=False))
    return TrainOutcome(
        spec.export_dir,
        metrics,
        result.checkpoint.path if result.checkpoint else None,
        _best_checkpoint(spec),
        data,
        tracking.summary(),
    )


def _with_probe(spec, metrics: dict, probe: Probe) -> dict:
    """metrics.json with the frozen probe, the fine-tune's gain over it and, when it ended
    below, the one-line verdict (the CLI prints it under the table)."""
    gain = probe_gain(metrics.get("final") or {}, probe)
    metrics = {
        **metrics,
        "probe": probe.to_dict(),
        "probe_gain": gain,
        "probe_verdict": probe_verdict(
            gain, spec.method, spec.train.best_metric, probe.validation_rows
        ),
    }
    if metrics["probe_verdict"]:
        log.warning("%s", metrics["probe_verdict"])
    with on_full_disk("run.storage_path", spec.run.storage_path, spec.export_dir):
        write_bytes(join(spec.export_dir, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return metrics


def _best_checkpoint(spec) -> str | None:
    """The committed checkpoint with the best train.best_metric (None: no finite value)."""
    try:
        return find_checkpoint(spec, "best")[1]
    except ConfigError:
        return None


def ray_datasets(data: PreparedData, splits: tuple[str, ...] = ("train", "validation")) -> dict:
    """The cached Parquet as Ray Datasets. Small sets are read once on the driver and put in the
    object store, so neither start-up nor each epoch's streaming split pays for read tasks
    (seconds each on a small machine); large ones stream from storage."""
    import pyarrow.parquet as pq
    import ray.data

    out = {}
    for name in splits:
        path = data.train_path if name == "train" else data.validation_path
        if data.train_tokens * 8 < _IN_MEMORY_BYTES:
            fs, p = filesystem(path)
            out[name] = ray.data.from_arrow(pq.read_table(p, filesystem=fs))
        else:
            out[name] = ray.data.read_parquet(path)
    return out


_IN_MEMORY_BYTES = 256 << 20


def dataset_config():
    """Train is split into disjoint equal shards. Validation is not split: each worker evaluates
    every world-th batch of the whole set, so every validation row counts exactly once (an equal
    split would drop up to num_workers-1 rows).

    Order is preserved: with more than one prefetched batch, Ray Data collates in a thread pool
    and, unordered, hands batches over in whichever order the threads finish. The same seed
    then trained on differently ordered batches each run, and a resume, which skips the
    micro-batches its checkpoint consumed by count, skipped the wrong ones."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)
