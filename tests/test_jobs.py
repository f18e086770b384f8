"""`ferry submit` and `ferry jobs` against a real Ray head with token auth; packaging without one.

One Ray head for the module, started with `ray start --head --block` in its own process group,
on 127.0.0.1 with its own ports and temp dir, and stopped by killing that group (never `ray stop`,
which would kill every Ray on the machine). Nothing here calls `ray.init` in the pytest process:
the CLI runs in subprocesses, and the packaging test uses Ferry's client only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from conftest import classification_rows, lm_rows, write_jsonl

from cluster import jobs
from cluster.session import free_ports
from trainers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SECRET_NAME = "FERRY_TEST_SECRET"
_CLIENT_ENV_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_ADDRESS", "RAY_AUTH_TOKEN",
                    "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


@dataclass
class Head:
    url: str
    token: str
    temp_dir: str
    home: str  # a HOME without ~/.ray/auth_token, so "no token" really means none


@pytest.fixture(scope="module")
def head():
    """A Ray head with token auth on, its dashboard (Jobs API) and every port on 127.0.0.1."""
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="ferry-head-", dir="/tmp")  # short: Ray's socket paths
    home = os.path.join(temp_dir, "home")
    os.makedirs(home)
    # Distinct ports, chosen together (one port handed to two components fails the start).
    dash, gcs, *component_ports = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP and k != "PYTHONPATH"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # Ray Train's placement-group cleaner must ask this cluster's dashboard (see session.py).
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}",
        # The job's `python` must be the one with Ray, as on a cluster image.
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        # Every Ray process on 127.0.0.1, as for the embedded Ray (see session.py).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    # No PYTHONPATH to this checkout: the job must run the Ferry shipped with it (py_modules).
    ports = dict(zip((
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port"),
        component_ports, strict=True))
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--num-cpus=4",
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                r = requests.get(f"{url}/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "Ray head did not start in 90 s"
            time.sleep(0.5)
        yield Head(url, token, temp_dir, home)
    finally:
        # The group is gone already when the head failed to start: let that failure show.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        # `ray start --block` stops its children one by one (20-30 s here): end the rest now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ferry_env(head: Head, token: str | None = "head", env_extra=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}
    env.update(PYTHONUNBUFFERED="1", HOME=head.home, RAY_JOB_ADDRESS=head.url,
               PYTHONPATH=str(REPO))
    if token is not None:
        env["RAY_AUTH_TOKEN"] = head.token if token == "head" else token
    env.update(env_extra or {})
    return env


def _ferry(*args, head: Head, cwd, token: str | None = "head", env_extra=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd,
                          env=_ferry_env(head, token, env_extra), capture_output=True, text=True,
                          timeout=timeout)


def _config(tmp_path: Path, storage: str, **train) -> Path:
    write_jsonl(tmp_path / "train.jsonl", classification_rows(120))
    steps = {"max_steps": 2, "eval_every_n_steps": 2, "eval_before_training": False,
             "micro_batch_size_per_worker": 4, "log_every_n_steps": 1, **train}
    cfg = {
        "run": {"name": "job", "storage_path": storage},
        "model": {"preset": "tiny-bert"},
        "method": "full",
        "task": {"type": "sequence_classification"},
        "data": {"train_files": ["train.jsonl"], "max_seq_length": 32, "validation_fraction": 0.2},
        "train": {"learning_rate": 3.0e-3, **steps},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "data_cpus": 0.5},
    }
    path = tmp_path / "run.yaml"
    path.write_text("# tiny job test run\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


def _files_text(root: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ packaging, no cluster


@pytest.mark.timeout(60)
def test_package_stages_config_and_data_and_keeps_outputs_relative(tmp_path, monkeypatch):
    src = tmp_path / "project"
    (src / "data").mkdir(parents=True)
    write_jsonl(src / "data" / "a.jsonl", classification_rows(20))
    write_jsonl(src / "data" / "b.jsonl", classification_rows(20, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", classification_rows(10))
    (src / "ds.json").write_text('{"wall_clock_breakdown": false}')
    (src / "run.yaml").write_text(yaml.safe_dump({
        "run": {"name": "p", "storage_path": "runs"},
        "model": {"preset": "tiny-bert"},
        "task": {"type": "sequence_classification"},
        "data": {"train_files": ["data/*.jsonl"], "validation_files": [f"file://{val}"]},
        "deepspeed": {"config_file": "ds.json"},
    }))
    monkeypatch.setenv(SECRET_NAME, "s3cr3t-value-123")
    stage = tmp_path / "stage"
    stage.mkdir()
    pkg = jobs.package_job(src / "run.yaml", stage, overrides=["train.max_steps=3"],
                           command_args=["--merge"], env_names=[SECRET_NAME])

    staged = yaml.safe_load((stage / "config.yaml").read_text())
    assert staged["data"]["train_files"] == ["inputs/train_files/000_a.jsonl",
                                             "inputs/train_files/001_b.jsonl"]
    assert staged["data"]["validation_files"] == [f"file://{val}"]  # URIs travel as given
    assert staged["deepspeed"]["config_file"] == "inputs/deepspeed.json"
    assert staged["run"]["storage_path"] == "runs"  # not this machine's absolute path
    assert staged["train"]["max_steps"] == 3  # --set applied before staging
    assert (stage / "inputs/train_files/001_b.jsonl").read_bytes() == (src / "data/b.jsonl").read_bytes()
    assert pkg.staged_bytes == sum(p.stat().st_size for p in (stage / "inputs").rglob("*") if p.is_file())
    assert pkg.entrypoint == "python -m cluster.cli train config.yaml --merge"
    env = pkg.runtime_env
    assert env["working_dir"] == str(stage)
    assert sorted(Path(p).name for p in env["py_modules"]) == ["cluster", "trainers", "tuning"]
    assert all(Path(p).parent == REPO for p in env["py_modules"])
    assert env["env_vars"] == {SECRET_NAME: "s3cr3t-value-123"} and pkg.env_names == [SECRET_NAME]
    assert "s3cr3t-value-123" not in _files_text(stage)
    # The staged config validates on its own, from any directory, as it will on the cluster.
    from trainers.config_load import load_config

    spec = load_config(stage / "config.yaml")
    assert spec.data.train_files[0] == str(stage / "inputs/train_files/000_a.jsonl")


@pytest.mark.timeout(60)
def test_package_stages_the_files_every_stage_reads(tmp_path):
    """A stage's `set:` may name its own data (domain adaptation): those files travel too."""
    src = tmp_path / "project"
    (src / "domain").mkdir(parents=True)
    write_jsonl(src / "task.jsonl", classification_rows(20))
    write_jsonl(src / "domain" / "a.jsonl", lm_rows(20))
    write_jsonl(src / "domain" / "b.jsonl", lm_rows(20, seed=1))
    write_jsonl(src / "held.jsonl", lm_rows(10, seed=2))
    (src / "ds.json").write_text('{"wall_clock_breakdown": false}')
    config = {
        "run": {"name": "da", "storage_path": "runs"},
        "model": {"preset": "tiny-bert"},
        "task": {"type": "sequence_classification"},
        "data": {"train_files": ["task.jsonl"]},
        "stages": [
            {"name": "domain", "set": {"task.type": "masked_lm", "method": "full",
                                       "data.train_files": ["domain/*.jsonl"],
                                       "data.validation_files": ["held.jsonl"],
                                       "deepspeed.config_file": "ds.json"}},
            {"name": "task"},
        ],
    }
    (src / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    stage = tmp_path / "stage"
    stage.mkdir()
    pkg = jobs.package_job(src / "run.yaml", stage)

    staged = yaml.safe_load((stage / "config.yaml").read_text())
    domain = staged["stages"][0]["set"]
    assert domain["data.train_files"] == ["inputs/stages/domain/train_files/000_a.jsonl",
                                          "inputs/stages/domain/train_files/001_b.jsonl"]
    assert domain["data.validation_files"] == [
        "inputs/stages/domain/validation_files/000_held.jsonl"]
    assert domain["deepspeed.config_file"] == "inputs/stages/domain/deepspeed.json"
    assert staged["stages"][1] == {"name": "task"}
    assert staged["data"]["train_files"] == ["inputs/train_files/000_task.jsonl"]
    assert (stage / "inputs/stages/domain/train_files/001_b.jsonl").read_bytes() == (
        src / "domain" / "b.jsonl").read_bytes()
    staged_files = [p for p in (stage / "inputs").rglob("*") if p.is_file()]
    assert pkg.staged_bytes == sum(p.stat().st_size for p in staged_files)
    # On the cluster every stage reads the copies, and all of them are there.
    from trainers.config_load import load_config
    from trainers.data.files import check_data
    from trainers.stages import stage_specs

    plan = stage_specs(load_config(stage / "config.yaml"))
    for label, spec in plan:
        files = [*spec.data.train_files, *spec.data.validation_files, spec.deepspeed.config_file]
        assert all(f.startswith(str(stage) + "/") for f in files if f), (label, files)
        assert check_data(spec) == [], label

    # A stage's missing file fails here, offline, naming the stage.
    (src / "held.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"stages\[0\] \(domain\): data\.validation_files=.*held"
                       r"\.jsonl: file not found"):
        jobs.package_job(src / "run.yaml", tmp_path / "stage2")


@pytest.mark.timeout(60)
def test_package_refuses_large_data_and_bad_flags_naming_them(tmp_path, monkeypatch):
    cfg = _config(tmp_path, "runs")
    monkeypatch.setattr(jobs, "MAX_STAGED_BYTES", 1000)
    with pytest.raises(ConfigError, match=r"data\.train_files=\['.*train.jsonl'\]: .* MiB of local "
                       r"files .* is over the 0 MiB a job carries\. Put the data on shared storage"):
        jobs.package_job(cfg, tmp_path / "s1")
    monkeypatch.setattr(jobs, "MAX_STAGED_BYTES", 100 * 2**20)

    monkeypatch.delenv("FERRY_UNSET_VAR", raising=False)
    (tmp_path / "bad.env").write_text("# comment\nGOOD=1\nthis-line-is-secret-ish\n")
    with pytest.raises(ConfigError) as e:
        jobs.package_job(cfg, tmp_path / "s2", command="eval",
                         env_names=["FERRY_UNSET_VAR", "HF_TOKEN=hf_abc"],
                         env_file=str(tmp_path / "bad.env"))
    text = str(e.value)
    assert "-- eval: unknown command. Use one of: train, tune." in text
    assert "--env=FERRY_UNSET_VAR: not set in this environment." in text
    assert "--env=HF_TOKEN: expects only a variable name" in text and "hf_abc" not in text
    assert "line 3 is not NAME=value" in text and "secret-ish" not in text


def test_submit_takes_command_and_args_after_double_dash(monkeypatch):
    from cluster.cli import build_parser

    args = build_parser().parse_args(["submit", "run.yaml", "--follow", "--set", "a.b=1", "--",
                                 "tune", "--resume", "--set", "x=2"])
    assert (args.config, args.follow, args.overrides) == ("run.yaml", True, ["a.b=1"])
    assert args.command_args == ["tune", "--resume", "--set", "x=2"]
    assert build_parser().parse_args(["submit", "run.yaml"]).command_args == []
    assert jobs.resolve_address("head:8265") == "http://head:8265"
    for name in ("RAY_JOB_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, not the Jobs API
    assert jobs.resolve_address(None) == jobs.DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265/")
    assert jobs.resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_JOB_ADDRESS", "https://jobs.example.com")
    assert jobs.resolve_address(None) == "https://jobs.example.com"


# ------------------------------------------------------------------ the embedded Ray


@pytest.mark.timeout(120)
def test_embedded_ray_listens_on_loopback_only():
    temp_dir = tempfile.mkdtemp(prefix="ferry-lo-", dir="/tmp")  # short: Ray's socket paths
    script = (
        "import json, psutil\n"
        "from cluster.session import connect, disconnect\n"
        f"s = connect(None, needed_cpus=1, temp_dir={temp_dir!r})\n"
        "seen = []\n"
        "for p in psutil.Process().children(recursive=True):\n"
        "    try:\n"
        "        seen += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections('inet')\n"
        "                 if c.status == psutil.CONN_LISTEN]\n"
        "    except psutil.Error:\n"
        "        pass\n"
        "print('LISTEN ' + json.dumps(seen), flush=True)\n"
        "disconnect(s)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}
    env["PYTHONPATH"] = str(REPO)
    try:
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=110)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.split("LISTEN ", 1)[1].splitlines()[0])
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the check saw Ray's own servers
    loopback = ("127.", "::ffff:127.", "::1")
    assert [s for s in seen if not s[1].startswith(loopback)] == []


# ------------------------------------------------------------------ against a real head


@dataclass
class Training:
    proc: subprocess.Popen
    output: Path
    storage: Path
    secret: str
    tmp: Path


@pytest.fixture(scope="module")
def training(head, tmp_path_factory):
    """`ferry submit --follow` of a tiny real training run, started in the background so that it
    trains while the other cluster tests run (a job's start-up is mostly waiting);
    test_submit_follow_trains_exports_and_keeps_the_secret, the last test, checks the result."""
    tmp = tmp_path_factory.mktemp("training")
    storage = tmp / "runs"  # absolute: the head runs on this machine and writes here
    cfg = _config(tmp, str(storage))
    secret = "s3cr3t-" + secrets.token_hex(8)
    output = tmp / "submit.out"  # a file, not a pipe: nobody reads it until the last test
    with open(output, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "submit", str(cfg), "--follow", "--env",
             SECRET_NAME],
            cwd=tmp, env=_ferry_env(head, env_extra={SECRET_NAME: secret}), stdout=out,
            stderr=subprocess.STDOUT)
    yield Training(proc, output, storage, secret, tmp)
    if proc.poll() is None:
        proc.kill()


