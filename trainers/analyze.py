"""Domain-shift report before training: how far is the run's data from what the model knows?

`analyze_domain_shift` is the entry point (driver side, no Ray: it reads at most `max_rows` rows
per side and runs in seconds on a CPU). Stages:
  read the target (data.train_files) and the source (files given, else `REFERENCE_ENGLISH`, a small
  generic English sample shipped here), keeping an evenly spaced sample of each
  -> tokenizer statistics: fertility (tokens per whitespace word) and unknown-token rate
  -> base-model perplexity: token perplexity for causal LMs; for encoders, masked-LM perplexity
     with 15% of tokens masked in one pass (pseudo-perplexity, one pass per token, is too slow),
     or null with a reason when the checkpoint has no masked-LM head
  -> embedding centroids: mean-pooled last hidden state per row, averaged per side; cosine distance
  -> label balance of the whole target (classification)
  -> a recommendation from the thresholds below, with the numbers behind it, and its confidence:
     how the calibration runs (`calibration.json`, measured outcomes of feature extraction, LoRA
     and domain adaptation) that the same rules send the same way actually came out.
The thresholds are derived from that table by `thresholds_from_table`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from typing import Any

from trainers.config import RunSpec
from trainers.data.files import expand_files, format_of, parse_file, peek_columns, raw_columns
from trainers.device import compute_device, on_device
from trainers.errors import ConfigError, DataError
from trainers.model import (
    load_pretrained,
    load_tokenizer_for,
    model_config,
    requested_attention,
)
from trainers.storage import is_uri
from trainers.tasks import TASKS

# Thresholds of the recommendation. Ratios compare the target with the source side. The values are
# `thresholds_from_table(load_calibration())` written out (a test keeps them equal); a threshold
# no calibration run crosses keeps its prior value (`PRIOR_THRESHOLDS`).
UNK_RATE_HIGH = 0.01
"""Above 1% unknown target tokens the tokenizer cannot represent the domain: adapt first."""
FERTILITY_RATIO_HIGH = 1.5
"""Target words cost this many times the source's tokens or more: the vocabulary fits the domain
poorly."""
PERPLEXITY_RATIO_HIGH = 4.0
"""Target perplexity this many times the source's or more: the model finds the domain's text
surprising."""
SMALL_LABELED_ROWS = 200
"""Fewer labeled rows than this is a small set: too few to adapt many weights safely (calibrated:
feature extraction beat LoRA at 100 rows, LoRA won at 400 and 800)."""
LOW_SHIFT_DISTANCE = 0.05
"""Centroid cosine distance below this: the model already represents target like source text."""
LOW_SHIFT_FLOOR_RATIO = 2.0
"""Also low shift: a distance below this many times the target's split-half distance (what two
halves of the same data already show; the scale of distances depends on the model)."""

PRIOR_THRESHOLDS = {
    "unk_rate_high": 0.01,
    "fertility_ratio_high": 1.5,
    "perplexity_ratio_high": 4.0,
    "small_labeled_rows": 1000,
    "low_shift_distance": 0.05,
    "low_shift_floor_ratio": 2.0,
}
"""The hand-picked values before calibration: what a threshold keeps when no run crosses it."""

CALIBRATION_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.json")
"""Measured outcomes (bench/calibrate_analyze.py): per setting the signals, each method's
validation metrics and the winner. Shipped with the package."""

RECOMMENDATIONS = {
    "domain-adaptation-first": "continue pretraining on unlabeled target text before fine-tuning "
    "for the task (a stages: list, first stage task.type=causal_lm or "
    "masked_lm; see examples/reviews_minilm_domain_adaptation.yaml)",
    "feature-extraction": "keep the base model frozen and train only a classifier on its "
    "embeddings (method: feature_extraction; or LoRA with a small rank)",
    "lora": "fine-tune with LoRA (method: lora)",
}

MASK_FRACTION = 0.15
BATCH_SIZE = 16

# The default source side when no --source is given: everyday English prose of the kind general
# pretraining corpora are made of (news, how-to, encyclopedic, conversational).
REFERENCE_ENGLISH = (
    "The city council met on Tuesday to discuss the new budget for schools and roads.",
    "She opened the window to let in some fresh air before starting work.",
    "Scientists have found that regular exercise can improve sleep quality.",
    "The train to the airport leaves every fifteen minutes from platform two.",
    "He spent the weekend painting the fence and fixing the garden gate.",
    "Most plants need sunlight, water and good soil to grow well.",
    "The museum will be closed on Monday for maintenance.",
    "Our team finished the project two days ahead of schedule.",
    "Heavy rain is expected in the northern part of the country tonight.",
    "The river flows through three countries before it reaches the sea.",
    "Please remember to bring your own water bottle to the meeting.",
    "The company announced that it would hire two hundred new workers this year.",
    "Children learn languages faster when they hear them every day.",
    "The old bridge was replaced by a wider one with a lane for bicycles.",
    "I think we should leave early to avoid the traffic.",
    "The library offers free classes on computers and the internet.",
    "Prices of fruit and vegetables rose slightly during the winter months.",
    "The history of the town goes back more than eight hundred years.",
    "Doctors recommend eating a balanced diet with plenty of vegetables.",
    "The concert was cancelled because the singer was ill.",
    "A small group of volunteers cleaned the beach on Saturday morning.",
    "The book tells the story of a family that moves to a new country.",
    "Students will take their final exams at the end of June.",
    "The price of the new phone is higher than last year's model.",
    "After dinner we walked along the lake and watched the sunset.",
    "The mayor said the new park would open next spring.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The film won several awards at the international festival.",
    "Farmers in the region grow wheat, corn and potatoes.",
    "You can find more information on the official website.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "Many people now work from home at least one day a week.",
    "The restaurant on the corner serves breakfast until noon.",
    "The government plans to build more homes in the coming years.",
    "The cat slept on the sofa for most of the afternoon.",
    "Engineers tested the new engine for several weeks before the launch.",
    "The shop sells books, maps and postcards for tourists.",
    "It is important to back up your files regularly.",
    "The team lost the first match but won the next three.",
    "Birds migrate south in the autumn when the weather gets colder.",
)


def analyze_domain_shift(
    spec: RunSpec, source_files: list[str] | None = None, *, max_rows: int = 128
) -> dict[str, Any]:
    """Compare the run's training data (target) with source text through the run's base model.

    Args:
        spec: the validated run config (model, task, data).
        source_files: pretraining-like text (paths or globs, read with data.text_column); None
            compares with `REFERENCE_ENGLISH` instead.
        max_rows: rows sampled per side (128 rows of 64 tokens through a 22M-parameter encoder:
            about 15 s on 2 busy CPU cores).

    Returns:
        The report (JSON-serializable): sides, tokenizer, perplexity, embedding, labels,
        recommendation, thresholds, notes.

    Raises:
        DataError: missing files or columns, no usable rows.
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    target_texts, target_labels, target_info = read_target(spec, max_rows)
    if source_files:
        source_texts, source_info = _read_source(spec, source_files, max_rows)
    else:
        source_texts = list(REFERENCE_ENGLISH)[:max_rows]
        source_info = {
            "name": "builtin-english",
            "files": [],
            "rows": len(REFERENCE_ENGLISH),
            "rows_sampled": len(source_texts),
        }
        notes.append(
            "no --source given: the source side is Ferry's built-in generic English "
            f"sample ({len(REFERENCE_ENGLISH)} sentences), standing in for pretraining text"
        )
    tokenizer = _tokenizer(spec, target_texts, notes)
    tok = {
        "target": tokenizer_stats(tokenizer, target_texts),
        "source": tokenizer_stats(tokenizer, source_texts),
    }
    tok["fertility_ratio"] = _ratio(tok["target"]["fertility"], tok["source"]["fertility"])
    model, kind, reason = _load_base_model(spec, tokenizer)
    device = next(model.parameters()).device
    if spec.model.preset:
        notes.append(
            f"model.preset={spec.model.preset} is random-init: perplexity and embedding "
            "distance are computed but meaningless, and the recommendation ignores them"
        )
    ppl: dict[str, Any] = {
        "kind": kind,
        "target": None,
        "source": None,
        "ratio": None,
        "reason": reason,
    }
    if kind is not None:
        ppl["target"] = _perplexity(model, tokenizer, target_texts, kind, spec, device)
        ppl["source"] = _perplexity(model, tokenizer, source_texts, kind, spec, device)
        ppl["ratio"] = _ratio(ppl["target"], ppl["source"])
    embedding = _embedding_shift(model, tokenizer, target_texts, source_texts, spec, device)
    labels = label_balance(target_labels) if target_labels is not None else None
    report = {
        "model": spec.model.preset or spec.model.name_or_path,
        "task": spec.task.type,
        "target": target_info,
        "source": source_info,
        "tokenizer": tok,
        "perplexity": ppl,
        "embedding": embedding,
        "labels": labels,
        "thresholds": threshold_sources(),
        "notes": notes,
    }
    report["recommendation"] = recommend(report, trust_model=not spec.model.preset)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def recommend(
    report: dict[str, Any], trust_model: bool = True, calibration: list[dict] | None = None
) -> dict[str, Any]:
    """Pick one of `RECOMMENDATIONS` from a report's numbers; the reasons quote them, and the
    confidence says how the calibration runs that land on the same rule fared.

    Rules, first match wins: target UNK rate > UNK_RATE_HIGH, fertility ratio >=
    FERTILITY_RATIO_HIGH or perplexity ratio >= PERPLEXITY_RATIO_HIGH -> domain-adaptation-first;
    classification with < SMALL_LABELED_ROWS rows and low shift -> feature-extraction; else lora.
    Low shift: centroid distance < LOW_SHIFT_DISTANCE or < LOW_SHIFT_FLOOR_RATIO x the target's
    split-half distance. Model-based numbers count only when `trust_model`.

    Args:
        report: `analyze_domain_shift`'s report (tokenizer, perplexity, embedding, labels).
        trust_model: False for a random-init preset: perplexity and distances are ignored.
        calibration: rows of the calibration table; None reads `CALIBRATION_TABLE`.

    Returns:
        choice, action, reasons, confidence (high|medium|low), based_on (calibration runs on the
        same rule whose measured winner agrees / disagrees) and calibration (one line saying so).
    """
    tok, ppl = report["tokenizer"], report["perplexity"]
    sig = signals_of(report)
    distance, floor = sig["centroid_distance"], sig["split_half_distance"]
    th = current_thresholds()
    fired = _adapt_rules(sig, th, trust_model)
    reasons = []
    if "unk_rate_high" in fired:
        reasons.append(f"target unknown-token rate {sig['unk_rate']:.2%} > {UNK_RATE_HIGH:.2%}")
    if "fertility_ratio_high" in fired:
        reasons.append(
            f"fertility ratio {tok['fertility_ratio']:.2f} (target "
            f"{tok['target']['fertility']:.2f} vs source {tok['source']['fertility']:.2f} "
            f"tokens/word) >= {FERTILITY_RATIO_HIGH}"
        )
    if "perplexity_ratio_high" in fired:
        reasons.append(
            f"perplexity ratio {ppl['ratio']:.2f} (target {ppl['target']:.1f} vs source "
            f"{ppl['source']:.1f}) >= {PERPLEXITY_RATIO_HIGH}"
        )
    choice = choose(sig, th, trust_model)
    labels = report["labels"]
    small = _small(sig, th)
    limit = max(LOW_SHIFT_DISTANCE, LOW_SHIFT_FLOOR_RATIO * (floor or 0.0))
    if choice == "feature-extraction":
        reasons.append(
            f"{labels['rows']} labeled rows < {SMALL_LABELED_ROWS} and centroid "
            f"distance {distance:.3f} < {limit:.3f} (max of {LOW_SHIFT_DISTANCE} and "
            f"{LOW_SHIFT_FLOOR_RATIO} x split-half {_fmt(floor, 3)})"
        )
    elif choice == "lora":
        reasons.append(
            f"tokenizer{' and perplexity' if trust_model else ''} within thresholds "
            f"(UNK {tok['target']['unk_rate']:.2%}, fertility ratio "
            f"{_fmt(tok['fertility_ratio'])}, perplexity ratio {_fmt(ppl['ratio'])})"
        )
        if labels is None:
            reasons.append("no labels (causal_lm)")
        elif not small:
            reasons.append(f"{labels['rows']} labeled rows >= {SMALL_LABELED_ROWS}")
        else:
            reasons.append(
                f"centroid distance {_fmt(distance, 3)} >= {limit:.3f}: the "
                "representation has to move"
                if trust_model
                else "model-based numbers ignored (random-init preset)"
            )
    rows = load_calibration() if calibration is None else calibration
    support = _calibration_support(choice, rows, trust_model)
    return {"choice": choice, "action": RECOMMENDATIONS[choice], "reasons": reasons, **support}


