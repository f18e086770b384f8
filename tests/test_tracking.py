"""Run tracking and run tables: one real tracked Ray Train run read back through MLflow's client,
TensorBoard's event reader, its curves and `ferry runs`/`ferry compare`; the tracker's failure
paths, resume and search parent/child runs on the same code without a fit (real MLflow stores)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil

import pytest
import yaml
from conftest import make_spec

from trainers.config_load import flatten
from trainers.curves import curve_series, plot_curves, read_history
from trainers.errors import ConfigError
from trainers.storage import CURVES_FILE, REPORT_DIR, STATUS_FILE


def _mlflow(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _state_history(run_dir):
    """The evaluations the run's last checkpoint carries (written by the worker loop): an
    independent record of what was reported."""
    last = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_step_"))[-1]
    with open(os.path.join(run_dir, last, "ferry_state.json")) as f:
        state = json.load(f)
    return [{**state["before"], "train/step": 0}, *state["history"]]


def _report(step, **metrics):
    return [{"train/step": step, **metrics}]  # one dict per worker, as Ray Train passes them


@pytest.mark.slow
def test_a_tracked_run_reads_back_from_mlflow_tensorboard_and_its_curves(stopped_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, outcome = stopped_run  # tests/conftest.py: 2 workers, ZeRO-3, stops early, tracked
    run_dir = spec.run_dir
    history = read_history(run_dir)
    reported = _state_history(run_dir)
    # Every report, once, in order, as the workers reported it (their checkpoint's own record).
    assert [r["step"] for r in history] == [int(r["train/step"]) for r in reported]
    assert [r["metrics"] for r in history] == reported

    # MLflow: the default store beside the runs, experiment = run name, one FINISHED run.
    uri = "sqlite:///" + os.path.join(spec.run.storage_path, "mlflow.db")
    assert outcome.tracking["mlflow"]["uri"] == uri and outcome.tracking["problems"] == {}
    client = _mlflow(uri)
    run = client.get_run(outcome.tracking["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "stops"
    assert client.get_experiment(run.info.experiment_id).name == "stops"
    expected = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in flatten(spec.model_dump(mode="json")).items()
    }
    assert run.data.params == expected  # the resolved config, dotted keys
    assert run.data.params["train.best_metric"] == "eval/loss"
    from trainers import __version__

    assert {
        "ferry.method": "full",
        "ferry.task": "sequence_classification",
        "ferry.model": "tiny-bert",
        "ferry.version": __version__,
    }.items() <= run.data.tags.items()
    keys = {k for r in history for k in r["metrics"]} - {"train/step"}
    assert set(run.data.metrics) == keys
    for key in keys:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(r["step"], r["metrics"][key]) for r in history if key in r["metrics"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"metrics.json", CURVES_FILE}

    # TensorBoard: the same numbers under <run>/tensorboard.
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == keys
    for key in ("eval/loss", "eval/accuracy", "train/loss"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r["metrics"][key]) for r in history if key in r["metrics"]]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32

    # The curves: a real figure of exactly the reported series, the best step by eval/loss and
    # the early stop marked.
    curves = os.path.join(run_dir, REPORT_DIR, CURVES_FILE)
    assert outcome.tracking["curves"] == curves
    with Image.open(curves) as png:
        assert png.format == "PNG" and png.width > 900 and png.height > 350
    stop = outcome.metrics["early_stop"]
    series = curve_series(history, "eval/loss", "min", stop)
    assert series.eval_loss == [(int(r["train/step"]), r["eval/loss"]) for r in reported]
    assert series.train_loss == [(int(r["train/step"]), r["train/loss"]) for r in reported[1:]]
    best = min(reported, key=lambda r: (r["eval/loss"], r["train/step"]))
    assert series.best == (int(best["train/step"]), best["eval/loss"])
    assert series.best[0] == outcome.metrics["exported_step"] and series.early_stop == stop
    with open(os.path.join(run_dir, REPORT_DIR, STATUS_FILE)) as f:
        status = json.load(f)
    assert status["status"] == "finished" and status["total_steps"] == 40


@pytest.mark.slow
def test_runs_table_and_compare_from_the_cli(stopped_run, capsys):
    """`ferry runs` and `ferry compare` on the real run and a copy of it made to look like a
    rerun with another learning rate that stopped early."""
    from cluster.cli import main

    spec, outcome = stopped_run
    storage = spec.run.storage_path
    other = os.path.join(storage, "other")
    shutil.copytree(spec.run_dir, other, ignore=shutil.ignore_patterns("checkpoint_*"))
    with open(os.path.join(other, "ferry_run.yaml")) as f:
        config = yaml.safe_load(f)
    config["run"]["name"] = "other"
    config["train"]["learning_rate"] = 0.05
    with open(os.path.join(other, "ferry_run.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    metrics_file = os.path.join(other, "final", "metrics.json")
    with open(metrics_file) as f:
        metrics = json.load(f)
    metrics["final"]["eval/loss"] = 1.2345
    metrics["early_stop"] = {"reason": "no improvement in 1 evaluation", "step": 6}
    with open(metrics_file, "w") as f:
        json.dump(metrics, f)

    assert main(["runs", storage, "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"stops", "other"}
    run = rows["stops"]
    history = read_history(spec.run_dir)
    best = curve_series(history, "eval/loss", "min").best
    assert (run["status"], run["method"], run["task"]) == (
        "stopped early",
        "full",
        "sequence_classification",
    )
    assert (run["steps_done"], run["total_steps"]) == (outcome.metrics["steps"], 40)
    assert (run["best_step"], run["best_value"]) == best
    assert run["export"] == spec.export_dir and run["wall_s"] > 0 and run["started"]
    assert rows["other"]["status"] == "stopped early"

    assert main(["runs", other, "--curves"]) == 0
    out = capsys.readouterr()
    assert "other" in out.out and "stopped early" in out.out
    assert os.path.join(other, REPORT_DIR, CURVES_FILE) in out.err

    assert main(["compare", "stops", "other", "--storage-path", storage]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    lr = next(line for line in lines if "train.learning_rate" in line)
    assert str(spec.train.learning_rate) in lr and "0.05" in lr
    assert not any("train.max_steps" in line for line in lines)  # only keys that differ
    loss = next(line for line in lines if "eval/loss" in line and "best" not in line)
    assert f"{metrics['final']['eval/loss']:.4g}" in loss
    plot = os.path.join(storage, "compare", "stops-vs-other.png")
    assert f"curves: {plot}" in out and os.path.getsize(plot) > 10_000


def test_unreachable_mlflow_warns_once_and_the_run_goes_on(tmp_path, data_dir, caplog, monkeypatch):
    """A server that is down at the start (the driver) or goes down mid-run (the controller's
    callback): one warning each, nothing raised, the history and curves still written, and the
    run's end says what happened."""
    from trainers.tracking import track_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    down = "http://127.0.0.1:1"
    spec = make_spec(tmp_path, "cls", data_dir, tracking={"mlflow": True, "mlflow_uri": down})
    caplog.set_level(logging.WARNING, logger="ferry.tracking")
    with track_run(spec, 10) as tracking:
        callback = pickle.loads(pickle.dumps(tracking.callback))  # as Ray ships it
        for step in (0, 5, 10):
            callback.after_report(None, _report(step, **{"eval/loss": 1.0 / (step + 1)}), "ckpt")
    failures = [r for r in caplog.records if "failed; training goes on" in r.getMessage()]
    assert len(failures) == 1 and down in failures[0].getMessage()
    assert tracking.status == "finished" and "mlflow" in tracking.summary()["problems"]
    assert "tracking had problems, the run itself was not affected" in caplog.text
    assert [r["step"] for r in read_history(spec.run_dir)] == [0, 5, 10]
    assert os.path.getsize(os.path.join(spec.run_dir, REPORT_DIR, CURVES_FILE)) > 10_000

    # The store works at the start and the server is lost mid-run: the callback warns once,
    # records the step, and the driver does not try again at the end.
    caplog.clear()
    good = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec.model_copy(
        update={"tracking": spec.tracking.model_copy(update={"mlflow_uri": good})}
    )
    with track_run(spec, 10) as tracking:
        callback = pickle.loads(pickle.dumps(tracking.callback))
        callback.after_report(None, _report(0, **{"eval/loss": 1.0}), None)
        callback.mlflow = dataclasses.replace(callback.mlflow, uri=down)
        callback._client = None  # a new connection, to the server that is now down
        for step in (5, 10):
            callback.after_report(None, _report(step, **{"eval/loss": 0.5}), "ckpt")
    failures = [r for r in caplog.records if "failed; training goes on" in r.getMessage()]
    assert len(failures) == 1
    assert "(at step 5)" in tracking.summary()["problems"]["mlflow"]
    run = _mlflow(good).get_run(tracking.mlflow.run_id)
    assert run.info.status == "RUNNING"  # left as it was: the driver does not retry a lost server
    assert [m.step for m in _mlflow(good).get_metric_history(run.info.run_id, "eval/loss")] == [0]


