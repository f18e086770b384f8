"""Multi-node correctness: shared storage, placement, and a real ZeRO run spread over nodes.

The multi-node scenarios run once, in a separate process holding a four-node Ray cluster
(tests/_multinode_run.py); each test below asserts one thing about what they produced. The
single-node checks use the session's local Ray.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from trainers.errors import ConfigError
from trainers.preflight import check_storage, prepare_run
from trainers.train.launch import train

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPREAD = {"placement_strategy": "STRICT_SPREAD", "cpus_per_worker": 1, "data_cpus": 1}
DEADLINE_S = 240  # the scenario process stops itself (and its nodes) after this; it took 135 s at load 15


@pytest.fixture(scope="module")
def multinode(request, tmp_path_factory, data_dir):
    """What tests/_multinode_run.py produced on a 0-CPU head + three 1-CPU nodes."""
    tmp = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "FERRY_MULTINODE_DEADLINE_S": str(DEADLINE_S)}
    log_path = tmp / "multinode.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_multinode_run.py")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env, cwd=tmp)
    try:
        out = proc.communicate(json.dumps(_scenarios(request, tmp, data_dir)), timeout=DEADLINE_S + 60)[0]
    except BaseException:
        proc.send_signal(signal.SIGINT)  # its `finally` shuts the nodes down
        proc.wait(60)
        raise
    lines = [x for x in out.splitlines() if x.startswith("FERRY_RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:] + log_path.read_text()[-6000:]
    return json.loads(lines[-1].removeprefix("FERRY_RESULT "))


def _scenarios(request, tmp, data_dir) -> dict:
    from conftest import make_spec

    from trainers.data.prepare import prepare_dataset
    from trainers.model import load_tokenizer_for

    # While the nodes start, tokenize the data into a cache on the session's single-node Ray: the
    # multi-node run then hits the cache instead of spending a minute in Ray Data on 1-CPU nodes.
    cache = {"cache_dir": str(tmp / "cache")}
    request.getfixturevalue("ray_session")
    spec = make_spec(tmp / "prepare", "cls", data_dir, data=cache)
    prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))

    def raw(name, **sections):
        return make_spec(tmp / name, "cls", data_dir, **sections).model_dump(mode="json")

    shared = {"name": "mn", "storage_shared": True}
    (tmp / "a-file").write_text("not a directory")
    return {
        # First: it starts a worker process on every node, which the later scenarios reuse.
        "check:marked": raw("marked", run=shared, data=cache),
        "check:uri": {**raw("uri"), "run": {"name": "t", "storage_path": "s3://ferry-bucket/runs"}},
        "check:unwritable": raw("unwritable", run={**shared, "storage_path": str(tmp / "a-file" / "runs")}),
        "unmarked": raw("unmarked", scaling=SPREAD, data=cache),
        # 4 x 0.5 CPU + 1 for Ray Data fits the cluster's 3 CPUs, but only 3 nodes have a CPU.
        "strict_spread": raw("spread", run=shared, data=cache,
                             scaling={**SPREAD, "num_workers": 4, "cpus_per_worker": 0.5}),
        "train": raw("train", run=shared, data=cache, scaling=SPREAD, deepspeed={"zero_stage": 2},
                     train={"max_steps": 2, "eval_every_n_steps": 2, "eval_before_training": False}),
    }


@pytest.mark.timeout(DEADLINE_S + 90)
def test_zero_run_spreads_over_nodes_and_checkpoints_every_shard(multinode):
    run = multinode["train"]
    assert run["steps"] == 2
    # STRICT_SPREAD: two ranks on two distinct worker nodes (the 0-CPU head holds no worker).
    a, b = run["rank_nodes"]
    assert a != b and {a, b} <= set(multinode["nodes"]) - {multinode["head"]}
    # Each rank's ZeRO-2 optimizer shard, written on its own node, landed in one checkpoint folder.
    for rank in (0, 1):
        assert glob.glob(os.path.join(run["checkpoint"], "ds", f"*zero_pp_rank_{rank}_*optim_states.pt"))
    assert os.path.basename(run["checkpoint"]) == "checkpoint_step_0000002"
    assert os.path.exists(os.path.join(run["export_dir"], "adapter_model.safetensors"))
    with open(os.path.join(run["export_dir"], "metrics.json")) as f:
        assert json.load(f)["steps"] == 2


def test_unmarked_local_storage_is_refused_on_a_multi_node_cluster(multinode):
    err = multinode["unmarked"]
    assert err["type"] == "ConfigError"
    assert re.search(
        r"run\.storage_path=/\S+: the cluster has 4 nodes and this path is local to each of them, "
        r"so workers would write checkpoints the others \(and a resumed run\) cannot see\. "
        r"Set run\.storage_path to shared storage .* run\.storage_shared=true\.", err["text"])
    # An explicit data.cache_dir is written by Ray Data tasks on any node: the same rule applies.
    assert re.search(r"data\.cache_dir=/\S+/cache: the cluster has 4 nodes .* workers would write "
                     r"preprocessed data the others .* Set data\.cache_dir to shared storage", err["text"])
    assert err["seconds"] < 15  # refused before any data preparation or worker start


def test_uri_storage_passes_and_marked_shared_path_is_verified_on_every_node(multinode):
    assert multinode["check:uri"] == []
    # Same filesystem on every node here, so the marker written by the driver is seen by all four
    # nodes (the head included) and the verification passes.
    assert multinode["check:marked"] == []


def test_marked_shared_path_the_driver_cannot_write_is_refused(multinode):
    assert len(multinode["check:unwritable"]) == 1
    assert re.fullmatch(r"run\.storage_path=/\S+/a-file/runs: the driver cannot write there \(Not a "
                        r"directory\)\. Fix the mount or its permissions, or use a bucket URI "
                        r"\(s3://\.\.\., gs://\.\.\.\)\.", multinode["check:unwritable"][0])


def test_strict_spread_that_cannot_be_placed_is_refused_on_a_multi_node_cluster(multinode):
    err = multinode["strict_spread"]
    assert err["type"] == "ConfigError"
    assert re.fullmatch(
        r"scaling\.placement_strategy=STRICT_SPREAD: each of the scaling\.num_workers=4 workers needs "
        r"its own node with 0\.5 CPU, and the cluster has 3 such nodes \(of 4\), so the run "
        r"would wait forever\. Lower scaling\.num_workers to 3, use SPREAD or PACK, or add nodes\.", err["text"])


@pytest.mark.timeout(60)
def test_single_node_needs_no_shared_storage(ray_session, spec_factory):
    assert check_storage(spec_factory("cls")) == []


@pytest.mark.timeout(60)
def test_strict_spread_with_more_workers_than_nodes_is_refused_up_front(ray_session, spec_factory):
    spec = spec_factory("cls", scaling={"placement_strategy": "STRICT_SPREAD", "num_workers": 2})
    with pytest.raises(ConfigError, match=r"scaling\.placement_strategy=STRICT_SPREAD: each of the "
                       r"scaling\.num_workers=2 workers needs its own node with 1 CPU, and the "
                       r"cluster has 1 such node \(of 1\)"):
        train(prepare_run(spec))


def test_k8s_render_declares_the_mounted_pvc_shared():
    import yaml

    from cluster.k8s import render_manifests
    from trainers.config_load import build_spec

    base = {"model": {"preset": "tiny-llama"}, "task": {"type": "causal_lm"},
            "data": {"train_files": ["/mnt/ferry/data/x.jsonl"]}}
    for storage, shared in (("/mnt/ferry/runs", True), ("s3://ferry-bucket/runs", None)):
        spec = build_spec({**base, "run": {"name": "tiny", "storage_path": storage}})
        config_map = render_manifests(spec, "rayproject/ray:2.60.0-py311-gpu")[0]
        assert yaml.safe_load(config_map["data"]["run.yaml"])["run"]["storage_shared"] is shared
