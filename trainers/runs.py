"""The runs under a storage path, read back from their files: `ferry runs` and `ferry compare`.

`list_runs` is the entry point: every run folder (one holding `ferry_run.yaml`) under a storage
path, including a search's trial runs (`<search>/runs/<trial>`), each summarised as a `RunRow`.
Everything comes from what runs leave on disk, so it works on finished, failed, interrupted and
copied runs: the recorded config, `report/run.json` and `report/history.jsonl`
(`trainers.tracking`), the export's metrics.json and, for runs recorded before those files
existed, the last checkpoint's state file. `compare_runs` sets runs side by side (config keys that
differ, final metrics) and draws their curves on one figure; `redraw_curves` rewrites a run's
`report/curves.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from trainers.config_load import flatten, load_yaml
from trainers.curves import CurveSeries, curve_series, plot_curves, plot_overlay, read_history
from trainers.errors import ConfigError
from trainers.storage import (
    CURVES_FILE,
    EXPORT_DIR,
    REPORT_DIR,
    RUN_CONFIG_FILE,
    STATE_FILE,
    STATUS_FILE,
    filesystem,
    join,
    read_json_if_any,
    read_text,
    with_scheme,
)

_SEARCH_RUNS = "runs"  # where a search keeps its trials' runs (tuning.layout.runs_dir)


@dataclass
class RunRow:
    """One run as `ferry runs` shows it; None where its files do not tell."""

    name: str  # the run's folder; `<search>/<trial>` for a search's trial
    path: str
    status: str  # finished, stopped early, failed, interrupted, running?, interrupted?, unknown
    method: str | None
    task: str | None
    steps_done: int | None
    total_steps: int | None
    metric: str  # train.best_metric
    best_value: float | None
    best_step: int | None
    export: str | None
    started: float | None  # unix seconds of the first start
    wall_s: float | None  # summed over every start (a resumed run started more than once)
    final: dict[str, Any] = field(default_factory=dict)  # the last evaluation's metrics
    early_stop: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Comparison:
    """Runs side by side: config keys whose values differ and final metrics, one value per run."""

    runs: list[RunRow]
    config: dict[str, list[Any]]
    metrics: dict[str, list[Any]]
    plot: str


def list_runs(storage_path: str) -> list[RunRow]:
    """Every run under `storage_path` (or the run itself, when it is a run folder), by name.

    Raises:
        ConfigError: the path does not exist.
    """
    fs, root = filesystem(storage_path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ConfigError(
            [
                f"storage_path={storage_path}: no such folder. Pass a run.storage_path "
                "(default ./ferry-runs) or a run folder."
            ]
        )
    if _is_run(fs, root):
        return [read_run(storage_path)]
    rows = []
    for child in _dirs(fs, root):
        if _is_run(fs, child.path):
            rows.append(read_run(with_scheme(storage_path, child.path)))
            continue
        nested = f"{child.path}/{_SEARCH_RUNS}"
        if fs.get_file_info(nested).type == pafs.FileType.Directory:
            for trial in _dirs(fs, nested):
                if _is_run(fs, trial.path):
                    row = read_run(with_scheme(storage_path, trial.path))
                    row.name = f"{child.base_name}/{trial.base_name}"
                    rows.append(row)
    return sorted(rows, key=lambda r: r.name)


def read_run(run_dir: str) -> RunRow:
    """One run's row, from its files."""
    config = load_yaml(read_text(join(run_dir, RUN_CONFIG_FILE)) or "") or {}
    train = config.get("train") or {}
    metric, mode = train.get("best_metric", "eval/loss"), train.get("best_metric_mode", "min")
    record = read_json_if_any(join(run_dir, REPORT_DIR, STATUS_FILE)) or {}
    metrics = read_json_if_any(join(run_dir, EXPORT_DIR, "metrics.json"))
    history = run_history(run_dir)
    series = curve_series(history, metric, mode)
    final = dict((metrics or {}).get("final") or (history[-1]["metrics"] if history else {}))
    best = series.best
    if best is None and metric in final:  # nothing reported step by step (feature extraction)
        best = ((metrics or {}).get("steps", 0), final[metric])
    steps = max((r["step"] for r in history), default=None)
    if steps is None and metrics:
        steps = metrics.get("steps")
    attempts = record.get("attempts") or []
    last_seen = history[-1].get("time") if history else None
    return RunRow(
        name=run_dir.rstrip("/").rsplit("/", 1)[-1],
        path=run_dir,
        status=_status(run_dir, record, metrics),
        method=config.get("method"),
        task=(config.get("task") or {}).get("type"),
        steps_done=steps,
        total_steps=record.get("total_steps") or (metrics or {}).get("steps"),
        metric=metric,
        best_value=best[1] if best else None,
        best_step=best[0] if best else None,
        export=join(run_dir, EXPORT_DIR) if metrics else None,
        started=attempts[0]["started"] if attempts else _mtime(join(run_dir, RUN_CONFIG_FILE)),
        wall_s=_wall_s(attempts, last_seen),
        final=final,
        early_stop=(metrics or {}).get("early_stop"),
        error=record.get("error") if record.get("status") == "failed" else None,
    )


def run_history(run_dir: str) -> list[dict[str, Any]]:
    """The run's reported metrics (`trainers.curves.read_history`); for a run recorded before
    that file existed, the evaluations its last checkpoint carries."""
    history = read_history(run_dir)
    if history:
        return history
    fs, root = filesystem(run_dir)
    checkpoints = sorted(
        d.path for d in _dirs(fs, root) if d.base_name.startswith("checkpoint_step_")
    )
    for path in reversed(checkpoints):
        state = read_json_if_any(with_scheme(run_dir, f"{path}/{STATE_FILE}"))
        if state:
            rows = [state["before"]] if state.get("before") else []
            rows += state.get("history") or []
            return [{"step": int(r.get("train/step", 0)), "time": None, "metrics": r} for r in rows]
    return []


