"""Ferry's own fault suite: what survives what, and what is refused with which message.

Each test puts one fault in Ferry's way (a storage path under a file, a full disk, a typo that
asks an embedded Ray for 64 workers, a number where text belongs, a CSV quote never closed) and
pins the one message a user gets, and where it is raised: refusals before Ray starts, bad data
with its file and row. Tests that need Ray share the session's (tests/conftest.py).
"""

import errno
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import classification_rows, write_jsonl

from cluster import cli
from cluster.session import EMBEDDED_EXTRA_CPUS, check_embedded_cpus
from trainers.config import ScalingConfig
from trainers.config_load import load_config
from trainers.data.files import label_error, label_kind, parse_file
from trainers.data.prepare import prepare_dataset
from trainers.errors import DataError, DiskFullError
from trainers.model import load_tokenizer_for
from trainers.preflight import check_writable, record_config
from trainers.stages import stage_specs
from tuning.load import load_search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ---- bounds: the embedded Ray -----------------------------------------------------------------


def test_embedded_ray_cpu_bound_and_every_shipped_config_fits_a_2_core_machine(spec_factory):
    assert check_embedded_cpus(ScalingConfig(num_workers=64), cores=2) == [
        "scaling.num_workers=64: 64 workers x scaling.cpus_per_worker=1 + scaling.data_cpus=1 "
        f"= 65 CPUs, but this machine has 2 cores (embedded Ray allows up to "
        f"{2 + EMBEDDED_EXTRA_CPUS}). Lower scaling.num_workers (fractional "
        "scaling.cpus_per_worker is fine), connect to a cluster with --address, or pass "
        "--num-cpus 65 to declare that many anyway."
    ]
    assert check_embedded_cpus(ScalingConfig(num_workers=4, cpus_per_worker=0.5), cores=2) == []
    # The test suite's own runs and every example: workers, Ray Data and a search's trial driver.
    assert check_embedded_cpus(spec_factory("cls").scaling, cores=2) == []
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))):
        with open(path) as f:
            trial_cpus = load_search(path).tune.trial_cpus if "tune" in yaml.safe_load(f) else 0.0
        spec = load_config(path)
        for _, run in stage_specs(spec) if spec.stages else [("", spec)]:
            assert check_embedded_cpus(run.scaling, trial_cpus=trial_cpus, cores=2) == [], path


def test_a_typo_in_num_workers_is_refused_before_ray_starts(tmp_path):
    config = _write_config(tmp_path)
    workers = (os.cpu_count() or 1) + EMBEDDED_EXTRA_CPUS + 60  # too many on any machine
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            config,
            "--set",
            f"scaling.num_workers={workers}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        f"ferry: error: scaling.num_workers={workers}: {workers} workers x "
        f"scaling.cpus_per_worker=1 + scaling.data_cpus=1 = {workers + 1} CPUs, but this "
        f"machine has {os.cpu_count()} cores"
    ) in res.stderr
    assert f"pass --num-cpus {workers + 1} to declare that many anyway." in res.stderr
    assert "Traceback" not in res.stderr
    assert "started embedded Ray" not in res.stdout + res.stderr
    assert not (tmp_path / "runs").exists()  # no run folder, no log folder


# ---- the last bad inputs ----------------------------------------------------------------------


def test_a_number_in_the_text_column_is_a_bad_row(ray_session, spec_factory, tmp_path):
    rows = classification_rows(40)
    rows[4]["text"] = 42
    rows[8]["label"] = 1  # a number among string labels: a class of its own, silently
    path = write_jsonl(tmp_path / "nums.jsonl", rows)
    spec = spec_factory("cls", data={"train_files": [path]})
    with pytest.raises(
        DataError,
        match=(
            r"^data\.on_bad_rows=error: 2 bad rows \(2 expected a string, got int\); first at "
            + re.escape(path)
            + r" row 5: expected a string, got int \('text' holds 42\)\. "
            r"Fix the data or set data\.on_bad_rows=skip\.$"
        ),
    ):
        _prepare(spec)
    skipped = _prepare(spec_factory("cls", data={"train_files": [path], "on_bad_rows": "skip"}))
    assert skipped.bad_rows == {"expected a string, got int": 2}
    assert skipped.train_rows + skipped.validation_rows == 38
    assert skipped.label_names == ["neg", "pos"]


def test_csv_cells_are_text_and_label_ids_stay_labels(tmp_path):
    # Digits in a CSV are text: pyarrow's type inference would have made "007" the number 7.
    (tmp_path / "ids.csv").write_text("text,label\n007,1\n12,0\n")
    assert parse_file(str(tmp_path / "ids.csv"), "csv", ["text", "label"])[0] == [
        {"text": "007", "label": "1"},
        {"text": "12", "label": "0"},
    ]
    # JSON label ids and booleans are labels; a value of another kind than the file's is not.
    assert label_kind([0, 1, 1]) == "number" and label_error(0, "label", "number") is None
    assert label_kind([True, False]) == "boolean"
    assert label_kind(["pos", 1]) == "string"  # a tie: strings win
    assert label_error("pos", "label", "number") == (
        "expected a number, got str ('label' holds 'pos'; the file's other labels are numbers)"
    )


def test_unterminated_csv_quote_names_file_and_line(ray_session, spec_factory, tmp_path):
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in classification_rows(30)]
    lines[7] = '"this quote never closes,pos'  # line 8 of the file, data row 7
    path = tmp_path / "quote.csv"
    path.write_text("\n".join(lines) + "\n")
    spec = spec_factory("cls", data={"train_files": [str(path)]})
    with pytest.raises(DataError) as e:
        _prepare(spec)
    assert str(e.value) == (
        f"{path} line 8 (data row 7): unterminated quote: a quoted field that opens in this row "
        "is never closed, so the rest of the file would read as one field. Close the quote; a "
        'quote inside a quoted field is written twice ("").'
    )
    assert not os.path.exists(spec.cache_dir) or os.listdir(spec.cache_dir) == []
