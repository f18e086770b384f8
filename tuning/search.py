"""Hyperparameter search: validate -> size -> Ray Tune over the spine's training -> report.

`run_search` is the entry point (`ferry tune` calls it with Ray connected). Each trial is a Tune
function trainable that builds the trial's run config and calls `trainers.launch.train`, which runs
a Ray Train V2 TorchTrainer; `TuneReportCallback` forwards every evaluation to Tune (the form Train
V2 supports: `Tuner(TorchTrainer)` is rejected). ASHA compares trials on `tune.metric`; the
overfitting stopper watches each trial on its own. The search's result is the best *checkpoint*
of the best trial, exported like a finished run.

The experiment folder's layout is in `tuning.layout`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from trainers.config import RunSpec
from trainers.config_load import flatten
from trainers.data.files import check_data
from trainers.data.prepare import PreparedData
from trainers.errors import ConfigError
from trainers.export import export_checkpoint
from trainers.model import check_lora_fits, load_tokenizer
from trainers.preflight import (
    check_resources,
    check_storage,
    has_checkpoint,
    plan_checked,
    plan_for,
)
from trainers.tasks import TASKS
from trainers.tracking import track_search
from trainers.train.launch import train
from tuning.config import Distribution, SchedulerConfig, SearchSpec, TuneConfig
from tuning.layout import (
    BEST_DIR,
    REASONS_FILE,
    SEARCH_FILE,
    TRACKING_FILE,
    experiment_dir,
    experiment_name,
    runs_dir,
    trial_name,
    trial_record_file,
    trial_run_dir,
)
from tuning.load import trial_spec
from tuning.report import Report, build_report, print_report
from tuning.resources import size_trials
from tuning.rungs import RecheckingASHA
from tuning.stoppers import OverfittingStopper

log = logging.getLogger("ferry.tune")


class SearchFailedError(RuntimeError):
    """The search ran but produced no usable trial."""


@dataclass
class SearchOutcome:
    experiment_dir: str
    report: Report
    best_export: str | None


def run_search(search: SearchSpec, resume: bool = False) -> SearchOutcome:
    """Search `search.tune.space` around the run `search.base` on the connected Ray cluster.

    Args:
        search: the validated search (`tuning.load.load_search` or `build_search`).
        resume: continue the interrupted experiment of the same name/storage.

    Raises:
        ConfigError: a metric the task does not report, missing data, too few resources, a LoRA
            rank the model cannot take, or an experiment-exists conflict; raised before any
            trial starts.
        SearchFailedError: every trial failed.
    """
    spec, tune_cfg = search.base, search.tune
    exp_dir = experiment_dir(search)
    problems = _check_experiment(exp_dir, resume)
    task_metrics = TASKS[spec.task.type].METRICS
    if tune_cfg.metric not in task_metrics and tune_cfg.metric != "train/loss":
        problems.append(
            f"tune.metric={tune_cfg.metric}: not reported by task {spec.task.type}. "
            f"Use one of {', '.join(task_metrics)}."
        )
    problems += check_data(spec) + check_resources(spec) + check_storage(spec)
    concurrency, sizing_problems = size_trials(spec, tune_cfg)
    problems += sizing_problems
    if problems:
        raise ConfigError(problems)

    # Prepare the data once here: every trial trains on it, without checks or preparation of
    # its own (trainers.preflight.plan_for).
    run_plan = plan_checked(spec)
    data = run_plan.data
    tokenizer = load_tokenizer(data.tokenizer_path)
    for rank in _extremes(tune_cfg.space.get("lora.rank")):
        # Loading the search validated every candidate rank; only the model can tell if it fits.
        trial = spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": rank})})
        problems += [
            f"tune.space.lora.rank={rank}: {p}"
            for p in check_lora_fits(trial, tokenizer, data.label_names)
        ]
    if problems:
        raise ConfigError(problems)
    plan = {"steps_per_epoch": run_plan.steps_per_epoch, "total_steps": run_plan.total_steps}

    os.makedirs(exp_dir, exist_ok=True)
    if not resume:
        with open(os.path.join(exp_dir, SEARCH_FILE), "w") as f:
            json.dump({**search.model_dump(mode="json"), "plan": plan}, f, indent=2)
    # Tune saves its experiment state every few seconds; a killed driver loses at most this much.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # One MLflow parent run for the search (with tracking.mlflow on); each trial logs a child run.
    with track_search(
        spec,
        experiment_name(search),
        {
            **flatten(spec.model_dump(mode="json")),
            **flatten({"tune": tune_cfg.model_dump(mode="json")}),
        },
        os.path.join(exp_dir, TRACKING_FILE),
    ) as tracking:
        every = spec.train.eval_every_n_steps
        trainable = tune.with_resources(
            tune.with_parameters(
                _run_trial,
                base=spec,
                exp_dir=exp_dir,
                data=data.to_dict(),
                tracking=tracking.trial_overrides(),
                parent_run_id=tracking.mlflow.run_id if tracking.mlflow else None,
            ),
            {"CPU": tune_cfg.trial_cpus},
        )
        stopper = OverfittingStopper(
            tune_cfg.overfitting,
            os.path.join(exp_dir, REASONS_FILE),
            metric=tune_cfg.metric,
            mode=tune_cfg.mode,
        )
        log.info(
            "search %s: %d trial(s) at most %d at a time, %d steps each, eval every %d",
            experiment_name(search),
            _trial_count(tune_cfg),
            concurrency,
            plan["total_steps"],
            every,
        )
        t0 = time.perf_counter()
        if resume:
            tuner = tune.Tuner.restore(
                exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(tune_cfg),
                tune_config=tune.TuneConfig(
                    search_alg=_searcher(tune_cfg, concurrency),
                    scheduler=build_scheduler(tune_cfg, every, plan["total_steps"]),
                    num_samples=tune_cfg.num_samples,
                    max_concurrent_trials=concurrency,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=experiment_name(search),
                    storage_path=os.path.dirname(exp_dir),
                    stop=stopper,
                    # A trial that fails (e.g. diverges) is not retried; --resume retries
                    # errored ones.
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=1,
                ),
            )
        tuner.fit()
        log.info("search finished in %.0f s", time.perf_counter() - t0)

        report = build_report(exp_dir, write=False)  # written below, once the best model exists
        if report.best is None:
            raise SearchFailedError(
                f"no trial of {exp_dir} reported {tune_cfg.metric}; see the trial errors above or "
                "in the trial folders' error.txt."
            )
        best_export = _export_best(report, spec, data, exp_dir)
        if tune_cfg.delete_stopped_checkpoints:
            _delete_stopped_checkpoints(report, exp_dir)
        report = build_report(exp_dir)
        print_report(report)
        tracking.log_results(
            list(report.files.values()), {f"best/{tune_cfg.metric}": report.best["best_metric"]}
        )
        return SearchOutcome(exp_dir, report, best_export)


def _run_trial(
    config: dict[str, Any],
    base: RunSpec,
    exp_dir: str,
    data: dict,
    tracking: dict[str, Any],
    parent_run_id: str | None,
) -> None:
    """One trial: the base run with this trial's values (`config`, keyed by dotted path),
    trained by the spine on the data the driver prepared and checked, logged (with MLflow on)
    as a child of the search's run."""
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(
        base,
        {
            **config,
            **tracking,
            # Deterministic per trial: a resumed trial finds its own checkpoints and goes on.
            "run.name": trial_name(trial_id),
            "run.storage_path": runs_dir(exp_dir),
            "run.resume": "auto",
            # The base's cache (the driver filled it), not one under the trial's own storage path.
            "data.cache_dir": base.cache_dir,
            # The trial's workers export its last state, as they always did: the search exports
            # the best checkpoint of the best trial itself (_export_best), so a best export per
            # trial would only cost each trial's driver a checkpoint load.
            "train.export": "last",
            # One frozen probe per search, not per trial: the trials share its data and base
            # model, and concurrent trials would extract the same features at once.
            "train.probe_baseline": False,
        },
    )
    plan = plan_for(spec, PreparedData(**data))
    _record_start(
        trial_record_file(exp_dir, trial_id),
        config,
        plan.total_steps,
        resumed=has_checkpoint(spec),
    )
    train(plan, callbacks=[TuneReportCallback()], tracking_parent=parent_run_id)


