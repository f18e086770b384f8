"""Hyperparameter search: the overfitting rule on synthetic streams, search-space and resource
checks, and real Ray Tune searches over real Ray Train + DeepSpeed trials (no mocks)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import classification_rows, write_jsonl

from trainers.config_load import build_spec, load_config
from trainers.errors import ConfigError
from tuning.config import OverfittingConfig, SchedulerConfig, TuneConfig
from tuning.load import load_search, trial_spec
from tuning.resources import size_trials
from tuning.stoppers import DIVERGED, GAP, OVERFITTING, PLATEAU, OverfittingStopper, stop_reason

CFG = OverfittingConfig(grace_period=2, patience=2, min_delta=0.01, plateau_patience=None)


def stream(val, train):
    return [
        {"eval/loss": v, "train/loss": t, "train/step": 10 * (i + 1)}
        for i, (v, t) in enumerate(zip(val, train))
    ]


def first_stop(history, cfg=CFG):
    """(evaluation index, reason) of the first stop a trial would get, evaluation by evaluation."""
    for i in range(1, len(history) + 1):
        reason = stop_reason(history[:i], cfg)
        if reason:
            return i, reason
    return None


# ---- the overfitting rule -------------------------------------------------------------------


def test_overfitting_stream_is_stopped_when_val_rises_while_train_falls():
    h = stream(val=[1.0, 0.8, 0.7, 0.75, 0.8, 0.9], train=[1.0, 0.7, 0.5, 0.3, 0.2, 0.1])
    assert first_stop(h) == (5, OVERFITTING)  # two evaluations above the best (0.7) + min_delta


def test_improving_stream_is_never_stopped():
    h = stream(
        val=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45], train=[1.0, 0.85, 0.7, 0.6, 0.5, 0.4, 0.35]
    )
    assert first_stop(h) is None


def test_noisy_but_improving_stream_is_not_stopped():
    # Single upticks (noise) never last `patience` evaluations, and the trend keeps improving.
    rng = random.Random(0)
    val = [1.0 - 0.04 * i + (0.03 if i % 3 == 1 else 0.0) for i in range(15)]
    train = [1.0 - 0.05 * i + rng.uniform(-0.01, 0.01) for i in range(15)]
    assert first_stop(stream(val, train)) is None


def test_rising_val_with_rising_train_is_not_overfitting():
    # Both losses rise: the run is unstable, not overfitting (ASHA's business, not this rule's).
    h = stream(val=[1.0, 0.8, 0.7, 0.9, 1.0, 1.1], train=[1.0, 0.7, 0.5, 0.8, 0.9, 1.0])
    assert first_stop(h) is None


def test_nan_or_inf_loss_stops_at_once_as_diverged():
    h = stream(val=[1.0, 0.9, math.nan], train=[1.0, 0.8, 0.7])
    assert first_stop(h) == (3, DIVERGED)
    h = stream(val=[1.0, 0.9], train=[1.0, math.inf])
    assert first_stop(h) == (2, DIVERGED)


def test_grace_period_protects_early_evaluations():
    h = stream(val=[1.0, 1.2, 1.3], train=[1.0, 0.5, 0.3])
    assert first_stop(h, CFG.model_copy(update={"grace_period": 3})) is None


def test_generalization_gap_and_plateau_rules():
    gap_cfg = CFG.model_copy(update={"max_gap": 0.5})
    h = stream(val=[1.0, 0.95, 0.9, 0.9, 0.89], train=[1.0, 0.6, 0.3, 0.3, 0.2])
    assert first_stop(h, gap_cfg) == (4, GAP)
    flat_cfg = CFG.model_copy(update={"plateau_patience": 3, "plateau_min_delta": 0.01})
    h = stream(
        val=[1.0, 0.8, 0.7, 0.705, 0.702, 0.701, 0.7], train=[1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7]
    )
    assert first_stop(h, flat_cfg) == (6, PLATEAU)


def test_asha_rungs_are_fractions_of_the_run_in_whole_evaluations():
    from tuning.search import asha_budget, build_scheduler

    default = SchedulerConfig()
    # 1/9 of 540 steps = 60 steps = 12 evaluations of 5 steps.
    assert asha_budget(default, eval_every=5, total_steps=540) == (60, 540)
    # 246/9 = 27.3 steps rounds to 5 evaluations; 8/9 of a step is still one evaluation.
    assert asha_budget(default, eval_every=5, total_steps=246) == (25, 246)
    assert asha_budget(default, eval_every=2, total_steps=8) == (2, 8)
    # An explicit grace_period (evaluations) wins; max_t (evaluations) caps the run.
    assert asha_budget(SchedulerConfig(grace_period=3), 5, 246) == (15, 246)
    assert asha_budget(SchedulerConfig(grace_period=9, max_t=4), 5, 246) == (20, 20)
    cfg = TuneConfig(space={"train.learning_rate": {"grid": [1e-3]}})
    # 40/9 steps = 2 evaluations of 2 steps; x reduction_factor 3 from the first, below max_t.
    assert list(build_scheduler(cfg, eval_every=2, total_steps=40)._rungs) == [4, 12, 36]
    plain = cfg.model_copy(update={"scheduler": SchedulerConfig(recheck_rungs=False)})
    ray_rungs = build_scheduler(plain, eval_every=2, total_steps=40)._brackets[0]._rungs
    assert sorted(m for m, _ in ray_rungs) == [4, 12, 36]  # Ray's ASHA: the same rungs


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def _decisions(scheduler, events):
    """Feed (trial, step, eval/loss) results in order; each result's decision."""
    out = []
    for trial_id, step, loss in events:
        if step == 0:
            scheduler.on_trial_add(None, _Trial(trial_id))
            continue
        result = {"train/step": step, "eval/loss": loss}
        out.append(scheduler.on_trial_result(None, _Trial(trial_id), result))
    return out


