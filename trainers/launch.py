"""Driver side of a training run: validate -> prepare data -> size resources -> fit -> export.

`train` is the entry point (the CLI and the tuner call it). It expects Ray to be initialized
(cluster/ owns the connection) and never starts training before every check has passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from trainers.config import ConfigError, RunSpec
from trainers.data import PreparedData, check_data, load_tokenizer, prepare_dataset
from trainers.loop import train_loop_per_worker
from trainers.model import check_lora_fits, load_tokenizer_for

log = logging.getLogger("ferry.launch")


class TrainingFailedError(RuntimeError):
    """The distributed run failed; the message carries the worker's own error."""


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    export_dir: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    data: PreparedData


def train(spec: RunSpec, merge: bool = False, callbacks: list | None = None,
          worker_env: dict[str, str] | None = None) -> TrainOutcome:
    """Run one fine-tuning job end to end on the connected Ray cluster
    (method=feature_extraction: `trainers.features.train_features`, after the same checks).

    Raises:
        ConfigError: a config/data/resource problem found before anything started.
        TrainingFailedError: the run started and failed.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if spec.stages:
        raise ConfigError([f"stages={[s.name for s in spec.stages]}: a staged config runs its stages "
                           "with `ferry train` (trainers.stages.run_stages), not as one run. Use "
                           "`ferry train`, or remove stages: to tune/evaluate a single stage."])
    problems = check_data(spec) + check_resources(spec) + check_storage(spec)
    if spec.method == "feature_extraction":
        from trainers.features import check_features, train_features

        # No checkpoints to resume: a rerun reuses the cached features and retrains the head.
        problems += check_features(spec)
        if problems:
            raise ConfigError(problems)
        return train_features(spec)
    problems += _check_resume(spec)
    if problems:
        raise ConfigError(problems)
    data = prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))
    tokenizer = load_tokenizer(data.tokenizer_path)
    problems = check_lora_fits(spec, tokenizer, data.label_names)
    plan = plan_steps(spec, data)
    if plan["steps_per_epoch"] == 0:
        per_step = spec.global_batch
        problems.append(
            f"train.micro_batch_size_per_worker={spec.train.micro_batch_size_per_worker}: one optimizer "
            f"step needs {per_step} training sequences but there are {data.train_rows}. Lower the batch "
            "size or add data."
        )
    if problems:
        raise ConfigError(problems)
    log.info("data: %d train / %d validation rows (cache %s)", data.train_rows, data.validation_rows,
             "hit" if data.cache_hit else "written")

    export_dir = spec.run_dir + "/final"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "data": data.to_dict(), "plan": plan,
                           "export_dir": export_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(spec),
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=spec.run.name,
            storage_path=_abs(spec.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.train.keep_best_checkpoints,
                checkpoint_score_attribute=spec.train.best_metric,
                checkpoint_score_order=spec.train.best_metric_mode,
            ),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
        datasets=_datasets(data),
        dataset_config=dataset_config(),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; surface the worker's own message
        raise TrainingFailedError(_root_message(e)) from e
    if result.error is not None:
        raise TrainingFailedError(_root_message(result.error))
    metrics = read_export_metrics(export_dir)
    if merge and spec.method == "lora":
        merge_adapter(export_dir)
    best = result.best_checkpoints[0][0].path if getattr(result, "best_checkpoints", None) else None
    return TrainOutcome(export_dir, metrics, result.checkpoint.path if result.checkpoint else None, best, data)


def _datasets(data: PreparedData) -> dict:
    """The cached Parquet as Ray Datasets. Small sets are read once on the driver and put in the
    object store, so neither start-up nor each epoch's streaming split pays for read tasks
    (seconds each on a small machine); large ones stream from storage."""
    import pyarrow.parquet as pq
    import ray.data

    out = {}
    for name, path in (("train", data.train_path), ("validation", data.validation_path)):
        if data.train_tokens * 8 < _IN_MEMORY_BYTES:
            fs, p = pafs.FileSystem.from_uri(_abs(path))
            out[name] = ray.data.from_arrow(pq.read_table(p, filesystem=fs))
        else:
            out[name] = ray.data.read_parquet(path)
    return out


_IN_MEMORY_BYTES = 256 << 20


def dataset_config():
    """Train is split into disjoint equal shards. Validation is not split: each worker evaluates
    every world-th batch of the whole set, so every validation row counts exactly once (an equal
    split would drop up to num_workers-1 rows)."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"])


def plan_steps(spec: RunSpec, data: PreparedData) -> dict[str, int]:
    """Optimizer steps per epoch and in total. Ray splits the training set equally (dropping up to
    num_workers-1 rows), every worker drops its last incomplete micro-batch, and a step needs
    grad_accum micro-batches, so all workers run the same number of steps in lockstep."""
    rows_per_worker = data.train_rows // spec.scaling.num_workers
    micro = rows_per_worker // spec.train.micro_batch_size_per_worker
    per_epoch = micro // spec.grad_accum
    total = spec.train.max_steps or per_epoch * spec.train.num_epochs
    return {"steps_per_epoch": per_epoch, "total_steps": total}


