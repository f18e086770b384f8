"""Ferry's own cost: per optimizer step against bare baselines, and the fixed start-up of `ferry train`.

Step cost: median optimizer-step time after warm-up, same model (the small-llama preset, a few
million parameters, causal LM, built by `trainers.model.build_model`), same packed rows (a
synthetic corpus tokenized once by Ferry's own `prepare_dataset`; the baselines read the cached
Parquet with pyarrow), same micro-batch, same torch AdamW, same linear LR decay, 1 worker, fp32,
the same number of torch threads, for:
  ferry  `trainers.launch.train` on an embedded Ray (Ray Train + Ray Data + DeepSpeed), read from
         the `train/step_time_s` metric in the last checkpoint's ferry_state.json history
  (a)    the bare DeepSpeed engine in a minimal loop, same ZeRO stage and DeepSpeed config
  (b)    a plain PyTorch loop (forward, backward, clip, step; no DeepSpeed, i.e. ZeRO-0)
  (c)    the HF `transformers.Trainer` with the same DeepSpeed config (if that cannot run here:
         "not measured" with the error, and HF Trainer without DeepSpeed, labelled as such)
Ferry's step time includes what Ferry does per step (Ray Data batch fetch, shuffle buffer and
collate, the NaN check's all-reduce, progress bookkeeping) and the Ray processes it runs beside;
the baselines run afterwards, with Ray shut down, each in a fresh process, on batches stacked in
memory beforehand.
Each run is cut into windows of --report-every steps (Ferry reports once per window); the first
window is warm-up and dropped; a run's figure is the median of its window medians. The variants
run interleaved (--rounds rounds of: every setting's ferry, a, b, c), so a change in the
machine's load falls on all of them alike; a variant's figure is the median over rounds. Ratios
are ferry / baseline (above 1: Ferry is slower), over those medians and as the median of the
per-round ratios. Settings: ZeRO-2 and ZeRO-3 full fine-tuning and ZeRO-2 LoRA by default.
Ferry's train/ingest_wait_share (time blocked on Ray Data / window time) is printed too.

Start-up: `ferry train` on a tiny-llama config as a subprocess; time from process start to the
first "[ferry] step" progress line (train.log_every_n_steps=1), and total wall time, with a cold
preprocessing cache (--startup-warm adds a second run that finds the cache).

Timings only; nothing is asserted. Other processes on a shared machine move the numbers.

Run (about 15-20 minutes on 2 CPU cores with the defaults):
    .venv/bin/python bench/overhead.py            # or: make bench
    .venv/bin/python bench/overhead.py --rounds 2 --settings zero2 --skip-hf --skip-startup
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import yaml

# Syllables for a synthetic vocabulary: enough distinct words that the trained BPE tokenizer's
# 512 entries are all used, so the model's embedding and softmax have their full size.
_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "nel", "pi", "dra", "gu", "fen", "zo",
              "ta", "bri", "mon", "el", "ush", "qua", "dor"]


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, interleaved, print the tables and the machine description."""
    args = _parser().parse_args(argv)
    # Nothing here may reach the network: presets are random-init, tokenizers trained in-process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = args.workdir or tempfile.mkdtemp(prefix="/tmp/ferry-bench-")
    os.makedirs(work, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    tables: dict[str, list[dict]] = {}
    try:
        corpus = write_corpus(os.path.join(work, "corpus.jsonl"), args.corpus_docs, seed=0)
        # Interleaved: round 1 runs every setting's variants once (ferry a b c, then the next
        # setting), round 2 again, ... so a change in the machine's load lands on all variants
        # alike instead of on whichever ran during it.
        for rnd in range(args.rounds):
            for setting in args.settings:
                stage, method = _SETTINGS[setting]
                spec = bench_spec(corpus, os.path.join(work, "runs"), args, stage, method,
                                  name=f"bench-{setting}-r{rnd}")
                print(f"[bench] round {rnd + 1}/{args.rounds}, {setting}", flush=True)
                runs = tables.setdefault(setting, [])
                ferry, train_path = measure_ferry(spec, args.threads)
                runs.append(_row("ferry", f"Ferry: train() on Ray, ZeRO-{stage}", ferry, rnd))
                runs += measure_baselines(spec, train_path, args, stage, rnd)
        startup = [] if args.skip_startup else measure_startup(work, args)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(tables, startup, args, time.perf_counter() - t_start, load_before)
    return 0


# Setting name -> (ZeRO stage, method) for the step-cost rows.
_SETTINGS = {"zero2": (2, "full"), "zero3": (3, "full"), "lora-zero2": (2, "lora"),
             "zero0": (0, "full"), "zero1": (1, "full"), "lora-zero3": (3, "lora")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per variant")
    p.add_argument("--report-every", type=int, default=5,
                   help="steps per window (Ferry's eval_every_n_steps); the first window is warm-up")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--max-seq-length", type=int, default=128, help="tokens per packed row")
    p.add_argument("--settings", nargs="+", default=["zero2", "zero3", "lora-zero2"],
                   choices=sorted(_SETTINGS), help="ZeRO stage / method settings to measure")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds: every variant of every setting runs once per round")
    p.add_argument("--skip-hf", action="store_true", help="leave out (c), the HF Trainer")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every variant (1 = what Ray gives a 1-CPU Ferry worker)")
    p.add_argument("--corpus-docs", type=int, default=3000, help="synthetic documents to generate")
    p.add_argument("--startup-max-steps", type=int, default=3, help="steps of the start-up run")
    p.add_argument("--startup-warm", action="store_true",
                   help="also time a second `ferry train` that finds the preprocessing cache")
    p.add_argument("--skip-startup", action="store_true", help="skip the `ferry train` start-up run")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3],
                   help="ZeRO stage of the start-up run")
    p.add_argument("--workdir", default=None, help="keep data and runs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir at the end")
    return p