def test_rechecking_asha_stops_a_trial_that_passed_a_rung_once_later_trials_beat_it():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from tuning.rungs import RecheckingASHA

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    kw = dict(time_attr="train/step", metric="eval/loss", mode="min", grace_period=4, max_t=40)
    events = [(t, 0, None) for t in "abcd"]
    events += [("a", 4, 0.6), ("b", 4, 0.7), ("a", 8, 0.55), ("c", 4, 0.5), ("d", 4, 0.45)]
    events += [("a", 12, 0.5), ("c", 8, 0.4), ("a", 14, 0.4)]
    # a reaches the rung at step 4 alone and passes; b, worse, is stopped on arrival by both.
    # c and d pass the rung better than a: with 4 recorded, the top ceil(4/3) = 2 go on.
    rechecking = RecheckingASHA(**kw, reduction_factor=3)
    assert _decisions(rechecking, events) == [go, stop, go, go, go, stop, go, stop]
    assert rechecking.stopped == {"b": 4, "a": 4}  # the rung each was stopped at
    # Ray's ASHA never looks back: a is the first at rung 12 and runs on.
    ray_asha = ASHAScheduler(**kw, reduction_factor=3)
    assert _decisions(ray_asha, events) == [go, stop, go, go, go, go, go, go]
    # Higher is better with mode max: the same trials, the same calls.
    maxed = RecheckingASHA(**{**kw, "mode": "max"}, reduction_factor=3)
    assert _decisions(maxed, [("a", 4, 0.6), ("b", 4, 0.7), ("a", 8, 0.7)]) == [go, go, stop]


