"""Stop trials that overfit, plateau or diverge.

The rule is `trainers.stopping.stop_reason` (re-exported here with its reasons), the same one
`ferry train` applies with `train.early_stopping`. `OverfittingStopper` applies it inside Ray Tune
and records why it stopped each trial in `<experiment>/stop_reasons.json`, which the report reads
and which survives a restore.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Literal

from ray.tune.stopper import Stopper

from trainers.stopping import (
    DIVERGED,
    GAP,
    NO_IMPROVEMENT,
    OVERFITTING,
    PLATEAU,
    EarlyStoppingConfig,
    stop_reason,
)

__all__ = [
    "DIVERGED",
    "GAP",
    "NO_IMPROVEMENT",
    "OVERFITTING",
    "PLATEAU",
    "OverfittingStopper",
    "read_state",
    "stop_reason",
]


class OverfittingStopper(Stopper):
    """Tune stopper applying `stop_reason` per trial; decisions persist in `state_file`.
    `metric`/`mode` (the search's) are what cfg.metric_patience watches."""

    def __init__(
        self,
        cfg: EarlyStoppingConfig,
        state_file: str,
        metric: str = "eval/loss",
        mode: Literal["min", "max"] = "min",
    ):
        self.cfg = cfg
        self.state_file = state_file
        self.metric, self.mode = metric, mode
        self._histories: dict[str, list[dict[str, float]]] | None = None
        self._reasons: dict[str, str] | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self._load()
        assert self._histories is not None and self._reasons is not None
        # The evaluation before training (train/step 0) is a baseline, not progress.
        if result.get("train/step", 0) == 0 or self.cfg.val_metric not in result:
            return False
        watched = [self.cfg.val_metric, self.cfg.train_metric, "train/step"]
        if self.cfg.metric_patience is not None:
            watched.append(self.metric)
        point = {k: float(result[k]) for k in watched if isinstance(result.get(k), int | float)}
        history = self._histories.setdefault(trial_id, [])
        # A resumed trial re-reports from its checkpoint: keep one entry per step.
        history[:] = [h for h in history if h.get("train/step", -1) < point.get("train/step", 0)]
        history.append(point)
        reason = (
            stop_reason(history, self.cfg, self.metric, self.mode) if self.cfg.enabled else None
        )
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
            "metric": self.metric,
            "mode": self.mode,
            "_histories": None,
            "_reasons": None,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A search started before metric_patience existed pickled no metric/mode.
        self.__dict__.update({"metric": "eval/loss", "mode": "min", **state})


def read_state(state_file: str) -> dict[str, Any]:
    if os.path.exists(state_file):
        with open(state_file) as f:
            return json.load(f)
    return {"histories": {}, "reasons": {}}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
