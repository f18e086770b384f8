"""method=feature_extraction on a real local Ray: frozen tiny-bert features (Ray Data actor pool),
cached once, a logistic-regression head on the driver and an MLP head through Ray Train."""

import glob
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import classification_rows, make_spec, write_jsonl

from trainers.config_load import load_config
from trainers.errors import ConfigError
from trainers.features.extract import check_features, embed, feature_cache_key, load_backbone
from trainers.features.head import load_feature_model, read_features
from trainers.predict import predict_dataset
from trainers.preflight import prepare_run
from trainers.storage import LEASE_FILE
from trainers.tasks import classification
from trainers.tasks.common import pad_inputs
from trainers.train.launch import train

pytestmark = pytest.mark.slow

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "reviews_minilm_features.yaml")


def _spec(root, data_dir, name="lr", **sections):
    run = {"name": name, **sections.pop("run", {})}
    return make_spec(root, "cls", data_dir, method="feature_extraction", run=run, **sections)


@pytest.fixture(scope="module")
def lr_run(ray_session, tmp_path_factory, data_dir):
    """One logistic-regression run; its storage (and feature cache) is shared by the tests below."""
    root = tmp_path_factory.mktemp("features")
    spec = _spec(root, data_dir)
    return root, spec, train(prepare_run(spec))


def _feature_folders(spec) -> list[str]:
    return sorted(glob.glob(os.path.join(spec.cache_dir, "features-*")))


@pytest.mark.timeout(400)
def test_logistic_head_learns_with_fine_tuning_metric_keys(lr_run):
    _, spec, outcome = lr_run
    final = outcome.metrics["final"]
    assert final["eval/accuracy"] >= 0.9
    assert final["eval/loss"] < 0.4
    # Exactly the keys a fine-tuning evaluation reports (classification.metrics), plus timings.
    fine_tune_keys = set(classification.metrics(0.0, 1.0, [0], [0], ["neg", "pos"]))
    assert fine_tune_keys == set(classification.METRICS) | {"eval/f1_neg", "eval/f1_pos"}
    assert {k for k in final if k.startswith("eval/")} == fine_tune_keys
    assert final["train/wall_s"] >= final["features/extract_s"] + final["features/head_s"] > 0
    assert outcome.metrics["method"] == "feature_extraction" and outcome.metrics["steps"] == 0
    assert outcome.metrics["feature_cache_hit"] is False
    assert outcome.checkpoint_path is None
    assert not os.path.exists(os.path.join(spec.run_dir, LEASE_FILE))  # the driver's lease is gone
    # No regularization_c in the config: C was chosen by cross-validation on the training
    # features, and the head is no worse than a plain scikit-learn logistic regression fitted
    # on the same (cached) features.
    assert outcome.metrics["head_regularization_c_from"] == "5-fold cross-validation"
    assert 1e-4 <= outcome.metrics["head_regularization_c"] <= 100
    from sklearn.linear_model import LogisticRegression

    from trainers.features.head import read_features

    [folder] = _feature_folders(spec)
    x, y = read_features(os.path.join(folder, "train"))
    xv, yv = read_features(os.path.join(folder, "validation"))
    plain = LogisticRegression(max_iter=2000).fit(x, y).score(xv, yv)
    assert final["eval/accuracy"] >= plain - 1e-9
    files = set(os.listdir(outcome.export_dir))
    assert {"head.safetensors", "feature_head.json", "labels.json", "metrics.json", "ferry_run.yaml",
            "tokenizer.json", "base"} <= files


@pytest.mark.timeout(400)
def test_rerun_hits_the_feature_cache_and_a_changed_pooling_misses(lr_run, data_dir):
    root, spec, first = lr_run
    folders = _feature_folders(spec)
    assert len(folders) == 1
    again = train(prepare_run(_spec(root, data_dir, name="lr-again")))
    assert again.metrics["feature_cache_hit"] is True
    assert _feature_folders(spec) == folders  # nothing re-extracted
    assert again.metrics["final"]["eval/accuracy"] == first.metrics["final"]["eval/accuracy"]
    assert again.metrics["final"]["features/extract_s"] < first.metrics["final"]["features/extract_s"]

    # What changes the features changes the key, so the lookup misses (checked on the key: a
    # second extraction costs a minute on a loaded 2-core machine).
    key = feature_cache_key(spec, first.data)
    assert os.path.basename(folders[0]) == f"features-{key}"
    for changed in ({"features": {"pooling": "cls"}}, {"features": {"layer": 0}}, {"run": {"seed": 1}}):
        assert feature_cache_key(_spec(root, data_dir, **changed), first.data) != key, changed
    assert feature_cache_key(_spec(root, data_dir, name="other", features={"head": "mlp"}),
                             first.data) == key  # the head does not change the features


def _assert_each_vector_is_its_own_rows_with_its_label(folder: str, tokenized: str) -> None:
    # Extraction sorts rows by length before batching; the cache must still hold each row's
    # features beside that row's label. Every cached vector equals an unbucketed forward of one
    # tokenized row (all rows in file order, one batch; within 1e-5) with that row's label, and
    # every row is matched once (rows of the same text are interchangeable: same features, same
    # label).
    base = load_backbone({"name_or_path": os.path.join(folder, "base")})
    for split in ("train", "validation"):
        rows = pq.read_table(os.path.join(tokenized, split)).to_pylist()
        batch = pad_inputs([r["input_ids"] for r in rows], pad_id=0)  # file order, unsorted
        with torch.inference_mode():
            alone = embed(base, batch["input_ids"], batch["attention_mask"], "mean", -1).numpy()
        x, y = read_features(os.path.join(folder, split))
        assert len(x) == len(rows)
        gap = np.abs(x[:, None, :] - alone[None, :, :]).max(-1)
        nearest = gap.argmin(1)
        assert gap[np.arange(len(x)), nearest].max() < 1e-5
        assert [rows[j]["labels"] for j in nearest] == y.tolist()
        assert Counter(tuple(rows[j]["input_ids"]) for j in nearest) == Counter(
            tuple(r["input_ids"]) for r in rows)