def test_rechecking_asha_leaves_only_a_rungs_top_third_running_whatever_the_order():
    """Once all 12 trials have reported at the first rung, every trial still running is among its
    4 best there (synchronous successive halving's cut), for any arrival order."""
    import random

    from ray.tune.schedulers import TrialScheduler

    from tuning.rungs import RecheckingASHA

    loss = {f"t{i}": 1.0 - 0.05 * i for i in range(12)}  # t11 best
    top = set(sorted(loss, key=loss.get)[:4])
    for seed in range(20):
        order = sorted(loss)
        random.Random(seed).shuffle(order)
        s = RecheckingASHA("train/step", "eval/loss", "min", 2, 3.0, 20)
        _decisions(s, [(t, 2, loss[t]) for t in order])  # every trial at the rung
        running = {
            t
            for t in order
            if s.on_trial_result(None, _Trial(t), {"train/step": 4, "eval/loss": loss[t]})
            == TrialScheduler.CONTINUE
        }
        assert running and running <= top, (seed, running)
        assert set(s.stopped) == set(loss) - running


def test_stopper_persists_decisions_and_skips_the_baseline(tmp_path):
    path = str(tmp_path / "reasons.json")
    stopper = OverfittingStopper(CFG, path)
    assert stopper("t1", {"eval/loss": 2.0, "train/step": 0}) is False  # before training: ignored
    decisions = [
        stopper("t1", r) for r in stream([1.0, 0.8, 0.7, 0.75, 0.8], [1.0, 0.7, 0.5, 0.3, 0.2])
    ]
    assert decisions == [False, False, False, False, True]
    # A restored driver unpickles a stopper without its memory: the file carries it.
    import pickle

    again = pickle.loads(pickle.dumps(stopper))
    assert again.reasons() == {"t1": OVERFITTING}


# ---- search-space and resource checks ---------------------------------------------------------


def write_search(tmp_path, data_file, tune_block, **sections):
    raw = {
        "run": {"name": "s", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-bert"},
        "task": {"type": "sequence_classification"},
        "data": {"train_files": [str(data_file)], "max_seq_length": 32},
        "train": {
            "learning_rate": 3e-3,
            "num_epochs": 1,
            "eval_every_n_steps": 5,
            "micro_batch_size_per_worker": 8,
            "eval_batch_size_per_worker": 32,
            "log_every_n_steps": 1000,
        },
        "deepspeed": {"zero_stage": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tune": tune_block,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_search_spaces_name_the_path(tmp_path, data_dir):
    path = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {
            "space": {
                "train.learnin_rate": {"loguniform": [1e-5, 1e-3]},
                "lora.rank": {"choice": []},
                "lora.alpha": {"uniform": [32, 8]},
                "train.weight_decay": {"loguniform": [0, 0.1]},
                "train.warmup_ratio": {"choice": [0.1, 1.5]},
                "lora": {"choice": [1]},
            }
        },
    )
    with pytest.raises(ConfigError) as e:
        load_search(path)
    problems = str(e.value)
    assert "tune.space.train.learnin_rate: no key 'learnin_rate' in train" in problems
    assert "tune.space.lora.rank.choice=[]: needs at least one value" in problems
    assert "tune.space.lora.alpha.uniform=[32.0, 8.0]: low must be below high" in problems
    assert "tune.space.train.weight_decay.loguniform=[0.0, 0.1]: low must be > 0" in problems
    assert "tune.space.train.warmup_ratio=1.5 (choice): train.warmup_ratio=1.5" in problems
    assert "tune.space.lora: 'lora' is a section, not a value" in problems


def test_trial_spec_derives_a_validated_run_from_the_base(tmp_path, data_dir):
    path = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {"metric": "eval/accuracy", "mode": "max", "space": {"lora.rank": {"choice": [4, 8]}}},
        train={"global_batch_size": 8},
    )
    base = load_search(path).base
    # Trials rank their checkpoints by the search metric.
    assert (base.train.best_metric, base.train.best_metric_mode) == ("eval/accuracy", "max")
    trial = trial_spec(base, {"train.learning_rate": 3e-4, "lora.rank": 4})
    assert (trial.train.learning_rate, trial.lora.rank) == (3e-4, 4)
    assert (base.train.learning_rate, base.lora.rank) == (3e-3, 8)  # the base is left as it was
    # A value valid on its own that breaks a rule together with the base fails, named by its key.
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8: must be divisible by .*=3"):
        trial_spec(base, {"train.micro_batch_size_per_worker": 3})


def test_tune_block_schema_errors(tmp_path, data_dir):
    path = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {"space": {"lora.rank": {"choice": [4], "grid": [8]}}, "schedular": {}},
    )
    with pytest.raises(ConfigError) as e:
        load_search(path)
    text = str(e.value)
    assert "tune.schedular" in text and "tune.space.lora.rank" in text and "exactly one" in text
    # The same file still trains: `ferry train` ignores the tune block.
    assert load_config(path).model.preset == "tiny-bert"


