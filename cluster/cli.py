"""The `ferry` command line: validate, plan, preprocess, train, export, eval, predict, analyze,
tune, runs, compare, submit, jobs, k8s.

`main` is the entry point. Every argument is parsed here; the commands call plain library
functions (`cluster.jobs`, `cluster.k8s`, `cluster.session`, `trainers`, `tuning`) with typed
arguments. Every command that reads a run config takes it the same way: a YAML file and any number
of `--set key.path=value` overrides. Errors end in one clear message and a non-zero exit
(2: bad input, 1: the run failed); `--debug` shows the tracebacks. The terminal shows Ferry's own
lines; what Ray, DeepSpeed, transformers and the rest print (a failed worker's traceback, Ray
Train's report of it) goes to the run's `logs/` folder (`cluster.terminal`), unless `--verbose`
or `--debug`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

from cluster.jobs import (
    DEFAULT_ADDRESS,
    follow_job,
    job_logs,
    job_status,
    list_jobs,
    resolve_address,
    stop_job,
    submit_job,
)
from cluster.k8s import COMMANDS, dump_manifests, render_manifests
from cluster.session import (
    EMBEDDED_EXTRA_CPUS,
    check_embedded_cpus,
    cpus_needed,
    ray_session,
    starts_embedded,
)
from trainers import __version__

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ferry` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[ferry] %(message)s")
    for noisy in ("ray", "deepspeed", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # Restored on the way out of the block, before an error is printed.
        with _terminal(args) as args.terminal:
            return args.func(args)
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear message, no traceback, unless --debug
        if args.debug:
            raise
        code = EXIT_CONFIG if _is_input_error(e) else EXIT_FAILED
        print(f"ferry: error: {e}", file=sys.stderr)
        return code


def _is_input_error(e: Exception) -> bool:
    from trainers.errors import ConfigError, DataError

    return isinstance(e, ConfigError | DataError)


def build_parser() -> argparse.ArgumentParser:
    """The whole `ferry` command line; each subcommand's `func` runs it."""
    p = argparse.ArgumentParser(prog="ferry", description="Transfer learning on Ray clusters.")
    p.add_argument("--version", action="version", version=f"ferry {__version__}")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        add_config_args(sp)
        sp.add_argument("--debug", action="store_true", help=_DEBUG_HELP)

    def ray_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--address",
            default=None,
            help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)",
        )
        sp.add_argument(
            "--num-cpus",
            type=int,
            default=None,
            metavar="N",
            help="logical CPUs the embedded local Ray declares (default: what the run needs, "
            f"refused beyond the machine's cores + {EMBEDDED_EXTRA_CPUS}: a larger ask is "
            "usually a typo in scaling.num_workers); ignored with --address",
        )
        verbose_opt(sp)

    v = sub.add_parser(
        "validate", help="check a config and its data files; print the resolved config"
    )
    common(v)
    v.set_defaults(func=cmd_validate)

    pp = sub.add_parser(
        "preprocess",
        help="build (or reuse) the preprocessed data cache as `ferry train` would, without "
        "training; print its counts and the first rows with their loss-bearing tokens marked",
        description="Prepare the run's data exactly as `ferry train` does (same cache key: a "
        "following `ferry train` reuses it), then print the counts (rows, tokens, bad rows, "
        "cache) and the first --show rows of the train split, decoded with the cache's "
        "tokenizer: loss-bearing tokens in colour on a terminal, else inside [[...]]; "
        "classification rows show their label.",
    )
    common(pp)
    ray_opts(pp)
    pp.add_argument(
        "--show", type=int, default=3, metavar="N", help="rows shown (default 3; 0: none)"
    )
    pp.add_argument(
        "--json",
        action="store_true",
        help="JSON lines on stdout and nothing else: first the counts "
        '({"summary": true, "train_rows": ..., "cache_hit": ..., ...}), then one object per '
        "row shown (row, text, segments, loss_spans, loss_text, tokens, loss_tokens; label "
        "for classification, target for encoder-decoder rows)",
    )
    pp.set_defaults(func=cmd_preprocess)

    pl = sub.add_parser(
        "plan",
        help="GPU memory per ZeRO stage, offload and micro-batch: what fits, and the cheapest "
        "--set line that does (meta device: no weights load, no Ray)",
        description="Per-GPU bytes of parameters, gradients, optimizer states, DeepSpeed buffers "
        "and activations for ZeRO stages 0-3 with and without CPU offload over a range of "
        "micro-batches, computed on the meta device (trainers.train.plan documents the formulas). "
        "Shows the config's own row, the largest fitting micro-batch of every stage/offload "
        "combination, and the cheapest fit (fewest offloads, then largest micro-batch, then "
        "lowest stage) as a --set line that keeps the global batch.",
    )
    common(pl)
    pl.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="GPUs (= ranks, one worker per GPU) to plan for (default scaling.num_workers)",
    )
    pl.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GiB, 80GB, 81920MiB (default: this machine's GPU, "
        "if any; without it nothing is judged to fit)",
    )
    pl.add_argument("--json", action="store_true", help="the whole plan as JSON on stdout")
    pl.set_defaults(func=cmd_plan)

    t = sub.add_parser("train", help="fine-tune: prepare data, train, evaluate, export")
    common(t)
    ray_opts(t)
    t.add_argument("--merge", action="store_true", help="also write the LoRA-merged model")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser(
        "export",
        help="export a committed checkpoint of a finished or interrupted run (HF format)",
        description="Export one committed checkpoint of the run in RUN_DIR "
        "(<run.storage_path>/<run.name>) like a finished run's final/: the config the run "
        "started with (RUN_DIR/ferry_run.yaml) and its prepared data are reused. Default output: "
        "RUN_DIR/final for best or last, RUN_DIR/export-step-STEP for a step.",
    )
    x.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder")
    x.add_argument(
        "--checkpoint",
        default="best",
        metavar="best|last|STEP",
        help="best (by train.best_metric, the default), last, or an optimizer step",
    )
    x.add_argument("--merge", action="store_true", help="also write the LoRA-merged model")
    x.add_argument(
        "--output", default=None, metavar="DIR", help="new or empty folder, or an earlier export"
    )
    x.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    ray_opts(x)
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="evaluate a checkpoint or export on the validation data")
    common(e)
    ray_opts(e)
    e.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="<run>/final or a checkpoint_step_* folder; repeat it to compare several in one "
        "evaluation (data prepared and workers started once)",
    )
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "predict", help="batch prediction with a checkpoint or export over input files"
    )
    common(pr)
    ray_opts(pr)
    pr.add_argument("--checkpoint", required=True, help="<run>/final or a checkpoint_step_* folder")
    pr.add_argument(
        "--input",
        dest="inputs",
        action="append",
        required=True,
        metavar="FILE_OR_GLOB",
        help="JSONL/CSV/Parquet file(s) with the config's text column; repeatable",
    )
    pr.add_argument(
        "--output", required=True, metavar="DIR", help="new or empty folder for Parquet"
    )
    pr.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    pr.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated per row: causal_lm greedy (default 32); summarization "
        "and generative QA (default generation.max_new_tokens)",
    )
    pr.add_argument(
        "--num-actors", type=int, default=None, help="model replicas (default scaling.num_workers)"
    )
    pr.set_defaults(func=cmd_predict)

    an = sub.add_parser(
        "analyze",
        help="domain-shift report before training: perplexity, "
        "tokenizer fertility/UNK, embedding distance, label balance",
    )
    common(an)
    an.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="FILE_OR_GLOB",
        help="source-domain text (pretraining-like); default: a built-in English sample",
    )
    an.add_argument(
        "--output",
        default=None,
        metavar="FILE.json",
        help="where the JSON report goes (default <storage_path>/<run.name>/domain_shift.json)",
    )
    an.add_argument("--max-rows", type=int, default=128, help="rows sampled per side (default 128)")
    verbose_opt(an)
    an.set_defaults(func=cmd_analyze)

    se = sub.add_parser(
        "select",
        help="rank candidate base models for the run's task with cheap transfer signals "
        "(frozen-feature probe, LogME, base perplexity, tokenizer fertility, cost)",
    )
    common(se)
    se.add_argument(
        "--candidates",
        nargs="+",
        required=True,
        metavar="MODEL",
        help="base models: Hub ids, local folders, .gguf files, python-package: references, "
        "preset:NAME",
    )
    se.add_argument(
        "--budget-rows",
        type=int,
        default=None,
        metavar="N",
        help="rows read per split for the signals (default 1000)",
    )
    se.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="where select.json and selected.yaml go (default <storage_path>/<run.name>/select)",
    )
    se.add_argument("--json", action="store_true", help="print the ranking as JSON")
    ray_opts(se)
    se.set_defaults(func=cmd_select)

    tu = sub.add_parser(
        "tune", help="search hyperparameters (the config's tune: block) with Ray Tune"
    )
    add_config_args(tu, config_nargs="?")  # optional: `--report DIR` needs no config
    tu.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    ray_opts(tu)
    tu.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search of the same tune.name/storage_path",
    )
    tu.add_argument(
        "--report",
        metavar="EXPERIMENT_DIR",
        default=None,
        help="only rebuild the report (table, CSV, best.yaml, plots) of a search folder",
    )
    tu.set_defaults(func=cmd_tune)

    _add_runs_parsers(sub)
    _add_k8s_parser(sub)
    _add_jobs_parsers(sub)
    return p


