"""The `tune:` block of a run config and the checks on its search space.

`load_search` is the entry point: YAML + `--set` overrides -> (base run config mapping, TuneConfig).
`check_space` validates every searched path and value against the run-config schema, so a typo'd
path, an empty choice or a value the schema rejects fails before any trial starts, named by path.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainers.config import RunSpec
from trainers.config_load import build_spec, load_raw, set_path
from trainers.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of the keys: how a searched value is drawn."""

    choice: list[Any] | None = Field(None, description="Pick uniformly from these values.")
    grid: list[Any] | None = Field(None, description="Try every value (a grid axis).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniform.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], uniform in log space (learning rates); low > 0."
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high), integers.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)


KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop weak trials at rungs; fifo: run every trial to the end."
    )
    grace_period: int = Field(
        2, ge=1, description="ASHA: evaluations every trial gets before it can be stopped."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA: keep the best 1/reduction_factor of trials at each rung."
    )
    max_t: int | None = Field(
        None, ge=1,
        description="ASHA: evaluations a trial may run at most; default: the run's own length.",
    )


class OverfittingConfig(_Strict):
    enabled: bool = Field(True, description="Stop trials that overfit or plateau.")
    grace_period: int = Field(
        3, ge=0, description="Evaluations (after training starts) before the stopper may act."
    )
    patience: int = Field(
        2, ge=1,
        description="Consecutive evaluations with validation loss above its best by more than "
        "min_delta while training loss is below its value at that best by more than min_delta.",
    )
    min_delta: float = Field(
        0.01, ge=0, allow_inf_nan=False,
        description="Loss change that counts (absolute, loss units): smaller moves are noise. "
        "0 makes the stop fire on any wobble.",
    )
    max_gap: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Also stop when validation minus training loss exceeds this for `patience` "
        "evaluations (None: off).",
    )
    plateau_patience: int | None = Field(
        4, ge=1,
        description="Stop when the best validation loss has not improved by plateau_min_delta "
        "for this many evaluations (None: off).",
    )
    plateau_min_delta: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Improvement that resets the plateau count."
    )
    val_metric: str = Field("eval/loss", description="Validation loss the stopper watches.")
    train_metric: str = Field("train/loss", description="Training loss the stopper watches.")


