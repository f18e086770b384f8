"""The errors Ferry raises, and how a worker's error reaches the driver's terminal.

Every entry point raises these; the CLI turns them into one line and an exit code (2 for input
errors, 1 for a run that started and failed).
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator


class ConfigError(ValueError):
    """One or more config problems, each formatted `"<dotted.key>=<value>: <rule>. <fix>."`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def __reduce__(self):
        # Pickled by its problems (it crosses processes: a worker's error travels to the
        # driver); the default would rebuild it from the joined message, one problem per letter.
        return (type(self), (self.problems,))


class DataError(ValueError):
    """Bad input data: names the file, row and the fix."""


class DiskFullError(RuntimeError):
    """A disk filled up while Ferry wrote to storage: names the setting, the path and the fix."""


class TrainingFailedError(RuntimeError):
    """The distributed run failed; the message carries the worker's own error."""


class DivergedError(RuntimeError):
    """The training loss, evaluation loss or gradient norm became NaN/inf; the last checkpoint
    whose metrics are finite is kept. Not retried: the same state diverges the same way."""


class CheckpointError(RuntimeError):
    """A checkpoint does not verify against its manifests (truncated, missing or changed files).
    Not retried: loading it again fails the same way; a rerun falls back to an earlier one."""


# Errors that a retry would raise again: Ray Train does not restart the workers for these
# (trainers.train.fail_fast), and the driver raises the worker's own (`run_error`).
NOT_RETRIED = (ConfigError, DataError, DivergedError, CheckpointError)


def run_error(e: BaseException) -> Exception:
    """The error the driver raises for a failed Ray Train run: the worker's own Ferry error (a
    DivergedError stays one, with its message), else a TrainingFailedError with `root_message`."""
    cause = _worker_cause(e)
    if isinstance(cause, NOT_RETRIED):
        return cause
    return TrainingFailedError(root_message(e))


def _worker_cause(e: BaseException) -> BaseException | None:
    """The exception inside Ray Train's wrapper of a failed run, found by the attributes Ray's
    public exceptions carry (so this module needs no Ray): a `ray.train.WorkerGroupError`'s
    `worker_failures` (rank -> the worker's exception; a Ferry error first, then the lowest rank)
    or a `ray.train.ControllerError`'s `controller_failure` (a callback's exception: see
    trainers.train.fail_fast)."""
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        ranked = [failures[rank] for rank in sorted(failures)]
        return next((f for f in ranked if isinstance(f, NOT_RETRIED)), ranked[0])
    cause = getattr(e, "controller_failure", None)
    return cause if isinstance(cause, BaseException) else None


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from or during, outermost first (each once)."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def root_message(e: BaseException) -> str:
    """The innermost non-empty message of an exception chain, as `Type: last line`: Ray wraps a
    worker's exception in several layers whose own messages name Ray internals (and a remote
    traceback's text); the worker's own exception is used when Ray's wrapper holds it."""
    e = _worker_cause(e) or e
    for exc in reversed(_chain(e)):
        text = str(exc).strip()
        if text:
            return f"{type(exc).__name__}: {text.splitlines()[-1][:1000]}"
    return repr(e)


@contextlib.contextmanager
def unwrap_data_errors() -> Iterator[None]:
    """Re-raise a DataError raised inside a Ray Data task as itself: Ray wraps it in a task
    error whose message names a Ray task, not the file and row."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        # The remote traceback travels as text; the original message is its DataError line.
        found = re.search(r"trainers\.errors\.DataError: (.+)", str(e))
        if found:
            raise DataError(found.group(1).strip()) from None
        raise


@contextlib.contextmanager
def on_full_disk(key: str, value: str, path: str) -> Iterator[None]:
    """Re-raise a full disk (ENOSPC) met in the block as one DiskFullError naming the setting
    `key`=`value` and what was being written (the error's own file, else `path`); every other
    error passes as it is. Ray hands a task's error over as text, so the text counts too."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        full, written = _full_disk(e)
        if not full:
            raise
        raise DiskFullError(
            f"{key}={value}: the disk is full (No space left on device) while writing "
            f"{written or path}. Free space there or point {key} at a larger volume; committed "
            "checkpoints are intact and a rerun resumes."
        ) from e


_NO_SPACE = "No space left on device"


def is_full_disk(e: BaseException) -> bool:
    """Whether the exception (or its chain, or its text) is a full disk (ENOSPC)."""
    return _full_disk(e)[0]


def _full_disk(e: BaseException) -> tuple[bool, str | None]:
    """(whether the exception chain holds ENOSPC, the file it names if any)."""
    for exc in _chain(e):
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True, exc.filename
        if _NO_SPACE in str(exc):
            # Python's own OSError text ends with the file: "...device: '/path'".
            named = re.search(_NO_SPACE + r": '([^']+)'", str(exc))
            return True, named.group(1) if named else None
    return False, None