def _add_runs_parsers(sub: argparse._SubParsersAction) -> None:
    """`ferry runs [PATH]` and `ferry compare RUN RUN ...`: read run folders, start nothing."""
    rs = sub.add_parser(
        "runs",
        help="table of the runs under a storage path (status, steps, best metric, export)",
        description="List every run under STORAGE_PATH (a run.storage_path; search trials "
        "included) from the files the runs left: name, status (finished, stopped early, failed, "
        "interrupted, running?), method, task, steps done/total, best metric and its step, "
        "start, wall time, export. A run folder lists that run alone.",
    )
    rs.add_argument(
        "path",
        nargs="?",
        default="./ferry-runs",
        metavar="STORAGE_PATH",
        help="a run.storage_path or one run's folder (default ./ferry-runs)",
    )
    rs.add_argument(
        "--curves",
        action="store_true",
        help="also redraw each listed run's report/curves.png from its metrics and print the path",
    )
    rs.add_argument("--json", action="store_true", help="one JSON object per run, nothing else")
    rs.add_argument("--debug", action="store_true", help="show tracebacks")
    rs.set_defaults(func=cmd_runs)

    cp = sub.add_parser(
        "compare",
        help="config differences and final metrics of runs side by side, curves overlaid",
    )
    cp.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders, or run names under --storage-path"
    )
    cp.add_argument(
        "--storage-path",
        default="./ferry-runs",
        help="where run names are looked up (default ./ferry-runs)",
    )
    cp.add_argument(
        "--output",
        default=None,
        metavar="FILE.png",
        help="the overlay plot (default <storage of the first run>/compare/<runs>.png)",
    )
    cp.add_argument("--debug", action="store_true", help="show tracebacks")
    cp.set_defaults(func=cmd_compare)


