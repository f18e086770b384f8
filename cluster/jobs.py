"""Ray Jobs: ship a run config to a running Ray cluster, then list, follow and stop its jobs.

`submit_job` is the entry point (`ferry submit`); `package_job` builds what it sends, and
`list_jobs`, `job_status`, `job_logs`, `follow_job` and `stop_job` back `ferry jobs ...`
(cluster/cli.py parses their flags). All talk to the cluster's Jobs API over HTTP (the
dashboard, port 8265).

What a submitted job carries (its Ray runtime environment):

* `working_dir`: a temporary folder holding `config.yaml` and copies of the local files the config
  reads: `data.train_files`, `data.validation_files` (globs and folders expanded) and
  `deepspeed.config_file`, at the top level and in each stage's `set:` (under
  `inputs/stages/<name>/`), at most `MAX_STAGED_BYTES` in all; bigger data belongs on shared storage
  or a URI, and is then passed as given. `config.yaml` is the user's YAML with the `--set`
  overrides applied and those paths pointed at the copies. `run.storage_path` and
  `data.cache_dir` are *not* rewritten: a URI or an absolute path (a volume every node mounts) is
  used as given; a relative one stays relative to the job's working directory on the head node,
  which Ray deletes eventually (a warning says so). `model.name_or_path` is passed as given
  (a Hub id, `python-package:...`, or a path that must exist on the cluster).
* `py_modules`: Ferry's own packages (`cluster`, `trainers`, `tuning`) from this machine, so the
  job runs exactly the submitter's Ferry version, installed on the cluster or not.
* `env_vars`: secrets such as HF_TOKEN, named with `--env NAME` (value from this environment) or
  read from `--env-file`. They are never written to the working dir, the config, the logs Ferry
  prints, or the run's outputs. Ray does show a job's runtime_env, env_vars included, to anyone
  who can read the job's details from the dashboard or Jobs API, so protect that with token auth.
* `pip` (optional, `--pip`): extra requirements installed for the job. Everything else (ray,
  torch, deepspeed, transformers, peft, ...) must already be in the cluster's image.

The entrypoint is `python -m cluster.cli <train|tune> config.yaml [args]`, which needs no `ferry`
console script on the cluster, only a `python` on the head's PATH that has Ray.

Authentication: the token comes from `--token-file`, else `RAY_AUTH_TOKEN`, else
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (Ray's own order) and is sent as
`Authorization: Bearer <token>`, the header Ray's token loader produces. Ferry passes it as an
explicit header because Ray's client adds it only when `RAY_AUTH_MODE=token` is set in the
client's environment; a refused request becomes one `AuthError` that says what to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from trainers.config import RunSpec

log = logging.getLogger("ferry.cluster")

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
MAX_STAGED_BYTES = 100 * 2**20  # Ray uploads the working dir through the GCS; keep it small
COMMANDS = ("train", "tune")
FERRY_PACKAGES = ("cluster", "trainers", "tuning")
CONFIG_NAME = "config.yaml"
STOP_WAIT_S = 60.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STAGED_INPUTS = (("data", "train_files"), ("data", "validation_files"))


class JobSubmitError(RuntimeError):
    """The Jobs API could not be reached or refused a request."""


class AuthError(JobSubmitError):
    """The cluster requires a token and none, or a wrong one, was sent."""


class JobFailedError(JobSubmitError):
    """A followed job ended FAILED or STOPPED."""


@dataclass
class JobPackage:
    """What `submit_job` sends: the entrypoint command and its runtime environment."""

    entrypoint: str
    runtime_env: dict[str, Any]
    working_dir: Path
    staged_bytes: int
    env_names: list[str] = field(default_factory=list)


def submit_job(
    config: str | os.PathLike,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    command: str = "train",
    command_args: list[str] | None = None,
    env_names: list[str] | None = None,
    env_file: str | None = None,
    pip: list[str] | None = None,
    token_file: str | None = None,
) -> str:
    """Validate `config` here, package it and submit `ferry <command>` to a Ray cluster.

    Args:
        config: path of the YAML run config.
        address: the cluster's Jobs API, e.g. http://head:8265 (see `resolve_address`).
        overrides: `key.path=value` overrides, applied before validation and staging.
        command: `train` or `tune`.
        command_args: extra arguments for the command on the cluster, e.g. ["--merge"].
        env_names: names of environment variables to pass on (secrets such as HF_TOKEN).
        env_file: a dotenv-style file of `NAME=value` lines to pass on.
        pip: extra pip requirements installed for the job.
        token_file: file with the cluster's auth token (default: RAY_AUTH_TOKEN, ...).

    Returns:
        The job's submission id.

    Raises:
        ConfigError: the config, its data or a flag is wrong (nothing was submitted).
        JobSubmitError / AuthError: the cluster is unreachable or refused the job.
    """
    with tempfile.TemporaryDirectory(prefix="ferry-job-") as tmp:
        package = package_job(
            config,
            Path(tmp),
            overrides=overrides,
            command=command,
            command_args=command_args,
            env_names=env_names,
            env_file=env_file,
            pip=pip,
        )
        log.info(
            "submitting `%s` (%.1f MiB of config and data%s)",
            package.entrypoint,
            package.staged_bytes / 2**20,
            f"; env: {', '.join(package.env_names)}" if package.env_names else "",
        )
        client = _client(address, token_file)  # after validation: a bad config fails offline
        # Ray zips and uploads working_dir and py_modules here, so the folder can go afterwards.
        job_id = _call(
            client,
            "submit",
            lambda: client.submit_job(
                entrypoint=package.entrypoint,
                runtime_env=package.runtime_env,
                metadata={"ferry_command": command, "ferry_config": os.path.basename(config)},
            ),
        )
    return job_id


def package_job(
    config: str | os.PathLike,
    stage_dir: Path,
    *,
    overrides: list[str] | None = None,
    command: str = "train",
    command_args: list[str] | None = None,
    env_names: list[str] | None = None,
    env_file: str | None = None,
    pip: list[str] | None = None,
) -> JobPackage:
    """Validate the config and stage what a job needs into `stage_dir` (an empty folder).

    Runs the checks of `ferry validate` that need neither Ray nor the model (schema, rules, data
    files and their columns), then writes `config.yaml` and copies of the local input files. The
    model checks (tokenizer, LoRA fit) run on the cluster before training starts: the model may not
    be reachable from here, and loading torch alone would add seconds to every submit.
    Secrets go into the returned runtime_env only, never into `stage_dir`.

    Raises:
        ConfigError: every problem found, each naming the key or flag.
    """
    from trainers.config_load import apply_override, load_config
    from trainers.errors import ConfigError

    problems: list[str] = []
    if command not in COMMANDS:
        problems.append(f"-- {command}: unknown command. Use one of: {', '.join(COMMANDS)}.")
    env_vars = _read_env(env_names or [], env_file, problems)
    try:
        spec = load_config(config, overrides)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    problems += _check_data_of_every_run(spec)
    if problems:
        raise ConfigError(problems)

    raw = yaml.safe_load(Path(config).read_text()) or {}
    # The same override code as load_config, on the user's unresolved mapping: relative output
    # paths must stay relative (to the job's working dir), not become this machine's paths.
    for item in overrides or []:
        apply_override(raw, item)
    staged_bytes = _stage_inputs(spec, raw, stage_dir)
    _warn_about_paths(spec, raw)
    (stage_dir / CONFIG_NAME).write_text(
        f"# staged by `ferry submit` from {os.path.basename(config)}\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )

    runtime_env: dict[str, Any] = {
        "working_dir": str(stage_dir),
        "py_modules": [_package_dir(name) for name in FERRY_PACKAGES],
        "excludes": ["__pycache__", "*.pyc"],
    }
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)
    entrypoint = shlex.join(
        ["python", "-m", "cluster.cli", command, CONFIG_NAME, *(command_args or [])]
    )
    return JobPackage(entrypoint, runtime_env, stage_dir, staged_bytes, sorted(env_vars))


def list_jobs(address: str | None = None, token_file: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first: id, status, start time, entrypoint, message."""
    client = _client(address, token_file)
    jobs = _call(client, "list", client.list_jobs)
    rows = [
        {
            "id": j.submission_id or j.job_id,
            "status": str(j.status),
            "start_time": j.start_time,
            "entrypoint": j.entrypoint,
            "message": j.message or "",
        }
        for j in jobs
    ]
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def job_status(
    job_id: str, address: str | None = None, token_file: str | None = None
) -> tuple[str, str]:
    """(status, message) of one job, e.g. ("FAILED", "Job entrypoint command failed ...")."""
    client = _client(address, token_file)
    info = _call(client, "status", lambda: client.get_job_info(job_id), job_id)
    return str(info.status), info.message or ""


