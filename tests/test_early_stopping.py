"""Early stopping in `ferry train`, the best-checkpoint export and `ferry export`.

The rule itself (`trainers.stopping.stop_reason`) is the one `ferry tune` applies to trials; its
overfitting, plateau and divergence cases are pinned on synthetic streams in tests/test_tune.py.
Here: the metric-patience rule, the config, and one real run (2 workers, ZeRO-3, full
fine-tuning) that memorizes random labels, stops itself, and exports its best checkpoint.
"""

from __future__ import annotations

import json
import os

import pytest

from trainers.config_load import build_spec
from trainers.errors import ConfigError
from trainers.stopping import (
    NO_IMPROVEMENT,
    OVERFITTING,
    EarlyStoppingConfig,
    best_evaluation,
    stop_reason,
)

# ---- the rule, shared with ferry tune --------------------------------------------------------


def _evals(metric_values, key="eval/accuracy"):
    return [
        {key: v, "eval/loss": 1.0, "train/loss": 1.0, "train/step": 10 * (i + 1)}
        for i, v in enumerate(metric_values)
    ]


def test_tuning_applies_the_same_rule_and_config():
    import tuning.stoppers
    from tuning.config import OverfittingConfig, TuneConfig

    assert tuning.stoppers.stop_reason is stop_reason
    assert tuning.stoppers.OVERFITTING == OVERFITTING
    assert OverfittingConfig is EarlyStoppingConfig
    # tune.overfitting keeps its defaults: on, the same thresholds as before the move.
    tune = TuneConfig(space={"lora.rank": {"choice": [4]}})
    assert tune.overfitting.enabled and tune.overfitting.plateau_patience == 4


def test_metric_patience_watches_the_best_metric_in_its_direction():
    cfg = EarlyStoppingConfig(grace_period=1, plateau_patience=None, metric_patience=2)
    rising = _evals([0.5, 0.6, 0.7, 0.8])
    assert stop_reason(rising, cfg, "eval/accuracy", "max") is None
    stalled = _evals([0.5, 0.7, 0.69, 0.7])  # no evaluation beat 0.7 in the last two
    assert stop_reason(stalled, cfg, "eval/accuracy", "max") == NO_IMPROVEMENT
    assert stop_reason(stalled[:3], cfg, "eval/accuracy", "max") is None  # only one so far
    # min_delta: an improvement smaller than it does not reset the count.
    small = _evals([0.5, 0.7, 0.705, 0.708])
    assert stop_reason(small, cfg, "eval/accuracy", "max") is None
    strict = cfg.model_copy(update={"metric_min_delta": 0.01})
    assert stop_reason(small, strict, "eval/accuracy", "max") == NO_IMPROVEMENT
    # Off by default; the tune stopper passes the search's metric the same way.
    off = cfg.model_copy(update={"metric_patience": None})
    assert stop_reason(stalled, off, "eval/accuracy", "max") is None
    # The latest of tied bests: the one Ray Train keeps when it ranks checkpoints by the metric.
    assert best_evaluation(stalled, "eval/accuracy", "max")["train/step"] == 40
    assert best_evaluation(stalled, "eval/accuracy", "min")["train/step"] == 10


# ---- config -------------------------------------------------------------------------------------

BASE = {
    "model": {"preset": "tiny-bert"},
    "task": {"type": "sequence_classification"},
    "data": {"train_files": ["x.jsonl"]},
}


def test_early_stopping_and_export_config():
    spec = build_spec(BASE)
    assert spec.train.early_stopping is None and spec.train.export == "best"
    on = build_spec({**BASE, "train": {"early_stopping": {"metric_patience": 3}}})
    assert on.train.early_stopping.enabled and on.train.early_stopping.patience == 2
    bad = {
        **BASE,
        "train": {
            "export": "first",
            "early_stopping": {"patience": 0, "metric_patience": 0, "patiance": 3},
        },
    }
    with pytest.raises(ConfigError) as e:
        build_spec(bad)
    text = str(e.value)
    assert "train.export=first: input should be 'best' or 'last'" in text
    assert "train.early_stopping.patience=0: input should be greater than or equal to 1" in text
    assert "train.early_stopping.metric_patience=0: input should be greater than or equal" in text
    assert (
        "train.early_stopping.patiance=3: extra inputs are not permitted. Remove it or fix the "
        "spelling (allowed here: enabled, grace_period, " in text
    )
    frozen = {**BASE, "method": "feature_extraction", "train": {"early_stopping": {}}}
    with pytest.raises(ConfigError, match=r"train\.early_stopping=\{\.\.\.\}: method=feature_"):
        build_spec(frozen)