def _add_k8s_parser(sub: argparse._SubParsersAction) -> None:
    """`ferry k8s render CONFIG ...`."""
    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests for a run")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    r = k8s_sub.add_parser(
        "render",
        help="print the ConfigMap + RayJob (+ RayCluster) that run CONFIG on KubeRay",
        description="Print Kubernetes YAML for `kubectl apply -f -`. See k8s/README.md.",
    )
    add_config_args(r)
    r.add_argument(
        "--image",
        default=None,
        help="container image with Ferry installed, tagged with its Ray version",
    )
    r.add_argument("--namespace", default="default", help="namespace of every object")
    r.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="override scaling.gpus_per_worker (pods and config)",
    )
    # dest: `command` is taken by the top-level subcommand of `ferry`.
    r.add_argument(
        "--command",
        dest="run_command",
        choices=COMMANDS,
        default="train",
        help="ferry command to run",
    )
    r.add_argument(
        "--with-cluster",
        action="store_true",
        help="also render a long-lived autoscaling RayCluster that the RayJob selects",
    )
    r.add_argument(
        "--ray-version",
        default=None,
        help="Ray version of the image, when its tag does not start with one",
    )
    r.add_argument(
        "--mount-path",
        default=None,
        help="where the shared PVC is mounted (default: run.storage_path)",
    )
    r.add_argument(
        "--memory-per-worker",
        default=None,
        help="memory of each worker pod, e.g. 64Gi (default: from CPUs and GPUs)",
    )
    r.add_argument(
        "--deadline-s",
        type=int,
        default=86400,
        help="RayJob activeDeadlineSeconds (default: one day)",
    )
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(func=cmd_k8s_render)


def _add_jobs_parsers(sub: argparse._SubParsersAction) -> None:
    """`ferry submit CONFIG ...` and `ferry jobs list|status|logs|stop`."""

    def cluster_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--address",
            default=None,
            help=f"the cluster's Jobs API (default: RAY_JOB_ADDRESS or RAY_ADDRESS if http(s), "
            f"else {DEFAULT_ADDRESS})",
        )
        sp.add_argument(
            "--token-file",
            default=None,
            help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
        )
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    s = sub.add_parser(
        "submit",
        usage="ferry submit CONFIG [options] [-- [train|tune] [ARGS ...]]",
        help="run `ferry train CONFIG` (or tune) as a job on a Ray cluster",
        description="Validate CONFIG here, ship it with its local data files and this Ferry to a "
        "Ray cluster, and run `ferry train` there. Arguments after `--` go to the command on the "
        "cluster: `-- tune ...`, `-- --merge`.",
    )
    # argparse cannot put `-- ARGS` after options that follow a positional; split it off first.
    s.__class__ = _ArgsAfterDoubleDash
    add_config_args(s)
    s.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 if it SUCCEEDED, else 1",
    )
    s.add_argument(
        "--env",
        dest="env_names",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable (e.g. HF_TOKEN) to the job; repeatable",
    )
    s.add_argument(
        "--env-file",
        default=None,
        metavar="FILE",
        help="pass the NAME=value lines of this dotenv-style file to the job",
    )
    s.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="extra pip requirement installed for the job; repeatable",
    )
    cluster_opts(s)
    s.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = jobs_sub.add_parser("list", help="every job: id, status, start time, command")
    cluster_opts(ls)
    ls.set_defaults(func=cmd_jobs_list)
    st = jobs_sub.add_parser("status", help="a job's status and message")
    st.add_argument("job_id")
    cluster_opts(st)
    st.set_defaults(func=cmd_jobs_status)
    lg = jobs_sub.add_parser("logs", help="a job's output so far, or --follow it until it ends")
    lg.add_argument("job_id")
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    cluster_opts(lg)
    lg.set_defaults(func=cmd_jobs_logs)
    sp = jobs_sub.add_parser("stop", help="stop a job and wait until it has stopped")
    sp.add_argument("job_id")
    cluster_opts(sp)
    sp.set_defaults(func=cmd_jobs_stop)