def job_logs(job_id: str, address: str | None = None, token_file: str | None = None) -> str:
    """Everything the job's entrypoint has printed so far."""
    client = _client(address, token_file)
    return _call(client, "logs", lambda: client.get_job_logs(job_id), job_id)


def follow_job(
    job_id: str, address: str | None = None, token_file: str | None = None, out=None
) -> str:
    """Stream the job's logs to `out` until it ends; return its final status.

    Raises:
        JobFailedError: the job ended FAILED or STOPPED (the message says why).
    """
    out = out or sys.stdout
    client = _client(address, token_file)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"ferry: {job_id} keeps running; stop it with `ferry jobs stop {job_id}`",
            file=sys.stderr,
        )
        raise
    except Exception as e:  # the stream broke: the job's outcome still decides
        log.warning("log stream ended early (%s); waiting for the job to finish", e)
    info = _wait_until_done(client, job_id, timeout_s=None)
    status = str(info.status)
    if status != "SUCCEEDED":
        raise JobFailedError(f"job {job_id} {status}: {info.message or 'no message'}")
    return status


def stop_job(job_id: str, address: str | None = None, token_file: str | None = None) -> str:
    """Ask the cluster to stop a job, wait (up to STOP_WAIT_S) until it has; return its status."""
    client = _client(address, token_file)
    _call(client, "stop", lambda: client.stop_job(job_id), job_id)
    return str(_wait_until_done(client, job_id, timeout_s=STOP_WAIT_S).status)


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: `address`, else RAY_JOB_ADDRESS / RAY_ADDRESS when http(s), else local."""
    if address:
        if not address.startswith(("http://", "https://")):
            address = f"http://{address}"
        return address.rstrip("/")
    for name in ("RAY_JOB_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    return DEFAULT_ADDRESS


# --- packaging -----------------------------------------------------------------------------


def _stage_inputs(spec: RunSpec, raw: dict[str, Any], stage_dir: Path) -> int:
    """Copy the local files the run and each of its stages read into stage_dir, point `raw` at
    the copies (URIs stay as given); return the bytes."""
    from trainers.data.files import expand_files
    from trainers.errors import ConfigError
    from trainers.storage import is_uri

    plan: list[tuple[str, str, list[tuple[str, str]]]] = []  # (key, shown value, [(src, dst)])

    def files(key: str, patterns: list[str], folder: str) -> list[str]:
        local = [p for p in patterns if not is_uri(p)]
        found = expand_files(local, key) if local else []
        copies = [(src, f"{folder}/{i:03d}_{os.path.basename(src)}") for i, src in enumerate(found)]
        plan.append((key, str(patterns), copies))
        return [dst for _, dst in copies] + [p for p in patterns if is_uri(p)]

    def config_file(key: str, path: str, dst: str) -> str:
        if is_uri(path):
            return path
        plan.append((key, path, [(path, dst)]))
        return dst

    for section, key in _STAGED_INPUTS:
        patterns = getattr(getattr(spec, section), key)
        if patterns:
            raw.setdefault(section, {})[key] = files(f"{section}.{key}", patterns, f"inputs/{key}")
    if spec.deepspeed.config_file:
        raw.setdefault("deepspeed", {})["config_file"] = config_file(
            "deepspeed.config_file", spec.deepspeed.config_file, "inputs/deepspeed.json"
        )
    # A stage's `set:` may name its own files (domain adaptation reads unlabeled text first);
    # stage_specs applies these dotted keys over the top-level config, so they are staged here.
    for i, stage in enumerate(spec.stages or []):
        folder = f"inputs/stages/{stage.name}"
        for section, key in _STAGED_INPUTS:
            dotted = f"{section}.{key}"
            value = stage.set.get(dotted)
            if value:
                patterns = value if isinstance(value, list) else [value]
                raw["stages"][i]["set"][dotted] = files(
                    f"stages[{i}].set.{dotted}", patterns, f"{folder}/{key}"
                )
        ds_file = stage.set.get("deepspeed.config_file")
        if ds_file:
            raw["stages"][i]["set"]["deepspeed.config_file"] = config_file(
                f"stages[{i}].set.deepspeed.config_file", ds_file, f"{folder}/deepspeed.json"
            )

    sizes = {key: sum(os.path.getsize(src) for src, _ in copies) for key, _, copies in plan}
    total = sum(sizes.values())
    if total > MAX_STAGED_BYTES:
        limit = MAX_STAGED_BYTES / 2**20
        raise ConfigError(
            [
                f"{key}={shown}: {sizes[key] / 2**20:.1f} MiB of local files "
                f"({total / 2**20:.1f} MiB in all) is over the {limit:.0f} MiB a job carries. "
                "Put the data on shared storage or a URI (s3://, gs://) and set "
                f"{key} to that path."
                for key, shown, _ in plan
                if sizes[key]
            ]
        )
    for _, _, copies in plan:
        for src, dst in copies:
            (stage_dir / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, stage_dir / dst)
    return total


def _check_data_of_every_run(spec: RunSpec) -> list[str]:
    """check_data of the run, or of each stage's run, labelled as `ferry validate` labels them."""
    from trainers.data.files import check_data
    from trainers.errors import ConfigError
    from trainers.stages import stage_specs

    if not spec.stages:
        return check_data(spec)
    try:
        plan = stage_specs(spec)
    except ConfigError as e:
        return e.problems
    return [f"{label}: {p}" for label, stage_spec in plan for p in check_data(stage_spec)]


