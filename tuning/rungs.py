"""ASHA that re-checks its rungs: successive halving's choice without its waiting.

Ray's ASHA decides once, when a trial reaches a rung, against the trials that reached it before.
The first trials at a rung pass with little or nothing to beat, so when a search starts as many
trials at once as the cluster holds, that first wave reaches every rung before its rivals and runs
to the end whatever its curves (measured on a 24-trial MiniLM grid: 5 trials ran all their steps,
31 % of the grid's trial-steps). `RecheckingASHA` keeps ASHA's rungs. At arrival a trial goes
on if it ranks in the top 1/reduction_factor of the trials recorded at the rung, itself included
(Ray's ASHA compares it with a percentile of the others: nearly the same cut); in addition, at
every later result of a running trial it checks the trial again at each rung it has passed,
against every trial recorded there since, and stops it once it is out of that rung's top
1/reduction_factor. A stop is final; a promotion is provisional. So once every trial
has reached a rung, none outside its top 1/reduction_factor is still running there, as in
synchronous successive halving (a trial stopped on few rivals stays stopped, as in ASHA).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


def rungs(grace: int, max_t: int, reduction_factor: float) -> list[int]:
    """The rung milestones below max_t: grace x reduction_factor^k (ASHA's, one bracket)."""
    out, t = [], float(grace)
    while t < max_t:
        out.append(int(round(t)))
        t *= reduction_factor
    return out


def kept(n: int, reduction_factor: float) -> int:
    """How many of the n trials recorded at a rung may go on: the top 1/reduction_factor, at
    least one."""
    return max(1, math.ceil(n / reduction_factor - 1e-9))


class RecheckingASHA(FIFOScheduler):
    """ASHA over `time_attr` with rungs at `rungs(grace_period, max_t, reduction_factor)`;
    see the module docstring for the rule. Ranks on `metric`, ties keep the earlier trial."""

    def __init__(
        self,
        time_attr: str,
        metric: str,
        mode: str,
        grace_period: int,
        reduction_factor: float,
        max_t: int,
    ):
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._sign = 1.0 if mode == "max" else -1.0
        self._rf, self._max_t = reduction_factor, max_t
        # milestone -> {trial_id: signed metric (higher is better)}, in the order recorded. A
        # trial's entries outlive it (FIFOScheduler's on_trial_complete keeps them): later
        # trials are still ranked against it. Tune never saves a scheduler, so no save/restore.
        self._rungs: dict[int, dict[str, float]] = {
            m: {} for m in rungs(grace_period, max_t, reduction_factor)
        }
        self.stopped: dict[str, int] = {}  # trial_id -> the rung it was stopped at

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # Built with the search's metric and mode; a second, different pair is a wiring error.
        return (metric is None or metric == self._metric) and (mode is None or mode == self._mode)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        if trial.trial_id in self.stopped:
            return TrialScheduler.STOP
        t, value = result[self._time_attr], self._sign * float(result[self._metric])
        for milestone, recorded in self._rungs.items():
            if t >= milestone and trial.trial_id not in recorded and not math.isnan(value):
                recorded[trial.trial_id] = value
        for milestone, recorded in self._rungs.items():
            if trial.trial_id in recorded and not self._in_top(trial.trial_id, recorded):
                self.stopped[trial.trial_id] = milestone
                return TrialScheduler.STOP
        return TrialScheduler.STOP if t >= self._max_t else TrialScheduler.CONTINUE

    def _in_top(self, trial_id: str, recorded: dict[str, float]) -> bool:
        order = sorted(recorded, key=lambda k: -recorded[k])  # stable: earlier trial wins ties
        return order.index(trial_id) < kept(len(recorded), self._rf)

    def debug_string(self) -> str:
        return "RecheckingASHA: " + " | ".join(
            f"step {m}: {len(r)} recorded" for m, r in self._rungs.items()
        )