_VERBOSE_HELP = (
    "show everything Ray, Ray Data, Ray Train, DeepSpeed, transformers and torch print, on the "
    "driver and from every worker (default: Ferry's own lines only; the rest goes to "
    "<storage_path>/<run.name>/logs/)"
)


_DEBUG_HELP = (
    "show tracebacks: the driver's, and what the libraries print (Ray's report of a failed "
    "worker, with its traceback) as --verbose does"
)


def verbose_opt(sp: argparse.ArgumentParser) -> None:
    """`--verbose` after the command too (`ferry train CONFIG --verbose`); SUPPRESS keeps the
    subcommand from resetting `ferry --verbose train ...`. Marks the commands whose library
    output goes to a log file by default."""
    sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    sp.set_defaults(library_logs=True)


def _terminal(args) -> contextlib.AbstractContextManager:
    """A quiet terminal for the commands that start Ray or load models (`cluster.terminal`),
    unless --verbose or --debug (the tracebacks a failed run's workers and Ray Train print are
    library output); the command moves its log into the run's folder (`_keep_logs_in`)."""
    if args.verbose or getattr(args, "debug", False) or not getattr(args, "library_logs", False):
        return contextlib.nullcontext()
    from cluster.terminal import QuietTerminal

    return QuietTerminal(args.command)


def _keep_logs_in(args, run_dir: str) -> None:
    """The command's library output, so far and from now on, in `<run_dir>/logs/`. Called once
    the run's checks passed, so a mistyped config leaves no folder behind."""
    from trainers.storage import LOGS_DIR, join

    terminal = getattr(args, "terminal", None)
    if terminal is not None:
        terminal.log_to(join(run_dir, LOGS_DIR))


def _require(problems: list[str]) -> None:
    from trainers.errors import ConfigError

    if problems:
        raise ConfigError(problems)


def _ray_session(
    args,
    scaling,
    *,
    workers: int | None = None,
    workers_key: str = "scaling.num_workers",
    trial_cpus: float = 0.0,
    label: str = "",
) -> contextlib.AbstractContextManager:
    """The command's `ray_session`, sized for `workers` (default scaling.num_workers; 0: Ray
    Data alone). An embedded Ray that would have to declare more CPUs than the machine allows
    (`check_embedded_cpus`) is refused here, before it starts, unless --num-cpus says how many."""
    if args.num_cpus is not None and args.num_cpus < 1:
        _require([f"--num-cpus={args.num_cpus}: must be >= 1. Leave it out to size by the run."])
    if not starts_embedded(args.address):
        if args.num_cpus is not None:
            logging.getLogger("ferry.cluster").warning(
                "--num-cpus=%d is ignored: Ray is already running (--address, RAY_ADDRESS).",
                args.num_cpus,
            )
    elif args.num_cpus is None:
        problems = check_embedded_cpus(
            scaling, workers=workers, workers_key=workers_key, trial_cpus=trial_cpus
        )
        _require([f"{label}: {p}" if label else p for p in problems])
    return ray_session(
        args.address,
        needed_cpus=cpus_needed(scaling, workers=workers, trial_cpus=trial_cpus),
        num_cpus=args.num_cpus,
    )


