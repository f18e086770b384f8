"""Damage a power cut or a full disk leaves behind, and divergence (trainers.checkpoints and the
loop's divergence watch): one trained run, copied for each kind of damage."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest
from conftest import make_spec

from trainers.checkpoints import (
    COMMIT_RECORD,
    DAMAGED_DIR,
    committed_names,
    recover_run,
    verify_checkpoint,
)
from trainers.errors import CheckpointError, ConfigError, DivergedError
from trainers.preflight import prepare_run
from trainers.train.launch import train

pytestmark = pytest.mark.slow


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


def test_a_damaged_checkpoint_is_refused_by_name_where_it_would_load(trained, tmp_path, data_dir):
    from trainers.data.prepare import prepare_dataset
    from trainers.model import load_tokenizer
    from trainers.saved import load_saved

    spec = _copy(trained, tmp_path, data_dir)
    DAMAGE["zero-byte optimizer shard"](_ckpt(spec, 12))
    data = prepare_dataset(spec)
    with pytest.raises(CheckpointError, match=r"checkpoint_step_0000012 is damaged \(ds/zero_pp_rank_1_mp_rank_00_optim_states\.pt is 0 bytes"):
        load_saved(spec, load_tokenizer(data.tokenizer_path), data, _ckpt(spec, 12))


def test_no_checkpoint_that_verifies_is_one_error_naming_them(trained, tmp_path, data_dir):
    spec = _copy(trained, tmp_path, data_dir)
    for step in (4, 8, 12):
        DAMAGE["missing RNG file"](_ckpt(spec, step))
    with pytest.raises(ConfigError, match=r"run\.name=damage: no committed checkpoint of the run verifies "
                                          r"\(checkpoint_step_0000012 \(rng_rank1\.pt is missing\); "
                                          r"checkpoint_step_0000008 .*run\.resume=restart"):
        recover_run(spec)


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


def test_uncommitted_checkpoint_folders_are_removed_on_resume(trained, tmp_path, data_dir):
    spec = _copy(trained, tmp_path, data_dir)
    partial = _ckpt(spec, 10)  # a folder Ray never committed: a run killed while writing it
    os.makedirs(os.path.join(partial, "ds"))
    open(os.path.join(partial, "rng_rank0.pt"), "wb").close()
    recover_run(spec)
    assert not os.path.exists(partial)
    assert all(os.path.exists(_ckpt(spec, s)) for s in (4, 8, 12))


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


def test_a_resume_with_another_number_of_workers_is_refused_before_training(trained, tmp_path, data_dir):
    from trainers.preflight import check_run

    spec = _copy(trained, tmp_path, data_dir)
    one = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"num_workers": 1})})
    [problem] = check_run(one)
    assert re.search(r"run\.name=damage: this run finished earlier with a different config \(changed: "
                     r"scaling\.num_workers;.* one ZeRO shard per worker of the scaling\.num_workers=2 it ran "
                     r"with: resume it with that\.", problem), problem


def _ferry_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_killing_every_process_while_a_checkpoint_is_written_then_rerunning_ends_at_the_same_step(tmp_path):
    """A power cut, as near as a test gets: `ferry train` and every process it started (embedded
    Ray, its controller and workers) SIGKILLed the moment the step-8 checkpoint folder appears,
    i.e. while the ranks are writing it. The rerun of the same command resumes from a committed
    checkpoint and ends at the planned step with each evaluation once."""
    import signal
    import subprocess
    import sys
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
    cmd = [sys.executable, "-m", "cluster.cli", "train", "run.yaml"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_ferry_env(), start_new_session=True,
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
    rerun = subprocess.run(cmd, cwd=tmp_path, env=_ferry_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"\[ferry\] resumed from \S+checkpoint_step_000000[48] at step [48]", rerun.stderr + rerun.stdout)
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert metrics["steps"] == 16
    last = max(p for p in run.iterdir() if p.name.startswith("checkpoint_step_"))
    state = json.loads((last / "ferry_state.json").read_text())
    assert [h["train/step"] for h in state["history"]] == [4, 8, 12, 16]
    assert verify_checkpoint(str(last)) == []
