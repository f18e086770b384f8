"""The errors Ferry raises, and how a worker's error reaches the driver's terminal.

Every entry point raises these; the CLI turns them into one line and an exit code (2 for input
errors, 1 for a run that started and failed).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class ConfigError(ValueError):
    """One or more config problems, each formatted `"<dotted.key>=<value>: <rule>. <fix>."`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class DataError(ValueError):
    """Bad input data: names the file, row and the fix."""


class TrainingFailedError(RuntimeError):
    """The distributed run failed; the message carries the worker's own error."""


class DivergedError(RuntimeError):
    """The training loss, evaluation loss or gradient norm became NaN/inf; the last checkpoint
    whose metrics are finite is kept. Not retried: the same state diverges the same way."""


class CheckpointError(RuntimeError):
    """A checkpoint does not verify against its manifests (truncated, missing or changed files).
    Not retried: loading it again fails the same way; a rerun falls back to an earlier one."""


def root_message(e: BaseException) -> str:
    """The innermost non-empty message of an exception chain, as `Type: last line`: Ray wraps a
    worker's exception in several layers whose own messages name Ray internals."""
    seen, cur = [], e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in reversed(seen):
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