def choose(sig: dict[str, Any], th: dict[str, float], trust_model: bool = True) -> str:
    """The rules of `recommend` on `signals_of`'s numbers with thresholds `th`: the one place they
    are decided, for a report and for a calibration run alike."""
    if _adapt_rules(sig, th, trust_model):
        return "domain-adaptation-first"
    if _small(sig, th) and trust_model and _close(sig, th):
        return "feature-extraction"
    return "lora"


def _adapt_rules(sig: dict[str, Any], th: dict[str, float], trust_model: bool) -> list[str]:
    """The domain-adaptation thresholds this setting reaches."""
    fired = []
    if sig["unk_rate"] > th["unk_rate_high"]:
        fired.append("unk_rate_high")
    if sig["fertility_ratio"] is not None and sig["fertility_ratio"] >= th["fertility_ratio_high"]:
        fired.append("fertility_ratio_high")
    ppl = sig["perplexity_ratio"]
    if trust_model and ppl is not None and ppl >= th["perplexity_ratio_high"]:
        fired.append("perplexity_ratio_high")
    return fired


def _small(sig: dict[str, Any], th: dict[str, float]) -> bool:
    return sig["labeled_rows"] is not None and sig["labeled_rows"] < th["small_labeled_rows"]


def _close(sig: dict[str, Any], th: dict[str, float]) -> bool:
    distance, floor = sig["centroid_distance"], sig["split_half_distance"]
    limit = max(th["low_shift_distance"], th["low_shift_floor_ratio"] * (floor or 0.0))
    return distance is not None and distance < limit


