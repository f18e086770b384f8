"""A quiet terminal: Ferry's own lines on the terminal, what the libraries print in a log file.

`QuietTerminal` is the entry point: a `with` block around one CLI command (unless `--verbose`).
Inside it:

- file descriptors 1 and 2 point at a log file, so what Ray, Ray Data, Ray Train, DeepSpeed,
  transformers, torch and Python's warnings write on the driver lands there, from Python, C++
  (Ray's core worker) or Rust (tokenizers) alike;
- `sys.stdout` is still the terminal for what is printed (Ferry's tables, summaries, JSON; Ray
  Tune's trial tables), but not for logging handlers bound to it (DeepSpeed's logger takes
  sys.stdout when it is imported: on the driver that happens inside the block); the records of
  the `ferry.*` loggers show on the terminal as `[ferry] ...` lines (on stderr);
- what Ray forwards from its workers and actors (`log_to_driver`) goes to the log file, each line
  after its process as Ray shows it (`(RayTrainWorker pid=123) ...`), and the lines that start
  with `trainers.console.PREFIX` (progress, evaluations, the export) to the terminal as well.

The log file starts in the temp dir (`ferry-logs/<command>-<time>.log`): the run's folder is known
only once the command has read its config. `log_to` moves it into the run's `logs/` folder and
says where, once; a command that ends before that leaves a non-empty file where it is and says
where. On the way out everything is put back, before the CLI prints an error. Nothing is thrown
away: the log holds every line `--verbose` would show, except what Ferry prints to stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, TextIO

from trainers.console import PREFIX
from trainers.storage import is_uri

log = logging.getLogger("ferry.terminal")


class QuietTerminal:
    """The library output of one command in a log file; see the module docstring."""

    def __init__(self, command: str):
        self.command = command
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = os.path.join(
            tempfile.gettempdir(), "ferry-logs", f"{command}-{stamp}-{os.getpid()}.log"
        )
        self._moved = False
        self._saved: dict[int, int] = {}
        self._opened: list[TextIO] = []

    def __enter__(self) -> QuietTerminal:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._log = _open_log(self.path)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        out = self._on_terminal(sys.stdout)
        self._to_terminal = logging.StreamHandler(self._on_terminal(sys.stderr))
        self._to_terminal.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        self._stdout_before = sys.stdout
        for fd in (1, 2):
            os.dup2(self._log.fileno(), fd)
        sys.stdout = _Stdout(out, self._stdout_before)
        # Ferry's records also reach the root logger's handler, whose stream is now the log.
        logging.getLogger("ferry").addHandler(self._to_terminal)
        self._workers = _WorkerOutput(self._log, out)
        self._workers.start()
        return self

    def log_to(self, log_dir: str) -> str:
        """Move the log, with what it holds so far, to a new file in `log_dir` (a run's logs/
        folder; a bucket's gets a local stand-in, see `log_path`) and say where. Once: later
        calls keep the first folder.

        Returns:
            The log file's path.
        """
        if self._moved:
            return self.path
        path = log_path(log_dir, self.command)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        moved = _open_log(path)
        for stream in (self._stdout_before, sys.stderr):
            stream.flush()
        with open(self.path, encoding="utf-8", errors="replace") as so_far:
            shutil.copyfileobj(so_far, moved)
        for fd in (1, 2):
            os.dup2(moved.fileno(), fd)
        self._workers.switch(moved)
        self._log.close()
        os.remove(self.path)
        self._log, self.path, self._moved = moved, path, True
        log.info("library logs: %s", path)
        return path

    def __exit__(self, *exc_info: Any) -> None:
        self._workers.stop()
        for stream in (self._stdout_before, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if not self._moved and os.path.getsize(self.path) > 0:
            log.info("library logs: %s", self.path)
        logging.getLogger("ferry").removeHandler(self._to_terminal)
        sys.stdout = self._stdout_before
        for stream in (*self._opened, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in self._saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for stream in self._opened:
            stream.close()
        self._log.close()
        if not self._moved and os.path.getsize(self.path) == 0:
            os.remove(self.path)

    def _on_terminal(self, stream: TextIO) -> TextIO:
        """Where `stream` keeps writing inside the block: a new stream on the saved copy of its
        file descriptor when that is 1 or 2 (about to point at the log), else `stream` itself (it
        goes elsewhere already: a test's capture, or stderr's copy that `ferry preprocess` makes
        stdout)."""
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            return stream
        if fd not in self._saved:
            return stream
        copy = open(  # closed in __exit__
            self._saved[fd],
            "w",
            buffering=1,
            encoding=stream.encoding,
            errors=stream.errors,
            closefd=False,
        )
        self._opened.append(copy)
        return copy


class _Stdout:
    """sys.stdout inside the block: what is printed goes to the terminal; what a logging handler
    writes goes to the file descriptor under the stream sys.stdout was before (the log)."""

    def __init__(self, terminal: TextIO, log_stream: TextIO):
        self._terminal, self._log_stream = terminal, log_stream

    def write(self, text: str) -> int:
        # StreamHandler.emit calls stream.write itself; print() leaves no Python frame between.
        if sys._getframe(1).f_code is _EMIT:
            return self._log_stream.write(text)
        return self._terminal.write(text)

    def flush(self) -> None:
        self._terminal.flush()
        self._log_stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the terminal
        return getattr(self._terminal, name)


_EMIT = logging.StreamHandler.emit.__code__


def _open_log(path: str) -> TextIO:
    return open(path, "a", buffering=1, encoding="utf-8", errors="replace")


def log_path(log_dir: str, command: str) -> str:
    """`<log_dir>/<command>-<YYYYmmdd-HHMMSS>.log`. For a bucket's run folder (s3://, gs://) the
    folder is local instead (a file descriptor needs a local file):
    `<temp dir>/ferry-logs/<run name>/logs`."""
    if log_dir.startswith("file://"):
        log_dir = log_dir.removeprefix("file://")
    elif is_uri(log_dir):
        run_and_logs = log_dir.split("://", 1)[1].strip("/").split("/")[-2:]
        log_dir = os.path.join(tempfile.gettempdir(), "ferry-logs", *run_and_logs)
    return os.path.join(log_dir, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log")


class _WorkerOutput:
    """Ray's forwarded worker output: every line to the log file, Ferry's also to the terminal.

    Ray's driver reads what its workers and actors print (log_to_driver) on a thread that hands
    each batch to the handlers of `ray._private.ray_logging.global_worker_stdstream_dispatcher`;
    Ray's own handler prints it to sys.stdout/sys.stderr. For the block, Ray's printing is switched
    off (`ray._private.worker._worker_logs_enabled`, the switch Ray's debugger uses while it holds
    the terminal) and this handler is added. Both are Ray internals (2.60): tests/test_cli.py
    fails if a worker line reaches the terminal.
    """

    NAME = "ferry_quiet_terminal"

    def __init__(self, log_file: TextIO, terminal: TextIO):
        self.log_file, self.terminal = log_file, terminal
        self._ray_printed: bool | None = None
        self._lock = threading.Lock()  # Ray's thread writes while the driver may switch files

    def switch(self, log_file: TextIO) -> None:
        with self._lock:
            self.log_file = log_file

    def start(self) -> None:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        self._ray_printed = ray_worker._worker_logs_enabled
        ray_worker._worker_logs_enabled = False
        global_worker_stdstream_dispatcher.add_handler(self.NAME, self)

    def stop(self) -> None:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        # Returns once a batch being handled is done (the dispatcher holds its lock meanwhile).
        global_worker_stdstream_dispatcher.remove_handler(self.NAME)
        ray_worker._worker_logs_enabled = self._ray_printed

    def __call__(self, data: dict[str, Any]) -> None:
        source = _source(data)
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":
            from ray._private.worker import filter_autoscaler_events

            # Ray's monitor sends its whole status report; Ray shows only its events.
            lines = list(filter_autoscaler_events(lines))
        ours = [line for line in lines if line.startswith(PREFIX)]
        with self._lock:
            self.log_file.writelines(f"{source} {line}\n" for line in lines)
        if ours:
            self.terminal.writelines(line + "\n" for line in ours)
            self.terminal.flush()


def _source(data: dict[str, Any]) -> str:
    """The process of a forwarded batch as Ray prints it: `(RayTrainWorker pid=123)`."""
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        return f"({pid})"
    name = data.get("actor_name") or data.get("task_name")
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={pid}{where})"