def test_staged_and_feature_extraction_configs_are_refused(tmp_path, data_dir):
    space = {"space": {"train.learning_rate": {"choice": [1e-3]}}}
    staged = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        space,
        stages=[
            {"name": "domain", "set": {"task.type": "masked_lm", "method": "full"}},
            {"name": "task"},
        ],
    )
    with pytest.raises(
        ConfigError, match=r"stages=\['domain', 'task'\]: `ferry tune` searches one run"
    ):
        load_search(staged)
    frozen = write_search(tmp_path, data_dir / "cls.jsonl", space, method="feature_extraction")
    with pytest.raises(ConfigError, match=r"method=feature_extraction: .* does not search it"):
        load_search(frozen)


def test_resource_sizing(data_dir, tmp_path):
    spec = build_spec(
        {
            "model": {"preset": "tiny-bert"},
            "task": {"type": "sequence_classification"},
            "data": {"train_files": [str(data_dir / "cls.jsonl")]},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1, "data_cpus": 1},
        }
    )
    tune_cfg = TuneConfig(space={"lora.rank": {"choice": [4]}})
    assert size_trials(spec, tune_cfg, {"CPU": 8}) == (3, [])  # (8 - 1 data) // 2.01
    assert (
        size_trials(spec, tune_cfg.model_copy(update={"max_concurrent_trials": 2}), {"CPU": 8})[0]
        == 2
    )
    n, problems = size_trials(spec, tune_cfg, {"CPU": 2})
    assert n == 0 and "scaling.num_workers=2: one trial needs 2.01 CPUs" in problems[0]
    gpu = spec.model_copy(
        update={"scaling": spec.scaling.model_copy(update={"gpus_per_worker": 1})}
    )
    assert size_trials(gpu, tune_cfg, {"CPU": 64, "GPU": 5})[0] == 2


@pytest.mark.timeout(300)
def test_rank_beyond_the_model_fails_before_any_trial(tmp_path, data_dir, ray_session):
    from tuning.search import run_search

    path = write_search(
        tmp_path, data_dir / "cls.jsonl", {"space": {"lora.rank": {"choice": [4, 4096]}}}
    )
    search = load_search(path)
    with pytest.raises(ConfigError, match=r"tune.space.lora.rank=4096: lora.rank=4096"):
        run_search(search)
    exp = tmp_path / "runs" / "s-tune"
    assert not exp.exists() or not [p for p in os.listdir(exp) if p.startswith("trial-")]


