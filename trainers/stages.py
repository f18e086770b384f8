"""Chained runs: each stage starts from the previous stage's exported model (domain adaptation).

`run_stages` is the entry point. The main use: stage 1 continues pretraining on unlabeled domain
text (causal_lm for decoders, masked_lm for encoders), stage 2 fine-tunes on the labeled task
from stage 1's output. Each stage is an ordinary run named `<run.name>-<stage>`, so its
checkpoints, export and resume behave exactly like one `ferry train`: rerunning the same command
skips finished stages (export present, same recorded config) and resumes an interrupted stage
from its last checkpoint, i.e. at the stage and step where it stopped.

The report (`<storage_path>/<run.name>/stages.json`) holds each stage's metrics before/after,
the domain perplexity before/after the first language-modelling stage and, with
`run.stage_baseline`, the task metric of the last stage with and without the earlier stages.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trainers.config import RunSpec
from trainers.config_load import build_spec, set_path
from trainers.errors import ConfigError
from trainers.preflight import (
    check_resources,
    check_run,
    check_storage,
    has_checkpoint,
    plan_checked,
    recorded_config,
)
from trainers.saved import export_exists, read_export_metrics
from trainers.storage import MERGED_DIR, exists, filesystem
from trainers.train.launch import train
from trainers.train.loop import KillAfterStep

log = logging.getLogger("ferry.stages")

_LM_TASKS = ("causal_lm", "masked_lm")


@dataclass
class StageResult:
    name: str
    run_name: str
    task: str
    method: str
    status: str  # "ran", "resumed" or "complete" (finished earlier, skipped)
    export_dir: str
    before: dict[str, Any] | None
    final: dict[str, Any]
    wall_s: float


@dataclass
class StagesOutcome:
    stages: list[StageResult]
    baseline: StageResult | None
    report_path: str
    summary: dict[str, Any] = field(default_factory=dict)


def run_stages(
    spec: RunSpec,
    stages: list[tuple[str, RunSpec]] | None = None,
    fault: KillAfterStep | None = None,
) -> StagesOutcome:
    """Run `spec.stages` in order, each from the previous stage's model; write the report.

    Args:
        spec: the staged run config.
        stages: `check_stages(spec)`'s result when the caller already ran it (the CLI does,
            before it starts Ray); checked here otherwise.
        fault: fault injection for resume tests, passed to every stage's training.

    Raises:
        ConfigError: a stage's config, data or resources are wrong (all stages are checked before
            the first one starts), or a stage's recorded config differs from this one.
        TrainingFailedError: a stage started and failed (rerun to resume it).
    """
    plan = stages if stages is not None else check_stages(spec)
    problems = check_resources(plan[0][1]) + check_storage(plan[0][1])
    if problems:
        raise ConfigError(problems)

    results = [
        _run_one(label, s, merge=i < len(plan) - 1, fault=fault)
        for i, (label, s) in enumerate(plan)
        if not label.endswith("(baseline)")
    ]
    baseline = None
    if plan[-1][0].endswith("(baseline)"):
        baseline = _run_one(plan[-1][0], plan[-1][1], merge=False, fault=fault)
    return _write_report(spec, results, baseline)


def check_stages(spec: RunSpec) -> list[tuple[str, RunSpec]]:
    """Every stage's config, data and recorded run checked at once, without the cluster.

    Returns:
        The stage specs (`stage_specs`).

    Raises:
        ConfigError: every problem of every stage, each labelled with its stage.
    """
    plan = stage_specs(spec)
    problems = [f"{label}: {p}" for label, stage_spec in plan for p in check_run(stage_spec)]
    if problems:
        raise ConfigError(problems)
    return plan


def stage_specs(spec: RunSpec) -> list[tuple[str, RunSpec]]:
    """One validated RunSpec per stage (plus the baseline run when run.stage_baseline), labelled
    `stages[i] (<name>)`. Raises one ConfigError with every stage's problems."""
    if not spec.stages:
        raise ConfigError(
            [
                "stages=None: this config has no stages. Add a stages: list or run "
                "`ferry train` on it as a single run."
            ]
        )
    names = [s.name for s in spec.stages]
    problems = (
        [f"stages={names}: stage names must be distinct. Rename one."]
        if len(set(names)) < len(names)
        else []
    )
    base = spec.model_dump(mode="json", exclude={"stages"})
    out: list[tuple[str, RunSpec]] = []
    previous: RunSpec | None = None
    for i, stage in enumerate(spec.stages):
        label = f"stages[{i}] ({stage.name})"
        raw = copy.deepcopy(base)
        for key, value in stage.set.items():
            if key.split(".")[0] in ("stages", "run") and key not in ("run.seed",):
                problems.append(
                    f"{label}.set.{key}={value}: stages cannot override run.* or stages. "
                    "Set it at the top level."
                )
                continue
            set_path(raw, key, value)
        raw["run"]["name"] = f"{spec.run.name}-{stage.name}"
        if previous is not None:
            raw["model"] = {
                "name_or_path": _model_dir(previous),
                "trust_remote_code": spec.model.trust_remote_code,
            }
        try:
            stage_spec = build_spec(raw)
        except ConfigError as e:
            problems += [f"{label}: {p}" for p in e.problems]
            previous = None
            continue
        if stage_spec.method == "feature_extraction" and i < len(spec.stages) - 1:
            problems.append(
                f"{label}.set.method=feature_extraction: a frozen-feature head cannot feed "
                "a later stage. Use it in the last stage only."
            )
        out.append((label, stage_spec))
        previous = stage_spec
    if len(spec.stages) > 1 and out and out[0][1].task.type not in _LM_TASKS:
        log.info(
            "stage 1 is %s, not continued pretraining: no domain perplexity is reported",
            out[0][1].task.type,
        )
    if problems:
        raise ConfigError(problems)
    if spec.run.stage_baseline:
        last_label, last = out[-1]
        raw = last.model_dump(mode="json")
        raw["model"] = base["model"]
        raw["run"]["name"] = f"{last.run.name}-baseline"
        out.append((f"{last_label} (baseline)", build_spec(raw)))
    return out