class _ArgsAfterDoubleDash(argparse.ArgumentParser):
    """Moves everything after the first `--` into `command_args` before normal parsing."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        rest: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, rest = args[:i], args[i + 1 :]
        ns, extra = super().parse_known_args(args, namespace)
        ns.command_args = rest
        return ns, extra


def add_config_args(sp: argparse.ArgumentParser, config_nargs: str | None = None) -> None:
    """CONFIG and `--set`: every command that reads a run config takes them the same way."""
    sp.add_argument("config", nargs=config_nargs, help="YAML run config")
    sp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=3e-4",
    )


def cmd_validate(args) -> int:
    from trainers.config_load import dump_spec, load_config
    from trainers.errors import ConfigError
    from trainers.model import check_checkpointing, check_lora_fits, load_tokenizer_for
    from trainers.preflight import check_run
    from trainers.stages import check_stages

    spec = load_config(args.config, args.overrides)
    if spec.stages:
        check_stages(spec)
        print(dump_spec(spec), end="")
        return 0
    problems = check_run(spec)
    tokenizer = None if spec.model.preset else load_tokenizer_for(spec, None)
    labels = spec.task.labels or (
        ["a", "b"] if spec.task.type == "sequence_classification" else None
    )
    problems += check_lora_fits(spec, tokenizer, labels)
    problems += check_checkpointing(spec, tokenizer, labels)
    if problems:
        raise ConfigError(problems)
    print(dump_spec(spec), end="")
    return 0


def cmd_preprocess(args) -> int:
    from trainers.config_load import load_config
    from trainers.data.files import check_data
    from trainers.data.inspect import format_summary, print_samples, sample_rows, summarize
    from trainers.errors import ConfigError
    from trainers.preflight import check_writable, prepare_checked_data

    spec = load_config(args.config, args.overrides)
    if spec.stages:
        raise ConfigError(
            [
                f"stages={[s.name for s in spec.stages]}: a staged config's data is prepared "
                "stage by stage in `ferry train` (a later stage reads the earlier one's "
                "tokenizer). Put one stage's settings in a config without stages: to preprocess "
                "it."
            ]
        )
    problems = check_data(spec) + check_writable(spec)
    if args.show < 0:
        problems.append(f"--show={args.show}: must be >= 0. Use 0 to show no rows.")
    if problems:  # files and columns fail in a second, before Ray starts
        raise ConfigError(problems)
    # No training workers: Ray Data has the cluster (an embedded Ray: the machine's CPUs).
    session = _ray_session(args, spec.scaling, workers=0)
    _keep_logs_in(args, spec.run_dir)
    with _stdout_to_stderr(), session:
        data = prepare_checked_data(spec)
    summary, samples = summarize(data), sample_rows(data, args.show)
    if args.json:
        for record in [{"summary": True, **summary}, *samples]:
            print(json.dumps(record))
        return 0
    print("\n".join(format_summary(summary)), flush=True)
    print_samples(samples, color=sys.stdout.isatty())
    return 0


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Whatever is printed in the block goes to stderr, so that stdout carries only the
    command's own output (`ferry preprocess --json` is read by scripts). Redirected at the file
    descriptor too: a preset's tokenizer trainer (Rust) writes its progress bar's newlines to
    fd 1, below Python's sys.stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def cmd_plan(args) -> int:
    import warnings

    from trainers.config_load import load_config
    from trainers.stages import stage_specs
    from trainers.train.plan import parse_bytes, plan_run

    if args.gpus is not None and args.gpus < 1:
        _require([f"--gpus={args.gpus}: must be >= 1. Leave it out to plan scaling.num_workers."])
    memory = parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None
    spec = load_config(args.config, args.overrides)
    if memory is None:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.mem_get_info()[1]
    # transformers' deprecation notices from building the meta model are not the user's concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # A later stage trains the earlier stage's output: the top-level model's shape.
        runs = (
            [(label, s.model_copy(update={"model": spec.model})) for label, s in stage_specs(spec)]
            if spec.stages
            else [("", spec)]
        )
        plans = [(label, plan_run(s, gpus=args.gpus, gpu_memory_bytes=memory)) for label, s in runs]
    if args.json:
        out = [dict(plan.to_dict(), stage=label or None) for label, plan in plans]
        print(json.dumps(out[0] if len(out) == 1 else {"stages": out}, indent=2))
        return 0
    for label, plan in plans:
        _print_plan(plan, label)
    return 0


def _print_plan(plan, label: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from trainers.train.plan import GIB, HEADROOM

    memory = (
        f"{plan.gpu_memory_bytes / GIB:.1f} GiB ({1 - HEADROOM:.0%} usable)"
        if plan.gpu_memory_bytes
        else "unknown memory (pass --gpu-memory)"
    )
    print(
        f"{label + ': ' if label else ''}{plan.model}: {plan.trainable_params:,} of "
        f"{plan.total_params:,} parameters trained; sequence {plan.seq_length}, global batch "
        f"{plan.global_batch}; {plan.world} GPU(s) x {memory}. GiB per GPU:"
    )
    table = Table()
    for name in ("", "ZeRO", "offload", "micro", "accum", "params", "grads", "optim",
                 "buffers", "activ", "GPU", "CPU", "fits"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("", "offload") else "right")
    best: dict = {}
    for row in plan.rows:  # the largest fitting micro-batch of each stage/offload combination
        key = (row.zero_stage, row.offload_optimizer, row.offload_params)
        if row.fits and row.gradient_accumulation is not None:
            if key not in best or row.micro_batch > best[key].micro_batch:
                best[key] = row
    shown = [("config", plan.current)] + [
        ("cheapest" if r is plan.cheapest_fit else "fits", r) for r in best.values()
    ]
    for mark, r in shown:
        offload = "+".join(
            n for n, on in (("optimizer", r.offload_optimizer), ("params", r.offload_params)) if on
        )
        gib = [f"{b / GIB:.1f}" for b in (r.params_bytes, r.grads_bytes,
               r.master_bytes + r.optimizer_bytes, r.buffers_bytes, r.activation_bytes,
               r.gpu_bytes, r.cpu_bytes)]  # fmt: skip
        fits = "-" if r.fits is None else ("yes" if r.fits else "NO")
        accum = "-" if r.gradient_accumulation is None else str(r.gradient_accumulation)
        table.add_row(mark, str(r.zero_stage), offload or "none", str(r.micro_batch), accum,
                      *gib, fits)  # fmt: skip
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)
    for note in plan.notes:
        print(f"note: {note}")
    if plan.cheapest_fit_set:
        print(f"cheapest fit: {plan.cheapest_fit_set}")
    elif plan.gpu_memory_bytes:
        print("nothing fits: use more GPUs (--gpus), method=lora, or a smaller model")


def cmd_train(args) -> int:
    from trainers.config_load import load_config
    from trainers.errors import ConfigError
    from trainers.preflight import check_run, prepare_checked_run
    from trainers.train.launch import train

    spec = load_config(args.config, args.overrides)
    if spec.stages:
        return _train_stages(spec, args)
    # Files, columns and the run's history fail in a second, before Ray starts; the cluster's
    # checks follow once it is up.
    problems = check_run(spec)
    if problems:
        raise ConfigError(problems)
    session = _ray_session(args, spec.scaling)
    t0 = time.perf_counter()
    _keep_logs_in(args, spec.run_dir)
    with session:
        outcome = train(prepare_checked_run(spec), merge=args.merge)
    _print_summary(outcome.metrics, time.perf_counter() - t0)
    print(f"model: {outcome.export_dir}")
    _print_tracking(outcome.tracking)
    return 0


def _print_tracking(tracking: dict | None) -> None:
    """Where the run's curves and trackers are; tracking problems were warned about already."""
    if not tracking:
        return
    if tracking.get("curves"):
        print(f"curves: {tracking['curves']}")
    mlflow = tracking.get("mlflow")
    if mlflow and "mlflow" not in tracking.get("problems", {}):
        print(
            f"mlflow: run {mlflow['run_id']} in experiment {mlflow['experiment']} at {mlflow['uri']}"
        )
    if tracking.get("tensorboard") and "tensorboard" not in tracking.get("problems", {}):
        print(f"tensorboard: {tracking['tensorboard']}")