# ---- real searches ------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_overfitting_trial_is_stopped_and_a_sane_one_is_not(tmp_path, ray_session):
    """16 training rows with random labels: a high learning rate memorizes them (training loss
    falls) while held-out loss rises; a tiny learning rate barely moves either."""
    rng = random.Random(1)
    train = [dict(r, label=rng.choice(["pos", "neg"])) for r in classification_rows(16, seed=3)]
    val = [dict(r, label=rng.choice(["pos", "neg"])) for r in classification_rows(64, seed=4)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)
    path = write_search(
        tmp_path,
        tmp_path / "train.jsonl",
        {
            "space": {"train.learning_rate": {"grid": [3e-3, 1e-7]}},
            "num_samples": 1,
            "scheduler": {"type": "fifo"},
            "overfitting": {
                "grace_period": 2,
                "patience": 2,
                "min_delta": 0.02,
                "plateau_patience": None,
            },
        },
        method="full",
        data={"validation_files": [str(tmp_path / "val.jsonl")]},
        train={
            "num_epochs": 12,
            "micro_batch_size_per_worker": 4,
            "eval_every_n_steps": 4,
            "lr_schedule": "constant",
        },
    )
    from tuning.search import run_search

    outcome = run_search(load_search(path))
    by_lr = {t["params"]["train.learning_rate"]: t for t in outcome.report.trials}
    assert by_lr[3e-3]["status"] == OVERFITTING, by_lr[3e-3]
    assert by_lr[3e-3]["steps_run"] < by_lr[3e-3]["total_steps"]
    assert by_lr[1e-7]["status"] == "completed", by_lr[1e-7]
    # A trial's result is its best evaluation, which for the overfitting one is before its last.
    assert by_lr[3e-3]["best_step"] < by_lr[3e-3]["steps_run"]
    best = outcome.report.best
    assert best["best_checkpoint"].endswith(f"checkpoint_step_{best['best_step']:07d}")
    exported = json.loads((tmp_path / "runs" / "s-tune" / "best" / "metrics.json").read_text())
    assert (
        exported["checkpoint"] == best["best_checkpoint"] and exported["steps"] == best["best_step"]
    )


@pytest.mark.timeout(1800)
def test_search_killed_mid_way_resumes_and_reports(tmp_path, data_dir):
    """`ferry tune` on its own embedded Ray: ASHA over 4 trials, the driver killed after the first
    trial ends, `--resume` finishes the same trial set with no trial restarted from scratch; the
    report, plots and best model come out; --report rebuilds them."""
    path = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {
            "space": {"train.learning_rate": {"grid": [3e-3, 1e-3, 1e-5, 1e-6]}},
            "num_samples": 1,
            # ASHA rungs at steps 15 and 30: a trial that ASHA will stop still runs 10 steps past
            # its first checkpoint (step 5), the window the kill below must hit.
            "scheduler": {"grace_period": 3, "reduction_factor": 2},
            "overfitting": {"plateau_patience": None},
        },
        method="full",
        # One trial at a time on the 2-CPU embedded Ray ((2 - data_cpus 1) // (0.5 + 0.01)), so
        # one trial finishes while the next is mid-way: the state the kill must hit.
        train={"num_epochs": 1, "eval_every_n_steps": 5},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cluster.cli", "tune", path]
    exp = tmp_path / "runs" / "s-tune"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )  # its own group: killing it kills its Ray
        try:
            deadline = time.time() + 900
            finished_before, resumable = set(), set()
            # Kill once one trial has finished and another is mid-way: a committed checkpoint on
            # disk and RUNNING in Tune's *saved* experiment state, which is what `--resume` reads
            # (a trial missing from it would be created anew, not continued). Read the state
            # rather than sleep past its save interval: a fixed sleep could outlast the trial.
            while time.time() < deadline and proc.poll() is None:
                statuses = _saved_statuses(exp) if exp.exists() else {}
                finished_before = {t for t, s in statuses.items() if s == "TERMINATED"}
                resumable = {
                    t
                    for t, s in statuses.items()
                    # Asked only once a trial has finished: each question reloads the snapshot.
                    if finished_before
                    and s == "RUNNING"
                    and _has_committed_checkpoint(exp / "runs" / f"trial-{t}")
                }
                if finished_before and resumable:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert finished_before and resumable
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert len(finished_before) < 4

    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((exp / "report" / "summary.json").read_text())
    trials = {t["trial_id"]: t for t in _csv_rows(exp / "report" / "trials.csv")}
    assert len(trials) == 4 and summary["totals"]["trials"] == 4
    assert {float(t["train.learning_rate"]) for t in trials.values()} == {3e-3, 1e-3, 1e-5, 1e-6}
    for trial_id, t in trials.items():
        if trial_id in finished_before:
            assert int(t["starts"]) == 1, t  # finished trials stay finished
        if trial_id in resumable:
            assert (int(t["starts"]), int(t["fresh_starts"])) == (2, 1), (
                t
            )  # continued, not restarted
        assert int(t["fresh_starts"]) <= 2, t
    assert any(t["status"] == "asha" for t in trials.values()), trials
    assert not [t for t in trials.values() if t["status"] in ("interrupted", "failed")], trials
    assert summary["totals"]["trial_steps"] < summary["totals"]["grid_steps"]
    for png in ("val_loss_curves.png", "best_metric_vs_lr.png"):
        assert (exp / "report" / png).stat().st_size > 10_000
    # The best model loads with plain peft/transformers, and best.yaml is a runnable run config.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(exp / "best"))
    assert model.config.num_labels == 2
    best_cfg = load_config(str(exp / "report" / "best.yaml"))
    assert best_cfg.train.learning_rate == float(
        _csv_rows(exp / "report" / "trials.csv")[0]["train.learning_rate"]
    )
    os.remove(exp / "report" / "trials.csv")
    again = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tune", "--report", str(exp)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0 and (exp / "report" / "trials.csv").exists(), again.stderr[-2000:]


