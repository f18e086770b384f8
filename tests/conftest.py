"""Shared fixtures: one real local Ray per test session, tiny generated datasets, run specs.

Nothing downloads: models are tiny presets (random init, tokenizer trained in-process) or small
pretrained models installed from the package index.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pytest

from trainers.config_load import build_spec

POS = ["good", "great", "excellent", "tasty", "love", "fresh", "delicious", "superb"]
NEG = ["bad", "awful", "terrible", "stale", "hate", "gross", "bland", "broken"]
LM_SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning",
                "rain falls on the roof", "the sun rises in the east"]


def ferry_command(*args) -> list[str]:
    """The `ferry` CLI as a subprocess command line (this interpreter, this checkout)."""
    return [sys.executable, "-m", "cluster.cli", *args]


def ferry_env() -> dict[str, str]:
    """The environment of a `ferry` subprocess: unbuffered, so its lines arrive as printed."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_ferry(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    """`ferry ARGS` run to its end in `cwd`, its output captured as text."""
    return subprocess.run(ferry_command(*args), cwd=cwd, env=ferry_env(), capture_output=True,
                          text=True, timeout=timeout)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(POS if label == "pos" else NEG, rng.randint(2, 4))
        rows.append({"text": f"this product is {' '.join(words)} really", "label": label})
    return rows


def lm_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " . ".join(rng.choice(LM_SENTENCES) for _ in range(rng.randint(1, 4)))}
            for _ in range(n)]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray for the whole session, in its own temp dir, shut down at the end.

    6 logical CPUs on a 2-core machine: 2 training workers + Ray Data + the trial driver fit
    without any test waiting on resources (training is light; CPU oversubscription is fine).
    """
    import ray
    import ray.data

    from cluster.session import free_port

    temp_dir = tempfile.mkdtemp(prefix="ferry-ray-", dir="/tmp")
    # Own dashboard + State API address: Ray Train's placement-group cleaner must query this
    # cluster, not another Ray on the machine (see cluster.session.connect).
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, _temp_dir=temp_dir, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "cls.jsonl", classification_rows(320))
    write_jsonl(d / "lm.jsonl", lm_rows(240))
    return d


def make_spec(tmp_path, kind: str, data_dir, **sections):
    """A run spec for a tiny preset: kind = 'cls' (tiny-bert) or 'lm' (tiny-llama)."""
    raw = {
        "run": {"name": "t", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-bert" if kind == "cls" else "tiny-llama"},
        "task": {"type": "sequence_classification" if kind == "cls" else "causal_lm"},
        "data": {"train_files": [str(data_dir / ("cls.jsonl" if kind == "cls" else "lm.jsonl"))],
                 "max_seq_length": 32},
        # The frozen probe beside classification fine-tunes is tested in test_probe.py; here it
        # would only add a feature extraction to every run.
        "train": {"learning_rate": 3e-3, "num_epochs": 2, "eval_every_n_steps": 10,
                  "micro_batch_size_per_worker": 4, "eval_batch_size_per_worker": 16,
                  "probe_baseline": False},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    }
    return spec_with(raw, sections)


def spec_with(raw: dict, sections: dict):
    """`raw` with each section's keys merged in (a dict) or replaced (a value), validated."""
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return build_spec(raw)


@pytest.fixture
def spec_factory(tmp_path, data_dir):
    return lambda kind, **sections: make_spec(tmp_path, kind, data_dir, **sections)


def pytest_configure(config):
    # Offline by construction: any accidental hub access fails fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The embedded Ray's polling interval for every Ray this suite starts (the session Ray,
    # simulated clusters, CLI subprocesses): a checkpointed report waits for the next poll.
    from cluster.session import apply_local_ray_env

    apply_local_ray_env()


@pytest.fixture(scope="session")
def stopped_run(ray_session, tmp_path_factory, data_dir):
    """16 training rows with random labels (as tests/test_tune.py's overfitting trial): a high
    learning rate memorizes them while held-out loss rises. 2 workers, ZeRO-3, full fine-tuning:
    the best export consolidates weight shards on the driver. Tracked (MLflow in the default
    SQLite store, TensorBoard): tests/test_early_stopping.py and tests/test_tracking.py both read
    this one run."""
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    root = tmp_path_factory.mktemp("early-stop")
    rng = random.Random(1)
    rows = [dict(r, label=rng.choice(["pos", "neg"])) for r in classification_rows(16, seed=3)]
    val = [dict(r, label=rng.choice(["pos", "neg"])) for r in classification_rows(64, seed=4)]
    data = {
        "train_files": [write_jsonl(root / "train.jsonl", rows)],
        "validation_files": [write_jsonl(root / "val.jsonl", val)],
    }
    spec = make_spec(
        root,
        "cls",
        data_dir,
        method="full",
        run={"name": "stops"},
        data=data,
        deepspeed={"zero_stage": 3},
        tracking={"mlflow": True, "tensorboard": True},
        train={
            "learning_rate": 1e-2,
            "num_epochs": 20,
            "micro_batch_size_per_worker": 4,
            "eval_every_n_steps": 3,
            "lr_schedule": "constant",
            "log_every_n_steps": 1000,
            # Overfitting sets in around step 15; the plateau rule would fire first on the flat
            # start of a random-init model, so it is off here.
            "early_stopping": {
                "grace_period": 2,
                "patience": 2,
                "min_delta": 0.02,
                "plateau_patience": None,
            },
        },
    )
    return spec, train(prepare_run(spec))