def _warn_about_paths(spec: RunSpec, raw: dict[str, Any]) -> None:
    from trainers.storage import is_uri

    storage = (raw.get("run") or {}).get("storage_path", "./ferry-runs")
    if not is_uri(storage) and not os.path.isabs(storage):
        log.warning(
            "run.storage_path=%s: relative, so the run lands in the job's working directory on the "
            "head node, which Ray deletes eventually. Use a URI or a path on shared storage.",
            storage,
        )
    name = spec.model.name_or_path
    if name and not name.startswith("python-package:") and os.path.isdir(name):
        log.warning(
            "model.name_or_path=%s: a local folder is not shipped with the job; it must exist at "
            "the same path on the cluster. Use a Hub id or a path on shared storage.",
            (raw.get("model") or {}).get("name_or_path"),
        )


def _read_env(names: list[str], env_file: str | None, problems: list[str]) -> dict[str, str]:
    """Values of `--env NAME` (from this environment) and `--env-file` lines; never logged."""
    env: dict[str, str] = {}
    if env_file:
        path = Path(env_file)
        if not path.is_file():
            problems.append(f"--env-file={env_file}: file not found. Fix the path.")
        else:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, sep, value = line.removeprefix("export ").partition("=")
                key, value = key.strip(), value.strip()
                if not sep or not _ENV_NAME.match(key):
                    # The line itself may be a secret: name the line, never print it.
                    problems.append(
                        f"--env-file={env_file}: line {n} is not NAME=value. Fix that line."
                    )
                    continue
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                env[key] = value
    for name in names:
        if not _ENV_NAME.match(name):
            problems.append(
                f"--env={name.partition('=')[0]}: expects only a variable name; the value is read "
                "from this environment. Export it and pass --env NAME."
            )
        elif name not in os.environ:
            problems.append(
                f"--env={name}: not set in this environment. Export it or put it in --env-file."
            )
        else:
            env[name] = os.environ[name]
    return env