def current_thresholds() -> dict[str, float]:
    """The module's threshold constants by their table names."""
    return {
        "unk_rate_high": UNK_RATE_HIGH,
        "fertility_ratio_high": FERTILITY_RATIO_HIGH,
        "perplexity_ratio_high": PERPLEXITY_RATIO_HIGH,
        "small_labeled_rows": SMALL_LABELED_ROWS,
        "low_shift_distance": LOW_SHIFT_DISTANCE,
        "low_shift_floor_ratio": LOW_SHIFT_FLOOR_RATIO,
    }


def load_calibration(path: str = CALIBRATION_TABLE) -> list[dict[str, Any]]:
    """The calibration table's rows; [] when the file is absent (nothing measured yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


_METHOD_OF = {
    "domain-adaptation-first": "domain_adaptation",
    "feature-extraction": "feature_extraction",
    "lora": "lora",
}


def thresholds_from_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Derive the recommendation's thresholds from measured outcomes (the calibration table).

    The rule, per threshold: it sits at the geometric midpoint between the largest signal value
    of a run where the threshold's method did NOT win and the smallest value of a run where it
    did (the arithmetic midpoint when the lower value is 0); rounded to 3 significant digits
    (rows: to a whole row). A threshold keeps its prior value (`PRIOR_THRESHOLDS`) and is marked
    not calibrated when no run crosses it: no run on one side, or the two sides overlap.
    The rules are a decision list, so each threshold learns from the runs that reach its rule:

    - unk_rate_high, fertility_ratio_high, perplexity_ratio_high: the runs that measured domain
      adaptation; the method wins above the threshold.
    - small_labeled_rows: the runs below every (derived) domain-adaptation threshold; LoRA beats
      feature extraction at or above it.
    - low_shift_distance (centroid distance) and low_shift_floor_ratio (distance / split-half
      distance): those of the runs above with fewer labeled rows than small_labeled_rows; LoRA
      beats feature extraction at or above it.

    "Won" is the table's metric (macro F1 on the held-out rows); feature extraction against LoRA
    is compared head to head.

    Returns:
        Per threshold name: value, calibrated (bool), runs (the two runs it sits between, or those
        that were looked at), why (one line).
    """
    out: dict[str, dict[str, Any]] = {}
    measured = [r for r in rows if "domain_adaptation" in r["methods"]]
    for key, signal in (
        ("unk_rate_high", "unk_rate"),
        ("fertility_ratio_high", "fertility_ratio"),
        ("perplexity_ratio_high", "perplexity_ratio"),
    ):
        points = [
            (r["name"], r["signals"][signal], r["winner"] == "domain-adaptation-first")
            for r in measured
            if r["signals"].get(signal) is not None
        ]
        out[key] = _split(key, points, "domain adaptation")
    adapt = PRIOR_THRESHOLDS | {k: v["value"] for k, v in out.items()}
    rest = [
        r
        for r in rows
        if not _adapt_rules(r["signals"], adapt, True) and "feature_extraction" in r["methods"]
    ]

    def lora_won(r: dict) -> bool:
        return r["methods"]["lora"]["f1"] > r["methods"]["feature_extraction"]["f1"]

    out["small_labeled_rows"] = _split(
        "small_labeled_rows",
        [(r["name"], r["signals"]["labeled_rows"], lora_won(r)) for r in rest],
        "LoRA (over feature extraction)",
        whole=True,
    )
    small = [r for r in rest if r["signals"]["labeled_rows"] < out["small_labeled_rows"]["value"]]
    for key, signal in (
        ("low_shift_distance", "centroid_distance"),
        ("low_shift_floor_ratio", "distance_to_floor_ratio"),
    ):
        points = [
            (r["name"], r["signals"][signal], lora_won(r))
            for r in small
            if r["signals"].get(signal) is not None
        ]
        out[key] = _split(key, points, "LoRA (over feature extraction, small data)")
    return out


