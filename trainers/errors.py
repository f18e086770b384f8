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


class DataError(ValueError):
    """Bad input data: names the file, row and the fix."""


class DiskFullError(RuntimeError):
    """A disk filled up while Ferry wrote to storage: names the setting, the path and the fix."""


class TrainingFailedError(RuntimeError):
    """The distributed run failed; the message carries the worker's own error."""


class DivergedError(RuntimeError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


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


def _full_disk(e: BaseException) -> tuple[bool, str | None]:
    """(whether the exception chain holds ENOSPC, the file it names if any)."""
    seen, cur = [], e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for exc in seen:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True, exc.filename
        if _NO_SPACE in str(exc):
            # Python's own OSError text ends with the file: "...device: '/path'".
            named = re.search(_NO_SPACE + r": '([^']+)'", str(exc))
            return True, named.group(1) if named else None
    return False, None
