"""A run's record, kept on the driver's node from what its workers report: the metrics history,
curves, MLflow and TensorBoard.

`track_run` is the entry point: a `with` block around a run's `fit()` (trainers.train.launch).
On entry the driver opens the run's MLflow run (params, tags; a resumed run continues its own)
and notes the start in `<run>/report/run.json`; inside, Ray Train calls the block's
`RunReporter` after every report; on exit the driver redraws the curves with the export's
early stop, logs metrics.json and curves.png as artifacts, ends the MLflow run with the run's
status and says what went wrong with tracking, if anything.

`RunReporter` is a Ray Train V2 `UserCallback`: Ray calls `after_report(run_context, metrics,
checkpoint)` on the run's controller, an actor pinned to the node of the process that called
`fit()`, once every worker has reported (`metrics[i]` is rank i's dict; ranks report the same
evaluation). So on a cluster it runs beside the driver, never on a training node. Each report
becomes a row of `<run>/report/history.jsonl` (rewritten whole: it may live in a bucket), is
logged to MLflow at its optimizer step and to TensorBoard, and an evaluation's key metrics are
one `[ferry] eval ...` line on the terminal; each checkpoint report also redraws
`<run>/report/curves.png`.

No tracker may stop training: Ray's controller would fail the run on an exception from a
callback. The first failure of a tracker is warned about once and turns that tracker off for the
rest of the run (a server that is down costs one timeout, not one per report); the problem is
recorded in run.json, which the driver reads at the end.

`track_search` is the same for `ferry tune`: one MLflow parent run for the search, whose trials
log to child runs (`track_run(..., parent_run_id=...)`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray.train

from trainers import __version__
from trainers.config import RunSpec
from trainers.config_load import dump_spec, flatten
from trainers.console import PREFIX, say
from trainers.curves import plot_curves, read_history
from trainers.errors import root_message
from trainers.storage import (
    CURVES_FILE,
    HISTORY_FILE,
    REPORT_DIR,
    STATUS_FILE,
    TENSORBOARD_DIR,
    exists,
    filesystem,
    is_uri,
    join,
    read_json_if_any,
    upload_dir,
    write_bytes,
)

log = logging.getLogger("ferry.tracking")

# A tracking server that is down must cost seconds, not MLflow's default of 7 retries with
# exponential backoff and a 120 s timeout per request (minutes per call). Values the user set in
# the driver's environment win; the driver's values travel to the controller.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# MLflow's limits (mlflow.utils.validation): params per batch call, characters per param value.
_PARAMS_PER_CALL, _PARAM_CHARS = 100, 6000


@dataclass(frozen=True)
class MlflowTarget:
    """The MLflow run a Ferry run logs to (what the controller needs to log there)."""

    uri: str
    experiment: str
    experiment_id: str
    run_id: str
    http_env: dict[str, str]
    parent_run_id: str | None = None


@dataclass
class RunTracking:
    """The open record of one run: its callback for Ray Train, and after the `with` block of
    `track_run`, how the run ended and what went wrong with tracking."""

    callback: RunReporter
    mlflow: MlflowTarget | None
    status: str = "running"
    problems: dict[str, str] = field(default_factory=dict)
    curves: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the CLI prints: the curves, the MLflow run, TensorBoard's folder, problems."""
        return {
            "curves": self.curves,
            "mlflow": asdict(self.mlflow) if self.mlflow else None,
            "tensorboard": self.callback.tensorboard_dir,
            "problems": dict(self.problems),
        }


