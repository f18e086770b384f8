"""Ferry's own fault suite: what survives what, and what is refused with which message.

Each test puts one fault in Ferry's way (a storage path under a file, a full disk, a typo that
asks an embedded Ray for 64 workers, a number where text belongs, a CSV quote never closed) and
pins the one message a user gets, and where it is raised: refusals before Ray starts, bad data
with its file and row. Tests that need Ray share the session's (tests/conftest.py).

Sections: storage, CPU bounds and bad inputs (refused before Ray starts, or a bad row); one
writer per run (the lease) and one message for a failed run; damage a power cut or a full disk
leaves in checkpoints, kills of workers and of every process, divergence. The checkpoint cases
share one trained ZeRO-3 run, copied for each kind of damage.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import (
    classification_rows,
    ferry_command,
    ferry_env,
    make_spec,
    run_ferry,
    write_jsonl,
)

from cluster import cli
from cluster.session import EMBEDDED_EXTRA_CPUS, check_embedded_cpus
from trainers import lease as lease_module
from trainers.checkpoints import (
    COMMIT_RECORD,
    DAMAGED_DIR,
    committed_names,
    recover_run,
    verify_checkpoint,
)
from trainers.config import ScalingConfig
from trainers.config_load import load_config
from trainers.data.files import label_error, label_kind, parse_file
from trainers.data.prepare import prepare_dataset
from trainers.errors import CheckpointError, ConfigError, DataError, DiskFullError, DivergedError
from trainers.lease import acquire_lease, hold_run, lease_problems, read_lease
from trainers.model import load_tokenizer_for
from trainers.preflight import check_rerun, check_writable, prepare_run, record_config
from trainers.stages import stage_specs
from trainers.storage import LEASE_FILE
from trainers.train.launch import train
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


# ---- one writer per run, one message ----------------------------------------------------------
# One writer per run (the run's lease, trainers.lease) and one message for a failed run: a
# diverged worker ends the run at once, the terminal shows Ferry's one error line, the log keeps
# Ray's tracebacks.

def _write_lease(run_dir, pid, host=None, heartbeat_age_s=2.0):
    os.makedirs(run_dir, exist_ok=True)
    now = time.time()
    record = {"host": host or socket.gethostname(), "pid": pid, "started": now - 300,
              "heartbeat": now - heartbeat_age_s, "token": "other-driver"}
    with open(os.path.join(run_dir, LEASE_FILE), "w") as f:
        json.dump(record, f)


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()  # exited and reaped: its pid names no process
    return done.pid


@pytest.fixture
def config(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", classification_rows(64))
    (tmp_path / "run.yaml").write_text(
        "# tiny run whose loss diverges at step 2 (learning rate 1e6)\n"
        "run: {name: div, storage_path: runs}\n"
        "model: {preset: tiny-bert}\n"
        "method: full\n"
        "task: {type: sequence_classification}\n"
        "data: {train_files: [train.jsonl], max_seq_length: 32}\n"
        "train: {learning_rate: 1.0e+6, num_epochs: 1, micro_batch_size_per_worker: 4,"
        " eval_every_n_steps: 4, log_every_n_steps: 1, eval_before_training: false}\n"
        "deepspeed: {zero_stage: 1}\n"
        "scaling: {num_workers: 1, max_failures: 2}\n"
    )
    return tmp_path


def test_a_live_drivers_lease_refuses_a_second_driver_before_ray_starts(config, spec_factory):
    holder = subprocess.Popen(["sleep", "60"])  # stands in for the first driver
    try:
        run_dir = config / "runs" / "div"
        _write_lease(run_dir, holder.pid, heartbeat_age_s=3)
        res = run_ferry("train", "run.yaml", cwd=config, timeout=120)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "started embedded Ray" not in res.stderr
        expected = (f"ferry: error: run.name=div: another Ferry driver is writing this run (pid "
                    f"{holder.pid} on host {socket.gethostname()}, started ")
        assert expected in res.stderr
        assert re.search(r"heartbeat \d+ s ago\)\. Wait for it to end or stop it \(kill "
                         rf"{holder.pid} on host .+, or ferry jobs stop JOB_ID for a submitted "
                         r"job\), then rerun; a lease whose driver died is taken over", res.stderr)
        assert read_lease(str(run_dir)).token == "other-driver"  # the holder's lease is untouched
        # run.resume=restart would delete the run's files: refused the same way; and taking the
        # lease (what train() does) is refused too.
        spec = spec_factory("cls", run={"name": "held", "resume": "restart"})
        _write_lease(spec.run_dir, holder.pid)
        [problem] = check_rerun(spec)
        assert problem.startswith("run.name=held: another Ferry driver is writing this run")
        with pytest.raises(ConfigError, match="another Ferry driver is writing this run"):
            acquire_lease(spec.run_dir, "held")
    finally:
        holder.kill()
        holder.wait()
    # Its driver gone, the lease no longer stands in the way.
    assert check_rerun(spec) == []


def test_a_dead_drivers_lease_is_taken_over_refreshed_and_released(tmp_path, caplog,
                                                                   monkeypatch):
    run_dir = str(tmp_path / "run")
    dead = _dead_pid()
    _write_lease(run_dir, dead)
    assert lease_problems(run_dir, "r") == []
    monkeypatch.setattr(lease_module, "HEARTBEAT_EVERY_S", 0.05)
    with caplog.at_level(logging.WARNING, logger="ferry.lease"), hold_run(run_dir, "r") as mine:
        assert (mine.host, mine.pid) == (socket.gethostname(), os.getpid())
        assert read_lease(run_dir) == mine
        time.sleep(0.5)
        assert read_lease(run_dir).heartbeat > mine.heartbeat  # the heartbeat thread refreshes it
        assert lease_problems(run_dir, "r") == []  # this process's own lease is never in its way
    [warning] = [r.getMessage() for r in caplog.records if r.name == "ferry.lease"]
    assert warning.startswith(f"run.name=r: took over the lease of a driver that is gone (pid "
                              f"{dead} on host {socket.gethostname()}, started ")
    assert not os.path.exists(os.path.join(run_dir, LEASE_FILE))  # released at the end
    # A driver that lost its lease (taken over after its heartbeat went stale) leaves the new
    # holder's lease in place when it ends.
    with hold_run(run_dir, "r"):
        _write_lease(run_dir, _dead_pid())
    assert read_lease(run_dir).token == "other-driver"


def test_another_hosts_lease_holds_until_its_heartbeat_is_older_than_the_bound(tmp_path, caplog):
    run_dir = str(tmp_path / "run")
    bound = lease_module.LEASE_STALE_AFTER_S
    # The pid (of no process here) says nothing about another host: only the heartbeat counts.
    _write_lease(run_dir, _dead_pid(), host="other-node", heartbeat_age_s=5)
    with pytest.raises(ConfigError, match=r"run\.name=r: another Ferry driver is writing this run "
                                          r"\(pid \d+ on host other-node, started .*heartbeat 5 s "
                                          rf"ago\).*elsewhere {bound:.0f} s after its last "
                                          r"heartbeat\)\.$"):
        acquire_lease(run_dir, "r")
    _write_lease(run_dir, _dead_pid(), host="other-node", heartbeat_age_s=bound + 5)
    with caplog.at_level(logging.WARNING, logger="ferry.lease"):
        mine = acquire_lease(run_dir, "r")
    assert read_lease(run_dir) == mine
    assert "took over the lease of a driver that is gone (pid" in caplog.text
    assert "on host other-node" in caplog.text


def test_restart_clears_the_run_but_keeps_its_lease(spec_factory):
    from trainers.preflight import _clear_run, record_config

    spec = spec_factory("cls", run={"name": "again", "resume": "restart"})
    record_config(spec)
    os.makedirs(os.path.join(spec.run_dir, "checkpoint_step_0000010"))
    _write_lease(spec.run_dir, _dead_pid())
    _clear_run(spec)
    assert sorted(os.listdir(spec.run_dir)) == [LEASE_FILE]


# Ferry's own lines on the terminal: its log records, its worker lines, its error line.
FERRY_LINE = re.compile(r"^(\[ferry\] |ferry: error: )")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diverged_worker_fails_once_with_one_message_and_tracebacks_in_the_log(config):
    """scaling.max_failures=2, yet the diverged run ends after its first attempt; the driver of
    an earlier run of this folder died and left its lease, taken over with a warning."""
    run_dir = config / "runs" / "div"
    dead = _dead_pid()
    _write_lease(run_dir, dead)
    res = run_ferry("train", "run.yaml", cwd=config, timeout=300)
    terminal = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 1, "\n".join(terminal[-40:])
    assert [line for line in terminal if not FERRY_LINE.match(line)] == []
    [error] = [line for line in terminal if line.startswith("ferry: error:")]
    assert error.startswith("ferry: error: training loss became non-finite (nan/inf) at step 2: stopped; ")
    assert "Traceback" not in res.stdout + res.stderr
    assert "(RayTrainWorker" not in res.stdout + res.stderr
    assert f"[ferry] run.name=div: took over the lease of a driver that is gone (pid {dead} " in res.stderr
    assert not (run_dir / LEASE_FILE).exists()  # released though the run failed
    [log] = (run_dir / "logs").glob("train-*.log")
    kept = log.read_text()
    assert "Traceback" in kept and "DivergedError: training loss became non-finite" in kept
    # One attempt: the worker group was not restarted for a retry.
    assert len(re.findall(r"\[ferry\] full on .* resuming at step 0", kept)) == 1
    assert "Error count: 2" not in kept


def test_debug_shows_the_libraries_tracebacks_on_the_terminal():
    """The diverged run's tracebacks are library output (Ray Train's controller and the worker,
    forwarded): --debug keeps them on the terminal, as --verbose does, with the driver's own."""
    import contextlib

    from cluster.cli import _terminal, build_parser
    from cluster.terminal import QuietTerminal

    parse = build_parser().parse_args
    assert isinstance(_terminal(parse(["train", "run.yaml"])), QuietTerminal)
    assert isinstance(_terminal(parse(["train", "run.yaml", "--debug"])), contextlib.nullcontext)


