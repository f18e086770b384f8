"""How many trials can run at once, computed from the cluster instead of guessed.

`size_trials` is the entry point. A trial holds its driver's CPU share plus its workers'
resources; Ray Data keeps `scaling.data_cpus`. Running more trials than fit leaves them PENDING
behind each other's placement groups (ray#38505, #18332); a trial that can never fit would wait
forever, so it is refused here, before anything starts.
"""

from __future__ import annotations

import math

from trainers.config import RunSpec
from tuning.config import TuneConfig


def size_trials(
    spec: RunSpec, tune_cfg: TuneConfig, resources: dict[str, float] | None = None
) -> tuple[int, list[str]]:
    """The number of trials to run concurrently, and problems if not even one fits.

    Args:
        spec: the base run (its scaling section sizes every trial).
        tune_cfg: the search (trial_cpus, max_concurrent_trials).
        resources: total cluster resources; default: the connected Ray cluster's.
    """
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    s = spec.scaling
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    per_trial_cpu = tune_cfg.trial_cpus + s.num_workers * s.cpus_per_worker
    per_trial_gpu = s.num_workers * s.gpus_per_worker
    free_cpu = cpus - s.data_cpus
    fit = math.floor((free_cpu + 1e-9) / per_trial_cpu) if per_trial_cpu > 0 else 1 << 30
    if per_trial_gpu > 0:
        fit = min(fit, math.floor((gpus + 1e-9) / per_trial_gpu))
    if fit < 1:
        need = f"{per_trial_cpu:g} CPUs" + (f" and {per_trial_gpu:g} GPUs" if per_trial_gpu else "")
        return 0, [
            f"scaling.num_workers={s.num_workers}: one trial needs {need} (tune.trial_cpus="
            f"{tune_cfg.trial_cpus:g} + workers x scaling.cpus_per_worker={s.cpus_per_worker:g}"
            + (
                f", workers x scaling.gpus_per_worker={s.gpus_per_worker:g}"
                if per_trial_gpu
                else ""
            )
            + f") plus scaling.data_cpus={s.data_cpus:g} for Ray Data, but the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs. Lower num_workers or cpus_per_worker, or add nodes."
        ]
    if tune_cfg.max_concurrent_trials is not None:
        fit = min(fit, tune_cfg.max_concurrent_trials)
    return fit, []