def _model_dir(spec: RunSpec) -> str:
    """Where a stage's model lands: its export, or the merged model for a LoRA stage (a plain
    checkpoint the next stage can load, fine-tune fully or adapt again)."""
    return spec.export_dir + (f"/{MERGED_DIR}" if spec.method == "lora" else "")


def _run_one(label: str, spec: RunSpec, merge: bool, fault: KillAfterStep | None) -> StageResult:
    merge = merge and spec.method == "lora"
    t0 = time.perf_counter()
    finished = export_exists(spec.export_dir) and recorded_config(spec) is not None
    if finished and (not merge or exists(f"{spec.export_dir}/{MERGED_DIR}")):
        status = "complete"
        log.info("%s: finished earlier, skipped (%s)", label, spec.export_dir)
        metrics = read_export_metrics(spec.export_dir)
    else:
        status = "resumed" if has_checkpoint(spec) else "ran"
        log.info(
            "%s: %s %s/%s run %s",
            label,
            "resuming" if status == "resumed" else "starting",
            spec.task.type,
            spec.method,
            spec.run.name,
        )
        metrics = train(plan_checked(spec), merge=merge, fault=fault).metrics
    return StageResult(
        name=label,
        run_name=spec.run.name,
        task=spec.task.type,
        method=spec.method,
        status=status,
        export_dir=spec.export_dir,
        before=metrics.get("before"),
        final=metrics.get("final") or {},
        wall_s=round(time.perf_counter() - t0, 1),
    )


def _write_report(
    spec: RunSpec, results: list[StageResult], baseline: StageResult | None
) -> StagesOutcome:
    summary: dict[str, Any] = {}
    first = results[0]
    if first.task in _LM_TASKS and len(results) > 1:
        summary["domain_perplexity"] = {
            "stage": first.name,
            "before": (first.before or {}).get("eval/perplexity"),
            "after": first.final.get("eval/perplexity"),
        }
    last = results[-1]
    metric = _task_metric(last, spec.train.best_metric)
    summary["task_metric"] = {
        "metric": metric,
        "with_stages": last.final.get(metric),
        "without_stages": baseline.final.get(metric) if baseline else None,
    }
    report_dir = spec.run_dir
    path = report_dir + "/stages.json"
    body = {
        "summary": summary,
        "stages": [asdict(r) for r in results],
        "baseline": asdict(baseline) if baseline else None,
    }
    fs, root = filesystem(report_dir)
    fs.create_dir(root)
    with fs.open_output_stream(f"{root}/stages.json") as f:
        f.write(json.dumps(body, indent=2).encode())
    return StagesOutcome(results, baseline, path, summary)


def _task_metric(result: StageResult, best_metric: str) -> str:
    """The headline metric of the last stage: the config's train.best_metric unless that is the
    loss, else the task's quality metric, else eval/loss."""
    if best_metric != "eval/loss" and best_metric in result.final:
        return best_metric
    for key in ("eval/accuracy", "eval/f1", "eval/rougeL", "eval/exact_match", "eval/perplexity"):
        if key in result.final:
            return key
    return "eval/loss"