@pytest.mark.timeout(400)
def test_each_cached_feature_vector_is_its_own_rows_with_its_label(lr_run):
    # A few hundred rows: extracted in the driver process (features.in_process_max_rows).
    _, spec, outcome = lr_run
    assert outcome.metrics["features_extracted_in"] == "in_process"
    [folder] = _feature_folders(spec)
    _assert_each_vector_is_its_own_rows_with_its_label(folder, outcome.data.cache_path)


@pytest.mark.timeout(400)
def test_the_actor_pool_caches_the_same_features_as_the_driver(lr_run, tmp_path, data_dir):
    # in_process_max_rows=0: the same rows on a Ray Data actor pool (what a large extraction
    # uses), in its own cache folder; same layout, same per-row features and labels, same head.
    _, spec, first = lr_run
    pool_spec = _spec(tmp_path, data_dir, features={"in_process_max_rows": 0})
    assert pool_spec.cache_dir != spec.cache_dir
    pooled = train(prepare_run(pool_spec))
    assert pooled.metrics["features_extracted_in"] == "actor_pool"
    assert pooled.metrics["feature_cache_hit"] is False
    [folder] = _feature_folders(pool_spec)
    assert os.path.basename(folder) == os.path.basename(_feature_folders(spec)[0])  # same key
    assert sorted(os.listdir(folder)) == sorted(os.listdir(_feature_folders(spec)[0]))
    _assert_each_vector_is_its_own_rows_with_its_label(folder, pooled.data.cache_path)
    assert pooled.metrics["final"]["eval/accuracy"] == pytest.approx(
        first.metrics["final"]["eval/accuracy"], abs=1e-9)


def test_extraction_place_follows_rows_and_gpus(tmp_path, data_dir):
    from trainers.features.extract import extraction_place

    spec = _spec(tmp_path, data_dir)
    limit = spec.features.in_process_max_rows
    assert extraction_place(spec, limit) == "in_process"
    assert extraction_place(spec, limit + 1) == "actor_pool"
    off = _spec(tmp_path, data_dir, features={"in_process_max_rows": 0})
    assert extraction_place(off, 1) == "actor_pool"
    gpu = _spec(tmp_path, data_dir, scaling={"gpus_per_worker": 1})
    assert extraction_place(gpu, 1) == ("in_process" if torch.cuda.is_available() else "actor_pool")


@pytest.mark.timeout(400)
def test_export_loads_and_predicts_like_the_run(lr_run, tmp_path):
    _, spec, outcome = lr_run
    model = load_feature_model(outcome.export_dir)
    rows = pq.read_table(outcome.data.validation_path).to_pylist()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits
            loss += torch.nn.functional.cross_entropy(logits, torch.tensor([r["labels"]])).item()
            correct += int(logits.argmax(-1).item() == r["labels"])
    final = outcome.metrics["final"]
    assert correct / len(rows) == pytest.approx(final["eval/accuracy"], abs=1.5 / len(rows))
    assert loss / len(rows) == pytest.approx(final["eval/loss"], rel=1e-3, abs=1e-4)

    inputs = classification_rows(12, seed=7)
    path = write_jsonl(tmp_path / "in.jsonl", inputs)
    summary = predict_dataset(spec, outcome.export_dir, [path], str(tmp_path / "pred"), batch_size=5,
                              num_actors=1)
    out = pq.read_table(str(tmp_path / "pred")).to_pylist()
    assert summary.rows == 12 and [r["row"] for r in out] == list(range(1, 13))
    assert [r["text"] for r in out] == [r["text"] for r in inputs]
    assert sum(r["prediction"] == r["label"] for r in out) >= 11


@pytest.mark.timeout(400)
def test_mlp_head_trains_data_parallel_on_ray_train(lr_run, data_dir):
    root, spec, _ = lr_run
    # Same data, model, pooling and layer as the logistic run: the features come from its cache.
    mlp = _spec(root, data_dir, name="mlp", train={"micro_batch_size_per_worker": 16},
                features={"head": "mlp", "distributed_min_rows": 1, "mlp_epochs": 20,
                          "mlp_hidden_size": 32})
    outcome = train(prepare_run(mlp))
    assert outcome.metrics["head_trained"] == "ray_train"
    assert outcome.metrics["feature_cache_hit"] is True
    assert outcome.metrics["final"]["eval/accuracy"] >= 0.9
    assert load_feature_model(outcome.export_dir).head[1].out_features == 32


@pytest.mark.timeout(60)
def test_layer_out_of_range_is_rejected_before_anything_runs(ray_session, tmp_path, data_dir):
    spec = _spec(tmp_path, data_dir, features={"layer": 5})
    with pytest.raises(ConfigError, match=r"features\.layer=5: this model has 2 layers, so the layer "
                       r"must be between -3 and 2"):
        train(prepare_run(spec))
    assert not os.path.exists(spec.cache_dir)  # nothing prepared
    assert check_features(_spec(tmp_path, data_dir, features={"layer": -3})) == []


def test_example_config_validates():
    spec = load_config(EXAMPLE)
    assert spec.method == "feature_extraction" and spec.features.pooling == "mean"
    assert check_features(spec) == []  # MiniLM's config: layer -1 of 6 is in range
