"""One writer per run (the run's lease, trainers.lease) and one message for a failed run: a
diverged worker ends the run at once, the terminal shows Ferry's one error line, the log keeps
Ray's tracebacks."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import classification_rows, write_jsonl

from trainers import lease as lease_module
from trainers.errors import ConfigError
from trainers.lease import acquire_lease, hold_run, lease_problems, read_lease
from trainers.preflight import check_rerun
from trainers.storage import LEASE_FILE


def _ferry(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
        res = _ferry("train", "run.yaml", cwd=config, timeout=120)
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
    res = _ferry("train", "run.yaml", cwd=config)
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