def _record_start(path: str, params: dict[str, Any], total_steps: int, resumed: bool) -> None:
    record = {"params": params, "total_steps": total_steps, "starts": []}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    record["starts"].append({"time": time.time(), "resumed": resumed})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _check_experiment(exp_dir: str, resume: bool) -> list[str]:
    exists = os.path.exists(os.path.join(exp_dir, SEARCH_FILE))
    if resume and not exists:
        return [
            f"--resume: no search at {exp_dir}. Drop --resume, or check tune.name and "
            "run.storage_path."
        ]
    if not resume and exists:
        return [
            f"tune.name: a search already exists at {exp_dir}. Add --resume to continue it, "
            "or set a new tune.name."
        ]
    return []


def _param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {path: make[d.kind](list(d.args)) for path, d in tune_cfg.space.items()}


def _searcher(tune_cfg: TuneConfig, concurrency: int):
    if tune_cfg.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=tune_cfg.metric, mode=tune_cfg.mode, seed=tune_cfg.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    # The generator must carry the limit itself: given a random_state, Tune ignores
    # TuneConfig.max_concurrent_trials (seen on Ray 2.60).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=tune_cfg.seed)


def build_scheduler(tune_cfg: TuneConfig, eval_every: int, total_steps: int):
    """The search's trial scheduler: FIFO, or ASHA over optimizer steps. The config speaks in
    evaluations and fractions of a run; steps are what every trial reports, restored trials
    included, so rungs stay aligned."""
    if tune_cfg.scheduler.type == "fifo":
        return FIFOScheduler()
    grace, max_t = asha_budget(tune_cfg.scheduler, eval_every, total_steps)
    # The same rungs either way; only whether a rung's decision is revisited differs.
    asha = RecheckingASHA if tune_cfg.scheduler.recheck_rungs else ASHAScheduler
    return asha(
        time_attr="train/step",
        metric=tune_cfg.metric,
        mode=tune_cfg.mode,
        grace_period=grace,
        reduction_factor=tune_cfg.scheduler.reduction_factor,
        max_t=max_t,
    )


