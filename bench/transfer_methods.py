"""Transfer methods on one real dataset: frozen features + head vs LoRA vs full fine-tuning.

Runs `examples/reviews_minilm_lora.yaml` (all-MiniLM-L6-v2 on 800 Amazon Fine Food reviews,
evaluated on 200 held-out ones) three ways on one embedded Ray, one after the other:

  features: method=feature_extraction with the settings of examples/reviews_minilm_features.yaml
  lora:     the example as it is (the baseline of the ratios)
  full:     method=full, same schedule, learning rate --full-lr (full fine-tuning of every weight
            needs a much smaller step than LoRA's adapters)

Each method gets its own fresh storage folder, so each pays for its own tokenization (and the
feature run for its extraction): the wall times are what a user waits for from a cold start,
measured around `trainers.launch.train` (Ray start-up excluded, paid once).
Printed: wall time (and ratio to LoRA), accuracy, macro F1, eval loss. Nothing is asserted: the
numbers go to BENCHMARKS.md.

Run (about 15-20 minutes on 2 CPU cores; needs `python examples/prepare_reviews.py examples/data`):
    .venv/bin/python bench/transfer_methods.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["features", "lora", "full"])
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from cluster.session import connect, disconnect
    from trainers.config_load import load_config
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    if not os.path.exists(os.path.join(ROOT, "examples", "data", "reviews_train.jsonl")):
        raise SystemExit("run `python examples/prepare_reviews.py examples/data` first")
    work = args.workdir or tempfile.mkdtemp(prefix="ferry-bench-methods-")
    features = load_config(os.path.join(ROOT, "examples", "reviews_minilm_features.yaml"))
    overrides = {
        "features": [f"features.{k}={v}" for k, v in features.features.model_dump().items()]
        + ["method=feature_extraction"],
        "lora": [],
        "full": ["method=full", f"train.learning_rate={args.full_lr}"],
    }
    session = connect(None, needed_cpus=3)
    results = {}
    try:
        for method in args.methods:
            storage = os.path.join(work, method)
            shutil.rmtree(storage, ignore_errors=True)
            spec = load_config(os.path.join(ROOT, "examples", "reviews_minilm_lora.yaml"),
                               overrides[method] + [f"run.storage_path={storage}",
                                                    f"run.name=bench-{method}"])
            t0 = time.perf_counter()
            outcome = train(prepare_run(spec))
            wall = time.perf_counter() - t0
            final = outcome.metrics["final"]
            results[method] = {"wall_s": round(wall, 1), "accuracy": final["eval/accuracy"],
                               "f1": final["eval/f1"], "loss": final["eval/loss"],
                               "steps": outcome.metrics.get("steps")}
            print(f"[bench] {method}: {json.dumps(results[method])}", flush=True)
    finally:
        disconnect(session)

    base = results.get("lora", {}).get("wall_s")
    print("\nmethod    | wall s | vs lora | accuracy | macro F1 | eval loss | steps")
    for method, r in results.items():
        ratio = f"{r['wall_s'] / base:.2f}x" if base else "-"
        print(f"{method:9} | {r['wall_s']:6.0f} | {ratio:>7} | {r['accuracy']:.3f}    | {r['f1']:.3f}    "
              f"| {r['loss']:.3f}     | {r['steps']}")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nresults: {work}/results.json")


if __name__ == "__main__":
    main()