def write_corpus(path: str, n_docs: int, seed: int) -> str:
    """Synthetic plain-text documents (JSONL, column `text`), 10-60 words each."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(600)})
    with open(path, "w") as f:
        for _ in range(n_docs):
            sentence = " ".join(rng.choices(words, k=rng.randint(10, 60)))
            f.write(json.dumps({"text": sentence + "."}) + "\n")
    return path


def bench_spec(corpus: str, storage: str, args, stage: int, method: str, name: str):
    """The run config every variant follows: small-llama, causal LM, fp32; full or LoRA."""
    from trainers.config_load import build_spec

    windows = -(-args.steps // args.report_every)
    return build_spec({
        "run": {"name": name, "storage_path": storage, "resume": "never"},
        "model": {"preset": "small-llama"},
        "method": method,
        "lora": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "task": {"type": "causal_lm"},
        "data": {"train_files": [corpus], "max_seq_length": args.max_seq_length,
                 "validation_fraction": 0.05},
        "train": {"max_steps": (windows + 1) * args.report_every,
                  "micro_batch_size_per_worker": args.micro_batch,
                  "eval_every_n_steps": args.report_every, "log_every_n_steps": args.report_every,
                  "eval_before_training": False, "precision": "fp32"},
        "deepspeed": {"zero_stage": stage},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 1},
    })


def measure_ferry(spec, threads: int) -> tuple[dict, str]:
    """Ferry's per-window median step times (warm-up window dropped) and the cached train rows."""
    import ray

    from trainers.data.prepare import prepare_dataset
    from trainers.preflight import prepare_run
    from trainers.storage import STATE_FILE
    from trainers.train.launch import train

    ray_tmp = tempfile.mkdtemp(prefix="/tmp/ferry-bench-ray-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
             _temp_dir=ray_tmp)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        # Prepared once here so the baselines read the very rows Ferry trains on; train() then
        # finds the cache and skips preprocessing.
        data = prepare_dataset(spec)
        print(f"[bench] data: {data.train_rows} train rows of {spec.data.max_seq_length} tokens",
              flush=True)
        load, t0 = os.getloadavg()[0], time.perf_counter()
        # Ray would give a 1-CPU worker OMP_NUM_THREADS=1 anyway; set it so every variant matches.
        outcome = train(prepare_run(spec), worker_env={"OMP_NUM_THREADS": str(threads)})
        print(f"[bench] ferry: train() took {time.perf_counter() - t0:.1f}s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with open(os.path.join(outcome.checkpoint_path, STATE_FILE)) as f:
        history = json.load(f)["history"]
    times = [h["train/step_time_s"] for h in history if "train/step_time_s" in h]
    if len(times) < 2:
        raise RuntimeError(
            f"ferry_state.json has {len(times)} reports with train/step_time_s; need >= 2 "
            "(is trainers/loop.py reporting it?)"
        )
    waits = [h["train/ingest_wait_share"] for h in history if "train/ingest_wait_share" in h]
    return ({"windows": times[1:], "threads": threads, "load": load, "ingest": waits[1:]},
            data.train_path)


def measure_baselines(spec, train_path: str, args, stage: int, rnd: int) -> list[dict]:
    """(a), (b), (c): each in a fresh process, so no torch.distributed or accelerate state, env
    var or thread setting leaks from one variant into the next."""
    kw = {"spec_dict": spec.model_dump(), "train_path": train_path, "threads": args.threads,
          "out_dir": os.path.join(os.path.dirname(spec.run_dir), "baselines"),
          "warmup": args.report_every, "window": args.report_every,
          "steps": spec.train.max_steps - args.report_every}
    variants = [
        ("a", f"(a) bare DeepSpeed engine, ZeRO-{stage}", run_deepspeed_loop, {}),
        ("b", "(b) plain PyTorch loop (ZeRO-0)", run_plain_loop, {}),
        ("c", f"(c) HF Trainer + DeepSpeed ZeRO-{stage}", run_hf_trainer, {"use_deepspeed": True}),
    ]
    rows = []
    for key, label, fn, extra in variants[: 2 if args.skip_hf else 3]:
        print(f"[bench] {label} ...", flush=True)
        load = os.getloadavg()[0]
        ok, result = _in_fresh_process(fn, **kw, **extra)
        if ok:
            result["load"] = load
        rows.append(_row(key, label, result, rnd) if ok else _row(key, label, None, rnd, result))
    return rows


def _in_fresh_process(fn, **kwargs) -> tuple[bool, object]:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_guarded, fn, kwargs).result()


