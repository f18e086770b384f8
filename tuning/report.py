"""The search's report, rebuilt from files on disk: ranked table, CSV/Parquet, best.yaml, plots.

`build_report` is the entry point (`ferry tune` calls it at the end; `ferry tune --report DIR`
calls it alone). It reads only what the experiment folder holds (Tune's per-trial result.json
and saved experiment state, Ferry's trial records, the stopper's decisions), so it works on a
finished, interrupted or copied experiment.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from ray.tune import ExperimentAnalysis

from trainers.checkpoints import checkpoint_name
from trainers.config import ScalingConfig
from trainers.config_load import set_path
from trainers.curves import pyplot
from tuning.config import TuneConfig
from tuning.layout import (
    BEST_DIR,
    REASONS_FILE,
    REPORT_DIR,
    SEARCH_FILE,
    TRIAL_PREFIX,
    trial_name,
    trial_record_file,
    trial_run_dir,
)
from tuning.stoppers import DIVERGED, read_state


@dataclass
class Report:
    experiment_dir: str
    metric: str
    mode: str
    trials: list[dict[str, Any]]  # ranked, best first
    best: dict[str, Any] | None
    totals: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


def build_report(exp_dir: str, write: bool = True) -> Report:
    """Collect every trial of the experiment at `exp_dir`; write report/ files when `write`.

    Raises:
        FileNotFoundError: `exp_dir` is not a Ferry search folder.
    """
    search_file = os.path.join(exp_dir, SEARCH_FILE)
    if not os.path.exists(search_file):
        raise FileNotFoundError(
            f"{exp_dir}: not a Ferry search folder (no {SEARCH_FILE}). Pass "
            "<run.storage_path>/<tune.name>."
        )
    with open(search_file) as f:
        search = json.load(f)
    # The base run stays a mapping: validating it again could fail where the report is read (a
    # model.name_or_path naming a Python package not installed there), and the report needs
    # only its scaling section and its values for best.yaml.
    base = search["base"]
    tune_cfg = TuneConfig.model_validate(search["tune"])
    metric, mode = tune_cfg.metric, tune_cfg.mode
    reasons = read_state(os.path.join(exp_dir, REASONS_FILE))["reasons"]
    statuses = _tune_statuses(exp_dir)
    scaling = ScalingConfig.model_validate(base["scaling"])
    workers, gpus = scaling.num_workers, scaling.gpus_per_worker

    trials = []
    for name in sorted(os.listdir(exp_dir)):
        result_file = os.path.join(exp_dir, name, "result.json")
        if not name.startswith(TRIAL_PREFIX) or not os.path.exists(result_file):
            continue
        trial_id = name.removeprefix(TRIAL_PREFIX)
        rows = read_results(result_file)
        record = _read_json(trial_record_file(exp_dir, trial_id), {})
        trials.append(
            _trial_row(
                exp_dir,
                trial_id,
                rows,
                record,
                metric,
                mode,
                reasons.get(trial_id),
                statuses.get(trial_id),
                workers,
                gpus,
                DIVERGED,
            )
        )
    sign = 1 if mode == "min" else -1
    trials.sort(
        key=lambda t: (
            not _finite(t["best_metric"]),
            sign * t["best_metric"] if _finite(t["best_metric"]) else 0,
        )
    )
    candidates = [t for t in trials if _finite(t["best_metric"]) and t["best_checkpoint"]]
    best = candidates[0] if candidates else None
    totals = {
        "trials": len(trials),
        "trial_steps": sum(t["steps_run"] for t in trials),
        "grid_steps": sum(t["total_steps"] or 0 for t in trials),
        "worker_seconds": round(sum(t["worker_seconds"] for t in trials), 1),
        "gpu_hours": round(sum(t["gpu_hours"] for t in trials), 4),
        "stopped_early": sum(
            t["status"] not in ("completed", "failed", "interrupted") for t in trials
        ),
        "by_status": {
            s: sum(t["status"] == s for t in trials) for s in sorted({t["status"] for t in trials})
        },
    }
    report = Report(exp_dir, metric, mode, trials, best, totals)
    if write:
        _write(report, base)
    return report


def print_report(report: Report) -> None:
    """The ranked table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    params = sorted({p for t in report.trials for p in t["params"]})
    table = Table(
        title=f"search {os.path.basename(report.experiment_dir)}: {report.metric} "
        f"({report.mode}), {report.totals['trial_steps']} trial-steps, "
        f"{report.totals['worker_seconds']:,.0f} worker-s"
    )
    for col in (
        "#",
        "trial",
        *params,
        f"best {report.metric}",
        "at step",
        "steps run",
        "stop reason",
    ):
        table.add_column(col, justify="right" if col not in ("trial", "stop reason") else "left")
    for i, t in enumerate(report.trials, 1):
        table.add_row(
            str(i),
            t["trial_id"],
            *(_fmt(t["params"].get(p)) for p in params),
            _fmt(t["best_metric"]),
            str(t["best_step"]),
            f"{t['steps_run']}/{t['total_steps']}",
            t["status"],
        )
    Console().print(table)
    if report.best:
        print(f"best: trial {report.best['trial_id']} {report.best['params']}")
    for name, path in report.files.items():
        print(f"{name}: {path}")


