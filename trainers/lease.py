"""One writer per run: a lease file in the run's folder names the driver that writes the run.

`hold_run` is the entry point: a `with` block around one training run (trainers.train.launch)
that takes `<run_dir>/LEASE_FILE` (host, pid, start and heartbeat times), refreshes its heartbeat
from a daemon thread every HEARTBEAT_EVERY_S and removes it on the way out. `lease_problems` is
the read-only check of the pre-run checks (trainers.preflight.check_rerun): a second driver is
refused in a second, before Ray starts; taking the lease in `hold_run` closes the race.

Without it nothing stops two drivers writing one run folder (a rerun while the first driver still
lives, two submissions of one config to a long-lived cluster): both would write checkpoints, the
recorded config and the export over each other.

A lease's driver counts as alive when its heartbeat is younger than LEASE_STALE_AFTER_S and, on
this host, its pid exists and is not this process's. Any other lease is stale (its driver died)
and is taken over with one warning. Locally the lease is created atomically (O_CREAT|O_EXCL); a
takeover replaces it and reads it back, so of two drivers taking over one stale lease the one
that reads back someone else's lease gives up. In a bucket (s3://, gs://) there is no
create-if-absent: read, then write and read back, best effort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from trainers.errors import ConfigError
from trainers.storage import (
    LEASE_FILE,
    exists,
    filesystem,
    is_uri,
    join,
    read_json_if_any,
    write_bytes,
)

log = logging.getLogger("ferry.lease")

HEARTBEAT_EVERY_S = 10.0
# Six missed heartbeats: the driver died (on another host its pid cannot be checked) or hangs.
# Also applies on this host: a driver killed without cleanup leaves its pid to be reused by an
# unrelated process, whose lease must not block the run (nor invite a `kill` of that process).
LEASE_STALE_AFTER_S = 60.0


@dataclass(frozen=True)
class Lease:
    """Who writes a run: times are Unix seconds; `token` tells this driver's lease from a later
    one of the same host and pid."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float | None = None) -> str:
        """`pid 1234 on host h, started 12:00:01, heartbeat 3 s ago`."""
        now = time.time() if now is None else now
        same_day = time.localtime(self.started)[:3] == time.localtime(now)[:3]
        started = time.strftime(
            "%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", time.localtime(self.started)
        )
        return (
            f"pid {self.pid} on host {self.host}, started {started}, "
            f"heartbeat {max(now - self.heartbeat, 0):.0f} s ago"
        )


@contextlib.contextmanager
def hold_run(run_dir: str, run_name: str) -> Iterator[Lease]:
    """This driver's lease on `run_dir` for the `with` block: taken on entry (a stale one taken
    over with a warning), its heartbeat refreshed meanwhile, removed on exit.

    Raises:
        ConfigError: another driver holds a live lease (`run.name=...: another Ferry driver ...`).
    """
    lease = acquire_lease(run_dir, run_name)
    beat = _Heartbeat(run_dir, run_name, lease)
    beat.start()
    try:
        yield lease
    finally:
        beat.stop()
        release_lease(run_dir, lease)


def lease_problems(run_dir: str, run_name: str) -> list[str]:
    """The refusal when another driver holds a live lease on `run_dir`, else nothing (no lease,
    a stale one, or this process's)."""
    held = read_lease(run_dir)
    return [_refusal(run_name, held)] if held is not None and is_alive(held) else []


def is_alive(lease: Lease, now: float | None = None) -> bool:
    """Whether the lease's driver still runs: a fresh heartbeat and, on this host, a live pid
    that is not this process (this process's own lease is never in its way)."""
    now = time.time() if now is None else now
    if now - lease.heartbeat > LEASE_STALE_AFTER_S:
        return False
    if lease.host != socket.gethostname():
        return True
    return lease.pid != os.getpid() and _pid_exists(lease.pid)