def _guarded(fn, kwargs) -> tuple[bool, object]:
    # Not every library exception pickles back to the parent; its text always does.
    try:
        return True, fn(**kwargs)
    except Exception as e:
        last = traceback.format_exception_only(e)[-1].strip()
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return False, last[:600]


def run_plain_loop(spec_dict, train_path, threads, out_dir, warmup, window, steps) -> dict:
    """(b): forward, backward, clip, AdamW step, LR step. Returns window medians after warm-up."""
    spec, tokenizer = _setup_child(spec_dict, train_path, threads)
    import torch

    from trainers.model import build_model

    model = build_model(spec, tokenizer, None)
    model.train()
    optimizer = _adamw(model, spec)
    schedule = _linear_decay(optimizer, warmup + steps)
    batches = load_batches(train_path, spec.train.micro_batch_size_per_worker)
    marks = [time.perf_counter()]
    for i in range(warmup + steps):
        loss = model(**batches[i % len(batches)], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    return {"windows": window_medians(marks, warmup, window), "threads": torch.get_num_threads()}


def run_deepspeed_loop(spec_dict, train_path, threads, out_dir, warmup, window, steps) -> dict:
    """(a): the DeepSpeed engine with Ferry's generated config, in a minimal loop."""
    spec, tokenizer = _setup_child(spec_dict, train_path, threads)
    import deepspeed
    import torch

    from trainers.model import build_model
    from trainers.train.ds_config import build_ds_config

    _init_single_process_gloo()
    ds_config = build_ds_config(spec)
    model = build_model(spec, tokenizer, None, ds_config)
    optimizer = _adamw(model, spec)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=_linear_decay(optimizer, warmup + steps),
        config=ds_config, dist_init_required=False,
    )
    engine.train()
    batches = load_batches(train_path, spec.train.micro_batch_size_per_worker)
    marks = [time.perf_counter()]
    for i in range(warmup + steps):
        loss = engine(**batches[i % len(batches)], use_cache=False).loss
        engine.backward(loss)
        engine.step()
        marks.append(time.perf_counter())
    return {"windows": window_medians(marks, warmup, window), "threads": torch.get_num_threads()}


def run_hf_trainer(spec_dict, train_path, threads, out_dir, warmup, window, steps,
                   use_deepspeed: bool) -> dict:
    """(c): `transformers.Trainer` on the same rows; with Ferry's DeepSpeed config if asked."""
    spec, tokenizer = _setup_child(spec_dict, train_path, threads)
    import torch
    import transformers

    from trainers.model import build_model
    from trainers.train.ds_config import build_ds_config

    if use_deepspeed:
        _init_single_process_gloo()
    model = build_model(spec, tokenizer, None)
    rows = load_rows(train_path)
    marks: list[float] = []

    class _StepClock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    targs = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "hf-trainer"),
        per_device_train_batch_size=spec.train.micro_batch_size_per_worker,
        gradient_accumulation_steps=spec.grad_accum,
        max_steps=warmup + steps,
        learning_rate=spec.train.learning_rate,
        weight_decay=spec.train.weight_decay,
        max_grad_norm=spec.train.max_grad_norm,
        lr_scheduler_type="linear",
        optim="adamw_torch",  # plain torch AdamW like Ferry; the default is the fused variant
        use_cpu=True,
        deepspeed=build_ds_config(spec) if use_deepspeed else None,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=spec.run.seed,
    )
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=rows,
                                   callbacks=[_StepClock()])
    trainer.train()
    return {"windows": window_medians(marks, warmup, window), "threads": torch.get_num_threads()}


