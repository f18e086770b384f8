"""Ferry's own fault suite: what survives what, and what is refused with which message.

Each test puts one fault in Ferry's way (a storage path under a file, a full disk, a typo that
asks an embedded Ray for 64 workers, a number where text belongs, a CSV quote never closed) and
pins the one message a user gets, and where it is raised: refusals before Ray starts, bad data
with its file and row. Tests that need Ray share the session's (tests/conftest.py).
"""

import errno
import json
import os

import pytest
import yaml
from conftest import classification_rows, write_jsonl

from cluster import cli
from trainers.data.prepare import prepare_dataset
from trainers.errors import DiskFullError
from trainers.model import load_tokenizer_for
from trainers.preflight import check_writable, record_config


def _write_config(tmp_path, tune: bool = False) -> str:
    """A tiny classification run config (tmp_path/run.yaml) with its data beside it; with
    `tune`, a tune: block for `ferry tune`."""
    raw = {
        "run": {"name": "faults", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-bert"},
        "task": {"type": "sequence_classification"},
        "data": {
            "train_files": [write_jsonl(tmp_path / "train.jsonl", classification_rows(40))],
            "max_seq_length": 32,
        },
        "scaling": {"num_workers": 2},
    }
    if tune:
        raw["tune"] = {"space": {"train.learning_rate": {"loguniform": [1e-4, 1e-3]}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _prepare(spec):
    return prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))


def _no_ray_session(*args, **kwargs):
    raise AssertionError("Ray was asked for: the refusal must come before it starts")


# ---- storage before compute -------------------------------------------------------------------

# Every command that reads a run config, with the arguments it needs to get that far.
_COMMANDS = {
    "validate": [],
    "train": [],
    "preprocess": [],
    "eval": ["--checkpoint", "nowhere"],
    "analyze": [],
    "tune": [],
}


@pytest.mark.parametrize("command", list(_COMMANDS))
def test_storage_under_a_file_is_refused_before_ray_by_every_command(
    command, tmp_path, capsys, monkeypatch
):
    import ray

    monkeypatch.setattr(cli, "ray_session", _no_ray_session)
    ray_before = ray.is_initialized()
    config = _write_config(tmp_path, tune=command == "tune")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = cli.main(
        [
            "--verbose",
            command,
            config,
            *_COMMANDS[command],
            "--set",
            f"run.storage_path={blocker}/runs",
            "--set",
            f"data.cache_dir={blocker}/cache",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # Both paths, collected into one error, in the house format.
    for key, path in (
        ("run.storage_path", f"{blocker}/runs"),
        ("data.cache_dir", f"{blocker}/cache"),
    ):
        assert (
            f"{key}={path}: cannot create or write there (Not a directory: {blocker}). "
            "Choose a writable folder or a bucket URI (s3://..., gs://...)."
        ) in err
    assert ray.is_initialized() == ray_before
    assert blocker.read_text() == "not a folder"


def test_validate_probes_storage_and_leaves_no_folder_behind(tmp_path, capsys, spec_factory):
    config = _write_config(tmp_path)
    fresh = tmp_path / "new" / "deep" / "runs"
    kept = tmp_path / "kept"
    kept.mkdir()
    code = cli.main(
        [
            "validate",
            config,
            "--set",
            f"run.storage_path={fresh}",
            "--set",
            f"data.cache_dir={kept}/cache",
        ]
    )
    assert code == 0, capsys.readouterr().err
    # The folders the probe created are gone, and so is its file; an existing folder stays.
    assert not (tmp_path / "new").exists()
    assert os.listdir(kept) == []
    # A bucket is not probed: a check reaches no network.
    bucket = spec_factory(
        "cls",
        run={"storage_path": "s3://no-such-bucket/runs"},
        data={"cache_dir": "gs://no-such-bucket/cache"},
    )
    assert check_writable(bucket) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_storage_folder_is_refused(tmp_path, spec_factory):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problems = check_writable(spec_factory("cls", run={"storage_path": str(ro / "runs")}))
    finally:
        ro.chmod(0o700)
    assert problems == [
        f"run.storage_path={ro}/runs: cannot create or write there (Permission denied: "
        f"{ro}/runs). Choose a writable folder or a bucket URI (s3://..., gs://...)."
    ]


# A real full disk needs a small filesystem, and mounting one (tmpfs) needs root privileges. The
# kernel's /dev/full answers every write with a real ENOSPC instead: the code under test writes
# there through its own calls, and only where the bytes land is arranged by the test.
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


@needs_dev_full
def test_full_disk_while_recording_the_run_is_one_message(spec_factory):
    spec = spec_factory("cls")
    os.makedirs(spec.run_dir)
    path = os.path.join(spec.run_dir, "ferry_run.yaml")
    os.symlink("/dev/full", path)  # the run's first file lands on a full device
    with pytest.raises(DiskFullError) as e:
        record_config(spec)
    assert str(e.value) == (
        f"run.storage_path={spec.run.storage_path}: the disk is full (No space left on device) "
        f"while writing {path}. Free space there or point run.storage_path at a larger volume; "
        "committed checkpoints are intact and a rerun resumes."
    )
    assert e.value.__cause__.errno == errno.ENOSPC  # pyarrow's own error, kept as the cause
    assert not cli._is_input_error(e.value)  # the CLI exits 1: the input was fine


@needs_dev_full
def test_full_disk_while_writing_the_data_cache_names_data_cache_dir(
    ray_session, spec_factory, tmp_path, monkeypatch
):
    import trainers.data.prepare as prepare

    def save_on_a_full_disk(tokenizer, fs, path):
        # The cache's first write (the tokenizer's files), sent to a full device.
        with open("/dev/full", "wb") as f:
            f.write(json.dumps(tokenizer.get_vocab()).encode())

    monkeypatch.setattr(prepare, "_save_tokenizer", save_on_a_full_disk)
    cache = tmp_path / "cache"
    spec = spec_factory("cls", data={"cache_dir": str(cache)})
    with pytest.raises(DiskFullError) as e:
        _prepare(spec)
    assert str(e.value) == (
        f"data.cache_dir={cache}: the disk is full (No space left on device) while writing "
        f"{cache}. Free space there or point data.cache_dir at a larger volume; committed "
        "checkpoints are intact and a rerun resumes."
    )
    # Nothing was published: a rerun prepares the data again instead of reading half a cache.
    assert all(".partial-" in name for name in os.listdir(cache))