def cmd_export(args) -> int:
    from trainers.data.files import check_data
    from trainers.errors import ConfigError
    from trainers.export import export_checkpoint, export_dtype, find_checkpoint
    from trainers.preflight import check_writable, load_recorded_spec, prepare_checked_data
    from trainers.saved import merge_adapter
    from trainers.storage import join

    which: str | int = args.checkpoint
    if which not in ("best", "last"):
        if not str(which).isdigit():
            raise ConfigError(
                [
                    f"--checkpoint={which}: must be best, last or an optimizer step. "
                    "Use e.g. --checkpoint 40."
                ]
            )
        which = int(which)
    spec = load_recorded_spec(args.run_dir)
    if spec.method == "feature_extraction":
        raise ConfigError(
            [
                f"run={args.run_dir}: method=feature_extraction runs keep no checkpoints; "
                f"their export is {spec.export_dir}. Use that folder."
            ]
        )
    # A missing checkpoint, step or data file fails in a second, before Ray starts.
    step, checkpoint, latest = find_checkpoint(spec, which)
    out = args.output or (
        spec.export_dir if isinstance(which, str) else join(spec.run_dir, f"export-step-{step}")
    )
    problems = check_data(spec) + check_writable(spec) + _check_export_output(args.output)
    if problems:
        raise ConfigError(problems)
    # Only the data cache is read (or rebuilt by Ray Data); no training workers start.
    with _ray_session(args, spec.scaling, workers=0):
        data = prepare_checked_data(spec)
    chosen = which if isinstance(which, str) else "step"
    export_checkpoint(spec, data, checkpoint, out, run_state=latest, export=chosen)
    if args.merge:
        if spec.method == "lora":
            merge_adapter(out, export_dtype(spec, adapter=False))
        else:
            print("ferry: --merge ignored: method=full exports a whole model", file=sys.stderr)
    print(f"step {step} of {latest['step']} ({chosen}) exported: {out}")
    return 0


def _check_export_output(output: str | None) -> list[str]:
    """`ferry export --output` replaces an earlier export there; any other content is refused."""
    from trainers.saved import export_exists
    from trainers.storage import exists

    if output is None or not exists(output) or export_exists(output) or not _has_files(output):
        return []
    return [
        f"--output={output}: the folder holds files that are not a Ferry export, and an export "
        "replaces its folder. Pass a new or empty folder."
    ]


def _has_files(folder: str) -> bool:
    import pyarrow.fs as pafs

    from trainers.storage import filesystem

    fs, path = filesystem(folder)
    try:
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except OSError:  # a file, not a folder
        return True


def _train_stages(spec, args) -> int:
    """A config with `stages:`: run them in order (finished ones skipped, an interrupted one
    resumed)."""
    from trainers.stages import check_stages, run_stages

    plan = check_stages(spec)  # every stage checked before Ray starts
    label, largest = max(plan, key=lambda stage: cpus_needed(stage[1].scaling))
    session = _ray_session(args, largest.scaling, label=label)
    t0 = time.perf_counter()
    _keep_logs_in(args, spec.run_dir)
    with session:
        outcome = run_stages(spec, stages=plan)
    for stage in outcome.stages + ([outcome.baseline] if outcome.baseline else []):
        print(
            f"{stage.name}: {stage.task}/{stage.method} {stage.status} in {stage.wall_s:,.0f}s "
            f"-> {stage.export_dir}"
        )
    ppl = outcome.summary.get("domain_perplexity")
    if ppl:
        print(
            f"domain perplexity ({ppl['stage']}): "
            f"{ppl['before']:.2f} before -> {ppl['after']:.2f} after"
        )
    task = outcome.summary["task_metric"]
    without = task["without_stages"]
    print(
        f"{task['metric']}: {task['with_stages']:.4f} with the earlier stages"
        + (f", {without:.4f} without" if without is not None else "")
    )
    print(f"report: {outcome.report_path} ({time.perf_counter() - t0:,.0f}s)")
    return 0


