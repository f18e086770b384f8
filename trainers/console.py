"""Ferry's own lines from any process of a run: what the user's terminal shows.

`say` is the entry point: it prints one line that starts with PREFIX. On a Ray worker or actor
(the training loop, the run reporter on Ray Train's controller) Ray forwards the line to the
driver; the CLI's quiet terminal (`cluster.terminal`) shows the lines that start with PREFIX and
sends everything else those processes print to the run's log file.
"""

from __future__ import annotations

import sys

PREFIX = "[ferry] "


def say(line: str) -> None:
    """Print `line` (which starts with PREFIX) for the driver's terminal. To the process's real
    stdout: on a training worker Ray Train patches print() into a logger and also tees it to
    sys.stdout when a library has wrapped that stream, which printed every line twice."""
    print(line, file=sys.__stdout__, flush=True)