def asha_budget(s: SchedulerConfig, eval_every: int, total_steps: int) -> tuple[int, int]:
    """ASHA's (grace period, max_t) in steps. The first rung sits at a whole evaluation: a rung
    between two evaluations would be decided at the next one anyway."""
    max_t = s.max_t * eval_every if s.max_t else total_steps
    if s.grace_period is not None:
        evals = s.grace_period
    else:
        evals = max(1, round(s.grace_fraction * max_t / eval_every))
    return min(evals * eval_every, max_t), max_t


def _trial_dirname(trial) -> str:
    return trial_name(trial.trial_id)


def _extremes(dist: Distribution | None) -> list[Any]:
    """The largest and smallest value a distribution can draw (numbers only)."""
    if dist is None:
        return []
    args = list(dist.args)
    if dist.kind in ("choice", "grid"):
        nums = [a for a in args if isinstance(a, int | float)]
        return [max(nums), min(nums)] if nums else []
    return [args[1] - (dist.kind == "randint"), args[0]]


def _trial_count(tune_cfg: TuneConfig) -> int:
    grid = math.prod(len(d.args) for d in tune_cfg.space.values() if d.kind == "grid")
    return grid * tune_cfg.num_samples


def _export_best(report: Report, base: RunSpec, data, exp_dir: str) -> str | None:
    """Export the best trial's best checkpoint to <experiment>/best (HF format)."""
    best = report.best
    if not best.get("best_checkpoint"):
        log.warning("best trial %s has no checkpoint on disk; nothing exported", best["trial_id"])
        return None
    spec = trial_spec(base, best["params"])
    out = os.path.join(exp_dir, BEST_DIR)
    shutil.rmtree(out, ignore_errors=True)
    export_checkpoint(
        spec,
        data,
        best["best_checkpoint"],
        out,
        extra={"search": exp_dir, "trial_id": best["trial_id"], "params": best["params"]},
    )
    log.info(
        "best trial %s (%s=%.4g at step %s) exported to %s",
        best["trial_id"],
        report.metric,
        best["best_metric"],
        best["best_step"],
        out,
    )
    return out


def _delete_stopped_checkpoints(report: Report, exp_dir: str) -> None:
    """Trials stopped early are never resumed or published: their checkpoints are dead weight."""
    freed = 0
    for row in report.trials:
        if row["trial_id"] == report.best["trial_id"] or row["status"] in ("completed", "failed"):
            continue
        run_dir = trial_run_dir(exp_dir, row["trial_id"])
        if not os.path.isdir(run_dir):
            continue
        for name in os.listdir(run_dir):
            if name.startswith("checkpoint_"):
                path = os.path.join(run_dir, name)
                freed += sum(
                    os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                )
                shutil.rmtree(path, ignore_errors=True)
    if freed:
        log.info("deleted checkpoints of early-stopped trials: %.1f MB freed", freed / 1e6)