def _package_dir(name: str) -> str:
    import importlib

    module = importlib.import_module(name)
    return str(Path(module.__file__).parent)


# --- talking to the Jobs API ---------------------------------------------------------------


def _client(address: str | None, token_file: str | None) -> JobSubmissionClient:
    """A JobSubmissionClient for exactly `address`, with the auth token attached."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers, source = _auth_header(token_file)
    host = url.split("://", 1)[1].split("/")[0].rsplit(":", 1)[0]
    if headers and url.startswith("http://") and host not in ("127.0.0.1", "localhost", "[::1]"):
        log.warning("the auth token travels unencrypted to %s; prefer https or an SSH tunnel", url)
    # JobSubmissionClient replaces its address with RAY_API_SERVER_ADDRESS or RAY_ADDRESS when
    # either is set (Ray 2.60, dashboard/utils.py), which would send the job to another cluster
    # than the one resolved here. Hide them while the client is built.
    with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        try:
            return JobSubmissionClient(url, headers=headers)
        except AuthenticationError as e:
            raise _auth_error(url, source, str(e)) from None
        except ConnectionError as e:
            raise JobSubmitError(
                f"--address={url}: cannot reach the Ray Jobs API ({str(e).rstrip('.')}). "
                "Start the cluster, or pass --address http://HEAD:8265 (or set RAY_JOB_ADDRESS) "
                "to its dashboard."
            ) from None
        except RuntimeError as e:
            raise JobSubmitError(f"--address={url}: {e}. Is this a Ray dashboard?") from None


def _call(client: JobSubmissionClient, what: str, fn, job_id: str | None = None):
    """Run one Jobs API request, turning Ray's errors into Ferry's."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise AuthError(f"--address={client.get_address()}: {e}") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise JobSubmitError(
                f"JOB_ID={job_id}: no such job on {client.get_address()}. "
                "See the ids with `ferry jobs list`."
            ) from None
        raise JobSubmitError(f"{what} at {client.get_address()}: {text}") from None


