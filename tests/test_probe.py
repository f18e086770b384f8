"""The frozen probe beside a classification fine-tune, on a real local Ray: its numbers equal a
plain scikit-learn logistic regression on the same pooled embeddings and split, they reach the
history, metrics.json and the final table, and a fine-tune that ends below them is told so."""

import json

import numpy as np
import pytest
from conftest import make_spec

from trainers.config_load import build_spec
from trainers.features.head import read_features
from trainers.features.probe import Probe, probe_gain, probe_verdict, run_probe, wants_probe
from trainers.preflight import prepare_run
from trainers.train.launch import train


@pytest.mark.timeout(300)
def test_probe_beside_a_fine_tune_matches_scikit_learn_and_flags_a_worse_fine_tune(
    ray_session, tmp_path, data_dir, capsys
):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from cluster.cli import _print_summary

    # A learning rate that cannot move the model in 4 steps: the fine-tune ends near chance,
    # below what a logistic regression gets from the same frozen features.
    spec = make_spec(
        tmp_path,
        "cls",
        data_dir,
        method="full",
        train={"learning_rate": 1e-7, "max_steps": 4, "eval_every_n_steps": 4,
               "probe_baseline": True},
        deepspeed={"zero_stage": 0},
        scaling={"num_workers": 1},
    )
    assert wants_probe(spec)
    outcome = train(prepare_run(spec))
    metrics = outcome.metrics
    probe = metrics["probe"]
    assert probe["skipped"] is None and probe["feature_cache_hit"] is False
    assert probe["regularization_c_from"] == "5-fold cross-validation"

    # The same pooled embeddings and split, fitted by scikit-learn directly.
    x_train, y_train = read_features(probe["feature_cache"] + "/train")
    x_val, y_val = read_features(probe["feature_cache"] + "/validation")
    assert len(y_val) == outcome.data.validation_rows and len(y_train) == outcome.data.train_rows
    scaler = StandardScaler().fit(x_train)
    plain = LogisticRegression(C=probe["metrics"]["probe/regularization_c"], max_iter=2000)
    predicted = plain.fit(scaler.transform(x_train), y_train).predict(scaler.transform(x_val))
    assert probe["metrics"]["probe/accuracy"] == pytest.approx(
        accuracy_score(y_val, predicted), abs=0.02
    )
    assert probe["metrics"]["probe/f1"] == pytest.approx(
        f1_score(y_val, predicted, average="macro"), abs=0.02
    )

    final = metrics["final"]
    gain = metrics["probe_gain"]
    assert gain["accuracy"] == pytest.approx(
        final["eval/accuracy"] - probe["metrics"]["probe/accuracy"]
    )
    assert gain["accuracy"] < 0 and "loss" not in gain
    assert metrics["probe_verdict"].startswith("the fine-tune ended below the frozen probe")
    assert "--set method=feature_extraction" in metrics["probe_verdict"]
    with open(outcome.export_dir + "/metrics.json") as f:
        assert json.load(f)["probe"] == probe

    # The history's step-0 row carries the probe beside the starting model's metrics.
    with open(spec.run_dir + "/report/history.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 0
    assert first["metrics"]["probe/accuracy"] == probe["metrics"]["probe/accuracy"]
    assert "eval/accuracy" in first["metrics"]

    # The final table: before, probe, after.
    capsys.readouterr()  # what the run printed
    _print_summary(metrics, 1.0)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "metric" in line)
    assert header.index("before") < header.index("probe") < header.index("after")
    row = next(line for line in out.splitlines() if "eval/accuracy" in line)
    assert f"{probe['metrics']['probe/accuracy']:.4f}" in row

    # A rerun of the probe reads the cached features back: same numbers, no forward pass.
    again = run_probe(spec, outcome.data)
    assert again.feature_cache_hit is True and again.metrics == probe["metrics"]


def test_gain_and_verdict():
    probe = Probe(metrics={"probe/accuracy": 0.8, "probe/f1": 0.7, "probe/loss": 0.4})
    final = {"eval/accuracy": 0.85, "eval/f1": 0.69, "eval/loss": 0.3}
    gain = probe_gain(final, probe)
    assert gain == pytest.approx({"accuracy": 0.05, "f1": -0.01})
    # Judged on the run's best metric: below on F1, not on accuracy.
    below = probe_verdict(gain, "lora", "eval/f1", 500)
    assert "(f1 -0.0100)" in below and "LoRA rank" in below
    assert probe_verdict(gain, "lora", "eval/accuracy", 500) is None
    # A metric the probe lacks (eval/loss ranks by default) falls back to accuracy.
    assert probe_verdict({"accuracy": -0.02}, "full", "eval/loss", 500).startswith("the fine")
    # One validation row or less is a tie: 200 rows, accuracy one row worse.
    assert probe_verdict({"accuracy": -0.005}, "full", "eval/accuracy", 200) is None
    assert probe_verdict({"accuracy": -0.01}, "full", "eval/accuracy", 200) is not None
    assert np.isclose(probe_gain({"eval/accuracy": 0.8}, probe)["accuracy"], 0.0)


def test_probe_opt_out_and_where_it_applies(tmp_path, data_dir):
    on = {"probe_baseline": True}
    assert wants_probe(make_spec(tmp_path, "cls", data_dir, method="lora", train=on))
    assert not wants_probe(make_spec(tmp_path, "cls", data_dir, train={"probe_baseline": False}))
    assert not wants_probe(make_spec(tmp_path, "lm", data_dir, train=on))
    assert not wants_probe(make_spec(tmp_path, "cls", data_dir, method="feature_extraction"))
    # On by default: every classification fine-tune gets its probe unless the config opts out.
    assert build_spec({"model": {"preset": "tiny-bert"}, "task": {"type": "sequence_classification"},
                       "data": {"train_files": ["x.jsonl"]}}).train.probe_baseline is True