def read_lease(run_dir: str) -> Lease | None:
    """The lease in `run_dir`, or None: no lease, or one that cannot be read (a lease is written
    whole, so that is a leftover of a crash mid-write, or its creator's first write under way)."""
    raw = read_json_if_any(join(run_dir, LEASE_FILE))
    try:
        return Lease(**raw) if isinstance(raw, dict) else None
    except TypeError:  # not a lease of this version
        return None


def acquire_lease(run_dir: str, run_name: str) -> Lease:
    """Take the lease on `run_dir` for this process (see `hold_run`).

    Raises:
        ConfigError: another driver holds a live lease.
    """
    now = time.time()
    mine = Lease(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
    path = join(run_dir, LEASE_FILE)
    if _create_exclusive(path, _encode(mine)):
        return mine
    held = _settled_lease(run_dir)
    if held is not None and is_alive(held):
        raise ConfigError([_refusal(run_name, held)])
    if held is not None and (held.host, held.pid) != (mine.host, mine.pid):
        log.warning(
            "run.name=%s: took over the lease of a driver that is gone (%s)",
            run_name,
            held.describe(now),
        )
    write_bytes(path, _encode(mine))
    back = read_lease(run_dir)
    if back is not None and back.token != mine.token:  # another driver took it over meanwhile
        raise ConfigError([_refusal(run_name, back)])
    return mine


def release_lease(run_dir: str, lease: Lease) -> None:
    """Remove the lease if it is still `lease` (a driver that lost it leaves the new one be)."""
    held = read_lease(run_dir)
    if held is None or held.token != lease.token:
        return
    fs, path = filesystem(join(run_dir, LEASE_FILE))
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


class _Heartbeat:
    """Refreshes the lease's heartbeat every HEARTBEAT_EVERY_S on a daemon thread (a driver that
    dies takes it along). Storage errors are warned about once and retried: a lease that goes
    stale meanwhile may be taken over, which is said once and ends the heartbeat."""

    def __init__(self, run_dir: str, run_name: str, lease: Lease):
        self.run_dir, self.run_name, self.lease = run_dir, run_name, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                held = read_lease(self.run_dir)
                if held is not None and held.token != self.lease.token:
                    log.warning(
                        "run.name=%s: another driver took over this run's lease (%s): its "
                        "heartbeat went stale. This run and that one now write the same folder.",
                        self.run_name,
                        held.describe(),
                    )
                    return
                beat = dataclasses.replace(self.lease, heartbeat=time.time())
                write_bytes(join(self.run_dir, LEASE_FILE), _encode(beat))
            except OSError as e:
                if not warned:
                    log.warning(
                        "run.name=%s: could not refresh the run's lease (%s)", self.run_name, e
                    )
                    warned = True


def _refusal(run_name: str, held: Lease) -> str:
    return (
        f"run.name={run_name}: another Ferry driver is writing this run ({held.describe()}). "
        f"Wait for it to end or stop it (kill {held.pid} on host {held.host}, or ferry jobs "
        "stop JOB_ID for a submitted job), then rerun; a lease whose driver died is taken over "
        f"(on its host at once, elsewhere {LEASE_STALE_AFTER_S:.0f} s after its last heartbeat)."
    )


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create the local file `path` with `data` if it does not exist, atomically; False if it
    exists, or for a bucket (no create-if-absent there: the caller reads, then writes)."""
    if is_uri(path) and not path.startswith("file://"):
        return False
    local = path.removeprefix("file://")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _settled_lease(run_dir: str) -> Lease | None:
    """`read_lease`, waiting briefly while the lease exists but cannot be read yet: its creator
    is between creating it and writing it (microseconds apart)."""
    for _ in range(5):
        held = read_lease(run_dir)
        if held is not None or not exists(join(run_dir, LEASE_FILE)):
            return held
        time.sleep(0.1)
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _encode(lease: Lease) -> bytes:
    return json.dumps(dataclasses.asdict(lease)).encode()