def _wait_until_done(client: JobSubmissionClient, job_id: str, timeout_s: float | None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = _call(client, "status", lambda: client.get_job_info(job_id), job_id)
        if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(1.0)


def _auth_header(token_file: str | None) -> tuple[dict[str, str], str | None]:
    """({"Authorization": "Bearer <token>"}, where it came from), or ({}, None) without a token."""
    from trainers.errors import ConfigError

    candidates: list[tuple[str, str | None, Path | None]] = [
        ("--token-file", token_file, Path(token_file) if token_file else None),
        ("RAY_AUTH_TOKEN", os.environ.get("RAY_AUTH_TOKEN"), None),
        (
            "RAY_AUTH_TOKEN_PATH",
            os.environ.get("RAY_AUTH_TOKEN_PATH"),
            Path(os.environ["RAY_AUTH_TOKEN_PATH"])
            if os.environ.get("RAY_AUTH_TOKEN_PATH")
            else None,
        ),
    ]
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        candidates.append(("~/.ray/auth_token", str(default), default))
    for source, value, path in candidates:
        if not value:
            continue
        if path is not None:
            if not path.is_file():
                raise ConfigError(
                    [f"{source}={value}: file not found. Point it at the token file."]
                )
            value = path.read_text()
        token = value.strip()
        if not token:
            raise ConfigError([f"{source}: the token is empty. Use the cluster's token."])
        return {"Authorization": f"Bearer {token}"}, source
    return {}, None


def _auth_error(url: str, source: str | None, ray_text: str) -> AuthError:
    if source is None:
        return AuthError(
            f"--address={url}: the cluster requires an auth token and none was sent. Set "
            "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH or --token-file to a file holding the "
            "cluster's token."
        )
    return AuthError(
        f"--address={url}: the cluster refused the token from {source} "
        f"({ray_text.splitlines()[0]}). Use the token the cluster was started with "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --token-file)."
    )


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