def _trial_row(
    exp_dir, trial_id, rows, record, metric, mode, reason, status, workers, gpus, diverged
) -> dict:
    trained = [r for r in rows if r.get("train/step", 0) > 0]
    scored = [r for r in trained if _finite(r.get(metric))]
    pick = min if mode == "min" else max
    best_row = pick(scored, key=lambda r: r[metric]) if scored else None
    steps_run = max((r.get("train/step", 0) for r in rows), default=0)
    total = record.get("total_steps")
    params = record.get("params") or (rows[0].get("config", {}) if rows else {})
    if total and steps_run >= total:
        state = "completed"
    elif reason:
        state = "failed (diverged)" if reason == diverged else reason
    elif status == "ERROR":
        state = "failed"
    elif status == "TERMINATED":
        state = "asha"  # ended before its last step, not by the stopper: ASHA cut it
    else:
        state = "interrupted"
    ckpt = None
    if best_row is not None:
        path = os.path.join(
            trial_run_dir(exp_dir, trial_id), checkpoint_name(int(best_row["train/step"]))
        )
        ckpt = path if os.path.isdir(path) else None
    seconds = _active_seconds(rows)
    error = None
    error_file = os.path.join(exp_dir, trial_name(trial_id), "error.txt")
    if state.startswith("failed") and os.path.exists(error_file):
        with open(error_file) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
            error = lines[-1][:300] if lines else None
    return {
        "trial_id": trial_id,
        "params": params,
        "status": state,
        "best_metric": best_row[metric] if best_row else math.nan,
        "best_step": int(best_row["train/step"]) if best_row else None,
        "steps_run": int(steps_run),
        "total_steps": total,
        "evals": len(trained),
        "starts": len(record.get("starts", [])),
        "fresh_starts": sum(not s["resumed"] for s in record.get("starts", [])),
        "worker_seconds": round(seconds * workers, 1),
        "gpu_hours": seconds * workers * gpus / 3600,
        "best_checkpoint": ckpt,
        "error": error,
        "curve": [
            (int(r["train/step"]), r.get("eval/loss"), r.get("train/loss"))
            for r in rows
            if "train/step" in r
        ],
    }


def _active_seconds(rows: list[dict]) -> float:
    """Wall time to the last report; a trial restarted by a resume starts its clock again."""
    total, prev = 0.0, 0.0
    for r in rows:
        t = r.get("time_total_s", 0.0)
        if t < prev:
            total += prev
        prev = t
    return total + prev


