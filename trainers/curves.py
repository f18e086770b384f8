"""A run's training curves, drawn from its reported metrics: `<run>/report/curves.png`.

`plot_curves` is the entry point: train and eval loss over optimizer steps, the run's
`train.best_metric` with its running best, the best step marked and, when the run stopped early,
where and why. `curve_series` computes what is plotted (tests and other plots read the same
numbers); `plot_overlay` draws several runs on one figure (`ferry compare`); `pyplot` is
matplotlib on its file-only backend (the search report draws with it too).

A history is what `trainers.tracking` records: one row per report,
`{"step": int, "time": unix seconds, "metrics": {key: number}}`, oldest first.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

from trainers.storage import HISTORY_FILE, REPORT_DIR, join, read_text, write_bytes

Point = tuple[int, float]


@dataclass(frozen=True)
class CurveSeries:
    """The numbers one run's curves show."""

    metric: str  # train.best_metric
    mode: str  # "min" or "max"
    train_loss: list[Point]
    eval_loss: list[Point]
    metric_values: list[Point]
    running_best: list[Point]  # the best metric value seen up to each evaluation
    best: Point | None  # (step, value) of the best evaluation; the latest on a tie (as exported)
    early_stop: dict[str, Any] | None  # {"step": ..., "reason": ...} from metrics.json


def plot_curves(
    history: list[dict[str, Any]],
    path: str,
    metric: str = "eval/loss",
    mode: str = "min",
    early_stop: dict[str, Any] | None = None,
    title: str = "",
) -> CurveSeries:
    """Draw one run's curves to `path` (a local path or URI; PNG).

    Args:
        history: the run's reported metrics, one row per report (see the module docstring).
        path: where the PNG goes.
        metric: the metric that ranks the run's checkpoints (train.best_metric).
        mode: "min" or "max": which way `metric` improves.
        early_stop: metrics.json's `early_stop` ({"step", "reason"}), when the run stopped early.
        title: the figure's title (the run's name).

    Returns:
        The series drawn.
    """
    series = curve_series(history, metric, mode, early_stop)
    plt = pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for points, label, style in (
        (series.train_loss, "train/loss", "-"),
        (series.eval_loss, "eval/loss", "-"),
    ):
        if points:
            loss_ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
    loss_ax.set_ylabel("loss")
    if series.metric_values:
        metric_ax.plot(*zip(*series.metric_values), marker="o", markersize=3, label=metric)
        metric_ax.step(
            *zip(*series.running_best), where="post", linestyle="--", alpha=0.7, label="best so far"
        )
    if series.best:
        metric_ax.plot(*series.best, marker="*", markersize=14, color="tab:green", linestyle="")
    metric_ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    for ax in (loss_ax, metric_ax):
        _mark_steps(ax, series)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no metrics reported yet", ha="center", transform=ax.transAxes)
    best = f"best {metric}={series.best[1]:.4g} at step {series.best[0]}" if series.best else ""
    fig.suptitle(" | ".join(x for x in (title, best) if x))
    _save(fig, path)
    return series


def curve_series(
    history: list[dict[str, Any]],
    metric: str = "eval/loss",
    mode: str = "min",
    early_stop: dict[str, Any] | None = None,
) -> CurveSeries:
    """The points `plot_curves` draws; non-finite values (a diverged loss) are left out."""

    def points(key: str) -> list[Point]:
        return [
            (int(row["step"]), float(row["metrics"][key]))
            for row in history
            if _finite(row["metrics"].get(key))
        ]

    values = points(metric)
    better = min if mode == "min" else max
    running, best = [], None
    for step, value in values:
        if best is None or value == best[1] or better(value, best[1]) != best[1]:
            best = (step, value)
        running.append((step, best[1]))
    return CurveSeries(
        metric=metric,
        mode=mode,
        train_loss=points("train/loss"),
        eval_loss=points("eval/loss"),
        metric_values=values,
        running_best=running,
        best=best,
        early_stop=early_stop,
    )


def plot_overlay(runs: list[tuple[str, CurveSeries]], path: str) -> str:
    """Several runs on one figure (`ferry compare`): eval loss (solid) and train loss (dashed)
    per run, and each run's best metric over steps with its best step starred. Returns `path`."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    metrics = {s.metric for _, s in runs}
    for label, s in runs:
        color = None
        if s.eval_loss:
            (line,) = loss_ax.plot(*zip(*s.eval_loss), marker="o", markersize=3, label=label)
            color = line.get_color()
        if s.train_loss:
            loss_ax.plot(*zip(*s.train_loss), linestyle="--", alpha=0.6, color=color)
        if s.metric_values:
            name = label if len(metrics) == 1 else f"{label} ({s.metric})"
            metric_ax.plot(
                *zip(*s.metric_values), marker="o", markersize=3, color=color, label=name
            )
        if s.best:
            metric_ax.plot(*s.best, marker="*", markersize=14, color=color, linestyle="")
        if s.early_stop and s.early_stop.get("step") is not None:
            metric_ax.axvline(s.early_stop["step"], color=color, linestyle=":", alpha=0.8)
    loss_ax.set_title("eval/loss (solid), train/loss (dashed)")
    metric_ax.set_title(
        f"{next(iter(metrics))} (star: best step)" if len(metrics) == 1 else "best metric per run"
    )
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return path


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """The run's reported metrics (`<run>/report/history.jsonl`, written by
    `trainers.tracking`), oldest first; empty when the run has reported nothing (yet)."""
    text = read_text(join(run_dir, REPORT_DIR, HISTORY_FILE))
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a partial last line, from a copy taken while it was rewritten
    return rows


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display (cluster nodes have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_steps(ax, series: CurveSeries) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if series.best:
        ax.axvline(
            series.best[0], color="tab:green", linestyle=":", label=f"best step {series.best[0]}"
        )
    stop = series.early_stop
    if stop and stop.get("step") is not None:
        reason = f" ({stop['reason']})" if stop.get("reason") else ""
        ax.axvline(stop["step"], color="tab:red", linestyle="--", label=f"early stop{reason}"[:60])


def _save(fig, path: str) -> None:
    # Rendered in memory, then written whole: the path may be a URI, and a reader (a rerun of
    # `ferry runs --curves`, a browser) never sees half a PNG.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