def test_resume_continues_the_mlflow_run_and_a_search_has_parent_and_children(tmp_path, data_dir):
    """A rerun of a run name logs to its earlier MLflow run; a search's trials are child runs of
    one parent, and a trial that Tune ended mid-run is marked killed when the search ends."""
    from trainers.tracking import track_run, track_search
    from tuning.load import trial_spec

    base = make_spec(tmp_path, "cls", data_dir, run={"name": "base"}, tracking={"mlflow": True})
    with track_run(base, 10) as first:
        callback = pickle.loads(pickle.dumps(first.callback))
        for step in (0, 5, 10):
            callback.after_report(None, _report(step, **{"eval/loss": 1.0 / (step + 1)}), None)
        # Reported again after a restart from the step-5 checkpoint: step 10 is replaced.
        callback.after_report(None, _report(10, **{"eval/loss": 0.01}), "ckpt")
    assert [r["metrics"]["eval/loss"] for r in read_history(base.run_dir)][-1] == 0.01
    resumed = base.model_copy(update={"run": base.run.model_copy(update={"resume": "must"})})
    with track_run(resumed, 10) as again:
        pass
    assert again.mlflow.run_id == first.mlflow.run_id
    client = _mlflow(first.mlflow.uri)
    assert client.get_run(first.mlflow.run_id).data.params["run.resume"] == "auto"  # first value

    record = str(tmp_path / "search-tracking.json")
    with track_search(base, "base-tune", {"tune.metric": "eval/loss"}, record) as search:
        children = {}
        for i, lr in enumerate((1e-3, 1e-4)):
            trial = trial_spec(
                base,
                {
                    **search.trial_overrides(),
                    "run.name": f"trial-{i}",
                    "run.storage_path": str(tmp_path / "base-tune" / "runs"),
                    "train.learning_rate": lr,
                },
            )
            with track_run(trial, 10, parent_run_id=search.mlflow.run_id) as t:
                t.callback.after_report(None, _report(10, **{"eval/loss": lr}), "ckpt")
            children[t.mlflow.run_id] = lr
        stopped = client.create_run(
            search.mlflow.experiment_id,
            run_name="trial-2",
            tags={"mlflow.parentRunId": search.mlflow.run_id},
        )
        search.log_results([], {"best/eval/loss": 1e-4})
    parent = client.get_run(search.mlflow.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ferry.kind"] == "search"
    assert parent.data.metrics == {"best/eval/loss": 1e-4}
    assert client.get_experiment(parent.info.experiment_id).name == "base-tune"
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_id = {r.info.run_id: r for r in runs}
    assert set(by_id) == {*children, stopped.info.run_id}
    for run_id, lr in children.items():
        assert by_id[run_id].info.status == "FINISHED"
        assert by_id[run_id].data.params["train.learning_rate"] == json.dumps(lr)
        assert by_id[run_id].data.metrics["eval/loss"] == lr
    assert by_id[stopped.info.run_id].info.status == "KILLED"
    # The trials share the parent's store, not one under their own storage path.
    assert not os.path.exists(tmp_path / "base-tune" / "runs" / "mlflow.db")


def test_curves_mark_the_best_step_and_an_early_stop(tmp_path):
    history = [
        {"step": s, "time": 0.0, "metrics": m}
        for s, m in [
            (0, {"eval/loss": 2.0, "eval/f1": 0.2}),
            (5, {"eval/loss": 1.0, "eval/f1": 0.7, "train/loss": 1.5}),
            (10, {"eval/loss": float("nan"), "eval/f1": 0.7, "train/loss": 0.9}),
            (15, {"eval/loss": 1.4, "eval/f1": 0.6, "train/loss": 0.5}),
        ]
    ]
    stop = {"reason": "eval/f1 did not improve", "step": 15}
    path = str(tmp_path / "c.png")
    series = plot_curves(history, path, "eval/f1", "max", early_stop=stop, title="r")
    # The latest step at the best value: the one the export picks (Ray Train keeps the later of
    # tied checkpoints), so the star marks the exported model.
    assert series.best == (10, 0.7)
    assert series.running_best == [(0, 0.2), (5, 0.7), (10, 0.7), (15, 0.7)]
    assert series.eval_loss == [(0, 2.0), (5, 1.0), (15, 1.4)]  # the NaN is left out
    assert series.early_stop == stop and os.path.getsize(path) > 10_000


def test_tracking_config_problems(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri=None: the default MLflow store"):
        make_spec(
            tmp_path,
            "cls",
            data_dir,
            run={"storage_path": "s3://bucket/runs"},
            tracking={"mlflow": True},
        )
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri=/tmp/x: MLflow 3 refuses"):
        make_spec(tmp_path, "cls", data_dir, tracking={"mlflow": True, "mlflow_uri": "/tmp/x"})
    with pytest.raises(ConfigError, match=r"tracking\.mlfow=True: extra inputs are not permitted"):
        make_spec(tmp_path, "cls", data_dir, tracking={"mlfow": True})


def test_version(capsys):
    from cluster.cli import main
    from trainers import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ferry {__version__}"