def check_resources(spec: RunSpec) -> list[str]:
    """Workers must fit the cluster and leave scaling.data_cpus for Ray Data: a run whose workers
    hold every CPU makes Ray Data's read tasks wait forever (seen on Ray 2.60)."""
    import ray

    s = spec.scaling
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpu = s.num_workers * s.cpus_per_worker
    problems = []
    if need_cpu + max(s.data_cpus, 0) > cpus + 1e-9:
        problems.append(
            f"scaling.num_workers={s.num_workers}: {s.num_workers} workers x "
            f"scaling.cpus_per_worker={s.cpus_per_worker} + scaling.data_cpus={s.data_cpus} = "
            f"{need_cpu + s.data_cpus:g} CPUs, but the cluster has {cpus:g}. Lower num_workers or "
            "cpus_per_worker (fractions are fine), or add nodes."
        )
    if s.num_workers * s.gpus_per_worker > gpus + 1e-9:
        problems.append(
            f"scaling.gpus_per_worker={s.gpus_per_worker}: {s.num_workers} workers need "
            f"{s.num_workers * s.gpus_per_worker:g} GPUs, the cluster has {gpus:g}. Lower it or add GPU nodes."
        )
    return problems + _check_placement(spec)


def _check_placement(spec: RunSpec) -> list[str]:
    """Worker bundles must fit on nodes the way the placement strategy demands. Ray accepts a
    placement group that no node layout can satisfy and leaves the run PENDING forever, so the
    rules are checked here against each alive node's total (not free) resources."""
    import ray

    s = spec.scaling
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    need = f"{s.cpus_per_worker:g} CPU" + (f" + {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else "")

    def holds(res: dict, workers: int) -> bool:
        return (res.get("CPU", 0.0) + 1e-9 >= workers * s.cpus_per_worker
                and res.get("GPU", 0.0) + 1e-9 >= workers * s.gpus_per_worker)

    fitting = sum(holds(r, 1) for r in nodes)
    if fitting == 0:
        return [f"scaling.cpus_per_worker={s.cpus_per_worker:g}: one worker needs {need} on a single "
                f"node, and none of the cluster's {len(nodes)} nodes has that. Lower "
                "scaling.cpus_per_worker/gpus_per_worker or add a larger node."]
    if s.placement_strategy == "STRICT_SPREAD" and fitting < s.num_workers:
        return [f"scaling.placement_strategy=STRICT_SPREAD: each of the scaling.num_workers="
                f"{s.num_workers} workers needs its own node with {need}, and the cluster has "
                f"{fitting} such node{'s' if fitting > 1 else ''} (of {len(nodes)}), so the run would "
                f"wait forever. Lower scaling.num_workers to {fitting}, use SPREAD or PACK, or add nodes."]
    if s.placement_strategy == "STRICT_PACK" and not any(holds(r, s.num_workers) for r in nodes):
        return [f"scaling.placement_strategy=STRICT_PACK: all scaling.num_workers={s.num_workers} "
                f"workers must share one node with {s.num_workers} x {need}, and no node of the "
                f"cluster's {len(nodes)} has that, so the run would wait forever. Use PACK or SPREAD, "
                "lower num_workers/cpus_per_worker, or add a larger node."]
    return []


def check_storage(spec: RunSpec) -> list[str]:
    """On a multi-node cluster, run.storage_path (and an explicit data.cache_dir) must be storage
    every node sees: each rank writes its ZeRO shard there, Ray Data tasks write the cache there,
    and a resumed run reads both back, wherever its workers land.

    A URI (s3://, gs://, ...) passes. A local path passes only when run.storage_shared=true and a
    marker file the driver writes there can be read on every alive node (a zero-CPU Ray task per
    node, so busy nodes still answer). Uses Ray tasks: call on the driver before training starts.

    Returns:
        Problems in the house format; empty on a single-node cluster.
    """
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return []
    paths = [("run.storage_path", spec.run.storage_path)]
    if spec.data.cache_dir:
        paths.append(("data.cache_dir", spec.data.cache_dir))
    local = [(key, path.removeprefix("file://")) for key, path in paths
             if "://" not in path or path.startswith("file://")]
    if not local:
        if spec.run.storage_shared:
            log.warning("run.storage_shared=true is ignored: run.storage_path=%s is a URI, shared "
                        "by nature.", spec.run.storage_path)
        return []
    if not spec.run.storage_shared:
        return [f"{key}={path}: the cluster has {len(nodes)} nodes and this path is local to each of "
                f"them, so workers would write {_WRITES[key]} the others (and a resumed run) cannot "
                f"see. Set {key} to shared storage (s3://..., gs://..., or an NFS/PVC mount) and, "
                "for a mounted path, run.storage_shared=true." for key, path in local]
    return [p for key, path in local for p in _verify_shared(key, path, nodes)]


_SHARED_CHECK_TIMEOUT_S = 60.0
_WRITES = {"run.storage_path": "checkpoints", "data.cache_dir": "preprocessed data"}


def _verify_shared(key: str, path: str, nodes: list[dict]) -> list[str]:
    """Write a marker under `path` here, read it back on every node; name the nodes that cannot."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Nested, so it travels by value: a node's worker need not import Ferry (and torch) to run it.
    def read_marker(marker: str) -> str | None:
        try:
            with open(marker) as f:
                return f.read()
        except OSError:
            return None

    token = uuid.uuid4().hex
    marker = os.path.join(os.path.abspath(path), f".ferry-shared-check-{token}")
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
    except OSError as e:
        return [f"{key}={path}: the driver cannot write there ({e.strerror}). Fix the mount or its "
                "permissions, or use a bucket URI (s3://..., gs://...)."]
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(read_marker)
        refs = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker): n for n in nodes}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=_SHARED_CHECK_TIMEOUT_S)
        for ref in pending:
            ray.cancel(ref, force=True)
        blind = []
        for ref in done:
            try:
                seen = ray.get(ref)
            except ray.exceptions.RayError:
                seen = None
            if seen != token:
                blind.append(_node_name(refs[ref]))
        silent = [_node_name(refs[ref]) for ref in pending]
    finally:
        os.remove(marker)
    problems = []
    if blind:
        problems.append(
            f"{key}={path}: run.storage_shared=true, but {len(blind)} of the cluster's {len(nodes)} "
            f"nodes cannot read a file the driver wrote there ({', '.join(blind)}), so their "
            f"{_WRITES[key]} would be lost to the others. Mount the same shared volume at this path "
            "on every node, or use a bucket URI (s3://..., gs://...)."
        )
    if silent:
        problems.append(
            f"{key}={path}: could not verify the path is shared: {', '.join(silent)} did not answer "
            f"within {_SHARED_CHECK_TIMEOUT_S:g} s. Check that these nodes are healthy, then retry."
        )
    return problems


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"


def _worker_resources(spec: RunSpec) -> dict[str, float]:
    res = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.gpus_per_worker:
        res["GPU"] = spec.scaling.gpus_per_worker
    return res


def _check_resume(spec: RunSpec) -> list[str]:
    has = has_checkpoint(spec)
    if spec.run.resume == "must" and not has:
        return [f"run.resume=must: no committed checkpoint for run.name={spec.run.name} under "
                f"{spec.run.storage_path}. Check run.name/storage_path or use run.resume=auto."]
    if spec.run.resume == "never" and has:
        return [f"run.resume=never: run.name={spec.run.name} already has checkpoints under "
                f"{spec.run.storage_path}. Choose a new run.name or use run.resume=auto."]
    return []


def has_checkpoint(spec: RunSpec) -> bool:
    """Whether the run has a committed checkpoint. Ray records committed checkpoints in its
    snapshot file; a checkpoint folder on disk may be uncommitted (report() returns before the
    controller registers it), so the folders themselves prove nothing."""
    fs, root = pafs.FileSystem.from_uri(_abs(spec.run_dir))
    snap = f"{root}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snap).type != pafs.FileType.File:
        return False
    with fs.open_input_stream(snap) as f:
        state = json.loads(f.read())
    return bool(state.get("checkpoint_results") or state.get("latest_checkpoint_result"))


def read_export_metrics(export_dir: str) -> dict[str, Any]:
    fs, path = pafs.FileSystem.from_uri(_abs(export_dir))
    with fs.open_input_stream(f"{path}/metrics.json") as f:
        return json.loads(f.read())


def merge_adapter(export_dir: str) -> str:
    """Write the LoRA adapter merged into its base model to <export_dir>/merged (plain HF)."""
    from trainers.data import localize

    local = localize(export_dir)
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    with open(os.path.join(local, "metrics.json")) as f:
        task = json.load(f)["task"]
    cls = AutoPeftModelForSequenceClassification if task == "sequence_classification" else AutoPeftModelForCausalLM
    merged = cls.from_pretrained(local).merge_and_unload()
    out = os.path.join(local, "merged")
    merged.save_pretrained(out, safe_serialization=True)
    # A complete model folder: the tokenizer and label names travel with the weights.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(local).save_pretrained(out)
    if os.path.exists(os.path.join(local, "labels.json")):
        shutil.copy(os.path.join(local, "labels.json"), out)
    if local != export_dir:
        fs, path = pafs.FileSystem.from_uri(export_dir)
        pafs.copy_files(out, f"{path}/merged", destination_filesystem=fs)
    return export_dir + "/merged"


def _root_message(e: BaseException) -> str:
    seen, cur = [], e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in reversed(seen):
        text = str(exc).strip()
        if text:
            return f"{type(exc).__name__}: {text.splitlines()[-1][:1000]}"
    return repr(e)


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)

