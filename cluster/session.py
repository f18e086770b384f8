"""Where work runs: the embedded local Ray by default, or an existing cluster by address.

`connect` is the entry point. The embedded Ray is sized so that training workers can never hold
every logical CPU (Ray Data needs some, or its reads wait forever), binds its dashboard to
127.0.0.1, and keeps its files in its own temp dir.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("ferry.cluster")


@dataclass
class Session:
    """A live Ray connection; `embedded` sessions are shut down by whoever started them."""

    address: str
    embedded: bool
    dashboard_url: str | None


def connect(address: str | None, *, needed_cpus: float = 1.0, temp_dir: str | None = None) -> Session:
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
    port = free_port()
    # Ray Train's placement-group cleaner asks the State API whether the run's controller is
    # alive. Pointing it at this cluster's own dashboard matters when several Ray instances share
    # the machine: otherwise it may query another one, find no controller there, and remove the
    # live run's placement group (seen on Ray 2.60). Set before init: Ray's processes inherit it.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
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
    return Session(info.address_info["gcs_address"], embedded=True, dashboard_url=info.dashboard_url)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disconnect(session: Session) -> None:
    """Shut down what this process started (never other Ray instances on the machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
