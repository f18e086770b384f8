"""HPO efficiency: a full grid against ASHA + the overfitting stop over the same grid.

Both searches run for real (Ray Tune over Ray Train + DeepSpeed trials) on one embedded Ray, one
after the other, on the same fixed problem: the tiny-bert preset, LoRA, a generated two-class
text set with 15% label noise (so long runs at high learning rates overfit), every trial with the
same seed. The grid is train.learning_rate x lora.rank.

  grid:  FIFO scheduler, overfitting stop off: every trial runs all its steps.
  asha:  ASHA (grace --grace evaluations, reduction factor 3) + the overfitting/plateau stop
         (the tune block's defaults).

Printed: trial-steps consumed by each (and the ratio asha/grid), wall time of each (and the ratio),
best eval/loss of each, and the regret (asha best - grid best, absolute and relative).
Nothing is asserted: the numbers go to BENCHMARKS.md.

Run (about 15-25 minutes on 2 CPU cores):
    .venv/bin/python bench/hpo_efficiency.py
    .venv/bin/python bench/hpo_efficiency.py --lrs 1e-4 1e-3 1e-2 --ranks 4 16 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

POS = [
    "good",
    "great",
    "excellent",
    "tasty",
    "love",
    "fresh",
    "delicious",
    "superb",
    "fine",
    "nice",
]
NEG = ["bad", "awful", "terrible", "stale", "hate", "gross", "bland", "broken", "poor", "weak"]
FILLER = ["this", "product", "is", "really", "the", "box", "came", "and", "it", "was", "quite"]


def make_data(path: str, n: int, noise: float, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = rng.sample(POS if label == "pos" else NEG, 2) + rng.sample(FILLER, 5)
            rng.shuffle(words)
            if rng.random() < noise:
                label = "neg" if label == "pos" else "pos"
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.15)
    ap.add_argument("--grace", type=int, default=4, help="ASHA grace period, in evaluations")
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--reuse-grid",
        action="store_true",
        help="take the grid's numbers from <workdir>/runs/bench-grid (a previous run)",
    )
    args = ap.parse_args()

    from cluster.session import connect, disconnect
    from tuning.load import build_search
    from tuning.report import build_report
    from tuning.search import run_search

    work = args.workdir or tempfile.mkdtemp(prefix="ferry-hpo-bench-")
    make_data(os.path.join(work, "train.jsonl"), args.rows, args.noise, seed=0)
    base = {
        "run": {"name": "hpo", "storage_path": os.path.join(work, "runs")},
        "model": {"preset": "tiny-bert"},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16},
        "task": {"type": "sequence_classification"},
        "data": {
            "train_files": [os.path.join(work, "train.jsonl")],
            "max_seq_length": 32,
            "validation_fraction": 0.2,
        },
        "train": {
            "num_epochs": args.epochs,
            "micro_batch_size_per_worker": 8,
            "eval_every_n_steps": args.eval_every,
            "lr_schedule": "constant",
            "eval_batch_size_per_worker": 64,
            "log_every_n_steps": 10_000,
            "keep_best_checkpoints": 1,
        },
        "deepspeed": {"zero_stage": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 0.5},
    }
    space = {"train.learning_rate": {"grid": args.lrs}, "lora.rank": {"grid": args.ranks}}
    session = connect(None, needed_cpus=4)
    results = {}
    try:
        for name, scheduler, overfit in (
            ("grid", {"type": "fifo"}, {"enabled": False}),
            (
                "asha",
                {"type": "asha", "grace_period": args.grace, "reduction_factor": 3},
                {"enabled": True},
            ),
        ):
            exp = os.path.join(work, "runs", f"bench-{name}")
            if name == "grid" and args.reuse_grid and os.path.isdir(exp):
                rep = build_report(exp, write=False)
                results[name] = {
                    "trial_steps": rep.totals["trial_steps"],
                    "grid_steps": rep.totals["grid_steps"],
                    "wall_s": float("nan"),
                    "best": rep.best["best_metric"],
                    "best_params": rep.best["params"],
                    "by_status": rep.totals["by_status"],
                    "worker_s": rep.totals["worker_seconds"],
                    "trials": len(rep.trials),
                }
                continue
            if os.path.isdir(exp):
                shutil.rmtree(exp)
            search = build_search(
                {
                    **base,
                    "tune": {
                        "name": f"bench-{name}",
                        "space": space,
                        "num_samples": 1,
                        "scheduler": scheduler,
                        "overfitting": overfit,
                        "delete_stopped_checkpoints": True,
                    },
                }
            )
            t0 = time.perf_counter()
            outcome = run_search(search)
            wall = time.perf_counter() - t0
            rep = outcome.report
            results[name] = {
                "trial_steps": rep.totals["trial_steps"],
                "grid_steps": rep.totals["grid_steps"],
                "wall_s": wall,
                "best": rep.best["best_metric"],
                "best_params": rep.best["params"],
                "by_status": rep.totals["by_status"],
                "worker_s": rep.totals["worker_seconds"],
                "trials": len(rep.trials),
            }
    finally:
        disconnect(session)
    g, a = results["grid"], results["asha"]
    print(json.dumps(results, indent=2))
    print(
        f"\ntrials: {g['trials']} ({len(args.lrs)} learning rates x {len(args.ranks)} ranks), "
        f"{g['grid_steps'] // max(g['trials'], 1)} steps each"
    )
    print(
        f"trial-steps  grid {g['trial_steps']}  asha {a['trial_steps']}  ratio asha/grid "
        f"{a['trial_steps'] / g['trial_steps']:.3f}"
    )
    print(
        f"wall time    grid {g['wall_s']:.0f}s  asha {a['wall_s']:.0f}s  "
        f"ratio {a['wall_s'] / g['wall_s']:.3f}"
    )
    print(
        f"best eval/loss  grid {g['best']:.4f} {g['best_params']}  "
        f"asha {a['best']:.4f} {a['best_params']}"
    )
    print(
        f"regret {a['best'] - g['best']:+.4f} "
        f"({(a['best'] - g['best']) / g['best'] * 100:+.2f}% of grid best)"
    )
    print(f"asha trials by outcome: {a['by_status']}")


if __name__ == "__main__":
    main()
