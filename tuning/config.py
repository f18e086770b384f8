"""The search config: the `tune:` block of a run config and `SearchSpec`, the whole search.

Schema only: reading a search file, checking its space against the run config and deriving each
trial's run config live in `tuning.load`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.config import RunSpec
from trainers.stopping import EarlyStoppingConfig

# The overfitting stop of each trial is `ferry train`'s early-stopping rule, under its tune name.
OverfittingConfig = EarlyStoppingConfig


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
    grace_period: int | None = Field(
        None,
        ge=1,
        description="ASHA: evaluations every trial gets before it can be stopped; default: "
        "grace_fraction of each trial's length.",
    )
    grace_fraction: float = Field(
        1 / 9,
        gt=0,
        le=1,
        description="ASHA without grace_period: the first rung as a fraction of max_t, rounded "
        "to whole evaluations (at least one). Smaller saves more steps and decides on less.",
    )
    reduction_factor: float = Field(
        3.0, gt=1, description="ASHA: keep the best 1/reduction_factor of trials at each rung."
    )
    max_t: int | None = Field(
        None,
        ge=1,
        description="ASHA: evaluations a trial may run at most; default: the run's own length.",
    )
    recheck_rungs: bool = Field(
        True,
        description="ASHA: check a running trial again at every rung it passed as later trials "
        "report there, and stop it once it is out of that rung's top 1/reduction_factor "
        "(synchronous successive halving's choice without its waiting); false: Ray's ASHA, "
        "which decides once, when the trial reaches the rung.",
    )


class TuneConfig(_Strict):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Experiment name (a folder under run.storage_path); default <run.name>-tune. "
        "Rerunning with --resume continues it.",
    )
    space: dict[str, Distribution] = Field(
        ...,
        description="Search space keyed by dotted paths into the run config, e.g. "
        "train.learning_rate: {loguniform: [1e-5, 1e-3]}.",
    )
    metric: str = Field(
        "eval/loss", description="Metric that ranks trials (and their checkpoints)."
    )
    mode: Literal["min", "max"] = Field("min", description="Lower or higher is better.")
    num_samples: int = Field(
        4,
        ge=1,
        description="Random search: trials drawn. With grid axes: repeats of the whole grid.",
    )
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="random (plus grid axes) or optuna (TPE; no grid axes)."
    )
    seed: int = Field(0, description="Seed of the searcher: the same seed draws the same trials.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    overfitting: OverfittingConfig = Field(
        default_factory=OverfittingConfig,
        description="Stop each trial that overfits, plateaus or diverges: the rule of "
        "train.early_stopping, on by default here.",
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="Upper bound on trials at once; the cluster's free resources may lower it.",
    )
    delete_stopped_checkpoints: bool = Field(
        True, description="Delete checkpoints of trials stopped early (not the best trial's)."
    )
    trial_cpus: float = Field(
        0.01,
        gt=0,
        allow_inf_nan=False,
        description="CPU reserved by each trial's driver (it only waits on its workers).",
    )


class SearchSpec(_Strict):
    """One search: the run every trial starts from and the `tune:` block that varies it.

    Build it with `tuning.load.load_search` (a file) or `build_search` (a mapping): they validate
    both parts and check every value of the space against the run config, all problems at once.
    """

    base: RunSpec = Field(
        ...,
        description="The validated run config every trial starts from (without its tune: "
        "block; train.best_metric and best_metric_mode set to tune.metric and tune.mode).",
    )
    tune: TuneConfig = Field(..., description="The validated tune: block.")