def _saved_statuses(exp) -> dict[str, str]:
    """Trial id -> status in Tune's latest saved experiment state (named by session start time).

    Read from the file: Tune's public reader (`ExperimentAnalysis`) turns a saved RUNNING into
    PENDING (to requeue it), and RUNNING is the state this test must catch.
    """
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
        return {t["trial_id"]: t["status"] for t in (json.loads(row[0]) for row in trial_data)}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}  # read while Tune rewrites it in place: ask again


def _has_committed_checkpoint(run_dir) -> bool:
    from ray.train import Result

    try:
        result = Result.from_path(str(run_dir))
    except Exception:  # RuntimeError: no snapshot yet; Ray Train's own (non-public) error: a
        return False  # snapshot read while Ray Train rewrites it in place
    return result.checkpoint is not None or bool(result.best_checkpoints)


def _csv_rows(path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_optuna_searcher_draws_from_the_space(tmp_path, data_dir):
    """TPE gets the same space (dotted paths, log scale) and proposes values inside it."""
    from ray import tune

    from tuning.search import _param_space, _searcher

    path = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {
            "search_alg": "optuna",
            "space": {
                "train.learning_rate": {"loguniform": [1e-5, 1e-3]},
                "lora.rank": {"choice": [4, 8]},
            },
        },
    )
    tune_cfg = load_search(path).tune
    searcher = _searcher(tune_cfg, concurrency=2)
    assert searcher.set_search_properties("eval/loss", "min", _param_space(tune_cfg))
    drawn = [searcher.suggest(f"t{i}") for i in range(2)]
    assert searcher.suggest("t2") is None  # the concurrency limit holds the third
    for params in drawn:
        assert 1e-5 <= params["train.learning_rate"] <= 1e-3 and params["lora.rank"] in (4, 8)
    assert isinstance(_param_space(tune_cfg)["train.learning_rate"], tune.search.sample.Float)
    grid = write_search(
        tmp_path,
        data_dir / "cls.jsonl",
        {"search_alg": "optuna", "space": {"lora.rank": {"grid": [4, 8]}}},
    )
    with pytest.raises(ConfigError, match="tune.space.lora.rank.grid: optuna cannot search grid"):
        load_search(grid)


def test_example_search_configs_validate():
    """Every shipped example with a tune: block has a valid block and search space."""
    import glob

    paths = glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml"))
    searches = [p for p in paths if "tune" in (yaml.safe_load(open(p)) or {})]
    assert searches
    for path in searches:
        load_search(path)  # raises ConfigError with every problem of the block and its space