def _split(
    key: str, points: list[tuple[str, float, bool]], method: str, whole: bool = False
) -> dict[str, Any]:
    """One threshold from (run, signal value, method won) points; see `thresholds_from_table`."""
    prior = PRIOR_THRESHOLDS[key]
    won = [(v, n) for n, v, w in points if w]
    lost = [(v, n) for n, v, w in points if not w]
    names = [n for n, _, _ in points]
    if not points:
        why = "no calibration run measured this signal"
        return {"value": prior, "calibrated": False, "runs": [], "why": why}
    if not won or not lost:
        side = "won" if not won else "lost"
        why = f"no calibration run where {method} {side} ({len(points)} run(s) looked at)"
        return {"value": prior, "calibrated": False, "runs": names, "why": why}
    (hi, hi_name), (lo, lo_name) = max(lost), min(won)
    if hi >= lo:
        why = f"runs overlap: {method} lost at {_g(hi)} ({hi_name}) but won at {_g(lo)} ({lo_name})"
        return {"value": prior, "calibrated": False, "runs": names, "why": why}
    mid = math.sqrt(hi * lo) if hi > 0 else (hi + lo) / 2
    value: float = round(mid) if whole else float(f"{mid:.3g}")
    why = f"between {_g(hi)} ({hi_name}: {method} did not win) and {_g(lo)} ({lo_name}: it won)"
    return {"value": value, "calibrated": True, "runs": [hi_name, lo_name], "why": why}


