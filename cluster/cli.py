"""The `ferry` command line: validate, train, eval.

Every command takes a YAML run config and any number of `--set key.path=value` overrides.
Errors end in one clear message and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ferry` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[ferry] %(message)s")
    for noisy in ("ray", "deepspeed", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
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
    from trainers.config import ConfigError
    from trainers.data import DataError

    return isinstance(e, ConfigError | DataError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Transfer learning on Ray clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML run config")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.learning_rate=3e-4")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    def ray_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    v = sub.add_parser("validate", help="check a config and its data files; print the resolved config")
    common(v)
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("train", help="fine-tune: prepare data, train, evaluate, export")
    common(t)
    ray_opts(t)
    t.add_argument("--merge", action="store_true", help="also write the LoRA-merged model")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint or export on the validation data")
    common(e)
    ray_opts(e)
    e.add_argument("--checkpoint", required=True, help="<run>/final or a checkpoint_step_* folder")
    e.set_defaults(func=cmd_eval)

    tu = sub.add_parser("tune", help="search hyperparameters (the config's tune: block) with Ray Tune")
    tu.add_argument("config", nargs="?", help="YAML run config with a tune: block")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set tune.num_samples=8")
    tu.add_argument("--debug", action="store_true", help="show tracebacks")
    ray_opts(tu)
    tu.add_argument("--resume", action="store_true",
                    help="continue the interrupted search of the same tune.name/storage_path")
    tu.add_argument("--report", metavar="EXPERIMENT_DIR", default=None,
                    help="only rebuild the report (table, CSV, best.yaml, plots) of a search folder")
    tu.set_defaults(func=cmd_tune)

    from cluster.k8s import register_cli

    register_cli(sub)
    from cluster.jobs import register_cli as register_jobs_cli

    register_jobs_cli(sub)
    return p


def cmd_validate(args) -> int:
    from trainers.config import ConfigError, dump_spec, load_config
    from trainers.data import check_data
    from trainers.model import check_lora_fits, load_tokenizer_for

    spec = load_config(args.config, args.overrides)
    problems = check_data(spec)
    tokenizer = None if spec.model.preset else load_tokenizer_for(spec, None)
    labels = spec.task.labels or (["a", "b"] if spec.task.type == "sequence_classification" else None)
    problems += check_lora_fits(spec, tokenizer, labels)
    if problems:
        raise ConfigError(problems)
    print(dump_spec(spec), end="")
    return 0


def cmd_train(args) -> int:
    from cluster.session import connect, disconnect
    from trainers.config import load_config
    from trainers.launch import train

    spec = load_config(args.config, args.overrides)
    _check_inputs_before_starting_ray(spec)
    s = spec.scaling
    session = connect(args.address, needed_cpus=s.num_workers * s.cpus_per_worker + s.data_cpus)
    t0 = time.perf_counter()
    try:
        outcome = train(spec, merge=args.merge)
    finally:
        if session.embedded:
            disconnect(session)
    _print_summary(outcome.metrics, time.perf_counter() - t0)
    print(f"model: {outcome.export_dir}")
    return 0


def cmd_eval(args) -> int:
    from cluster.session import connect, disconnect
    from trainers.config import load_config
    from trainers.evaluate import evaluate_checkpoint

    spec = load_config(args.config, args.overrides)
    _check_inputs_before_starting_ray(spec)
    s = spec.scaling
    session = connect(args.address, needed_cpus=s.num_workers * s.cpus_per_worker + s.data_cpus)
    try:
        metrics = evaluate_checkpoint(spec, args.checkpoint)
    finally:
        if session.embedded:
            disconnect(session)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_tune(args) -> int:
    from cluster.session import connect, disconnect
    from trainers.config import ConfigError, build_spec

    if args.report:
        from tuning.report import build_report, print_report

        try:
            print_report(build_report(args.report))
        except FileNotFoundError as e:
            raise ConfigError([f"--report={args.report}: {e}"]) from e
        return 0
    if not args.config:
        raise ConfigError(["config=None: `ferry tune` needs a run config with a tune: block (or "
                           "--report EXPERIMENT_DIR). Pass the YAML file."])
    from tuning.config import load_search
    from tuning.search import run_search

    raw, tune_cfg = load_search(args.config, args.overrides)
    spec = build_spec(dict(raw))
    _check_inputs_before_starting_ray(spec)
    s = spec.scaling
    session = connect(args.address, needed_cpus=s.num_workers * s.cpus_per_worker + s.data_cpus
                      + tune_cfg.trial_cpus)
    try:
        outcome = run_search(raw, tune_cfg, resume=args.resume)
    finally:
        if session.embedded:
            disconnect(session)
    print(f"search: {outcome.experiment_dir}")
    return 0


def _check_inputs_before_starting_ray(spec) -> None:
    """Missing files or columns fail in a second, not after Ray has started."""
    from trainers.config import ConfigError
    from trainers.data import check_data

    problems = check_data(spec)
    if problems:
        raise ConfigError(problems)


def _print_summary(metrics: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    before, after = metrics.get("before") or {}, metrics.get("final") or {}
    table = Table(title=f"ferry: {metrics.get('steps')} steps in {seconds:,.0f}s")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(k for k in after if k.startswith("eval/")):
        b = before.get(key)
        table.add_row(key, "" if b is None else f"{b:.4f}", f"{after[key]:.4f}")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
