"""Multi-node scenarios for tests/test_multinode.py, run in a process of their own.

A Ray cluster of four nodes on one machine (`ray.cluster_utils.Cluster`: a 0-CPU head, where this
driver runs, and three 1-CPU nodes) cannot share a process with the test session's single-node
Ray, hence the separate process. Reads {scenario: run config} as JSON on stdin, prints one line
`FERRY_RESULT <json>` with what each scenario produced:

  unmarked, strict_spread, ...   train() must refuse up front -> {"type", "text", "seconds"}
  check:<name>                   check_storage() only -> its problems
  train                          a real 2-worker run -> nodes of the ranks, checkpoint, export
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time

NODES = 3  # 1-CPU worker nodes besides the 0-CPU head


def main() -> None:
    # A hard deadline that still runs the cleanup below: a killed process would leave the nodes'
    # agents running.
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(int(os.environ.get("FERRY_MULTINODE_DEADLINE_S", "150")))
    temp_dir = tempfile.mkdtemp(prefix="ferry-mn-", dir="/tmp")
    # cluster_utils writes its address file into Ray's default temp dir: keep it (and the session
    # files) in our own, away from other Ray instances on the machine.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    from cluster.session import free_port

    port = free_port()
    # Ray Train's placement-group cleaner must query this cluster's State API (cluster.session).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
        for _ in range(NODES):
            cluster.add_node(wait=False, num_cpus=1)
        cluster.wait_for_nodes(timeout=90)
        cluster.connect()
        _say("cluster up")
        # Read only now: the caller prepares the data cache while the nodes start.
        scenarios = json.load(sys.stdin)
        result = {"head": ray.get_runtime_context().get_node_id(),
                  "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
        for name, raw in scenarios.items():
            result[name] = _run(name, raw)
            _say(f"{name} done")
        print("FERRY_RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _deadline(signum, frame) -> None:
    raise TimeoutError("multi-node scenarios ran past FERRY_MULTINODE_DEADLINE_S")


_START = time.perf_counter()


def _say(text: str) -> None:
    print(f"[multinode {time.perf_counter() - _START:6.1f}s] {text}", file=sys.stderr, flush=True)


def _run(name: str, raw: dict) -> object:
    from trainers.config_load import build_spec
    from trainers.errors import ConfigError
    from trainers.preflight import check_storage, prepare_run
    from trainers.train.launch import train

    spec = build_spec(raw)
    if name.startswith("check:"):
        return check_storage(spec)
    start = time.perf_counter()
    try:
        outcome = train(prepare_run(spec))
    except ConfigError as e:
        return {"type": "ConfigError", "text": str(e), "seconds": time.perf_counter() - start}
    if name != "train":
        return {"type": None, "text": "trained instead of refusing", "seconds": time.perf_counter() - start}
    ckpt = outcome.checkpoint_path
    return {
        "checkpoint": ckpt,
        "export_dir": outcome.export_dir,
        "steps": outcome.metrics["steps"],
        "rank_nodes": [open(os.path.join(ckpt, f"node_rank{r}.txt")).read() for r in range(2)],
    }


if __name__ == "__main__":
    main()
