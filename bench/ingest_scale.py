"""Ingest at scale: data preparation of one large JSONL file against the same rows in 16 files.

`prepare_dataset` (read -> check rows -> split -> preset tokenizer trained on the text -> tokenize
-> Parquet cache) runs on one embedded Ray with a cold cache (a fresh cache folder every time) for
a generated two-class JSONL at each size, written once as one file and once as 16 files.
Printed per run: wall time, rows/s, the 1-minute load average when it started; per size, the
ratio one-file / 16-files (1.0 means one file is read as fast as the same rows spread over 16).
Nothing is asserted: the numbers go to BENCHMARKS.md.

Run (2M rows takes minutes on 2 CPU cores):
    .venv/bin/python bench/ingest_scale.py
    .venv/bin/python bench/ingest_scale.py --rows 20000 200000 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

POS = ["good", "great", "excellent", "tasty", "love", "fresh", "delicious", "superb", "fine"]
NEG = ["bad", "awful", "terrible", "stale", "hate", "gross", "bland", "broken", "poor", "weak"]
FILLER = ["this", "product", "is", "really", "the", "box", "came", "and", "it", "was", "quite"]


def make_files(folder: str, n: int, parts: int, seed: int = 0) -> list[str]:
    """`n` review-length rows (about 200 bytes each) in `parts` files, the same rows whatever
    `parts` is."""
    rng = random.Random(seed)
    paths = [os.path.join(folder, f"part-{i:02d}.jsonl") for i in range(parts)]
    handles = [open(p, "w") for p in paths]
    try:
        for i in range(n):
            label = rng.choice(["pos", "neg"])
            words = rng.sample(POS if label == "pos" else NEG, 2) + rng.choices(FILLER, k=32)
            rng.shuffle(words)
            handles[i * parts // n].write(json.dumps({"text": " ".join(words), "label": label}))
            handles[i * parts // n].write("\n")
    finally:
        for h in handles:
            h.close()
    return paths


def prepare_once(files: list[str], work: str) -> tuple[float, int]:
    """Wall seconds of one cold `prepare_dataset`, and the rows it kept."""
    from trainers.config_load import build_spec
    from trainers.data.prepare import prepare_dataset

    spec = build_spec(
        {
            "run": {"name": "ingest", "storage_path": os.path.join(work, "runs")},
            "model": {"preset": "tiny-bert"},
            "task": {"type": "sequence_classification"},
            "data": {
                "train_files": files,
                "max_seq_length": 32,
                "cache_dir": tempfile.mkdtemp(prefix="cache-", dir=work),
            },
            "scaling": {"num_workers": 1},
        }
    )
    start = time.perf_counter()
    prepared = prepare_dataset(spec)
    wall = time.perf_counter() - start
    shutil.rmtree(spec.data.cache_dir, ignore_errors=True)
    return wall, prepared.train_rows + prepared.validation_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    ap.add_argument("--parts", type=int, default=16, help="files in the spread-out variant")
    args = ap.parse_args()

    import ray
    import ray.data

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"embedded Ray: {cpus} CPUs; machine: {os.cpu_count()} cores")
    work = tempfile.mkdtemp(prefix="ferry-ingest-")
    results = []
    try:
        for n in args.rows:
            walls = {}
            for parts in (1, args.parts):
                folder = tempfile.mkdtemp(prefix=f"rows{n}-parts{parts}-", dir=work)
                files = make_files(folder, n, parts)
                size = sum(os.path.getsize(f) for f in files)
                load = os.getloadavg()[0]
                wall, kept = prepare_once(files, work)
                walls[parts] = wall
                print(
                    f"rows={n} files={parts} bytes={size} wall_s={wall:.1f} "
                    f"rows_per_s={n / wall:,.0f} kept={kept} load_at_start={load:.2f}",
                    flush=True,
                )
                results.append((n, parts, size, wall, load))
                shutil.rmtree(folder, ignore_errors=True)
            print(f"rows={n} one-file/{args.parts}-files = {walls[1] / walls[args.parts]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
    print("\n| rows | files | MB | wall (s) | rows/s | load at start |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, parts, size, wall, load in results:
        print(f"| {n:,} | {parts} | {size / 1e6:.0f} | {wall:.1f} | {n / wall:,.0f} | {load:.2f} |")


if __name__ == "__main__":
    main()
