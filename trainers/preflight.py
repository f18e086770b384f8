"""Every check before a run starts, and the run's step plan: `prepare_run(spec) -> RunPlan`.

Each entry point (ferry train, each stage, ferry tune's driver, eval, predict) calls it once; a
tune trial reuses its driver's prepared data through `plan_for` and repeats no check; ferry
preprocess prepares the data alone (`prepare_checked_data`). Problems are collected from every
check and raised together as one `ConfigError`, in the house format.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from trainers.checkpoints import record_is_damaged
from trainers.config import RunSpec
from trainers.config_load import build_spec, dump_spec, load_yaml
from trainers.data.files import check_data
from trainers.data.prepare import PreparedData, prepare_dataset
from trainers.errors import ConfigError, on_full_disk
from trainers.features.extract import check_features
from trainers.lease import lease_problems
from trainers.model import check_checkpointing, check_lora_fits, load_tokenizer
from trainers.storage import (
    EXPORT_DIR,
    LEASE_FILE,
    LOGS_DIR,
    RUN_CONFIG_FILE,
    committed_checkpoints,
    filesystem,
    is_uri,
)
from trainers.storage import (
    exists as fs_exists,
)

log = logging.getLogger("ferry.preflight")

# Keys a rerun may change without changing what the run computes (how it is watched or kept).
_RERUN_FREE_KEYS = {
    "run.resume",
    "run.storage_path",  # where the run folder is, not what it computes: a moved run resumes
    "run.storage_shared",
    "run.stage_baseline",
    "scaling.max_failures",
    "scaling.data_cpus",
    "train.log_every_n_steps",
    "train.export",
    "export",  # how the weights are stored, not what they are
    # Memory levers that leave the numbers as they were (within float tolerance): a run that ran
    # out of memory may resume with checkpointing on or another attention kernel.
    "train.gradient_checkpointing",
    "model.attn_implementation",
    "data.cache_dir",
    "stages",
    "tracking",
}


@dataclass
class RunPlan:
    """A checked run: its spec, its prepared data and its step plan (travels to workers)."""

    spec: RunSpec
    data: PreparedData
    steps_per_epoch: int
    total_steps: int


def prepare_run(spec: RunSpec) -> RunPlan:
    """Check everything, prepare the data, plan the steps. Needs a connected Ray.

    Raises:
        ConfigError: every config, data, resource, storage and resume problem found.
        DataError: bad rows (raised by data preparation with file and row).
    """
    if spec.stages:
        raise ConfigError(
            [
                f"stages={[s.name for s in spec.stages]}: a staged config runs its "
                "stages with `ferry train` (trainers.stages.run_stages), not as one "
                "run. Use `ferry train`, or remove stages: to tune/evaluate a single "
                "stage."
            ]
        )
    problems = check_run(spec)
    if problems:
        raise ConfigError(problems)
    return prepare_checked_run(spec)


def prepare_checked_run(spec: RunSpec) -> RunPlan:
    """`prepare_run` for a spec whose `check_run` already passed (the CLI runs it before it
    starts Ray, to fail in a second rather than after Ray's start-up): the cluster's checks,
    then the data and the plan."""
    problems = check_resources(spec) + check_storage(spec)
    if problems:
        raise ConfigError(problems)
    return plan_checked(spec)


def check_run(spec: RunSpec) -> list[str]:
    """The checks of one run that need neither the cluster nor its prepared data: data files,
    writable storage, rerun against what is on disk, and the feature-extraction block."""
    problems = check_data(spec) + check_writable(spec) + check_rerun(spec)
    if spec.method == "feature_extraction":
        problems += check_features(spec)
    return problems


def check_writable(spec: RunSpec) -> list[str]:
    """run.storage_path and an explicit data.cache_dir must take files: each is created if
    missing, a probe file is written there and removed. Checked before Ray starts, so a path
    under a file or a read-only folder fails in a second, not after the data was prepared (the
    default cache lives under run.storage_path, so that one check covers it). Folders the check
    created are removed again: `ferry validate` leaves nothing behind. A bucket URI is not
    probed (a check reaches no network).

    Returns:
        Problems in the house format.
    """
    paths = [("run.storage_path", spec.run.storage_path)]
    if spec.data.cache_dir:
        paths.append(("data.cache_dir", spec.data.cache_dir))
    problems = []
    for key, path in paths:
        if is_uri(path) and not path.startswith("file://"):
            continue
        reason = _probe_write(path.removeprefix("file://"))
        if reason:
            problems.append(
                f"{key}={path}: cannot create or write there ({reason}). Choose a writable "
                "folder or a bucket URI (s3://..., gs://...)."
            )
    return problems


def _probe_write(folder: str) -> str | None:
    """Why `folder` cannot take a file (`strerror: path`), or None. Only the folders this call
    created are removed, and only while empty: a run that started meanwhile keeps its own."""
    folder = os.path.abspath(folder)
    missing, top = [], folder
    while not os.path.exists(top) and os.path.dirname(top) != top:
        missing.append(top)
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        return f"Not a directory: {top}"
    created: list[str] = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=".ferry-write-check-", dir=folder)
        try:
            os.write(fd, b"ferry")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        return f"{e.strerror}: {e.filename}" if e.filename else (e.strerror or str(e))
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return None


def plan_checked(spec: RunSpec) -> RunPlan:
    """Prepare the data and plan the steps of a run whose checks passed (`check_run` and the
    cluster's): the checks that need the tokenizer (LoRA shapes) and the data (enough rows for
    a step) run here."""
    if spec.run.resume == "restart":
        _clear_run(spec)
    data = prepare_dataset(spec)
    log.info(
        "data: %d train / %d validation rows (cache %s)",
        data.train_rows,
        data.validation_rows,
        "hit" if data.cache_hit else "written",
    )
    problems = []
    if spec.method != "feature_extraction":
        tokenizer = load_tokenizer(data.tokenizer_path)
        problems = check_lora_fits(spec, tokenizer, data.label_names)
        problems += check_checkpointing(spec, tokenizer, data.label_names)
    return plan_for(spec, data, problems)


def prepare_data(spec: RunSpec) -> PreparedData:
    """The checks and data preparation of an entry point that reads a trained model (ferry eval,
    predict from a DeepSpeed checkpoint): the run's data, checked and tokenized like training's
    (a cache hit after training). Needs a connected Ray.

    Raises:
        ConfigError: every data and resource problem found.
    """
    problems = check_data(spec) + check_resources(spec)
    if problems:
        raise ConfigError(problems)
    return prepare_dataset(spec)


def prepare_checked_data(spec: RunSpec) -> PreparedData:
    """The data of a run alone (ferry preprocess), for a spec whose `check_data` and
    `check_writable` already passed: `prepare_dataset`, the call and cache key training makes,
    so a following `ferry train` hits the cache. Needs a connected Ray.

    The storage check runs (Ray Data tasks write the cache from any node); the rerun and
    resource checks do not: nothing is trained and the run's folder is not touched.

    Raises:
        ConfigError: run.storage_path or data.cache_dir not shared on a multi-node cluster.
        DataError: bad rows (raised by data preparation with file and row).
    """
    problems = check_storage(spec)
    if problems:
        raise ConfigError(problems)
    return prepare_dataset(spec)


def plan_for(spec: RunSpec, data: PreparedData, problems: list[str] | None = None) -> RunPlan:
    """The step plan of `spec` on already prepared data (a tune trial: its driver checked).

    Ray splits the training set equally (dropping up to num_workers-1 rows), every worker drops
    its last incomplete micro-batch, and a step needs grad_accum micro-batches, so all workers
    run the same number of steps in lockstep.
    """
    problems = list(problems or [])
    rows_per_worker = data.train_rows // spec.scaling.num_workers
    per_epoch = rows_per_worker // spec.train.micro_batch_size_per_worker // spec.grad_accum
    if per_epoch == 0 and spec.method != "feature_extraction":
        problems.append(
            f"train.micro_batch_size_per_worker={spec.train.micro_batch_size_per_worker}: one "
            f"optimizer step needs {spec.global_batch} training sequences but there are "
            f"{data.train_rows}. Lower the batch size or add data."
        )
    if problems:
        raise ConfigError(problems)
    total = spec.train.max_steps or per_epoch * spec.train.num_epochs
    return RunPlan(spec, data, per_epoch, total)


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
            f"{s.num_workers * s.gpus_per_worker:g} GPUs, the cluster has {gpus:g}. Lower it or "
            "add GPU nodes."
        )
    return problems + _check_placement(spec)


def _check_placement(spec: RunSpec) -> list[str]:
    """Worker bundles must fit on nodes the way the placement strategy demands. Ray accepts a
    placement group that no node layout can satisfy and leaves the run PENDING forever, so the
    rules are checked here against each alive node's total (not free) resources."""
    import ray

    s = spec.scaling
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    need = f"{s.cpus_per_worker:g} CPU" + (
        f" + {s.gpus_per_worker:g} GPU" if s.gpus_per_worker else ""
    )

    def holds(res: dict, workers: int) -> bool:
        return (
            res.get("CPU", 0.0) + 1e-9 >= workers * s.cpus_per_worker
            and res.get("GPU", 0.0) + 1e-9 >= workers * s.gpus_per_worker
        )

    fitting = sum(holds(r, 1) for r in nodes)
    if fitting == 0:
        return [
            f"scaling.cpus_per_worker={s.cpus_per_worker:g}: one worker needs {need} on a "
            f"single node, and none of the cluster's {len(nodes)} nodes has that. Lower "
            "scaling.cpus_per_worker/gpus_per_worker or add a larger node."
        ]
    if s.placement_strategy == "STRICT_SPREAD" and fitting < s.num_workers:
        return [
            f"scaling.placement_strategy=STRICT_SPREAD: each of the scaling.num_workers="
            f"{s.num_workers} workers needs its own node with {need}, and the cluster has "
            f"{fitting} such node{'s' if fitting > 1 else ''} (of {len(nodes)}), so the run "
            f"would wait forever. Lower scaling.num_workers to {fitting}, use SPREAD or PACK, "
            "or add nodes."
        ]
    if s.placement_strategy == "STRICT_PACK" and not any(holds(r, s.num_workers) for r in nodes):
        return [
            f"scaling.placement_strategy=STRICT_PACK: all scaling.num_workers={s.num_workers} "
            f"workers must share one node with {s.num_workers} x {need}, and no node of the "
            f"cluster's {len(nodes)} has that, so the run would wait forever. Use PACK or "
            "SPREAD, lower num_workers/cpus_per_worker, or add a larger node."
        ]
    return []


def check_storage(spec: RunSpec) -> list[str]:
    """On a multi-node cluster, run.storage_path (and an explicit data.cache_dir) must be storage
    every node sees: each rank writes its ZeRO shard there, Ray Data tasks write the cache there,
    and a resumed run reads both back, wherever its workers land.

    A URI (s3://, gs://, ...) passes. A local path passes only when run.storage_shared=true and a
    marker file the driver writes there can be read on every alive node (a zero-CPU Ray task per
    node, so busy nodes still answer).

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
    local = [
        (key, path.removeprefix("file://"))
        for key, path in paths
        if not is_uri(path) or path.startswith("file://")
    ]
    if not local:
        if spec.run.storage_shared:
            log.warning(
                "run.storage_shared=true is ignored: run.storage_path=%s is a URI, shared "
                "by nature.",
                spec.run.storage_path,
            )
        return []
    if not spec.run.storage_shared:
        return [
            f"{key}={path}: the cluster has {len(nodes)} nodes and this path is local to each "
            f"of them, so workers would write {_WRITES[key]} the others (and a resumed run) "
            f"cannot see. Set {key} to shared storage (s3://..., gs://..., or an NFS/PVC "
            "mount) and, for a mounted path, run.storage_shared=true."
            for key, path in local
        ]
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
        return [
            f"{key}={path}: the driver cannot write there ({e.strerror}). Fix the mount or "
            "its permissions, or use a bucket URI (s3://..., gs://...)."
        ]
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(read_marker)
        refs = {
            read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(marker): n
            for n in nodes
        }
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
            f"{key}={path}: run.storage_shared=true, but {len(blind)} of the cluster's "
            f"{len(nodes)} nodes cannot read a file the driver wrote there ({', '.join(blind)}), "
            f"so their {_WRITES[key]} would be lost to the others. Mount the same shared volume "
            "at this path on every node, or use a bucket URI (s3://..., gs://...)."
        )
    if silent:
        problems.append(
            f"{key}={path}: could not verify the path is shared: {', '.join(silent)} did not "
            f"answer within {_SHARED_CHECK_TIMEOUT_S:g} s. Check that these nodes are healthy, "
            "then retry."
        )
    return problems


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"


def has_checkpoint(spec: RunSpec) -> bool:
    """Whether the run has a committed checkpoint to resume from (a damaged record counts: the
    run's next `ferry train` repairs it, trainers.checkpoints)."""
    if record_is_damaged(spec.run_dir):
        return True
    return committed_checkpoints(spec.run_dir) is not None


def recorded_config(spec: RunSpec) -> dict[str, Any] | None:
    """The config this run name was started with (written when it started; older runs recorded
    it only in their export), or None for a new run."""
    return _read_recorded(spec.run_dir)


def load_recorded_spec(run_dir: str) -> RunSpec:
    """The validated config a run folder was started with (`ferry export RUN_DIR`), pointing at
    `run_dir` wherever the run lives now: run.storage_path and run.name are taken from the
    folder, so a moved run (or one trained elsewhere on the same storage) still finds its
    checkpoints.

    Raises:
        ConfigError: no recorded config in `run_dir`, or it no longer validates.
    """
    raw = _read_recorded(run_dir)
    if raw is None:
        raise ConfigError(
            [
                f"run={run_dir}: no {RUN_CONFIG_FILE} there (Ferry writes it when a run starts). "
                "Pass the folder of a Ferry run: <run.storage_path>/<run.name>."
            ]
        )
    root = run_dir.rstrip("/") if is_uri(run_dir) else os.path.abspath(run_dir)
    storage_path, name = root.rsplit("/", 1)
    raw.setdefault("run", {}).update(storage_path=storage_path or "/", name=name)
    return build_spec(raw)


def _read_recorded(run_dir: str) -> dict[str, Any] | None:
    fs, root = filesystem(run_dir)
    for path in (f"{root}/{RUN_CONFIG_FILE}", f"{root}/{EXPORT_DIR}/{RUN_CONFIG_FILE}"):
        if fs.get_file_info(path).type.name == "File":
            with fs.open_input_stream(path) as f:
                return load_yaml(f.read().decode())
    return None


def record_config(spec: RunSpec) -> None:
    """Write the run's resolved config beside its checkpoints, so a rerun can be compared. The
    run's first file: a full disk under run.storage_path shows here first, as a DiskFullError."""
    fs, root = filesystem(spec.run_dir)
    path = f"{root}/{RUN_CONFIG_FILE}"
    with on_full_disk("run.storage_path", spec.run.storage_path, path):
        fs.create_dir(root)
        with fs.open_output_stream(path) as f:
            f.write(dump_spec(spec).encode())


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, dotted + ".")
        elif a != b:
            out.append(dotted)
    return out


def check_rerun(spec: RunSpec) -> list[str]:
    """run.resume against what is on disk. A run another live driver is writing is refused,
    whatever run.resume says (`trainers.lease`; restart would delete its files). A rerun of an
    existing run.name resumes (or, when finished, re-exports) that run, so it must be the same
    run: a changed config is refused with the keys that changed, instead of silently continuing
    the old one."""
    held = lease_problems(spec.run_dir, spec.run.name)
    if held:
        return held
    if spec.run.resume == "restart":
        return []
    has = has_checkpoint(spec)
    if spec.run.resume == "must" and not has:
        return [
            f"run.resume=must: no committed checkpoint for run.name={spec.run.name} under "
            f"{spec.run.storage_path}. Check run.name/storage_path or use run.resume=auto."
        ]
    if spec.run.resume == "never" and has:
        return [
            f"run.resume=never: run.name={spec.run.name} already has checkpoints under "
            f"{spec.run.storage_path}. Choose a new run.name or use run.resume=auto."
        ]
    old = recorded_config(spec)
    if old is None:
        return []
    finished = fs_exists(f"{spec.export_dir}/metrics.json")
    changed = [
        k
        for k in changed_keys(old, spec.model_dump(mode="json"))
        if k not in _RERUN_FREE_KEYS and k.split(".")[0] not in _RERUN_FREE_KEYS
    ]
    if not changed:
        return []
    shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
    state = "finished earlier" if finished else "already exists"
    why = ""
    if "scaling.num_workers" in changed:
        # DeepSpeed's ZeRO checkpoints are partitioned per rank: another world size would load
        # the wrong partitions (or none), so this is refused rather than resharded.
        why = (
            f" Its checkpoints hold one ZeRO shard per worker of the scaling.num_workers="
            f"{old.get('scaling', {}).get('num_workers')} it ran with: resume it with that."
        )
    return [
        f"run.name={spec.run.name}: this run {state} with a different config (changed: "
        f"{shown}; recorded in {spec.run_dir}/{RUN_CONFIG_FILE}); rerunning it would "
        f"{'re-export' if finished else 'resume'} the old run.{why} "
        "Choose a new run.name, or set run.resume=restart to discard the old run and start "
        "over."
    ]


def _clear_run(spec: RunSpec) -> None:
    """run.resume=restart: the old run's checkpoints and export go (the user asked for it). Its
    LOGS_DIR stays: the command that clears the run is writing its log there already. So does
    its LEASE_FILE: `check_rerun` refused a live driver's lease before, and a dead driver's is
    taken over by `trainers.lease.hold_run` when training starts (deleting it here could delete
    the lease of a driver that started since)."""
    fs, root = filesystem(spec.run_dir)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.base_name in (LOGS_DIR, LEASE_FILE):
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
        if not fs.get_file_info(pafs.FileSelector(root)):
            fs.delete_dir(root)
    log.warning("run.resume=restart: removed the earlier run at %s", spec.run_dir)
