"""Stop trials that overfit, plateau or diverge.

`stop_reason` is the rule, a pure function over one trial's evaluation history (unit-tested on
synthetic streams). `OverfittingStopper` applies it inside Ray Tune and records why it stopped each
trial in `<experiment>/stop_reasons.json`, which the report reads and which survives a restore.

Overfitting = validation loss has risen above its best by more than `min_delta` for `patience`
evaluations in a row while training loss fell below its value at that best by more than
`min_delta` (the model keeps
fitting the training set and gets worse on held-out data). ASHA alone never sees this: it compares
trials with each other on one number, so an overfitting trial that is still the best survives.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from ray.tune.stopper import Stopper

from tuning.config import OverfittingConfig

OVERFITTING, GAP, PLATEAU, DIVERGED = "overfitting", "generalization gap", "plateau", "diverged"


def stop_reason(history: list[dict[str, float]], cfg: OverfittingConfig) -> str | None:
    """Why this trial should stop now, or None.

    Args:
        history: the trial's evaluations after training started, oldest first; each has
            cfg.val_metric and (normally) cfg.train_metric.
        cfg: thresholds.
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
    if cfg.plateau_patience is not None and len(val) > cfg.plateau_patience:
        # The best of all but the last plateau_patience evaluations, beaten by none of those.
        before = (
            min(v for v in val[: -cfg.plateau_patience] if _finite(v))
            if any(_finite(v) for v in val[: -cfg.plateau_patience])
            else math.inf
        )
        recent = [v for v in val[-cfg.plateau_patience :] if _finite(v)]
        if recent and min(recent) > before - cfg.plateau_min_delta:
            return PLATEAU
    return None


class OverfittingStopper(Stopper):
    """Tune stopper applying `stop_reason` per trial; decisions persist in `state_file`."""

    def __init__(self, cfg: OverfittingConfig, state_file: str):
        self.cfg = cfg
        self.state_file = state_file
        self._histories: dict[str, list[dict[str, float]]] | None = None
        self._reasons: dict[str, str] | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self._load()
        assert self._histories is not None and self._reasons is not None
        # The evaluation before training (train/step 0) is a baseline, not progress.
        if result.get("train/step", 0) == 0 or self.cfg.val_metric not in result:
            return False
        point = {
            k: float(result[k])
            for k in (self.cfg.val_metric, self.cfg.train_metric, "train/step")
            if isinstance(result.get(k), int | float)
        }
        history = self._histories.setdefault(trial_id, [])
        # A resumed trial re-reports from its checkpoint: keep one entry per step.
        history[:] = [h for h in history if h.get("train/step", -1) < point.get("train/step", 0)]
        history.append(point)
        reason = stop_reason(history, self.cfg) if self.cfg.enabled else None
        if reason is None and not all(_finite(v) for v in point.values()):
            reason = DIVERGED  # NaN stops a trial even with the overfitting rule switched off
        if reason:
            self._reasons[trial_id] = reason
        self._save()
        return reason is not None

    def stop_all(self) -> bool:
        return False

    def reasons(self) -> dict[str, str]:
        self._load()
        return dict(self._reasons or {})

    def _load(self) -> None:
        if self._histories is not None:
            return
        state = read_state(self.state_file)
        self._histories, self._reasons = state["histories"], state["reasons"]

    def _save(self) -> None:
        folder = os.path.dirname(self.state_file)
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump({"histories": self._histories, "reasons": self._reasons}, f)
        os.replace(f.name, self.state_file)  # atomic: a killed driver never leaves half a file

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the stopper into its experiment state; the live state is in the file.
        return {
            "cfg": self.cfg,
            "state_file": self.state_file,
            "_histories": None,
            "_reasons": None,
        }


def read_state(state_file: str) -> dict[str, Any]:
    if os.path.exists(state_file):
        with open(state_file) as f:
            return json.load(f)
    return {"histories": {}, "reasons": {}}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