# ---- checkpoint damage, kills, divergence -----------------------------------------------------
# Damage a power cut or a full disk leaves behind, and divergence (trainers.checkpoints and the
# loop's divergence watch): one trained run, copied for each kind of damage.

def _spec(root, data_dir, run=None, **sections):
    # 12 steps, a checkpoint every 4, all three kept: the damage cases fall back by one interval.
    # ZeRO-3: every rank's checkpoint part holds its own weight and optimizer partitions.
    base = {"max_steps": 12, "eval_every_n_steps": 4, "keep_best_checkpoints": 3}
    return make_spec(root, "cls", data_dir, method="full", run={"name": "damage", **(run or {})},
                     train={**base, **sections.pop("train", {})},
                     deepspeed={"zero_stage": 3}, **sections)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory, data_dir):
    """One finished 2-worker ZeRO-3 run with checkpoints at steps 4, 8 and 12."""
    root = tmp_path_factory.mktemp("trained")
    spec = _spec(root, data_dir)
    outcome = train(prepare_run(spec))
    return spec, outcome


def _copy(trained, tmp_path, data_dir):
    """The trained run, copied under tmp_path (the same config: a moved run), and its spec."""
    spec, _ = trained
    shutil.copytree(spec.run_dir, tmp_path / "runs" / "damage")
    return _spec(tmp_path, data_dir, data={"cache_dir": spec.cache_dir})