class TuneConfig(_Strict):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Experiment name (a folder under run.storage_path); default <run.name>-tune. "
        "Rerunning with --resume continues it.",
    )
    space: dict[str, Distribution] = Field(
        ..., description="Search space keyed by dotted paths into the run config, e.g. "
        "train.learning_rate: {loguniform: [1e-5, 1e-3]}.",
    )
    metric: str = Field("eval/loss", description="Metric that ranks trials (and their checkpoints).")
    mode: Literal["min", "max"] = Field("min", description="Lower or higher is better.")
    num_samples: int = Field(
        4, ge=1,
        description="Random search: trials drawn. With grid axes: repeats of the whole grid.",
    )
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="random (plus grid axes) or optuna (TPE; no grid axes)."
    )
    seed: int = Field(0, description="Seed of the searcher: the same seed draws the same trials.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    overfitting: OverfittingConfig = Field(default_factory=OverfittingConfig)
    max_concurrent_trials: int | None = Field(
        None, ge=1,
        description="Upper bound on trials at once; the cluster's free resources may lower it.",
    )
    delete_stopped_checkpoints: bool = Field(
        True, description="Delete checkpoints of trials stopped early (not the best trial's)."
    )
    trial_cpus: float = Field(
        0.01, gt=0, allow_inf_nan=False,
        description="CPU reserved by each trial's driver (it only waits on its workers).",
    )


def load_search(path: str, overrides: list[str] | None = None) -> tuple[dict[str, Any], TuneConfig]:
    """Read a run config with a `tune:` block.

    Returns:
        (the run config mapping without `tune`, the validated TuneConfig).

    Raises:
        ConfigError: the tune block is missing or invalid, or the base run config is invalid.
    """
    raw, problems = load_raw(path, overrides)
    block = raw.pop("tune", None)
    if not isinstance(block, dict):
        raise ConfigError([f"tune={block}: `ferry tune` needs a tune: block with a space. Add e.g. "
                           "tune: {space: {train.learning_rate: {loguniform: [1e-5, 1e-3]}}}."])
    tune_cfg = None
    try:
        tune_cfg = TuneConfig.model_validate(block)
    except ValidationError as e:
        problems += [_format(err) for err in e.errors()]
    try:
        spec = build_spec(copy.deepcopy(raw))
        # Trials report through Ray Train callbacks; neither of these is one Ray Train run.
        if spec.stages:
            problems.append(f"stages={[s.name for s in spec.stages]}: `ferry tune` searches one run. "
                            "Tune the task stage as its own config (model.name_or_path = the "
                            "earlier stage's export).")
        if spec.method == "feature_extraction":
            problems.append("method=feature_extraction: its head trains in seconds outside Ray "
                            "Train, so `ferry tune` does not search it. Tune method lora or full.")
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    assert tune_cfg is not None
    return raw, tune_cfg


def check_space(raw: dict[str, Any], tune_cfg: TuneConfig) -> list[str]:
    """Every searched path exists in the run-config schema and every value it can take validates.

    Ranges are checked at both ends; choices and grids value by value.
    """
    problems = []
    for path, dist in tune_cfg.space.items():
        key = f"tune.space.{path}"
        where = _schema_problem(path)
        if where:
            problems.append(f"{key}: {where}")
            continue
        kind, args = dist.kind, dist.args
        if kind in ("choice", "grid") and not args:
            problems.append(f"{key}.{kind}=[]: needs at least one value. List the values to try.")
            continue
        if kind in ("uniform", "loguniform", "randint") and not args[0] < args[1]:
            problems.append(f"{key}.{kind}={list(args)}: low must be below high. Write [low, high].")
            continue
        if kind == "loguniform" and args[0] <= 0:
            problems.append(f"{key}.loguniform={list(args)}: low must be > 0. Use a positive low "
                            "or a uniform distribution.")
            continue
        if kind == "grid" and tune_cfg.search_alg == "optuna":
            problems.append(f"{key}.grid: optuna cannot search grid axes. Use choice, or "
                            "tune.search_alg=random.")
            continue
        candidates = list(args) if kind in ("choice", "grid") else [args[0], args[1] - (kind == "randint")]
        for value in candidates:
            trial = copy.deepcopy(raw)
            set_path(trial, path, value)
            try:
                build_spec(trial)
            except ConfigError as e:
                problems += [f"{key}={value!r} ({kind}): {p}" for p in e.problems]
    return problems


def trial_config(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base run config with a trial's sampled values set at their dotted paths."""
    trial = copy.deepcopy(raw)
    for path, value in params.items():
        set_path(trial, path, value)
    return trial


def extremes(tune_cfg: TuneConfig, path: str) -> list[Any]:
    """Values of `path` worth checking against the model (largest and smallest)."""
    dist = tune_cfg.space.get(path)
    if dist is None:
        return []
    args = list(dist.args)
    if dist.kind in ("choice", "grid"):
        nums = [a for a in args if isinstance(a, int | float)]
        return [max(nums), min(nums)] if nums else []
    return [args[1] - (dist.kind == "randint"), args[0]]


def experiment_name(raw: dict[str, Any], tune_cfg: TuneConfig) -> str:
    return tune_cfg.name or f"{(raw.get('run') or {}).get('name', 'ferry-run')}-tune"


def experiment_dir(raw: dict[str, Any], tune_cfg: TuneConfig) -> str:
    storage = (raw.get("run") or {}).get("storage_path", "./ferry-runs")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return f"{storage.rstrip('/')}/{experiment_name(raw, tune_cfg)}"


def _schema_problem(path: str) -> str | None:
    """Why `path` is not a settable leaf of RunSpec, or None if it is."""
    model: type[BaseModel] = RunSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            here = ".".join(parts[:i]) or "the run config"
            close = sorted(model.model_fields)
            return (f"no key '{part}' in {here}. Valid keys there: {', '.join(close)}.")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            if i == len(parts) - 1:
                return f"'{path}' is a section, not a value. Search a key inside it."
            continue
        if i < len(parts) - 1 and not _is_mapping(ann):
            return f"'{'.'.join(parts[:i + 1])}' is a value, not a section. Search '{'.'.join(parts[:i + 1])}' itself."
        return None
    return None


def _is_mapping(ann: Any) -> bool:
    return "dict" in str(ann)


def _format(err: dict) -> str:
    loc = ".".join(str(x) for x in ("tune", *err["loc"]))
    value = err.get("input")
    if isinstance(value, dict | list) and len(str(value)) > 80:
        value = str(value)[:77] + "..."
    msg = err["msg"].removeprefix("Value error, ")
    fix = "Remove it (see the tune: keys in the README)." if err["type"] == "extra_forbidden" else "Fix the value."
    return f"{loc}={value}: {msg}. {fix}"

