"""Verified checkpoints: every rank's files listed in a manifest, checked before anything loads;
a damaged checkpoint set aside for the newest earlier one that verifies; Ray Train's commit
record repaired from the manifests.

`recover_run(spec)` is the entry point: the driver calls it before a run's workers start
(`trainers.train.launch`). The workers write their manifests (`write_manifest`, the last file of
each rank's part of a checkpoint) and check their own part again before they load
(`verify_checkpoint(..., rank=)`).

Why the driver: Ray Train hands every restarted worker the latest checkpoint its commit record
(COMMIT_RECORD, Ray's `checkpoint_manager_snapshot.json`) names, and nothing else. A checkpoint
truncated by a power cut or a full disk after Ray committed it would be loaded, fail with
`EOFError` or a zip error, and be retried as it is. So before `fit()`, the driver checks the
latest committed checkpoint; a damaged one is moved under `<run>/damaged/` and dropped from the
record, and the next newest committed checkpoint that verifies becomes the one Ray hands out.
The record is Ray's own file (its format is Ray's; kept in step by tests/test_faults.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Any

import pyarrow.fs as pafs

from trainers.errors import CheckpointError, ConfigError
from trainers.storage import (
    STATE_FILE,
    exists,
    filesystem,
    is_uri,
    join,
    read_json_if_any,
    with_scheme,
    write_bytes,
)

log = logging.getLogger("ferry.checkpoints")

MANIFEST = "ferry_manifest_rank{rank}.json"
COMMIT_RECORD = "checkpoint_manager_snapshot.json"
DAMAGED_DIR = "damaged"
CHECKPOINT_PREFIX = "checkpoint_step_"
_MANIFEST_RE = re.compile(r"^ferry_manifest_rank(\d+)\.json$")


def recover_run(spec) -> str | None:
    """Make the run's latest committed checkpoint one that verifies, before its workers start.

    - A commit record that does not parse is rebuilt from the checkpoint folders whose manifests
      verify (the damaged file is kept beside, under damaged/).
    - A damaged latest checkpoint is moved to `<run>/damaged/` and dropped from the record, with
      one warning naming it and what is wrong; the newest earlier committed one that verifies is
      then the latest (at most one more evaluation interval is redone when the previous one was
      kept).
    - Checkpoint folders Ray never committed (a run stopped while it wrote one) are removed: a
      resumed run would otherwise write into them or list them.

    Returns:
        The path of the checkpoint the run resumes from, or None for a new run.

    Raises:
        ConfigError: no committed checkpoint verifies, or the record is damaged and no folder
            verifies to rebuild it; the message names the checkpoints and the fix.
    """
    fs, root = filesystem(spec.run_dir)
    if not exists(join(spec.run_dir, COMMIT_RECORD)):
        return None
    record = _read_record(spec.run_dir)
    if record is None:
        record = _rebuild_record(spec, fs, root)
    damaged: list[str] = []
    while record["latest_checkpoint_result"] is not None:
        name = record["latest_checkpoint_result"]["checkpoint_dir_name"]
        problems = verify_checkpoint(join(spec.run_dir, name))
        if not problems:
            break
        where = _set_aside(fs, root, name)
        damaged.append(f"{name} ({'; '.join(problems[:3])})")
        log.warning(
            "checkpoint %s is damaged (%s): moved to %s; resuming from the newest earlier "
            "checkpoint that verifies.",
            name,
            "; ".join(problems[:3]),
            where,
        )
        record = _drop(record, name)
        _write_record(spec.run_dir, record)
    if record["latest_checkpoint_result"] is None and damaged:
        raise ConfigError(
            [
                f"run.name={spec.run.name}: no committed checkpoint of the run verifies "
                f"({'; '.join(damaged)}; set aside under {join(spec.run_dir, DAMAGED_DIR)}). "
                "Start the run over with run.resume=restart, or choose a new run.name."
            ]
        )
    _remove_uncommitted(fs, root, record)
    latest = record["latest_checkpoint_result"]
    return join(spec.run_dir, latest["checkpoint_dir_name"]) if latest else None


def write_manifest(folder: str, rank: int, world: int, step: int) -> None:
    """List every file under `folder` (this rank's part of a checkpoint, before Ray merges the
    ranks' parts) with its size and SHA-256, in MANIFEST; written last, so a manifest present
    means the rank's part was written whole."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            with open(full, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            files[rel] = {"size": os.path.getsize(full), "sha256": digest}
    manifest = {"rank": rank, "world": world, "step": step, "files": files}
    path = os.path.join(folder, MANIFEST.format(rank=rank))
    with open(f"{path}.tmp", "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())  # the manifest vouches for files already on disk
    os.replace(f"{path}.tmp", path)


def verify_checkpoint(path: str, rank: int | None = None, world: int | None = None) -> list[str]:
    """What is wrong with a checkpoint folder, as short phrases naming the files; empty when it
    verifies: every rank's manifest present, and every file it lists present with its size and
    (on local storage; on a bucket, sizes only: hashing would download it) its SHA-256.

    Args:
        path: the checkpoint folder (local path or URI).
        rank: check only this rank's files (a worker before it loads); None: every rank's.
        world: the number of ranks the loader expects; None: as the manifests say.
    """
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return ["the folder is missing"]
    manifests = {}
    for info in fs.get_file_info(pafs.FileSelector(p)):
        found = _MANIFEST_RE.match(info.base_name)
        if found:
            manifests[int(found.group(1))] = info.path
    if not manifests:
        # Written before manifests existed: the state file at least must be there and readable.
        state = read_json_if_any(join(path, STATE_FILE))
        return [] if state is not None else [f"{STATE_FILE} is missing or unreadable (no manifest)"]
    problems: list[str] = []
    manifest_world = None
    for r in [rank] if rank is not None else sorted(manifests):
        if r not in manifests:
            problems.append(f"{MANIFEST.format(rank=r)} is missing")
            continue
        manifest = read_json_if_any(with_scheme(path, manifests[r]))
        if not isinstance(manifest, dict) or "files" not in manifest:
            problems.append(f"{MANIFEST.format(rank=r)} is unreadable")
            continue
        manifest_world = manifest["world"]
        problems += _check_files(fs, p, manifest["files"], hash_files=not is_uri(path))
    expected = world or manifest_world
    if expected is not None and rank is None:
        missing = sorted(set(range(expected)) - set(manifests))
        problems += [
            f"{MANIFEST.format(rank=r)} is missing (rank {r} of {expected})" for r in missing
        ]
    if world is not None and manifest_world is not None and manifest_world != world:
        problems.append(
            f"written by {manifest_world} workers, loaded by {world}: each rank's ZeRO shard "
            "belongs to its rank"
        )
    return problems


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step `step` (the loop reports it so)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def committed_names(run_dir: str) -> list[str] | None:
    """The checkpoint folders the run's commit record names (None: no readable record)."""
    record = _read_record(run_dir)
    if record is None:
        return None
    return [r["checkpoint_dir_name"] for r in record["checkpoint_results"]]


def record_is_damaged(run_dir: str) -> bool:
    """The run has a commit record that does not parse (repaired by the next `recover_run`)."""
    return exists(join(run_dir, COMMIT_RECORD)) and _read_record(run_dir) is None


def raise_if_damaged(path: str, problems: list[str]) -> None:
    """The one error a worker raises when the checkpoint it was handed does not verify."""
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({'; '.join(problems[:3])}). Rerun `ferry train` "
            "on the run: it sets the damaged checkpoint aside and resumes from the newest "
            "earlier one that verifies (`ferry export RUN_DIR --checkpoint STEP` exports "
            "another)."
        )


def _check_files(fs, root: str, files: dict[str, dict], hash_files: bool) -> list[str]:
    problems = []
    for rel, want in sorted(files.items()):
        info = fs.get_file_info(f"{root}/{rel}")
        if info.type != pafs.FileType.File:
            problems.append(f"{rel} is missing")
        elif info.size != want["size"]:
            problems.append(f"{rel} is {info.size:,} bytes, its manifest says {want['size']:,}")
        elif hash_files:
            with open(info.path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != want["sha256"]:
                    problems.append(f"{rel} does not match its SHA-256")
    return problems


def _read_record(run_dir: str) -> dict[str, Any] | None:
    """Ray's commit record as a dict; None when it is missing or does not parse."""
    record = read_json_if_any(join(run_dir, COMMIT_RECORD))
    keys = ("checkpoint_results", "checkpoint_report_indices", "latest_checkpoint_result")
    return record if isinstance(record, dict) and all(k in record for k in keys) else None


def _write_record(run_dir: str, record: dict[str, Any]) -> None:
    # Written beside and renamed into place (locally): a crash now never truncates it.
    write_bytes(join(run_dir, COMMIT_RECORD), json.dumps(record).encode())


def _drop(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The record without checkpoint `name`; the latest is then the newest one left (by Ray's
    report index)."""
    pairs = [
        (r, i)
        for r, i in zip(record["checkpoint_results"], record["checkpoint_report_indices"])
        if r["checkpoint_dir_name"] != name
    ]
    out = dict(record)
    out["checkpoint_results"] = [r for r, _ in pairs]
    out["checkpoint_report_indices"] = [i for _, i in pairs]
    out["latest_checkpoint_result"] = max(pairs, key=lambda p: p[1])[0] if pairs else None
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        out[key] = [n for n in record.get(key, []) if n != name]
    return out


def _rebuild_record(spec, fs, root: str) -> dict[str, Any]:
    """A commit record from the checkpoint folders whose every manifest verifies, each with the
    metrics its own state file recorded for its step; ordered worst first by
    train.best_metric, as Ray keeps it (its retention drops from the front)."""
    import ray

    kept = _set_aside(fs, root, COMMIT_RECORD)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith(CHECKPOINT_PREFIX):
            continue
        folder = join(spec.run_dir, name)
        if not _has_manifest(fs, info.path) or verify_checkpoint(folder):
            continue
        state = read_json_if_any(join(folder, STATE_FILE)) or {}
        step = state.get("step")
        metrics = next(
            (h for h in state.get("history", []) if h.get("train/step") == step),
            {"train/step": step},
        )
        found.append((int(step or 0), name, metrics))
    if not found:
        raise ConfigError(
            [
                f"run.name={spec.run.name}: the run's commit record {join(spec.run_dir, COMMIT_RECORD)} "
                f"is damaged (not valid JSON; kept as {kept}) and no checkpoint folder verifies "
                "to rebuild it. Start the run over with run.resume=restart, or choose a new "
                "run.name."
            ]
        )
    found.sort()
    t = spec.train
    sign = 1.0 if t.best_metric_mode == "max" else -1.0

    def worst_first(item) -> tuple[float, int]:
        value = item[2].get(t.best_metric)
        ok = isinstance(value, int | float) and value == value
        return (sign * value if ok else float("-inf"), item[0])

    ordered = sorted(found, key=worst_first)
    index = {name: i + 1 for i, (_, name, _) in enumerate(found)}  # report order = step order
    entries = [{"version": 0, "checkpoint_dir_name": n, "metrics": m} for _, n, m in ordered]
    record = {
        "ray_version": ray.__version__,
        "checkpoint_results": entries,
        "checkpoint_report_indices": [index[e["checkpoint_dir_name"]] for e in entries],
        "latest_checkpoint_result": next(
            e for e in entries if e["checkpoint_dir_name"] == found[-1][1]
        ),
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(found),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    _write_record(spec.run_dir, record)
    log.warning(
        "the run's commit record %s was damaged (kept as %s): rebuilt from the manifests of %d "
        "checkpoint(s), the latest %s.",
        join(spec.run_dir, COMMIT_RECORD),
        kept,
        len(found),
        found[-1][1],
    )
    return record


def _has_manifest(fs, folder: str) -> bool:
    return any(_MANIFEST_RE.match(i.base_name) for i in fs.get_file_info(pafs.FileSelector(folder)))


def _set_aside(fs, root: str, name: str) -> str:
    """Move `<root>/<name>` under `<root>/damaged/`, stamped (nothing is deleted: it may be
    inspected, or a file recovered by hand)."""
    target_dir = f"{root}/{DAMAGED_DIR}"
    fs.create_dir(target_dir)
    target = f"{target_dir}/{name}.{time.strftime('%Y%m%d-%H%M%S')}"
    fs.move(f"{root}/{name}", target)
    return target


def _remove_uncommitted(fs, root: str, record: dict[str, Any]) -> None:
    """Remove the checkpoint folders the record does not name. Only the driver holding the run
    (trainers.lease) gets here, so no live worker is still writing one."""
    named = {r["checkpoint_dir_name"] for r in record["checkpoint_results"]}
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX):
            if name not in named:
                fs.delete_dir(info.path)
                log.info("removed %s: a checkpoint the run never committed", name)