def _ckpt(spec, step: int) -> str:
    return os.path.join(spec.run_dir, f"checkpoint_step_{step:07d}")


def _truncate(path: str, keep: float) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _model_state(checkpoint: str) -> str:
    return os.path.join(checkpoint, "ds", "zero_pp_rank_0_mp_rank_00_model_states.pt")


DAMAGE = {
    "truncated model state": lambda c: _truncate(_model_state(c), 0.5),
    "zero-byte optimizer shard": lambda c: _truncate(
        os.path.join(c, "ds", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), 0.0),
    "missing RNG file": lambda c: os.remove(os.path.join(c, "rng_rank1.pt")),
}


@pytest.mark.slow
def test_every_rank_writes_a_manifest_that_verifies(trained):
    spec, outcome = trained
    ckpt = outcome.checkpoint_path
    assert ckpt.endswith("checkpoint_step_0000012")
    manifests = sorted(n for n in os.listdir(ckpt) if n.startswith("ferry_manifest_rank"))
    assert manifests == ["ferry_manifest_rank0.json", "ferry_manifest_rank1.json"]
    listed = set()
    for name in manifests:
        listed |= set(json.load(open(os.path.join(ckpt, name)))["files"])
    on_disk = {os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs}
    assert on_disk - listed == set(manifests)  # every file but the manifests themselves is listed
    assert verify_checkpoint(ckpt) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_for_the_previous_one(trained, tmp_path, data_dir, kind, caplog):
    spec = _copy(trained, tmp_path, data_dir)
    DAMAGE[kind](_ckpt(spec, 12))
    assert verify_checkpoint(_ckpt(spec, 12))  # the damage is seen
    with caplog.at_level(logging.WARNING, logger="ferry.checkpoints"):
        resumed_from = recover_run(spec)
    assert resumed_from == _ckpt(spec, 8)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint_step_0000012 is damaged" in warning
    assert {"truncated model state": "zero_pp_rank_0_mp_rank_00_model_states.pt is",
            "zero-byte optimizer shard": "zero_pp_rank_1_mp_rank_00_optim_states.pt is 0 bytes",
            "missing RNG file": "rng_rank1.pt is missing"}[kind] in warning
    # Nothing is deleted: the damaged folder is kept aside, and the record no longer names it.
    assert not os.path.exists(_ckpt(spec, 12))
    assert [n for n in os.listdir(os.path.join(spec.run_dir, DAMAGED_DIR)) if n.startswith("checkpoint_step_0000012")]
    record = json.load(open(os.path.join(spec.run_dir, COMMIT_RECORD)))
    assert record["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_step_0000008"


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_by_name_where_it_would_load(trained, tmp_path, data_dir):
    from trainers.data.prepare import prepare_dataset
    from trainers.model import load_tokenizer
    from trainers.saved import load_saved

    spec = _copy(trained, tmp_path, data_dir)
    DAMAGE["zero-byte optimizer shard"](_ckpt(spec, 12))
    data = prepare_dataset(spec)
    with pytest.raises(CheckpointError, match=r"checkpoint_step_0000012 is damaged \(ds/zero_pp_rank_1_mp_rank_00_optim_states\.pt is 0 bytes"):
        load_saved(spec, load_tokenizer(data.tokenizer_path), data, _ckpt(spec, 12))


@pytest.mark.slow
def test_no_checkpoint_that_verifies_is_one_error_naming_them(trained, tmp_path, data_dir):
    spec = _copy(trained, tmp_path, data_dir)
    for step in (4, 8, 12):
        DAMAGE["missing RNG file"](_ckpt(spec, step))
    with pytest.raises(ConfigError, match=r"run\.name=damage: no committed checkpoint of the run verifies "
                                          r"\(checkpoint_step_0000012 \(rng_rank1\.pt is missing\); "
                                          r"checkpoint_step_0000008 .*run\.resume=restart"):
        recover_run(spec)


@pytest.mark.slow
def test_a_truncated_commit_record_is_rebuilt_from_the_manifests(trained, tmp_path, data_dir, caplog):
    spec = _copy(trained, tmp_path, data_dir)
    _truncate(os.path.join(spec.run_dir, COMMIT_RECORD), 0.4)
    with pytest.raises(ConfigError, match=r"checkpoint record is damaged .*Rerun `ferry train`"):
        from trainers.export import find_checkpoint

        find_checkpoint(spec, "last")
    with caplog.at_level(logging.WARNING, logger="ferry.checkpoints"):
        assert recover_run(spec) == _ckpt(spec, 12)
    assert "rebuilt from the manifests of 3 checkpoint(s), the latest checkpoint_step_0000012" in caplog.text
    from trainers.export import find_checkpoint

    assert find_checkpoint(spec, "last")[0] == 12
    assert find_checkpoint(spec, 4)[0] == 4


@pytest.mark.slow
def test_uncommitted_checkpoint_folders_are_removed_on_resume(trained, tmp_path, data_dir):
    spec = _copy(trained, tmp_path, data_dir)
    partial = _ckpt(spec, 10)  # a folder Ray never committed: a run killed while writing it
    os.makedirs(os.path.join(partial, "ds"))
    open(os.path.join(partial, "rng_rank0.pt"), "wb").close()
    recover_run(spec)
    assert not os.path.exists(partial)
    assert all(os.path.exists(_ckpt(spec, s)) for s in (4, 8, 12))


@pytest.mark.slow
def test_resume_after_damage_redoes_one_interval_and_ends_like_the_run(trained, tmp_path, data_dir):
    """A ZeRO-3 resume with both kinds of damage at once, for real: a zero-byte optimizer shard in the latest
    checkpoint and a truncated commit record. The rerun rebuilds the record (without step 12),
    resumes at step 8 and ends at step 12 as the undamaged run did."""
    _, first = trained
    spec = _copy(trained, tmp_path, data_dir)
    DAMAGE["zero-byte optimizer shard"](_ckpt(spec, 12))
    _truncate(os.path.join(spec.run_dir, COMMIT_RECORD), 0.5)
    shutil.rmtree(spec.export_dir)  # as if the power cut came before the export
    outcome = train(prepare_run(spec))
    state = json.load(open(os.path.join(outcome.checkpoint_path, "ferry_state.json")))
    assert [h["train/step"] for h in state["history"]] == [4, 8, 12]
    assert outcome.metrics["steps"] == 12
    assert outcome.metrics["final"]["eval/loss"] == pytest.approx(first.metrics["final"]["eval/loss"], rel=0.15, abs=0.02)
    assert verify_checkpoint(outcome.checkpoint_path) == []


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint_and_ends_like_the_run(trained, tmp_path, data_dir):
    """SIGKILL of the last rank mid-interval (after step 6; checkpoints at 4, 8, 12): Ray
    restarts the worker group (scaling.max_failures=1), which resumes at step 4."""
    from trainers.train.loop import KillAfterStep

    spec, first = trained
    marker = tmp_path / "killed"
    spec = _spec(tmp_path, data_dir, run={"name": "killed"}, scaling={"max_failures": 1},
                 data={"cache_dir": spec.cache_dir})
    outcome = train(prepare_run(spec), fault=KillAfterStep(6, str(marker)))
    assert marker.exists()  # the worker really was killed
    state = json.load(open(os.path.join(outcome.checkpoint_path, "ferry_state.json")))
    assert [h["train/step"] for h in state["history"]] == [4, 8, 12]  # each evaluation once
    assert outcome.metrics["steps"] == first.metrics["steps"] == 12
    # Data order within a resumed epoch may differ (Ray's streaming split assigns blocks
    # dynamically), so the metrics match within a tolerance.
    assert outcome.metrics["final"]["eval/loss"] == pytest.approx(first.metrics["final"]["eval/loss"], rel=0.15, abs=0.02)


@pytest.mark.slow
def test_divergence_keeps_the_last_checkpoint_whose_metrics_are_finite(ray_session, tmp_path, data_dir):
    """An evaluation and a checkpoint at every step, and a learning rate that blows up once the
    warmup leaves step 1 (lr 0): the first NaN evaluation is caught before its checkpoint is
    reported, and the run is not retried under scaling.max_failures."""
    from trainers.export import find_checkpoint

    spec = _spec(tmp_path, data_dir, train={"learning_rate": 1e6, "warmup_ratio": 0.9,
                                            "eval_every_n_steps": 1, "max_grad_norm": 0.0},
                 scaling={"max_failures": 2})
    with pytest.raises(DivergedError) as err:
        train(prepare_run(spec))
    found = re.search(r"^evaluation loss became nan at step (\d+): stopped; the last good "
                      r"checkpoint is kept: checkpoint_step_(\d+) \(step (\d+)\)\. Lower train\.learning_rate",
                      str(err.value))
    assert found, err.value
    bad, kept = int(found.group(1)), int(found.group(3))
    assert kept == int(found.group(2)) == bad - 1 >= 1
    step, path, state = find_checkpoint(spec, "last")
    assert step == kept and path.endswith(f"checkpoint_step_{kept:07d}")
    assert len(state["history"]) == kept  # one evaluation per step, every one finite
    assert all(v == v and abs(v) != float("inf") for h in state["history"] for v in h.values())
    assert not os.path.exists(_ckpt(spec, bad))


@pytest.mark.slow
def test_a_resume_with_another_number_of_workers_is_refused_before_training(trained, tmp_path, data_dir):
    from trainers.preflight import check_run

    spec = _copy(trained, tmp_path, data_dir)
    one = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"num_workers": 1})})
    [problem] = check_run(one)
    assert re.search(r"run\.name=damage: this run finished earlier with a different config \(changed: "
                     r"scaling\.num_workers;.* one ZeRO shard per worker of the scaling\.num_workers=2 it ran "
                     r"with: resume it with that\.", problem), problem