@contextlib.contextmanager
def track_run(
    spec: RunSpec, total_steps: int | None, parent_run_id: str | None = None
) -> Iterator[RunTracking]:
    """Record a run around its fit: give `tracking.callback` to Ray Train's RunConfig.

    Args:
        spec: the run's config (`tracking:` says which trackers).
        total_steps: the run's planned optimizer steps (None: not step-based).
        parent_run_id: the MLflow run of the search this run is a trial of.

    The block's exception passes through; the run is recorded as failed (interrupted for
    Ctrl-C) and its MLflow run ended with that status.
    """
    status_path = join(spec.run_dir, REPORT_DIR, STATUS_FILE)
    record = read_json_if_any(status_path) or {}
    problems: dict[str, str] = {}
    target = None
    if spec.tracking.mlflow:
        target = _open_mlflow(spec, record.get("mlflow"), parent_run_id, problems)
    record.update(
        name=spec.run.name,
        status="running",
        total_steps=total_steps,
        mlflow=asdict(target) if target else None,
        tensorboard=_tensorboard_dir(spec),
        problems=problems,
    )
    record.setdefault("attempts", []).append({"started": time.time(), "ended": None})
    _write_json(status_path, record)
    tracking = RunTracking(
        RunReporter(
            spec.run_dir,
            spec.run.name,
            spec.train.best_metric,
            spec.train.best_metric_mode,
            target,
            _tensorboard_dir(spec),
            dump_spec(spec),
        ),
        target,
        problems=problems,
    )
    error = None
    try:
        yield tracking
        tracking.status = "finished"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; Ray's own SIGINT handler may exit
        tracking.status = "interrupted"
        raise
    except BaseException as e:
        tracking.status, error = "failed", root_message(e)
        raise
    finally:
        _close(spec, tracking, status_path, error)