def _write(report: Report, base: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = os.path.join(report.experiment_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    params = sorted({p for t in report.trials for p in t["params"]})
    columns = [
        "rank",
        "trial_id",
        *params,
        f"best {report.metric}",
        "best_step",
        "steps_run",
        "total_steps",
        "evals",
        "status",
        "worker_seconds",
        "gpu_hours",
        "starts",
        "fresh_starts",
        "best_checkpoint",
        "error",
    ]
    data: dict[str, list] = {c: [] for c in columns}
    for i, t in enumerate(report.trials, 1):
        data["rank"].append(i)
        data["trial_id"].append(t["trial_id"])
        for p in params:
            data[p].append(t["params"].get(p))
        data[f"best {report.metric}"].append(t["best_metric"])
        for c in columns[len(params) + 3 :]:
            data[c].append(t[c])
    # Mixed-type parameter columns (a choice of ints and floats) are stored as floats or strings.
    arrays = {}
    for c, values in data.items():
        try:
            arrays[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[c] = pa.array([None if v is None else str(v) for v in values])
    table = pa.table(arrays)
    pacsv.write_csv(table, os.path.join(out, "trials.csv"))
    pq.write_table(table, os.path.join(out, "trials.parquet"))
    report.files = {
        "table": os.path.join(out, "trials.csv"),
        "parquet": os.path.join(out, "trials.parquet"),
    }
    if report.best:
        best_raw = copy.deepcopy(base)
        run = {
            "run.name": f"{os.path.basename(report.experiment_dir)}-best",
            "run.resume": "auto",
        }
        for path, value in {**report.best["params"], **run}.items():
            set_path(best_raw, path, value)
        path = os.path.join(out, "best.yaml")
        with open(path, "w") as f:
            f.write(
                f"# Best trial {report.best['trial_id']} of {report.experiment_dir}: "
                f"{report.metric}={report.best['best_metric']:.6g} "
                f"at step {report.best['best_step']}.\n"
                f"# Reproduce it with: ferry train {path}\n"
            )
            yaml.safe_dump(best_raw, f, sort_keys=False)
        report.files["best_config"] = path
    export = os.path.join(report.experiment_dir, BEST_DIR)
    if os.path.exists(os.path.join(export, "metrics.json")):
        report.files["best_model"] = export
    report.files.update(_plots(report, out, params))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(
            {
                "metric": report.metric,
                "mode": report.mode,
                "totals": report.totals,
                "best": {k: v for k, v in (report.best or {}).items() if k != "curve"},
                "files": report.files,
            },
            f,
            indent=2,
            default=str,
        )


def _plots(report: Report, out: str, params: list[str]) -> dict[str, str]:
    plt = pyplot()
    files = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in report.trials:
        pts = [(s, v) for s, v, _ in t["curve"] if _finite(v)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        early = t["status"] not in ("completed",)
        label = f"{t['trial_id']} {_short(t['params'])} [{t['status']}]"
        (line,) = ax.plot(xs, ys, linestyle="--" if early else "-", label=label)
        # An x marks where a trial was cut short; a dot where it ran to the end.
        ax.plot(xs[-1], ys[-1], marker="x" if early else "o", markersize=9, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (eval/loss)")
    ax.set_title("Validation loss per trial (dashed + x: stopped early)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    files["val_loss_plot"] = os.path.join(out, "val_loss_curves.png")
    fig.savefig(files["val_loss_plot"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    numeric = [
        p for p in params if all(isinstance(t["params"].get(p), int | float) for t in report.trials)
    ]
    x_param = (
        "train.learning_rate"
        if "train.learning_rate" in numeric
        else (numeric[0] if numeric else None)
    )
    c_param = (
        "lora.rank"
        if "lora.rank" in params and x_param != "lora.rank"
        else next((p for p in params if p != x_param), None)
    )
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [t for t in report.trials if _finite(t["best_metric"]) and x_param]
    if pts:
        colors = [t["params"].get(c_param) for t in pts] if c_param else None
        numeric_colors = colors and all(isinstance(c, int | float) for c in colors)
        sc = ax.scatter(
            [t["params"][x_param] for t in pts],
            [t["best_metric"] for t in pts],
            c=colors if numeric_colors else None,
            cmap="viridis",
            s=60,
        )
        if numeric_colors:
            fig.colorbar(sc, ax=ax, label=c_param)
        if x_param == "train.learning_rate":
            ax.set_xscale("log")
        ax.set_xlabel(x_param)
    ax.set_ylabel(f"best {report.metric}")
    ax.set_title(f"Best {report.metric} per trial" + (f", colored by {c_param}" if c_param else ""))
    ax.grid(alpha=0.3)
    files["metric_plot"] = os.path.join(out, "best_metric_vs_lr.png")
    fig.savefig(files["metric_plot"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return files


def _tune_statuses(exp_dir: str) -> dict[str, str]:
    """Trial id -> Tune's status (TERMINATED, ERROR, PENDING) from Tune's latest saved experiment
    state, which a restored search continues and rewrites. Tune reads a trial saved as RUNNING
    back as PENDING (to requeue it); to the report both mean interrupted."""
    # It unpickles what Tune saved: the report trusts its experiment folder, as --resume does.
    try:
        analysis = ExperimentAnalysis(exp_dir)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        # No state saved yet, one read while Tune rewrites it in place, or a format this Ray does
        # not know: every status falls back to "interrupted".
        return {}
    return {trial.trial_id: trial.status for trial in analysis.trials}


def read_results(path: str) -> list[dict]:
    """Every result Tune logged for one trial, oldest first.

    Read here rather than through `ExperimentAnalysis.trial_dataframes` or `Result.from_path`:
    both fail on the partial last line a killed driver leaves and then drop the trial's whole
    history, and the analysis lists only the trials in the last saved experiment state (a trial
    started after it is on disk all the same).
    """
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a driver killed mid-write leaves a partial last line
    return rows


def _read_json(path: str, default: Any) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _short(params: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in sorted(params.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
