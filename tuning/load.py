"""Reading a search: YAML + `--set` overrides -> a validated `SearchSpec`, and each trial's run.

`load_search` is the entry point. It validates the `tune:` block, the run config every trial
starts from, and every value the search space can take against that run config, so a typo'd
path, an empty choice or a value the schema rejects fails before Ray starts, named by its path.
`trial_spec` derives one trial's `RunSpec` from the validated base and the trial's dotted values.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ValidationError

from trainers.config import RunSpec
from trainers.config_load import build_spec, load_raw, set_path
from trainers.errors import ConfigError
from tuning.config import SearchSpec, TuneConfig


def load_search(path: str, overrides: list[str] | None = None) -> SearchSpec:
    """Read a run config with a `tune:` block and validate the whole search.

    Raises:
        ConfigError: listing every problem of the tune block, the base run config and the space.
    """
    raw, problems = load_raw(path, overrides)
    return build_search(raw, problems)


def build_search(raw: dict[str, Any], problems: list[str] | None = None) -> SearchSpec:
    """Validate a run-config mapping with a `tune:` block (the mapping is not modified).

    Args:
        raw: the run config, paths resolved and overrides applied, `tune` key included.
        problems: problems found earlier (in the overrides), reported with the rest.

    Raises:
        ConfigError: listing every problem of the tune block, the base run config and the space.
    """
    problems = list(problems or [])
    raw = copy.deepcopy(raw)
    block = raw.pop("tune", None)
    if not isinstance(block, dict):
        raise ConfigError(
            problems
            + [
                f"tune={block}: `ferry tune` needs a tune: block with a space. Add e.g. "
                "tune: {space: {train.learning_rate: {loguniform: [1e-5, 1e-3]}}}."
            ]
        )
    tune = None
    try:
        tune = TuneConfig.model_validate(block)
    except ValidationError as e:
        problems += [_format(err) for err in e.errors()]
    train = raw.setdefault("train", {})
    if tune is not None and isinstance(train, dict):
        # Trials keep their best checkpoints by the search metric, so "best checkpoint" means the
        # same thing to a trial and to the search.
        train.update(best_metric=tune.metric, best_metric_mode=tune.mode)
    base = None
    try:
        base = build_spec(raw)
    except ConfigError as e:
        problems += e.problems
    if base is not None:
        # Trials report through Ray Train callbacks; neither of these is one Ray Train run.
        if base.stages:
            problems.append(
                f"stages={[s.name for s in base.stages]}: `ferry tune` searches one run. Tune the "
                "task stage as its own config (model.name_or_path = the earlier stage's export)."
            )
        if base.method == "feature_extraction":
            problems.append(
                "method=feature_extraction: its head trains in seconds outside Ray Train, so "
                "`ferry tune` does not search it. Tune method lora or full."
            )
        if base.train.early_stopping is not None:
            problems.append(
                "train.early_stopping={...}: in a search, tune.overfitting stops each trial by "
                "the same rule (and the report records why). Remove train.early_stopping and set "
                "its thresholds under tune.overfitting."
            )
        if tune is not None:
            problems += _check_space(base, tune)
    if problems:
        raise ConfigError(problems)
    assert base is not None and tune is not None
    return SearchSpec(base=base, tune=tune)


def trial_spec(base: RunSpec, values: dict[str, Any]) -> RunSpec:
    """`base` with `values` set at their dotted paths (e.g. {"train.learning_rate": 3e-4}).

    Validated like a run config (schema and cross-field rules): a value that passes alone can
    still break a rule together with the base (a batch size that no longer divides
    train.global_batch_size), and values Tune samples between checked ends are first seen here.

    Raises:
        ConfigError: the values do not make a valid run config.
    """
    raw = base.model_dump()
    for path, value in values.items():
        set_path(raw, path, value)
    return build_spec(raw)


def _check_space(base: RunSpec, tune: TuneConfig) -> list[str]:
    """Every searched path exists in the run-config schema and every value it can take validates.

    Ranges are checked at both ends; choices and grids value by value.
    """
    problems = []
    for path, dist in tune.space.items():
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
            problems.append(
                f"{key}.{kind}={list(args)}: low must be below high. Write [low, high]."
            )
            continue
        if kind == "loguniform" and args[0] <= 0:
            problems.append(
                f"{key}.loguniform={list(args)}: low must be > 0. Use a positive low "
                "or a uniform distribution."
            )
            continue
        if kind == "grid" and tune.search_alg == "optuna":
            problems.append(
                f"{key}.grid: optuna cannot search grid axes. Use choice, or "
                "tune.search_alg=random."
            )
            continue
        if kind in ("choice", "grid"):
            candidates = list(args)
        else:
            candidates = [args[0], args[1] - (kind == "randint")]  # randint's high is exclusive
        for value in candidates:
            try:
                trial_spec(base, {path: value})
            except ConfigError as e:
                problems += [f"{key}={value!r} ({kind}): {p}" for p in e.problems]
    return problems


def _schema_problem(path: str) -> str | None:
    """Why `path` is not a settable leaf of RunSpec, or None if it is."""
    model: type[BaseModel] = RunSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            here = ".".join(parts[:i]) or "the run config"
            close = sorted(model.model_fields)
            return f"no key '{part}' in {here}. Valid keys there: {', '.join(close)}."
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            if i == len(parts) - 1:
                return f"'{path}' is a section, not a value. Search a key inside it."
            continue
        if i < len(parts) - 1 and not _is_mapping(ann):
            value = ".".join(parts[: i + 1])
            return f"'{value}' is a value, not a section. Search '{value}' itself."
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
    if err["type"] == "extra_forbidden":
        fix = "Remove it (see the tune: keys in the README)."
    else:
        fix = "Fix the value."
    return f"{loc}={value}: {msg}. {fix}"