class RunReporter(ray.train.UserCallback):
    """Ray Train V2 callback (runs on the controller): history, MLflow, TensorBoard, curves."""

    def __init__(
        self,
        run_dir: str,
        run_name: str,
        metric: str,
        mode: str,
        mlflow: MlflowTarget | None,
        tensorboard_dir: str | None,
        config_text: str,
    ):
        self.run_dir, self.run_name, self.metric, self.mode = run_dir, run_name, metric, mode
        self.mlflow, self.tensorboard_dir, self.config_text = mlflow, tensorboard_dir, config_text
        # Built on the controller at the first report (this object is pickled to get there).
        self._history: list[dict[str, Any]] | None = None
        self._guards: dict[str, _Guard] = {}
        self._client = None
        self._writer = None
        self._tb_local: str | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        """Called by Ray Train once every worker reported; `metrics[0]` is rank 0's dict."""
        row = {
            "step": int(metrics[0].get("train/step", 0)),
            "time": time.time(),
            "metrics": {k: v for k, v in metrics[0].items() if _is_number(v)},
        }
        self._guard("history")(self._append, row)
        if any(key.startswith("eval/") for key in row["metrics"]):
            say(_evaluation_line(row["step"], row["metrics"], self.metric))
        if self.mlflow:
            self._guard("mlflow", self.mlflow.uri)(self._log_mlflow, row)
        if self.tensorboard_dir:
            self._guard("tensorboard", self.tensorboard_dir)(self._log_tensorboard, row, checkpoint)
        if checkpoint is not None:
            self._guard("curves")(self._draw)

    def _append(self, row: dict[str, Any]) -> None:
        if self._history is None:  # a resumed run goes on with what it reported before
            self._history = read_history(self.run_dir)
        # A step at or below one already recorded means training went back to a checkpoint (a
        # resume or a worker restart): what came after that checkpoint is reported again.
        self._history = [r for r in self._history if r["step"] < row["step"]] + [row]
        text = "".join(json.dumps(r) + "\n" for r in self._history)
        write_bytes(join(self.run_dir, REPORT_DIR, HISTORY_FILE), text.encode())

    def _log_mlflow(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        assert self.mlflow is not None
        if self._client is None:
            self._client = mlflow_client(self.mlflow.uri, self.mlflow.http_env, overwrite=True)
        stamp = int(row["time"] * 1000)
        batch = [
            Metric(key, float(value), stamp, row["step"])
            for key, value in row["metrics"].items()
            if key != "train/step"  # the x axis of every metric already
        ]
        self._client.log_batch(self.mlflow.run_id, metrics=batch)

    def _log_tensorboard(self, row: dict[str, Any], checkpoint) -> None:
        assert self.tensorboard_dir is not None
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar, text

        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter

            # Event files go straight to a local folder; for a bucket they are written here and
            # copied up at every checkpoint report.
            local = self.tensorboard_dir
            if is_uri(local) and not local.startswith("file://"):
                self._tb_local = local = tempfile.mkdtemp(prefix="ferry-tb-")
            local = local.removeprefix("file://")
            os.makedirs(local, exist_ok=True)
            # The synchronous writer, not SummaryWriter: that one queues events for a thread
            # and its flush() does not wait for the queue, so the last report's events were
            # lost when Ray ended the controller process right after it.
            self._writer = EventsWriter(os.path.join(local, "events"))
            config = text("ferry/config", _indent(self.config_text))
            self._writer.write_event(Event(wall_time=row["time"], step=0, summary=config))
        for key, value in row["metrics"].items():
            if key != "train/step":
                event = Event(wall_time=row["time"], step=row["step"], summary=scalar(key, value))
                self._writer.write_event(event)
        self._writer.flush()
        if self._tb_local and checkpoint is not None:
            upload_dir(self._tb_local, self.tensorboard_dir)

    def _draw(self) -> None:
        plot_curves(
            self._history or [],
            join(self.run_dir, REPORT_DIR, CURVES_FILE),
            self.metric,
            self.mode,
            title=self.run_name,
        )

    def _guard(self, name: str, where: str = "") -> _Guard:
        if name not in self._guards:
            self._guards[name] = _Guard(name, where, self._record_problem)
        return self._guards[name]

    def _record_problem(self, name: str, message: str) -> None:
        path = join(self.run_dir, REPORT_DIR, STATUS_FILE)
        record = read_json_if_any(path) or {}
        step = self._history[-1]["step"] if self._history else 0
        record.setdefault("problems", {})[name] = f"{message} (at step {step})"
        _write_json(path, record)


@dataclass
class SearchTracking:
    """The MLflow parent run of a search, for its trials and its end."""

    mlflow: MlflowTarget | None
    problems: dict[str, str] = field(default_factory=dict)

    def trial_overrides(self) -> dict[str, Any]:
        """Dotted config values every trial runs with: the parent's store and experiment, so a
        trial's child run lands beside its parent (a trial's own storage path would otherwise
        give it another default store); MLflow off when the parent could not be opened."""
        if self.mlflow is None:
            return {
                "tracking.mlflow": False,
                "tracking.mlflow_uri": None,
                "tracking.experiment": None,
            }
        return {
            "tracking.mlflow_uri": self.mlflow.uri,
            "tracking.experiment": self.mlflow.experiment,
        }

    def log_results(self, files: list[str], metrics: dict[str, float]) -> None:
        """Attach the search report's files and its best result to the parent run."""
        if self.mlflow is None:
            return
        guard = _Guard("mlflow", self.mlflow.uri, self._note)
        client = guard(mlflow_client, self.mlflow.uri, self.mlflow.http_env)
        if client is None:
            return
        for path in files:
            if os.path.isfile(path):
                guard(client.log_artifact, self.mlflow.run_id, path)
        guard(
            client.log_batch,
            self.mlflow.run_id,
            metrics=_metrics({k: v for k, v in metrics.items() if _is_number(v)}, 0),
        )

    def _note(self, name: str, message: str) -> None:
        self.problems[name] = message


@contextlib.contextmanager
def track_search(
    spec: RunSpec, name: str, params: dict[str, Any], record_path: str
) -> Iterator[SearchTracking]:
    """The MLflow parent run of a search (`spec.tracking.mlflow` on; else a no-op handle).

    Args:
        spec: the search's base run config.
        name: the search's name: the parent run's name and the default experiment.
        params: the search's config as dotted keys (the base run and the tune block).
        record_path: a JSON file in the search's folder keeping the parent's id, so that a
            resumed search goes on in the same parent run.

    On exit, the parent ends with the search's status, and child runs still marked running
    (trials that Tune stopped by ending their process) are marked killed.
    """
    if not spec.tracking.mlflow:
        yield SearchTracking(None)
        return
    problems: dict[str, str] = {}
    experiment = spec.tracking.experiment or name
    search_spec = spec.model_copy(
        update={
            "run": spec.run.model_copy(update={"name": name}),
            "tracking": spec.tracking.model_copy(update={"experiment": experiment}),
        }
    )
    target = _open_mlflow(
        search_spec,
        read_json_if_any(record_path),
        None,
        problems,
        params=params,
        tags={"ferry.kind": "search"},
    )
    if target:
        _write_json(record_path, asdict(target))
    handle = SearchTracking(target, problems)
    status = "failed"
    try:
        yield handle
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if target:
            guard = _Guard("mlflow", target.uri, handle._note)
            client = guard(mlflow_client, target.uri, target.http_env)
            if client is not None:
                guard(_end_orphan_children, client, target)
                guard(client.set_terminated, target.run_id, _MLFLOW_STATUS[status])
        _warn_problems(name, handle.problems, None)


def mlflow_uri(spec: RunSpec) -> str:
    """The run's MLflow tracking URI: tracking.mlflow_uri, else a SQLite file beside the runs."""
    if spec.tracking.mlflow_uri:
        return spec.tracking.mlflow_uri
    return "sqlite:///" + os.path.abspath(
        os.path.join(spec.run.storage_path.removeprefix("file://"), "mlflow.db")
    )


def mlflow_client(uri: str, http_env: dict[str, str], overwrite: bool = False):
    """An MlflowClient for `uri`, after putting the HTTP retry and timeout settings in this
    process's environment (MLflow reads them there at each request). `overwrite`: the driver's
    values replace this process's own (on the controller)."""
    from mlflow.tracking import MlflowClient

    for key, value in http_env.items():
        if overwrite:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


class _Guard:
    """Runs one tracker's calls: the first failure is warned about once, recorded through
    `on_problem`, and turns the tracker off (later calls return None at once)."""

    def __init__(self, name: str, where: str, on_problem: Callable[[str, str], None]):
        self.name, self.where, self.on_problem = name, where, on_problem
        self.problem: str | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.problem is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any failure: training must go on
            self.problem = root_message(e)
            log.warning(
                "%s%s failed; training goes on without it: %s",
                self.name,
                f" ({self.where})" if self.where else "",
                self.problem,
            )
            with contextlib.suppress(Exception):
                self.on_problem(self.name, self.problem)
            return None


def _open_mlflow(
    spec: RunSpec,
    previous: dict[str, Any] | None,
    parent_run_id: str | None,
    problems: dict[str, str],
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> MlflowTarget | None:
    """The run's MLflow run, opened on the driver: the experiment (created when missing), the
    run (the earlier one when this run resumes, else a new one), params and tags. None, with the
    problem noted and warned about once, when MLflow cannot be reached."""
    uri = mlflow_uri(spec)
    experiment = spec.tracking.experiment or spec.run.name
    http_env = {k: os.environ.get(k, v) for k, v in _HTTP_DEFAULTS.items()}
    guard = _Guard("mlflow", uri, problems.__setitem__)

    def open_run() -> MlflowTarget:
        client = mlflow_client(uri, http_env)
        experiment_id = _experiment_id(client, experiment, spec, uri)
        run = None
        if previous and previous.get("uri") == uri and previous.get("experiment") == experiment:
            with contextlib.suppress(Exception):  # deleted since: start a new MLflow run
                run = client.get_run(previous["run_id"])
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s in %s", run.info.run_id, uri)
        else:
            all_tags = {**_tags(spec), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id, run_name=spec.run.name, tags=all_tags)
            log.info("mlflow: run %s in experiment %s at %s", run.info.run_id, experiment, uri)
        _log_params(client, run, params or flatten(spec.model_dump(mode="json")))
        return MlflowTarget(
            uri, experiment, experiment_id, run.info.run_id, http_env, parent_run_id
        )

    return guard(open_run)


def _experiment_id(client, name: str, spec: RunSpec, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # The default store keeps artifacts beside the database; MLflow's own default would be
        # ./mlruns under whatever directory the driver happens to run in.
        location = None
        if spec.tracking.mlflow_uri is None:
            location = os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlartifacts")
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # created by a concurrent run (e.g. another trial) in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _tags(spec: RunSpec) -> dict[str, str]:
    m = spec.model
    return {
        "ferry.version": __version__,
        "ferry.method": spec.method,
        "ferry.task": spec.task.type,
        "ferry.model": m.preset or m.name_or_path or "",
        "ferry.run_dir": spec.run_dir,
    }


def _log_params(client, run, params: dict[str, Any]) -> None:
    """Params not yet on the run. MLflow refuses to change a logged value; a resumed run may
    differ only in keys that do not change what it computes (run.resume, ...), which keep the
    value of the first start."""
    from mlflow.entities import Param

    have = run.data.params
    new = [
        Param(k, (v if isinstance(v, str) else json.dumps(v))[:_PARAM_CHARS])
        for k, v in params.items()
        if k not in have
    ]
    for i in range(0, len(new), _PARAMS_PER_CALL):
        client.log_batch(run.info.run_id, params=new[i : i + _PARAMS_PER_CALL])


def _metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step) for k, v in values.items()]


def _close(spec: RunSpec, tracking: RunTracking, status_path: str, error: str | None) -> None:
    """After the fit, on the driver: final curves, artifacts, the MLflow run's end, run.json."""
    record = read_json_if_any(status_path) or {}
    problems = tracking.problems
    problems.update(record.get("problems") or {})
    history = read_history(spec.run_dir)
    metrics = read_json_if_any(join(spec.export_dir, "metrics.json"))
    curves_path = join(spec.run_dir, REPORT_DIR, CURVES_FILE)
    if history:
        drawn = _Guard("curves", "", problems.__setitem__)(
            plot_curves,
            history,
            curves_path,
            spec.train.best_metric,
            spec.train.best_metric_mode,
            (metrics or {}).get("early_stop"),
            spec.run.name,
        )
        tracking.curves = curves_path if drawn is not None else None
    target = tracking.mlflow
    if target and "mlflow" not in problems:
        guard = _Guard("mlflow", target.uri, problems.__setitem__)
        client = guard(mlflow_client, target.uri, target.http_env)
        if client is not None:
            if not history and metrics and metrics.get("final"):
                # Nothing was reported step by step (feature extraction): the final metrics.
                final = {k: v for k, v in metrics["final"].items() if _is_number(v)}
                guard(client.log_batch, target.run_id, metrics=_metrics(final, metrics["steps"]))
            for path in (join(spec.export_dir, "metrics.json"), tracking.curves):
                if path and exists(path):
                    guard(_log_file_artifact, client, target.run_id, path)
            guard(client.set_terminated, target.run_id, _MLFLOW_STATUS[tracking.status])
    attempt = (record.get("attempts") or [{}])[-1]
    attempt.update(ended=time.time(), status=tracking.status, error=error)
    record.update(status=tracking.status, error=error, problems=problems)
    with contextlib.suppress(Exception):  # a status file that cannot be written stops nothing
        _write_json(status_path, record)
    _warn_problems(spec.run.name, problems, join(spec.run_dir, REPORT_DIR, HISTORY_FILE))


def _log_file_artifact(client, run_id: str, path: str) -> None:
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        client.log_artifact(run_id, p)
        return
    with tempfile.TemporaryDirectory(prefix="ferry-artifact-") as tmp:
        local = os.path.join(tmp, os.path.basename(p))
        with fs.open_input_stream(p) as src, open(local, "wb") as dst:
            dst.write(src.read())
        client.log_artifact(run_id, local)


def _end_orphan_children(client, parent: MlflowTarget) -> None:
    runs = client.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and "
        "attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")


