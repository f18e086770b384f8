"""Where work runs: the embedded local Ray by default, or an existing cluster by address.

`ray_session` is the entry point: a `with` block connected to Ray (`connect`) that shuts down,
on the way out, the embedded Ray it started (`disconnect`). The embedded Ray is sized so that
training workers can never hold every logical CPU (Ray Data needs some, or its reads wait
forever) and, unless the user names a number, never beyond the machine's cores plus
EMBEDDED_EXTRA_CPUS (`check_embedded_cpus`, before it starts). It listens on 127.0.0.1 only
(GCS, raylet, dashboard, agents and workers; tests/test_jobs.py checks every listening
socket) and keeps its files in its own temp dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from trainers.config import ScalingConfig

log = logging.getLogger("ferry.cluster")


@dataclass
class Session:
    """A live Ray connection; `embedded` sessions are shut down by whoever started them."""

    address: str
    embedded: bool
    dashboard_url: str | None


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    needed_cpus: float = 1.0,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
) -> Iterator[Session]:
    """Connected to Ray for the `with` block: `connect` on entry; on exit, `disconnect` only if
    this block started an embedded Ray (a cluster, or a Ray already initialized in this process,
    outlives the block).

    Args:
        address: "auto", "ray://host:10001", "host:6379", or None for RAY_ADDRESS / embedded.
        needed_cpus: logical CPUs the run needs; see `connect`.
        num_cpus: logical CPUs an embedded Ray declares, whatever the run needs; see `connect`.
        temp_dir: Ray's session directory (default: Ray's own).
    """
    session = connect(address, needed_cpus=needed_cpus, num_cpus=num_cpus, temp_dir=temp_dir)
    try:
        yield session
    finally:
        if session.embedded:
            disconnect(session)


def connect(
    address: str | None,
    *,
    needed_cpus: float = 1.0,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
) -> Session:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    Args:
        address: "auto", "ray://host:10001", "host:6379", or None for RAY_ADDRESS / embedded.
        needed_cpus: logical CPUs the run needs (workers + Ray Data share). The embedded Ray
            declares at least this many, so a 2-worker run also works on a 2-core laptop; how
            many that may be is the caller's check (`check_embedded_cpus`), made before this.
        num_cpus: logical CPUs the embedded Ray declares instead (the user's explicit choice).
        temp_dir: Ray's session directory (default: Ray's own).
    """
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return Session(ctx.gcs_address, embedded=False, dashboard_url=None)
    address = address or os.environ.get("RAY_ADDRESS")
    # Progress bars from Ray Data would interleave with Ferry's own progress lines.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address:
        info = ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray cluster at %s", address)
        return Session(address, embedded=False, dashboard_url=info.dashboard_url)
    if num_cpus is None:
        num_cpus = int(-(-max(float(os.cpu_count() or 1), needed_cpus) // 1))
    apply_local_ray_env()
    port = free_port()
    # Ray Train's placement-group cleaner asks the State API whether the run's controller is
    # alive. Pointing it at this cluster's own dashboard matters when several Ray instances share
    # the machine: otherwise it may query another one, find no controller there, and remove the
    # live run's placement group (seen on Ray 2.60). Set before init: Ray's processes inherit it.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    _listen_on_loopback_only()
    info = ray.init(
        address="local",  # never join a stale cluster left behind in the temp dir
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("started embedded Ray (%d CPUs), dashboard %s", num_cpus, info.dashboard_url)
    return Session(
        info.address_info["gcs_address"], embedded=True, dashboard_url=info.dashboard_url
    )


# Logical CPUs an embedded Ray may declare beyond the machine's cores. Small machines need a
# little: 2 training workers + scaling.data_cpus (the defaults, and every shipped example) are 3
# on a 2-core laptop, and training there is light enough to share cores. Much more is a typo
# (scaling.num_workers=64) that would start as many DeepSpeed processes.
EMBEDDED_EXTRA_CPUS = 2


def starts_embedded(address: str | None) -> bool:
    """Whether `connect(address)` would start an embedded Ray (no address, no RAY_ADDRESS, and
    no Ray initialized in this process)."""
    import ray

    return not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()


def cpus_needed(
    scaling: ScalingConfig, *, workers: int | None = None, trial_cpus: float = 0.0
) -> float:
    """Logical CPUs a run holds at once: `workers` (default scaling.num_workers) x
    scaling.cpus_per_worker, Ray Data's scaling.data_cpus and a search's tune.trial_cpus."""
    n = scaling.num_workers if workers is None else workers
    return n * scaling.cpus_per_worker + scaling.data_cpus + trial_cpus


def check_embedded_cpus(
    scaling: ScalingConfig,
    *,
    workers: int | None = None,
    workers_key: str = "scaling.num_workers",
    trial_cpus: float = 0.0,
    cores: int | None = None,
) -> list[str]:
    """What an embedded Ray on this machine cannot declare: more logical CPUs than its cores
    plus EMBEDDED_EXTRA_CPUS. Checked before Ray starts; a cluster (--address) is checked by
    `trainers.preflight.check_resources` instead, and `--num-cpus` declares any number.

    Args:
        scaling: the run's scaling block.
        workers: processes holding scaling.cpus_per_worker each (default scaling.num_workers;
            0: Ray Data alone, as in ferry preprocess).
        workers_key: the setting that chose `workers`, named in the message.
        trial_cpus: a search's tune.trial_cpus (one trial at a time at the least).
        cores: the machine's cores (default os.cpu_count()).

    Returns:
        Problems in the house format.
    """
    cores = cores or os.cpu_count() or 1
    allowed = cores + EMBEDDED_EXTRA_CPUS
    n = scaling.num_workers if workers is None else workers
    need = cpus_needed(scaling, workers=n, trial_cpus=trial_cpus)
    if need <= allowed + 1e-9:
        return []
    fix = ", connect to a cluster with --address, or pass --num-cpus"
    fix += f" {int(-(-need // 1))} to declare that many anyway."
    machine = f"this machine has {cores} cores (embedded Ray allows up to {allowed})"
    if not n:
        return [
            f"scaling.data_cpus={scaling.data_cpus:g}: Ray Data would hold {need:g} CPUs, but "
            f"{machine}. Lower scaling.data_cpus{fix}"
        ]
    trial = f" + tune.trial_cpus={trial_cpus:g}" if trial_cpus else ""
    return [
        f"{workers_key}={n}: {n} workers x scaling.cpus_per_worker={scaling.cpus_per_worker:g} "
        f"+ scaling.data_cpus={scaling.data_cpus:g}{trial} = {need:g} CPUs, but {machine}. "
        f"Lower {workers_key} (fractional scaling.cpus_per_worker is fine){fix}"
    ]


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s),
# and a worker's report with a checkpoint waits for that poll. Measured on 2 cores, a 72-step run
# with 8 checkpoints spent 17.9 s in its train loop at 2 s and 10.0-10.7 s at 0.5 s (the whole
# fit 53 s -> 41-45 s). On one machine the extra polls cost nothing worth counting.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def apply_local_ray_env() -> None:
    """Set LOCAL_RAY_ENV where the user has not; before ray.init, so Ray's processes inherit it
    (Ray Train also forwards it from the driver to its controller at each fit)."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def _listen_on_loopback_only() -> None:
    """Make the embedded Ray bind 127.0.0.1 instead of every interface.

    `dashboard_host` only covers the dashboard: GCS, raylet, agents and workers bind the node IP,
    and `ray.init(_node_ip_address="127.0.0.1")` is silently replaced by the host's network
    address (Ray 2.60), leaving them on `::`/0.0.0.0. Ray's "no cluster" mode, meant for laptops,
    is what makes it pick 127.0.0.1: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`. Ray reads it into a
    constant at import, and the CLI has imported Ray by now, so set both: the constant for this
    process, the variable for the processes Ray starts. Side effect: no other node can join this
    Ray, which is the point of an embedded one.
    """
    import ray._private.ray_constants as ray_constants

    global _cluster_setting_before
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    _cluster_setting_before = (os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER)
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# What `_listen_on_loopback_only` replaced; `disconnect` puts it back so that a later `connect`
# to a real cluster in the same process gets a routable node address again.
_cluster_setting_before: tuple[str | None, bool] | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    Every socket stays bound until all `n` are chosen: the kernel may hand a just-closed port out
    again, and one port given to two Ray components fails the node's start.
    """
    import socket
    from contextlib import ExitStack

    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def disconnect(session: Session) -> None:
    """Shut down what this process started (never other Ray instances on the machine)."""
    import ray

    global _cluster_setting_before
    if ray.is_initialized():
        ray.shutdown()
    if session.embedded and _cluster_setting_before is not None:
        import ray._private.ray_constants as ray_constants

        env_value, constant = _cluster_setting_before
        name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
        if env_value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env_value
        ray_constants.ENABLE_RAY_CLUSTER = constant
        _cluster_setting_before = None