@pytest.mark.timeout(180)  # includes starting the head
@pytest.mark.usefixtures("training")  # start it early
def test_token_auth_refuses_without_token_and_accepts_with_it(head, tmp_path):
    none = _ferry("jobs", "list", head=head, cwd=tmp_path, token=None)
    assert none.returncode == 1, none.stderr
    assert (f"ferry: error: --address={head.url}: the cluster requires an auth token and none was "
            "sent. Set RAY_AUTH_TOKEN") in none.stderr
    assert "Traceback" not in none.stderr
    wrong = _ferry("jobs", "list", head=head, cwd=tmp_path, token="not-the-token")
    assert wrong.returncode == 1 and "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    ok = _ferry("jobs", "list", "--token-file", str(token_file), head=head, cwd=tmp_path, token=None)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("JOB ID")


@pytest.mark.timeout(150)
def test_failed_job_exits_nonzero_and_its_logs_show_why(head, tmp_path):
    # Valid here (the submitter cannot know the cluster's size); refused on the 4-CPU cluster.
    cfg = _config(tmp_path, str(tmp_path / "runs"))
    res = _ferry("submit", str(cfg), "--set", "scaling.cpus_per_worker=16", "--follow", head=head,
                 cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    job_id = res.stdout.splitlines()[0].strip()
    assert f"ferry: error: job {job_id} FAILED" in res.stderr
    status = _ferry("jobs", "status", job_id, head=head, cwd=tmp_path)
    assert status.stdout.splitlines()[0] == "FAILED"
    logs = _ferry("jobs", "logs", job_id, head=head, cwd=tmp_path)
    assert "ferry: error: scaling.num_workers=1: 1 workers x scaling.cpus_per_worker=16.0" in logs.stdout
    assert "but the cluster has 4" in logs.stdout
    missing = _ferry("jobs", "status", "raysubmit_nope", head=head, cwd=tmp_path)
    assert missing.returncode == 1 and "JOB_ID=raysubmit_nope: no such job" in missing.stderr


@pytest.mark.timeout(120)
def test_secret_reaches_the_job_and_stop_stops_it(head, tmp_path, monkeypatch):
    """The packaged runtime env with a probe entrypoint: the job reads the secret and runs the
    shipped Ferry; then `ferry jobs stop` ends it."""
    cfg = _config(tmp_path, str(tmp_path / "runs"))
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_NAME, secret)
    probe = (
        "import hashlib, os, time, cluster; "
        f"print('sha', hashlib.sha256(os.environ['{SECRET_NAME}'].encode()).hexdigest()); "
        "print('ferry-from', os.path.dirname(cluster.__file__), flush=True); time.sleep(300)"
    )
    token_file = tmp_path / "token"
    token_file.write_text(head.token)
    client = jobs._client(head.url, str(token_file))
    stage = tmp_path / "stage"
    stage.mkdir()
    pkg = jobs.package_job(cfg, stage, env_names=[SECRET_NAME])
    job_id = client.submit_job(entrypoint=f"python -c {json.dumps(probe)}",
                               runtime_env=pkg.runtime_env)
    deadline = time.monotonic() + 60
    # Lines the probe printed (the log also echoes the entrypoint, which names the same words).
    while True:
        lines = (logs := client.get_job_logs(job_id)).splitlines()
        if any(line.startswith("ferry-from ") for line in lines):
            break
        assert not client.get_job_status(job_id).is_terminal(), logs
        assert time.monotonic() < deadline, logs
        time.sleep(1)
    printed = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in logs.splitlines()
               if line.startswith(("sha ", "ferry-from "))}
    assert printed["sha"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in logs
    shipped = printed["ferry-from"]
    assert shipped.startswith(head.temp_dir) and not shipped.startswith(str(REPO))

    stop = _ferry("jobs", "stop", job_id, head=head, cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "STOPPED"
    status = _ferry("jobs", "status", job_id, head=head, cwd=tmp_path)
    assert status.stdout.splitlines()[0] == "STOPPED"


@pytest.mark.timeout(300)
def test_submit_follow_trains_exports_and_keeps_the_secret(head, training):
    training.proc.wait(timeout=280)
    out = training.output.read_text()
    assert training.proc.returncode == 0, out[-4000:]
    job_id = "raysubmit_" + out.split("\nraysubmit_", 1)[1].split()[0]
    assert "[ferry] step 2/2" in out  # the job's own progress lines, streamed back
    tmp = training.tmp

    status = _ferry("jobs", "status", job_id, head=head, cwd=tmp)
    assert status.stdout.splitlines()[0] == "SUCCEEDED"
    final = training.storage / "job" / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert (final / "config.json").is_file() and (final / "labels.json").is_file()
    listed = _ferry("jobs", "list", head=head, cwd=tmp)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout

    logs = _ferry("jobs", "logs", job_id, head=head, cwd=tmp)
    assert "[ferry] step 2/2" in logs.stdout
    assert training.secret not in out and training.secret not in logs.stdout
    assert training.secret not in _files_text(training.storage)