def _warn_problems(name: str, problems: dict[str, str], history: str | None) -> None:
    if not problems:
        return
    where = f"; its metrics are in {history}" if history else ""
    log.warning(
        "%s: tracking had problems, the run itself was not affected%s: %s",
        name,
        where,
        "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())),
    )


def _tensorboard_dir(spec: RunSpec) -> str | None:
    return join(spec.run_dir, TENSORBOARD_DIR) if spec.tracking.tensorboard else None


def _write_json(path: str, value: Any) -> None:
    write_bytes(path, json.dumps(value, indent=2, default=str).encode())


def _indent(text: str) -> str:
    """YAML as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


# The metrics of the evaluation line, those the task reports; the run's best_metric joins them.
_HEADLINE = (
    "eval/loss",
    "eval/accuracy",
    "eval/f1",
    "eval/exact_match",
    "eval/perplexity",
    "eval/rougeL",
)


def _evaluation_line(step: int, metrics: dict[str, Any], best_metric: str) -> str:
    """`[ferry] eval @ step 25: eval/loss 0.6464 eval/accuracy 0.7100 eval/f1 0.7012`."""
    keys = dict.fromkeys(k for k in (*_HEADLINE, best_metric) if k in metrics)
    where = "before training" if step == 0 else f"@ step {step}"
    return f"{PREFIX}eval {where}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
