"""When a run should stop early, and which of its evaluations is the best: pure rules over an
evaluation history (oldest first, one dict of metrics per evaluation after training started).

`stop_reason` is the rule, and `EarlyStoppingConfig` its thresholds. `ferry train` applies it
after every evaluation (`train.early_stopping`, in `trainers.train.loop`) and `ferry tune` to each
trial (`tune.overfitting`, in `tuning.stoppers`): one rule, so a run stops for the same reasons
alone and in a search. `best_evaluation` ranks evaluations by `train.best_metric` the way the
export and the early-stop message do.

Overfitting = validation loss has risen above its best by more than `min_delta` for `patience`
evaluations in a row while training loss fell below its value at that best by more than
`min_delta` (the model keeps fitting the training set and gets worse on held-out data). ASHA alone
never sees this: it compares trials with each other on one number, so an overfitting trial that is
still the best survives.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OVERFITTING, GAP, PLATEAU, DIVERGED = "overfitting", "generalization gap", "plateau", "diverged"
NO_IMPROVEMENT = "no improvement"


class EarlyStoppingConfig(BaseModel):
    """Thresholds of `stop_reason`: `train.early_stopping` and `tune.overfitting`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Apply the rule (ferry train: stop the run; ferry tune: the trial)."
    )
    grace_period: int = Field(
        3, ge=0, description="Evaluations (after training starts) before the rule may act."
    )
    patience: int = Field(
        2,
        ge=1,
        description="Consecutive evaluations with validation loss above its best by more than "
        "min_delta while training loss is below its value at that best by more than min_delta.",
    )
    min_delta: float = Field(
        0.01,
        ge=0,
        allow_inf_nan=False,
        description="Loss change that counts (absolute, loss units): smaller moves are noise. "
        "0 makes the stop fire on any wobble.",
    )
    max_gap: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Also stop when validation minus training loss exceeds this for `patience` "
        "evaluations (None: off).",
    )
    plateau_patience: int | None = Field(
        4,
        ge=1,
        description="Stop when the best validation loss has not improved by plateau_min_delta "
        "for this many evaluations (None: off).",
    )
    plateau_min_delta: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Improvement that resets the plateau count."
    )
    metric_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when the ranking metric (train.best_metric in the direction of "
        "train.best_metric_mode; ferry tune: tune.metric/mode) has not improved by "
        "metric_min_delta for this many evaluations (None: off).",
    )
    metric_min_delta: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Improvement of the ranking metric that resets the metric_patience count: it "
        "must be larger than this (an equal value, e.g. the same accuracy, is no improvement).",
    )
    val_metric: str = Field("eval/loss", description="Validation loss the rule watches.")
    train_metric: str = Field("train/loss", description="Training loss the rule watches.")


def stop_reason(
    history: list[dict[str, float]],
    cfg: EarlyStoppingConfig,
    metric: str = "eval/loss",
    mode: Literal["min", "max"] = "min",
) -> str | None:
    """Why the run (or trial) should stop now, or None. `cfg.enabled` is the caller's to check.

    Args:
        history: evaluations after training started, oldest first; each has cfg.val_metric and
            (normally) cfg.train_metric.
        cfg: thresholds.
        metric, mode: the ranking metric that cfg.metric_patience watches.
    """
    if not history:
        return None
    last = history[-1]
    if any(k in last and not _finite(last[k]) for k in (cfg.val_metric, cfg.train_metric)):
        return DIVERGED
    if len(history) <= cfg.grace_period:
        return None
    val = [h.get(cfg.val_metric, math.nan) for h in history]
    train = [h.get(cfg.train_metric, math.nan) for h in history]
    best_i = min(range(len(val)), key=lambda i: val[i] if _finite(val[i]) else math.inf)
    tail = range(len(val) - cfg.patience, len(val))
    if best_i < len(val) - cfg.patience and tail.start > 0:
        rising = all(val[i] > val[best_i] + cfg.min_delta for i in tail)
        # Training loss must have really moved down too: early in a run both losses wobble around
        # their starting value, and that noise is not overfitting.
        train_falling = _finite(train[best_i]) and all(
            _finite(train[i]) and train[i] < train[best_i] - cfg.min_delta for i in tail
        )
        if rising and train_falling:
            return OVERFITTING
    if cfg.max_gap is not None and len(val) >= cfg.patience:
        if all(_finite(train[i]) and val[i] - train[i] > cfg.max_gap for i in tail):
            return GAP
    if cfg.plateau_patience is not None and _stalled(
        val, cfg.plateau_patience, cfg.plateau_min_delta
    ):
        return PLATEAU
    if cfg.metric_patience is not None:
        sign = 1.0 if mode == "min" else -1.0
        scores = [sign * h.get(metric, math.nan) for h in history]
        if _stalled(scores, cfg.metric_patience, cfg.metric_min_delta, tie_improves=False):
            return NO_IMPROVEMENT
    return None


def best_evaluation(
    history: list[dict[str, float]], metric: str, mode: Literal["min", "max"] = "min"
) -> dict[str, float] | None:
    """The evaluation with the best finite `metric` (the latest of equals), or None.

    The latest, because Ray Train keeps the later of tied checkpoints (train.keep_best_checkpoints
    ranks by this metric): a run whose evaluations all tie (one that predicts a single class) kept
    only its last checkpoints, and asking for the first tied step found none."""
    scored = [h for h in history if _finite(h.get(metric))]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(reversed(scored), key=lambda h: sign * h[metric])  # min keeps the first it meets


def _stalled(
    scores: list[float], patience: int, min_delta: float, tie_improves: bool = True
) -> bool:
    """Lower is better: none of the last `patience` scores improved on the best before them by
    `min_delta` (by more than `min_delta` when not `tie_improves`)."""
    if len(scores) <= patience:
        return False
    earlier = [s for s in scores[:-patience] if _finite(s)]
    before = min(earlier) if earlier else math.inf
    recent = [s for s in scores[-patience:] if _finite(s)]
    if not recent or before == math.inf:
        return False
    bar = before - min_delta
    return min(recent) > bar if tie_improves else min(recent) >= bar


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