def test_a_search_refuses_train_early_stopping(tmp_path):
    from tuning.load import build_search

    raw = {
        **BASE,
        "train": {"early_stopping": {}},
        "tune": {"space": {"train.learning_rate": {"choice": [1e-3]}}},
    }
    with pytest.raises(ConfigError, match=r"train\.early_stopping=\{\.\.\.\}: in a search, tune"):
        build_search(raw)


# ---- one real run that stops itself ------------------------------------------------------------


def _state(checkpoint_dir):
    with open(os.path.join(checkpoint_dir, "ferry_state.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_overfitting_run_stops_early_and_exports_its_best_checkpoint(stopped_run):
    from test_train import _reload_eval_loss

    spec, outcome = stopped_run
    metrics = outcome.metrics
    total = 20 * (16 // 2 // 4)
    stop = metrics["early_stop"]
    assert stop["reason"] == OVERFITTING, metrics
    assert stop["step"] == metrics["steps"] < total
    # The stopping step was checkpointed, with the decision: a resumed run stays stopped.
    last_state = _state(outcome.checkpoint_path)
    assert last_state["step"] == stop["step"] and last_state["early_stop"] == stop
    # final/ is the best checkpoint, not the last step, and metrics.json says so.
    assert metrics["export"] == "best" and metrics["exported_step"] < metrics["steps"]
    assert metrics["final"] == metrics["best"]
    assert metrics["final"]["train/step"] == metrics["exported_step"]
    assert metrics["last"]["train/step"] == metrics["steps"]
    assert metrics["final"]["eval/loss"] < metrics["last"]["eval/loss"] - 0.02
    assert outcome.best_checkpoint_path.endswith(f"checkpoint_step_{metrics['exported_step']:07d}")
    # The export reloads with plain transformers and reproduces the best step's eval loss.
    reloaded = _reload_eval_loss(outcome.export_dir, outcome.data, spec.task.type, "full")
    assert reloaded == pytest.approx(metrics["final"]["eval/loss"], rel=2e-3)
    assert reloaded != pytest.approx(metrics["last"]["eval/loss"], rel=2e-3)


@pytest.mark.slow
def test_ferry_export_writes_any_committed_step(stopped_run, capsys):
    from test_train import _reload_eval_loss

    from cluster.cli import main

    spec, outcome = stopped_run
    last = outcome.metrics["last"]
    step = int(last["train/step"])
    assert main(["export", spec.run_dir, "--checkpoint", str(step)]) == 0
    out = os.path.join(spec.run_dir, f"export-step-{step}")
    assert f"step {step} of {step} (step) exported: {out}" in capsys.readouterr().out
    exported = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert exported["export"] == "step" and exported["exported_step"] == step
    assert exported["early_stop"] == outcome.metrics["early_stop"]
    reloaded = _reload_eval_loss(out, outcome.data, spec.task.type, "full")
    assert reloaded == pytest.approx(last["eval/loss"], rel=2e-3)
    # A step without a committed checkpoint (none is evaluated at step 4): exit 2, naming the
    # steps there are.
    kept = sorted(
        int(name.removeprefix("checkpoint_step_"))
        for name in os.listdir(spec.run_dir)
        if name.startswith("checkpoint_step_")
    )
    assert main(["export", spec.run_dir, "--checkpoint", "4"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint=4: the run has no committed checkpoint at step 4" in err
    assert f"Use one of the steps it has: {', '.join(map(str, kept))}." in err


def test_ferry_export_of_a_run_without_checkpoints_is_refused(tmp_path, capsys):
    from cluster.cli import main
    from trainers.config_load import dump_spec

    spec = build_spec({**BASE, "run": {"name": "empty", "storage_path": str(tmp_path)}})
    os.makedirs(spec.run_dir)
    with open(os.path.join(spec.run_dir, "ferry_run.yaml"), "w") as f:
        f.write(dump_spec(spec))
    assert main(["export", spec.run_dir]) == 2
    assert f"run={spec.run_dir}: no committed checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing-here")]) == 2
    assert "ferry_run.yaml there" in capsys.readouterr().err
    assert main(["export", spec.run_dir, "--checkpoint", "first"]) == 2
    assert "--checkpoint=first: must be best, last or an optimizer step" in (
        capsys.readouterr().err
    )
