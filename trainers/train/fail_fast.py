"""A run whose worker raised an error that a retry would raise again fails at once.

`FailFast` is the entry point: a Ray Train callback (`RunConfig(callbacks=[...])`, on the run's
controller) for `trainers.train.launch.train`.

Ray Train V2 (2.60) restarts the worker group after any worker error, up to
scaling.max_failures times, from the last checkpoint: a run that diverged (DivergedError) or
met bad data would fail the same way again, each time after the whole start-up. Ray has no
public way to choose which errors it retries (its failure policy is built inside the trainer:
ray/train/v2/_internal/execution/failure_handling). What it never retries is a failure of the
controller itself, and an exception raised by a user callback is one: the controller wraps it in
a `ray.train.ControllerError`, whose failure policy decision is RAISE. So `after_exception`, which
the controller calls with the workers' exceptions as soon as it sees them, re-raises the worker's
own error when it is one of `trainers.errors.NOT_RETRIED`; the driver gets it back inside the
ControllerError and raises it as itself (`trainers.errors.run_error`).
"""

from __future__ import annotations

import ray.train

from trainers.errors import NOT_RETRIED, is_full_disk


class FailFast(ray.train.UserCallback):
    """Ends the run, without a retry, when a worker raised one of NOT_RETRIED or met a full
    disk."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = worker_exceptions[rank]
            # A full disk stays full for the retry: it fails the same way (is_full_disk).
            if isinstance(error, NOT_RETRIED) or is_full_disk(error):
                raise error