@pytest.mark.slow
def test_killing_every_process_while_a_checkpoint_is_written_then_rerunning_ends_at_the_same_step(tmp_path):
    """A power cut, as near as a test gets: `ferry train` and every process it started (embedded
    Ray, its controller and workers) SIGKILLed the moment the step-8 checkpoint folder appears,
    i.e. while the ranks are writing it. The rerun of the same command resumes from a committed
    checkpoint and ends at the planned step with each evaluation once."""
    import signal
    import subprocess
    import time

    import psutil
    from conftest import classification_rows, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", classification_rows(200))
    (tmp_path / "run.yaml").write_text(
        "run: {name: cut, storage_path: runs}\n"
        "model: {preset: tiny-bert}\n"
        "method: full\n"
        "task: {type: sequence_classification}\n"
        "data: {train_files: [train.jsonl], max_seq_length: 32}\n"
        "train: {learning_rate: 3.0e-3, max_steps: 16, micro_batch_size_per_worker: 4, "
        "eval_every_n_steps: 4, keep_best_checkpoints: 2}\n"
        "deepspeed: {zero_stage: 2}\n"
        "scaling: {num_workers: 2}\n"
    )
    first = subprocess.Popen(ferry_command("train", "run.yaml"), cwd=tmp_path, env=ferry_env(),
                             start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "cut"
    writing = run / "checkpoint_step_0000008"

    def step_4_committed() -> bool:  # Ray's record names it (a folder on disk proves nothing)
        return "checkpoint_step_0000004" in (committed_names(str(run)) or [])

    deadline = time.monotonic() + 300
    while not (writing.exists() and step_4_committed()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writing.exists() and step_4_committed(), "the run never reached its second checkpoint"
    everyone = [first.pid] + [c.pid for c in psutil.Process(first.pid).children(recursive=True)]
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait()
    rerun = run_ferry("train", "run.yaml", cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"\[ferry\] resumed from \S+checkpoint_step_000000[48] at step [48]", rerun.stderr + rerun.stdout)
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert metrics["steps"] == 16
    last = max(p for p in run.iterdir() if p.name.startswith("checkpoint_step_"))
    state = json.loads((last / "ferry_state.json").read_text())
    assert [h["train/step"] for h in state["history"]] == [4, 8, 12, 16]
    assert verify_checkpoint(str(last)) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs: room for the run's first checkpoint (about 1.5 MB) and its records, not
    for a second. Mounting needs root privileges (CAP_SYS_ADMIN): skipped where they are
    missing, since a full disk cannot be had otherwise without filling a real one."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_is_named_and_the_run_resumes_once_there_is_space(
        ray_session, small_disk, tmp_path, data_dir):
    spec = _spec(tmp_path, data_dir, run={"name": "full", "storage_path": str(small_disk)},
                 scaling={"max_failures": 2}, data={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DiskFullError, match=rf"^run\.storage_path={re.escape(str(small_disk))}: the disk "
                                            r"is full \(No space left on device\) while writing .*"
                                            r"committed checkpoints are intact and a rerun resumes\."):
        train(prepare_run(spec))
    # Ray's record names step 4 only, or Ray's own write of it met the full disk too (its text
    # cut short): then the rerun rebuilds it from the manifests, which a half-written step-8
    # folder lacks.
    assert committed_names(spec.run_dir) in (None, ["checkpoint_step_0000004"])
    assert verify_checkpoint(_ckpt(spec, 4)) == []  # the committed checkpoint is intact
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    outcome = train(prepare_run(spec))
    state = json.load(open(os.path.join(outcome.checkpoint_path, "ferry_state.json")))
    assert [h["train/step"] for h in state["history"]] == [4, 8, 12]
    assert outcome.metrics["steps"] == 12