def cmd_eval(args) -> int:
    from trainers.config_load import load_config
    from trainers.evaluate import evaluate_checkpoints
    from trainers.preflight import check_writable

    spec = load_config(args.config, args.overrides)
    _require(check_writable(spec))  # before Ray starts; the data's checks need it up
    session = _ray_session(args, spec.scaling)
    _keep_logs_in(args, spec.run_dir)
    with session:
        results = evaluate_checkpoints(spec, args.checkpoint)
    # One checkpoint: its metrics; several: {checkpoint: metrics}, in the order given.
    shown = results[0] if len(results) == 1 else dict(zip(args.checkpoint, results, strict=True))
    print(json.dumps(shown, indent=2, sort_keys=len(results) == 1))
    return 0


def cmd_predict(args) -> int:
    from trainers.config_load import load_config
    from trainers.predict import check_predict_inputs, predict_dataset
    from trainers.preflight import check_writable

    spec = load_config(args.config, args.overrides)
    # Missing files, columns or a non-empty output folder fail before Ray starts.
    check_predict_inputs(
        spec, args.checkpoint, args.inputs, args.output, args.batch_size, args.max_new_tokens
    )
    _require(check_writable(spec))  # the data cache and the command's log
    actors = args.num_actors or spec.scaling.num_workers
    key = "--num-actors" if args.num_actors else "scaling.num_workers"
    session = _ray_session(args, spec.scaling, workers=actors, workers_key=key)
    _keep_logs_in(args, spec.run_dir)
    with session:
        summary = predict_dataset(
            spec,
            args.checkpoint,
            args.inputs,
            args.output,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_actors=actors,
        )
    print(summary.line())
    return 0


def cmd_analyze(args) -> int:
    from trainers.analyze import analyze_domain_shift, summarize, write_report
    from trainers.config_load import load_config
    from trainers.preflight import check_writable

    spec = load_config(args.config, args.overrides)
    problems = check_writable(spec)  # the report and the log go under run.storage_path
    if args.max_rows < 1:
        problems.append(f"--max-rows={args.max_rows}: must be >= 1. Use e.g. 128.")
    _require(problems)
    _keep_logs_in(args, spec.run_dir)
    report = analyze_domain_shift(spec, args.source or None, max_rows=args.max_rows)
    path = write_report(report, args.output or f"{spec.run_dir}/domain_shift.json")
    print("\n".join(summarize(report)))
    print(f"report: {path}")
    return 0


def cmd_select(args) -> int:
    from trainers.config_load import load_config
    from trainers.preflight import check_writable
    from trainers.select import (
        DEFAULT_BUDGET_ROWS,
        candidate_specs,
        select_models,
        summarize,
        write_selection,
    )
    from trainers.storage import join

    spec = load_config(args.config, args.overrides)
    budget = args.budget_rows or DEFAULT_BUDGET_ROWS
    _require(check_writable(spec))
    candidate_specs(spec, args.candidates, budget)  # every candidate's problems before Ray
    actors = spec.features.num_actors if spec.task.type == "sequence_classification" else 1
    session = _ray_session(args, spec.scaling, workers=actors, workers_key="features.num_actors")
    _keep_logs_in(args, spec.run_dir)
    with session:
        selection = select_models(spec, args.candidates, budget_rows=budget)
    write_selection(selection, spec, args.output or join(spec.run_dir, "select"))
    if args.json:
        print(json.dumps(selection.to_dict(), indent=2))
    else:
        print("\n".join(summarize(selection)))
        print(f"report: {selection.report_path}")
        print(f"best config: {selection.config_path}")
    return 0


def cmd_tune(args) -> int:
    from trainers.errors import ConfigError

    if args.report:
        from tuning.report import build_report, print_report

        try:
            print_report(build_report(args.report))
        except FileNotFoundError as e:
            raise ConfigError([f"--report={args.report}: {e}"]) from e
        return 0
    if not args.config:
        raise ConfigError(
            [
                "config=None: `ferry tune` needs a run config with a tune: block (or "
                "--report EXPERIMENT_DIR). Pass the YAML file."
            ]
        )
    from trainers.preflight import check_writable
    from tuning.layout import experiment_dir
    from tuning.load import load_search
    from tuning.search import run_search

    search = load_search(args.config, args.overrides)
    _require(check_writable(search.base))  # the search's other checks need Ray up
    session = _ray_session(args, search.base.scaling, trial_cpus=search.tune.trial_cpus)
    _keep_logs_in(args, experiment_dir(search))
    with session:
        outcome = run_search(search, resume=args.resume)
    print(f"search: {outcome.experiment_dir}")
    return 0