def _setup_child(spec_dict, train_path, threads):
    """First call of every baseline: thread count, the run config, Ferry's cached tokenizer."""
    # Set before torch is imported, and kept in the environment: accelerate (under HF Trainer)
    # resets torch to every core when OMP_NUM_THREADS is unset, which would favour (c).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from trainers.config import RunSpec
    from trainers.model import load_tokenizer

    torch.set_num_threads(threads)
    spec = RunSpec.model_validate(spec_dict)
    tokenizer = load_tokenizer(os.path.join(os.path.dirname(train_path), "tokenizer"))
    return spec, tokenizer


def _adamw(model, spec):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay)


def _linear_decay(optimizer, total: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))


def _init_single_process_gloo() -> None:
    """torch.distributed with gloo, world size 1, as a DeepSpeed launcher would set it up."""
    import deepspeed

    from trainers.train.loop import skip_unused_shm_build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    skip_unused_shm_build()  # the same patch Ferry's workers apply
    deepspeed.init_distributed("gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_rows(train_path: str) -> list[dict]:
    """Ferry's cached packed rows as tensors: input_ids, labels, position_ids (full length)."""
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(train_path, columns=["input_ids", "labels", "position_ids"])
    return [{k: torch.tensor(v, dtype=torch.long) for k, v in r.items()} for r in table.to_pylist()]


def load_batches(train_path: str, micro: int) -> list[dict]:
    """Micro-batches stacked in advance, so the bare loops time compute only. Like Ferry's
    collate for packed rows: no attention_mask, so restarting position_ids keep documents apart."""
    import torch

    rows = load_rows(train_path)
    return [{k: torch.stack([r[k] for r in rows[i:i + micro]]) for k in rows[0]}
            for i in range(0, len(rows) - micro + 1, micro)]


def window_medians(marks: list[float], warmup: int, window: int) -> list[float]:
    """Step times from consecutive end-of-step timestamps, warm-up dropped, median per window."""
    times = [b - a for a, b in zip(marks, marks[1:])][warmup:]
    return [statistics.median(times[i:i + window]) for i in range(0, len(times), window)]


def measure_startup(work: str, args) -> list[dict]:
    """`ferry train` as a user first runs it (cold preprocessing cache); then warm if asked."""
    corpus = write_corpus(os.path.join(work, "startup.jsonl"), 300, seed=1)
    config = os.path.join(work, "startup.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({
            "run": {"name": "startup-cold", "storage_path": os.path.join(work, "startup-runs")},
            "model": {"preset": "tiny-llama"},
            "method": "full",
            "task": {"type": "causal_lm"},
            "data": {"train_files": [corpus], "max_seq_length": 64},
            "train": {"max_steps": args.startup_max_steps, "micro_batch_size_per_worker": 8,
                      "log_every_n_steps": 1, "eval_every_n_steps": args.startup_max_steps,
                      "eval_before_training": False},
            "deepspeed": {"zero_stage": args.zero_stage},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 1},
        }, f)
    out = []
    for name in ("startup-cold", "startup-warm")[: 2 if args.startup_warm else 1]:
        print(f"[bench] `ferry train` start-up ({name}) ...", flush=True)
        out.append({"name": name, **_time_cli(config, name, work)})
    return out


