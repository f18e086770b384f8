"""Where a run's files live: local paths and pyarrow URIs (s3://, gs://) alike.

One home for the path rules every module needs: what counts as a URI, how a local path is pinned,
how a finished folder is published (written elsewhere, then moved into place with a completion
marker last, so a half-written folder is never read) and which checkpoints of a run are committed.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

from trainers.errors import ConfigError

MARKER = "_FERRY_COMPLETE"
# A run's layout under <run.storage_path>/<run.name>: Ray Train's checkpoint_step_* folders (each
# with DeepSpeed's DS_TAG folder and the loop's STATE_FILE), the config the run started with
# (RUN_CONFIG_FILE), the export (EXPORT_DIR; a LoRA export may carry BASE_DIR, and --merge
# adds MERGED_DIR), and what the driver's node records while it runs (trainers.tracking): in
# REPORT_DIR the reported metrics (HISTORY_FILE), their plot (CURVES_FILE) and the run's status
# and trackers (STATUS_FILE); TensorBoard's event files in TENSORBOARD_DIR; the libraries' output
# of each command run on it in LOGS_DIR (cluster.terminal). While a driver trains the run,
# LEASE_FILE names it (host, pid, heartbeat; trainers.lease), so that a second driver is refused.
EXPORT_DIR = "final"
BASE_DIR = "base"
MERGED_DIR = "merged"
STATE_FILE = "ferry_state.json"
DS_TAG = "ds"
RUN_CONFIG_FILE = "ferry_run.yaml"
HUB_DATASET_PREFIX = "hf-hub:"
REPORT_DIR = "report"
HISTORY_FILE = "history.jsonl"
CURVES_FILE = "curves.png"
STATUS_FILE = "run.json"
TENSORBOARD_DIR = "tensorboard"
LOGS_DIR = "logs"
LEASE_FILE = "ferry_lease.json"


def is_uri(path: str) -> bool:
    """A pyarrow URI (s3://, gs://, file://, ...) rather than a plain local path."""
    return "://" in path


def is_hub_dataset(entry: str) -> bool:
    """A Hugging Face Hub dataset named in a data file list (`hf-hub:NAME[:SPLIT]`): neither a
    local path nor a URI, so it is never resolved against a folder."""
    return entry.startswith(HUB_DATASET_PREFIX)


def absolute(path: str) -> str:
    """URIs as they are, local paths made absolute (workers run in other directories)."""
    return path if is_uri(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (never os.path.join: it would mangle URIs)."""
    return "/".join([base.rstrip("/"), *parts])


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `path` and the path inside it."""
    return pafs.FileSystem.from_uri(absolute(path))


def with_scheme(template: str, path: str) -> str:
    """Re-attach the scheme of `template` (e.g. s3://) to a filesystem-relative `path`."""
    if is_uri(template) and not template.startswith("file://"):
        return template.split("://")[0] + "://" + path.lstrip("/")
    return path


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def localize(uri: str) -> str:
    """A local directory holding `uri`'s files (the path itself when already local)."""
    if not is_uri(uri) or uri.startswith("file://"):
        return uri.removeprefix("file://")
    local = tempfile.mkdtemp(prefix="ferry-")
    pafs.copy_files(uri, local)
    return local


def upload_dir(local_dir: str, target: str) -> None:
    """Copy a finished local folder to `target` (a local path or URI), creating it."""
    fs, path = filesystem(target)
    fs.create_dir(path)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read())


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file whole (a local path or URI), creating its folder. Locally it is written
    beside and renamed into place, so a reader never sees half a file."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0])
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_text(path: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def read_json_if_any(path: str) -> Any:
    """A small JSON file's value, or None when it is missing, empty or not (yet) valid JSON: a
    record another process may not have written, or is rewriting."""
    text = read_text(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def read_marker(fs: pafs.FileSystem, folder: str) -> dict | None:
    """The metadata a published folder's completion marker holds; None if not (yet) complete."""
    marker = f"{folder}/{MARKER}"
    if fs.get_file_info(marker).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(marker) as f:
        return json.loads(f.read())


def publish(fs: pafs.FileSystem, partial: str, final: str, meta: dict) -> None:
    """Write the completion marker into `partial`, then move it to `final`."""
    with fs.open_output_stream(f"{partial}/{MARKER}") as f:
        f.write(json.dumps(meta).encode())
    try:
        fs.move(partial, final)
    except OSError:
        # Another run published the same key first (identical content) or the filesystem cannot
        # rename directories: keep theirs / fall back to copy; the marker decides validity.
        if fs.get_file_info(f"{final}/{MARKER}").type != pafs.FileType.File:
            pafs.copy_files(partial, final, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(partial)


def committed_checkpoints(run_dir: str):
    """Ray Train's record of a run's committed checkpoints (a `ray.train.Result`), or None when
    the run never committed one. A checkpoint folder on disk proves nothing: report() returns
    before the controller commits it, so an interrupted run can leave an uncommitted folder.

    Raises:
        ConfigError: the record exists but is damaged (`ferry train` on the run rebuilds it:
            trainers.checkpoints).
    """
    import ray.train

    fs, path = filesystem(run_dir)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        result = ray.train.Result.from_path(absolute(run_dir))
    except RuntimeError:  # the folder exists but Ray never wrote its checkpoint record
        return None
    except Exception as e:  # the record does not parse: truncated by a crash or a full disk
        raise ConfigError(
            [
                f"run={run_dir}: the run's checkpoint record is damaged ({type(e).__name__}). "
                "Rerun `ferry train` on the run: it rebuilds the record from the checkpoints' "
                "manifests (or says why it cannot)."
            ]
        ) from None
    return result if result.checkpoint is not None else None