def cmd_runs(args) -> int:
    from trainers.runs import list_runs, print_runs, redraw_curves

    rows = list_runs(args.path)
    print_runs(rows, as_json=args.json)
    if args.curves:
        for row in rows:
            path = redraw_curves(row.path)
            print(f"{row.name}: {path or 'no metrics reported yet'}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from trainers.errors import ConfigError
    from trainers.runs import compare_runs, print_comparison, resolve_run
    from trainers.storage import join

    if len(args.runs) < 2:
        raise ConfigError([f"runs={args.runs}: compare needs two runs or more. Name another."])
    run_dirs = [resolve_run(r, args.storage_path) for r in args.runs]
    names = "-vs-".join(d.rstrip("/").rsplit("/", 1)[-1] for d in run_dirs)
    output = args.output or join(
        os.path.dirname(run_dirs[0].rstrip("/")), "compare", f"{names}.png"
    )
    comparison = compare_runs(run_dirs, output)
    print_comparison(comparison)
    print(f"curves: {comparison.plot}")
    return 0


def cmd_k8s_render(args) -> int:
    from trainers.config_load import load_config
    from tuning.load import load_search

    tune_cfg = None
    if args.run_command == "tune":
        # The whole search file: `ferry tune` in the pod reads its tune: block.
        search = load_search(args.config, args.overrides)
        spec, tune_cfg = search.base, search.tune
    else:
        spec = load_config(args.config, args.overrides)
    docs = render_manifests(
        spec,
        args.image,
        namespace=args.namespace,
        gpus_per_worker=args.gpus_per_worker,
        command=args.run_command,
        include_cluster=args.with_cluster,
        ray_version=args.ray_version,
        mount_path=args.mount_path,
        memory_per_worker=args.memory_per_worker,
        active_deadline_s=args.deadline_s,
        tune=tune_cfg,
    )
    sys.stdout.write(f"# ferry k8s render {args.config}: apply with `kubectl apply -f -`\n")
    sys.stdout.write(dump_manifests(docs))
    return 0


def cmd_submit(args) -> int:
    rest = list(args.command_args)
    command = rest.pop(0) if rest and not rest[0].startswith("-") else "train"
    address = resolve_address(args.address)
    job_id = submit_job(
        args.config,
        address=address,
        overrides=args.overrides,
        command=command,
        command_args=rest,
        env_names=args.env_names,
        env_file=args.env_file,
        pip=args.pip,
        token_file=args.token_file,
    )
    print(job_id, flush=True)
    if not args.follow:
        print(f"follow it: ferry jobs logs {job_id} --follow --address {address}", file=sys.stderr)
        return 0
    follow_job(job_id, address, args.token_file)
    return 0


def cmd_jobs_list(args) -> int:
    rows = list_jobs(args.address, args.token_file)
    print(f"{'JOB ID':<32} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for r in rows:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"] / 1000))
            if r["start_time"]
            else "-"
        )
        print(f"{r['id']:<32} {r['status']:<10} {started:<19} {r['entrypoint']}")
    return 0


def cmd_jobs_status(args) -> int:
    status, message = job_status(args.job_id, args.address, args.token_file)
    print(status)
    if message:
        print(message)
    return 0


def cmd_jobs_logs(args) -> int:
    if args.follow:
        follow_job(args.job_id, args.address, args.token_file)
    else:
        sys.stdout.write(job_logs(args.job_id, args.address, args.token_file))
    return 0


def cmd_jobs_stop(args) -> int:
    print(stop_job(args.job_id, args.address, args.token_file))
    return 0


def _print_summary(metrics: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = metrics.get("before") or {}, metrics.get("final") or {}
    # The frozen probe (classification): what the base model's features do without training.
    probe = (metrics.get("probe") or {}).get("metrics") or {}
    table = Table(title=f"ferry: {metrics.get('steps')} steps in {seconds:,.0f}s")
    table.add_column("metric")
    table.add_column("before", justify="right")
    if probe:
        table.add_column("probe", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(k for k in after if k.startswith("eval/")):
        cells = [before.get(key)]
        if probe:
            cells.append(probe.get("probe/" + key.removeprefix("eval/")))
        cells.append(after[key])
        table.add_row(key, *("" if v is None else f"{v:.4f}" for v in cells))
    Console().print(table)
    skipped = (metrics.get("probe") or {}).get("skipped")
    if skipped:
        print(f"frozen probe skipped: {skipped}")
    shares = [
        f"{name} {metrics[key]:.1%}"
        for key, name in (
            ("data/packing_efficiency", "packing efficiency"),
            ("data/whole_document_share", "documents kept whole"),
            ("data/trained_token_share", "loss-bearing tokens"),
        )
        if key in metrics
    ]
    if shares:
        print("training data: " + ", ".join(shares))
    stop = metrics.get("early_stop")
    if stop:
        print(f"stopped early at step {stop['step']}: {stop['reason']}")
    if metrics.get("exported_step") is not None and metrics["exported_step"] != metrics["steps"]:
        print(f"exported: step {metrics['exported_step']} (train.export={metrics['export']})")


if __name__ == "__main__":
    sys.exit(main())