def _time_cli(config: str, run_name: str, work: str) -> dict:
    ferry = os.path.join(os.path.dirname(sys.executable), "ferry")
    env = dict(os.environ, PYTHONUNBUFFERED="1",  # else the first step line waits in a pipe buffer
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ferry-bench-", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)  # always the embedded Ray, never a cluster found in the env
    load, t0 = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.Popen([ferry, "train", config, "--set", f"run.name={run_name}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, tail, timeline = None, [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        if first_step is None and "[ferry]" in line:
            # Where start-up goes: when each of Ferry's lines before the first step arrived.
            timeline.append((time.perf_counter() - t0, line.strip()[:150]))
        if first_step is None and "[ferry] step " in line:
            first_step = time.perf_counter() - t0
        tail = (tail + [line.rstrip()])[-15:]
    rc = proc.wait()
    total = time.perf_counter() - t0
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    if rc != 0:
        print("\n".join(tail), file=sys.stderr)
    return {"first_step_s": first_step, "total_s": total, "rc": rc, "load": load,
            "timeline": timeline}


def _row(key: str, label: str, result: dict | None, rnd: int, error: str | None = None) -> dict:
    result = result or {}
    windows = result.get("windows")
    return {"key": key, "label": label, "windows": windows, "error": error, "round": rnd,
            "median_s": statistics.median(windows) if windows else None,
            "threads": result.get("threads"), "load": result.get("load"),
            "ingest": result.get("ingest")}


def print_report(tables: dict[str, list[dict]], startup: list[dict], args, wall_s: float,
                 load_before) -> None:
    """Per setting: each variant's median over rounds (of each run's median window), the spread
    over rounds, and Ferry's ratio to it: over the medians, and the median of the per-round
    ratios (each pairs runs minutes apart, the point of interleaving)."""
    print(f"\n## Step time: {args.rounds} interleaved rounds; a run's figure is the median of "
          f"its {args.report_every}-step window medians after a {args.report_every}-step warm-up "
          f"({args.steps} measured steps)")
    print(f"micro-batch {args.micro_batch} x {args.max_seq_length} tokens, small-llama, fp32, "
          f"1 worker, {args.threads} torch thread(s); LoRA rank 8 on q/k/v/o\n")
    print("| setting | variant | median step (ms) | per-round medians (ms) | load (per round) "
          "| ferry / variant (medians) | ferry / variant (median of per-round ratios) |")
    print("|---|---|---:|---|---|---:|---:|")
    for setting, rows in tables.items():
        ferry = {r["round"]: r for r in rows if r["key"] == "ferry" and not r["error"]}
        for key in ("ferry", "a", "b", "c"):
            mine = [r for r in rows if r["key"] == key]
            if not mine:
                continue
            label = mine[0]["label"]
            ok = [r for r in mine if not r["error"]]
            if not ok:
                print(f"| {setting} | {label} | not measured | `{mine[0]['error']}` | - | - | - |")
                continue
            med = statistics.median(r["median_s"] for r in ok)
            per_round = " ".join(f"{r['median_s'] * 1e3:.0f}" for r in ok)
            loads = " ".join(f"{r['load']:.1f}" for r in ok)
            if key == "ferry":
                ratios = ["-", "-"]
            else:
                f_med = statistics.median(r["median_s"] for r in ferry.values())
                paired = [ferry[r["round"]]["median_s"] / r["median_s"] for r in ok
                          if r["round"] in ferry]
                ratios = [f"{f_med / med:.3f}",
                          f"{statistics.median(paired):.3f} ({min(paired):.2f}-{max(paired):.2f})"]
            print(f"| {setting} | {label} | {med * 1e3:.1f} | {per_round} | {loads} "
                  f"| {' | '.join(ratios)} |")
    for setting, rows in tables.items():
        shares = [w for r in rows if r["key"] == "ferry" and r["ingest"] for w in r["ingest"]]
        if shares:
            print(f"\n{setting}: Ferry's train/ingest_wait_share over its windows after warm-up: "
                  f"median {statistics.median(shares):.2%}, max {max(shares):.2%}")
    print("\n(load: the machine's 1-minute load average when each run started; "
          f"{os.cpu_count()} cores. Ratios above 1: Ferry is slower.)")
    if startup:
        print("\n## `ferry train` start-up (tiny-llama, 1 worker, embedded Ray with dashboard)\n")
        print("| run | process start -> first `[ferry] step` line (s) | total wall (s) | exit "
              "| load at start |")
        print("|---|---:|---:|---:|---:|")
        for s in startup:
            first = "not seen" if s["first_step_s"] is None else f"{s['first_step_s']:.1f}"
            print(f"| {s['name']} | {first} | {s['total_s']:.1f} | {s['rc']} | {s['load']:.1f} |")
        for s in startup:
            print(f"\n{s['name']}: seconds after process start at which each line arrived\n")
            for t, line in s["timeline"]:
                print(f"    {t:6.1f}  {line}")
    print("\n## Machine\n")
    for line in machine_description(load_before):
        print(f"- {line}")
    print(f"- bench wall time: {wall_s:.0f}s")


def machine_description(load_before) -> list[str]:
    """CPU, cores, memory, library versions and the load average around the run."""
    from importlib.metadata import version

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    load_after = os.getloadavg()
    return [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, {mem_kb / 2**20:.0f} GiB RAM",
        f"python {platform.python_version()}, "
        + ", ".join(f"{m} {version(m)}" for m in ("torch", "deepspeed", "ray", "transformers",
                                                     "accelerate", "pyarrow")),
        f"load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}",
    ]


if __name__ == "__main__":
    sys.exit(main())