def threshold_sources(rows: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The report's thresholds section: each value in use, whether it is calibrated, from which
    runs and why."""
    derived = thresholds_from_table(load_calibration() if rows is None else rows)
    return {
        k: {"value": v, **{f: derived[k][f] for f in ("calibrated", "runs", "why")}}
        for k, v in current_thresholds().items()
    }


def _calibration_support(choice: str, rows: list[dict], trust_model: bool) -> dict[str, Any]:
    """Confidence from the calibration runs that the same rules send to `choice`: high when at
    least 3 were measured with that method and all won with it, medium when most did, low
    otherwise (none measured, half or fewer agree, or model-based numbers ignored)."""
    th = current_thresholds()
    method = _METHOD_OF[choice]
    region = [r for r in rows if choose(r["signals"], th) == choice and method in r["methods"]]
    agree = [r for r in region if r["winner"] == choice]
    disagree = [r for r in region if r["winner"] != choice]
    n, k = len(region), len(agree)
    if not trust_model or n == 0 or 2 * k <= n:
        confidence = "low"
    else:
        confidence = "high" if k == n and n >= 3 else "medium"
    details = [
        f"{r['name']}: +{r['margin_points']:.1f} points over {r['runner_up']}" for r in agree
    ] + [
        f"{r['name']}: {r['winner']} won, "
        f"{100 * (r['methods'][_METHOD_OF[r['winner']]]['f1'] - r['methods'][method]['f1']):.1f} "
        "points ahead"
        for r in disagree
    ]
    if n:
        line = (
            f"{k} of {n} calibration runs with similar numbers won with {choice} "
            f"({'; '.join(details)})"
        )
    else:
        line = f"no calibration run with similar numbers measured {choice}"
    if not trust_model:
        line += "; model-based numbers ignored (random-init preset)"
    return {
        "confidence": confidence,
        "based_on": {
            "agree": [r["name"] for r in agree],
            "disagree": [r["name"] for r in disagree],
        },
        "calibration": line,
    }


def signals_of(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers `recommend` decides on, flat: what a calibration run records and what the
    thresholds are derived from (`thresholds_from_table`)."""
    tok, emb, labels = report["tokenizer"], report["embedding"], report["labels"]
    distance, floor = emb["centroid_cosine_distance"], emb["target_split_half_distance"]
    return {
        "unk_rate": tok["target"]["unk_rate"],
        "fertility_ratio": tok["fertility_ratio"],
        "perplexity_ratio": report["perplexity"]["ratio"],
        "centroid_distance": distance,
        "split_half_distance": floor,
        "distance_to_floor_ratio": _ratio(distance, floor),
        "labeled_rows": labels["rows"] if labels else None,
    }


def label_balance(labels: list[str]) -> dict[str, Any]:
    """Counts per label, majority share and entropy (bits; normalized by log2 of the label
    count)."""
    counts = Counter(labels)
    n = len(labels)
    shares = [c / n for c in counts.values()] if n else []
    entropy = -sum(p * math.log2(p) for p in shares)
    majority = max(counts, key=lambda k: (counts[k], k)) if counts else None
    return {
        "rows": n,
        "counts": dict(sorted(counts.items())),
        "majority_label": majority,
        "majority_share": max(shares) if shares else None,
        "entropy_bits": entropy,
        "normalized_entropy": entropy / math.log2(len(counts)) if len(counts) > 1 else 0.0,
    }


def summarize(report: dict[str, Any]) -> list[str]:
    """The short human-readable summary the CLI prints."""
    t, s, tok, ppl = report["target"], report["source"], report["tokenizer"], report["perplexity"]
    lines = [
        f"target: {t['rows']} rows ({t['rows_sampled']} sampled) from {len(t['files'])} file(s); "
        f"source: {s['name']} ({s['rows_sampled']} rows sampled)",
        f"tokens/word: target {tok['target']['fertility']:.2f}, source "
        f"{tok['source']['fertility']:.2f} (ratio {_fmt(tok['fertility_ratio'])}); unknown tokens: "
        f"target {tok['target']['unk_rate']:.2%}, source {tok['source']['unk_rate']:.2%}",
    ]
    if ppl["kind"] is None:
        lines.append(f"perplexity: null ({ppl['reason']})")
    else:
        lines.append(
            f"perplexity ({ppl['kind']}): target {ppl['target']:.2f}, source "
            f"{ppl['source']:.2f} (ratio {_fmt(ppl['ratio'])})"
        )
    emb = report["embedding"]
    lines.append(
        f"embedding centroid cosine distance: {_fmt(emb['centroid_cosine_distance'], 4)} "
        f"(target split-half: {_fmt(emb['target_split_half_distance'], 4)})"
    )
    if report["labels"]:
        lb = report["labels"]
        counts = ", ".join(f"{k} {v}" for k, v in lb["counts"].items())
        lines.append(
            f"labels: {counts}; majority share {lb['majority_share']:.2f}, entropy "
            f"{lb['entropy_bits']:.2f} bits"
        )
    lines += [f"note: {n}" for n in report["notes"]]
    rec = report["recommendation"]
    lines.append(f"recommendation: {rec['choice']}: {rec['action']} ({'; '.join(rec['reasons'])})")
    lines.append(f"confidence: {rec['confidence']}: {rec['calibration']}")
    th = report["thresholds"]
    calibrated = [
        f"{k}={v['value']:g} ({'|'.join(v['runs'])})" for k, v in th.items() if v["calibrated"]
    ]
    prior = [f"{k}={v['value']:g}" for k, v in th.items() if not v["calibrated"]]
    lines.append(
        f"thresholds calibrated from runs: {', '.join(calibrated) or 'none'}; "
        f"not calibrated (prior value): {', '.join(prior) or 'none'}"
    )
    return lines


def write_report(report: dict[str, Any], path: str) -> str:
    """Write the report as JSON to a local path or pyarrow URI; returns the path."""
    import pyarrow.fs as pafs

    text = json.dumps(report, indent=2)
    if not is_uri(path):
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs, p = pafs.FileSystem.from_uri(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())
    return path


def read_target(spec: RunSpec, max_rows: int) -> tuple[list[str], list[str] | None, dict]:
    d = spec.data
    files = expand_files(d.train_files, "data.train_files")
    if spec.task.type == "causal_lm" and d.prompt_column:
        columns = [d.prompt_column, d.response_column]
    elif spec.task.type == "question_answering":
        columns = [d.question_column, d.context_column]
    elif spec.task.type == "chat":
        columns = list(raw_columns(spec).values())
    else:
        columns = [d.text_column]
    is_cls = spec.task.type == "sequence_classification"
    needed = columns + ([d.label_column] if is_cls else [])
    texts, labels, bad = [], [], 0
    for path in files:
        records, n_bad = _read_file(path, spec, needed, "data.train_files")
        if spec.task.type == "chat":  # the turns' text, read as training reads conversations
            chats = [TASKS["chat"].read_row(rec, d) for rec in records]
            bad += sum(err is not None for _, err in chats)
            records = [json.loads(v["messages"]) for v, err in chats if err is None]
            texts += ["\n".join(m["content"] for m in msgs) for msgs in records]
            continue
        texts += [" ".join(str(rec[c]) for c in columns) for rec in records]
        labels += [str(rec[d.label_column]) for rec in records] if is_cls else []
        bad += n_bad
    if not texts:
        raise DataError(
            f"data.train_files={d.train_files}: no usable rows. Point data.train_files "
            "at non-empty data."
        )
    info = {
        "name": "data.train_files",
        "files": files,
        "rows": len(texts),
        "rows_sampled": min(len(texts), max_rows),
        "bad_rows_ignored": bad,
    }
    return _sample(texts, max_rows), (labels if is_cls else None), info


def _read_source(spec: RunSpec, patterns: list[str], max_rows: int) -> tuple[list[str], dict]:
    files = expand_files(patterns, "--source")
    texts, bad = [], 0
    for path in files:
        records, n_bad = _read_file(path, spec, [spec.data.text_column], "--source")
        texts += [str(rec[spec.data.text_column]) for rec in records]
        bad += n_bad
    if not texts:
        raise DataError(
            f"--source={patterns}: no usable rows. Pass files with a non-empty "
            f"'{spec.data.text_column}' column."
        )
    info = {
        "name": "--source",
        "files": files,
        "rows": len(texts),
        "rows_sampled": min(len(texts), max_rows),
        "bad_rows_ignored": bad,
    }
    return _sample(texts, max_rows), info


def _read_file(path: str, spec: RunSpec, columns: list[str], key: str) -> tuple[list[dict], int]:
    """(good rows, bad-row count) of one file, with training's parsers; bad rows are counted,
    not fatal: the report needs a sample, not every row."""
    fmt = format_of(path, spec.data.format)
    cols = peek_columns(path, fmt)
    for col in columns:
        if cols is not None and col not in cols:
            raise DataError(
                f"{key}={path}: column '{col}' not found (has: "
                f"{', '.join(sorted(cols))}). Set the matching data.*_column or fix the file."
            )
    records, errors = parse_file(path, fmt, columns)
    good = [
        rec
        for rec, err in zip(records, errors)
        if err is None
        and rec
        and all(rec.get(c) is not None and str(rec[c]).strip() for c in columns)
    ]
    return good, len(records) - len(good)


def _sample(texts: list[str], n: int) -> list[str]:
    """An evenly spaced, deterministic sample: covers every file, not just the first."""
    if len(texts) <= n:
        return texts
    return [texts[i * len(texts) // n] for i in range(n)]


def _tokenizer(spec: RunSpec, target_texts: list[str], notes: list[str]):
    if spec.model.preset:
        notes.append(
            "the preset's tokenizer is trained here on the target sample, so target "
            "unknown-token rate and fertility are low by construction"
        )
    return load_tokenizer_for(spec, lambda: iter(target_texts))


def tokenizer_stats(tokenizer, texts: list[str]) -> dict[str, Any]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokens = sum(len(x) for x in ids)
    words = sum(len(t.split()) for t in texts)
    unk = tokenizer.unk_token_id
    n_unk = sum(x.count(unk) for x in ids) if unk is not None else 0
    return {
        "rows": len(texts),
        "words": words,
        "tokens": tokens,
        "fertility": tokens / max(words, 1),
        "unk_rate": n_unk / max(tokens, 1),
    }


def _load_base_model(spec: RunSpec, tokenizer):
    """(model in eval mode, perplexity kind or None, reason when None), on this process's GPU in
    the run's precision when the run asks for GPUs (`trainers.device.compute_device`)."""
    import torch
    import transformers

    cfg = model_config(spec, tokenizer, None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(
            [
                f"model={spec.model.preset or spec.model.name_or_path}: ferry analyze reads "
                "encoder or "
                f"decoder models; this {cfg.model_type} model is an encoder-decoder (not supported "
                "yet). Analyze with a decoder or encoder model of the same domain, or skip analyze."
            ]
        )
    archs = getattr(cfg, "architectures", None) or []
    if (
        spec.task.type in ("causal_lm", "chat")
        or spec.model.preset in ("tiny-llama", "small-llama", "llama-1b", "llama-8b")
        or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    ):
        kind, cls = "causal", transformers.AutoModelForCausalLM
    elif cfg.model_type in transformers.models.auto.modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind, cls = "masked_lm", transformers.AutoModelForMaskedLM
    else:
        kind, cls = None, transformers.AutoModel
    device, dtype = compute_device(spec)
    torch.manual_seed(spec.run.seed)
    if spec.model.preset:
        attention = requested_attention(spec.model)
        model = cls.from_config(cfg, attn_implementation=attention)
        return model.to(device, dtype).eval(), kind, None
    # A missing head is expected (and reported below): keep transformers' loading table quiet.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = load_pretrained(
            cls, spec.model, dtype=dtype, config=cfg, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    reason = None if kind else f"no language-model head for model type '{cfg.model_type}'"
    prefix = model.base_model_prefix + "."
    head_missing = [k for k in info["missing_keys"] if not k.startswith(prefix)]
    if kind and head_missing:
        # The head would be random: its "perplexity" would measure nothing.
        kind, reason = (
            None,
            (
                f"the checkpoint has no {cls.__name__.removeprefix('AutoModelFor')} "
                f"head weights ({head_missing[0]} missing)"
            ),
        )
    return model.to(device).eval(), kind, reason


def _batches(tokenizer, texts: list[str], spec: RunSpec, device, **kw):
    tokenizer.padding_side = "right"
    for i in range(0, len(texts), BATCH_SIZE):
        enc = tokenizer(
            texts[i : i + BATCH_SIZE],
            truncation=True,
            padding=True,
            max_length=spec.data.max_seq_length,
            return_tensors="pt",
            **kw,
        )
        yield on_device(dict(enc), device)


def _perplexity(model, tokenizer, texts: list[str], kind: str, spec: RunSpec, device) -> float:
    """exp(mean token NLL): next-token for causal LMs; masked tokens (MASK_FRACTION, one pass,
    seeded) for masked LMs."""
    import torch

    gen = torch.Generator().manual_seed(spec.run.seed)
    nll, count = 0.0, 0
    with torch.no_grad():
        for enc in _batches(tokenizer, texts, spec, device, return_special_tokens_mask=True):
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if kind == "causal":
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            else:
                candidates = (mask == 1) & (enc["special_tokens_mask"] == 0)
                # Drawn on the CPU: the same masked positions on any device.
                drawn = torch.rand(ids.shape, generator=gen).to(device)
                chosen = candidates & (drawn < MASK_FRACTION)
                # Every row with a real token contributes at least one masked position.
                first = candidates.float().argmax(-1)
                rows = candidates.any(-1) & ~chosen.any(-1)
                chosen[rows, first[rows]] = True
                targets = ids.masked_fill(~chosen, -100)
                logits = model(
                    input_ids=ids.masked_fill(chosen, tokenizer.mask_token_id), attention_mask=mask
                ).logits
            nll += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((targets != -100).sum())
    return float(math.exp(min(nll / max(count, 1), 50.0)))


def _pooled(model, tokenizer, texts: list[str], spec: RunSpec, device):
    """One vector per row: the mean of the last hidden state over its real tokens."""
    import torch

    pooled = []
    with torch.no_grad():
        for enc in _batches(tokenizer, texts, spec, device):
            hidden = model.base_model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled.append((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(pooled).cpu()


def _embedding_shift(
    model, tokenizer, target: list[str], source: list[str], spec: RunSpec, device
) -> dict[str, Any]:
    """Cosine distance between the target and source centroids, and between the centroids of the
    target's even and odd rows: the noise floor, since the scale of these distances depends on
    the model (contrastively trained encoders spread topics far more than raw LMs)."""
    t = _pooled(model, tokenizer, target, spec, device)
    s = _pooled(model, tokenizer, source, spec, device)
    floor = _cosine_distance(t[0::2].mean(0), t[1::2].mean(0)) if len(t) > 1 else None
    return {
        "centroid_cosine_distance": _cosine_distance(t.mean(0), s.mean(0)),
        "target_split_half_distance": floor,
        "pooling": "mean of last hidden state",
    }


def _cosine_distance(a, b) -> float:
    import torch

    return float(1.0 - torch.nn.functional.cosine_similarity(a, b, dim=0))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _g(x: float) -> str:
    return f"{x:.4g}"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