def redraw_curves(run_dir: str) -> str | None:
    """Rewrite `<run>/report/curves.png` from the run's files; None when it reported nothing."""
    row = read_run(run_dir)
    history = run_history(run_dir)
    if not history:
        return None
    path = join(run_dir, REPORT_DIR, CURVES_FILE)
    mode = _config(run_dir).get("train", {}).get("best_metric_mode", "min")
    plot_curves(history, path, row.metric, mode, row.early_stop, row.name)
    return path


def compare_runs(run_dirs: list[str], output: str) -> Comparison:
    """Runs side by side, their curves overlaid in `output` (a PNG).

    Raises:
        ConfigError: a path is not a run folder.
    """
    problems = [
        f"run={d}: not a Ferry run (no {RUN_CONFIG_FILE}). Pass a run folder "
        "(<run.storage_path>/<run.name>) or a run name with --storage-path."
        for d in run_dirs
        if not _is_run(*filesystem(d))
    ]
    if problems:
        raise ConfigError(problems)
    rows = [read_run(d) for d in run_dirs]
    configs = [flatten(_config(d)) for d in run_dirs]
    keys = sorted({k for c in configs for k in c})
    config = {
        k: [c.get(k) for c in configs]
        for k in keys
        if any(c.get(k) != configs[0].get(k) for c in configs)
    }
    metrics: dict[str, list[Any]] = {
        "steps": [r.steps_done for r in rows],
        "status": [r.status for r in rows],
    }
    for metric in sorted({r.metric for r in rows}):
        metrics[f"best {metric}"] = [r.best_value if r.metric == metric else None for r in rows]
        metrics[f"best {metric} step"] = [r.best_step if r.metric == metric else None for r in rows]
    for key in sorted({k for r in rows for k in r.final}):
        metrics[key] = [r.final.get(key) for r in rows]
    series = [(r.name, _series(d, r)) for r, d in zip(rows, run_dirs)]
    return Comparison(rows, config, metrics, plot_overlay(series, output))


def resolve_run(ref: str, storage_path: str) -> str:
    """A run folder from a path or a run name under `storage_path` (a path wins)."""
    if _is_run(*filesystem(ref)):
        return ref
    under = join(storage_path, ref)
    return under if _is_run(*filesystem(under)) else ref


def print_runs(rows: list[RunRow], as_json: bool = False) -> None:
    """The run table on the terminal (or one JSON object per run)."""
    if as_json:
        for r in rows:
            print(json.dumps(asdict(r), default=str))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} run(s)")
    columns = ("run", "status", "method", "task", "steps", "best metric", "at step", "started")
    for col in (*columns, "wall", "export"):
        justify = "right" if col in ("steps", "at step", "wall") else "left"
        table.add_column(col, justify=justify, overflow="fold")  # wrap, never cut a name
    for r in rows:
        best = "" if r.best_value is None else f"{r.metric}={r.best_value:.4g}"
        table.add_row(
            r.name,
            r.status,
            r.method or "",
            r.task or "",
            f"{_fmt(r.steps_done)}/{_fmt(r.total_steps)}",
            best,
            _fmt(r.best_step),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)) if r.started else "",
            _duration(r.wall_s),
            r.export or "",
        )
    _console().print(table)


def print_comparison(c: Comparison) -> None:
    """Differing config keys, then metrics, one column per run."""
    from rich.table import Table

    console = _console()
    for title, values in (("config (keys that differ)", c.config), ("metrics", c.metrics)):
        table = Table(title=title)
        table.add_column("key", overflow="fold")
        for r in c.runs:
            table.add_column(r.name, justify="right", overflow="fold")
        for key, row in values.items():
            table.add_row(key, *(_fmt(v) for v in row))
        if not values:
            table.add_row("(none)", *("" for _ in c.runs))
        console.print(table)


def _console():
    """A terminal's own width; 160 columns when piped (rich would assume 80)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 160
    return console


def _series(run_dir: str, row: RunRow) -> CurveSeries:
    mode = _config(run_dir).get("train", {}).get("best_metric_mode", "min")
    return curve_series(run_history(run_dir), row.metric, mode, row.early_stop)


def _status(run_dir: str, record: dict[str, Any], metrics: dict | None) -> str:
    if metrics is not None:
        return "stopped early" if metrics.get("early_stop") else "finished"
    recorded = record.get("status")
    if recorded == "running":
        # A live run and one whose driver was killed look the same on disk.
        return "running?"
    if recorded in ("failed", "interrupted"):
        return recorded
    if recorded == "finished":
        return "finished (no export)"
    fs, root = filesystem(run_dir)
    if any(d.base_name.startswith("checkpoint_") for d in _dirs(fs, root)):
        return "interrupted?"
    return "unknown"


def _wall_s(attempts: list[dict[str, Any]], last_seen: float | None) -> float | None:
    total, known = 0.0, False
    for a in attempts:
        end = a.get("ended") or (last_seen if last_seen and last_seen >= a["started"] else None)
        if end:
            total, known = total + end - a["started"], True
    return round(total, 1) if known else None


def _config(run_dir: str) -> dict[str, Any]:
    return load_yaml(read_text(join(run_dir, RUN_CONFIG_FILE)) or "") or {}


def _is_run(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path.rstrip('/')}/{RUN_CONFIG_FILE}").type == pafs.FileType.File


def _dirs(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        (
            i
            for i in infos
            if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
        ),
        key=lambda i: i.base_name,
    )


def _mtime(path: str) -> float | None:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    return info.mtime.timestamp() if info.mtime else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else (f"{m}m{s:02d}s" if m else f"{s}s")
