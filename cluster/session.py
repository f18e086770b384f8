"""Where work runs: the embedded local Ray by default, or an existing cluster by address.

`ray_session` is the entry point: a `with` block connected to Ray (`connect`) that shuts down,
on the way out, the embedded Ray it started (`disconnect`). The embedded Ray is sized so that
training workers can never hold every logical CPU (Ray Data needs some, or its reads wait
forever), listens on 127.0.0.1 only (GCS, raylet, dashboard, agents and workers;
tests/test_jobs.py checks every listening socket), and keeps its files in its own temp dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("ferry.cluster")


@dataclass
class Session:
    """A live Ray connection; `embedded` sessions are shut down by whoever started them."""

    address: str
    embedded: bool
    dashboard_url: str | None


@contextlib.contextmanager
def ray_session(
    address: str | None, *, needed_cpus: float = 1.0, temp_dir: str | None = None
) -> Iterator[Session]:
    """Connected to Ray for the `with` block: `connect` on entry; on exit, `disconnect` only if
    this block started an embedded Ray (a cluster, or a Ray already initialized in this process,
    outlives the block).

    Args:
        address: "auto", "ray://host:10001", "host:6379", or None for RAY_ADDRESS / embedded.
        needed_cpus: logical CPUs the run needs; see `connect`.
        temp_dir: Ray's session directory (default: Ray's own).
    """
    session = connect(address, needed_cpus=needed_cpus, temp_dir=temp_dir)
    try:
        yield session
    finally:
        if session.embedded:
            disconnect(session)


def connect(
    address: str | None, *, needed_cpus: float = 1.0, temp_dir: str | None = None
) -> Session:
    """Connect to `address` (or RAY_ADDRESS), else start an embedded local Ray.

    Args:
        address: "auto", "ray://host:10001", "host:6379", or None for RAY_ADDRESS / embedded.
        needed_cpus: logical CPUs the run needs (workers + Ray Data share). The embedded Ray
            declares at least this many, so a 2-worker run also works on a 2-core laptop.
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
    num_cpus = max(float(os.cpu_count() or 1), needed_cpus)
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
        num_cpus=int(-(-num_cpus // 1)),
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
