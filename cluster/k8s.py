"""KubeRay manifests for a run: run config -> ConfigMap + RayJob (+ a long-lived RayCluster).

`render_manifests` is the entry point and `ferry k8s render` prints its output (`dump_manifests`).
The output has the shape of the shipped `k8s/ray-job.train.yaml`, `k8s/ray-job.tune.yaml` and
`k8s/ray-cluster.gpu.yaml` (tests/test_k8s.py validates all of them against the KubeRay v1 CRD
schemas and compares them):
token auth from the Secret `ferry-secrets`, non-root pods, requests == limits, one Ray worker pod
per training worker, checkpoints on the PVC `ferry-shared` mounted at `run.storage_path` (no
volume when the storage path is a bucket URI). A search (`command="tune"`) ships its whole search
config, tune: block included, and gets one worker pod per worker of every trial that runs at once
(`tune.max_concurrent_trials`). k8s/README.md walks through using them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from trainers.config import RunSpec
    from tuning.config import TuneConfig

log = logging.getLogger("ferry.cluster")

SECRET_NAME = "ferry-secrets"  # keys: auth_token (required), hf_token (optional)
AUTH_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
HF_TOKEN_KEY = "hf_token"
PVC_NAME = "ferry-shared"
CONFIG_DIR = "/etc/ferry"
CLIENT_LABEL = "ferry.io/client"  # pods with this label may reach the dashboard / Jobs API
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
BACKOFF_LIMIT = 2
TTL_SECONDS_AFTER_FINISHED = 600
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
SIDECAR_RESOURCES = {"cpu": "500m", "memory": "512Mi"}  # submitter pod, autoscaler container
AUTOSCALER_IDLE_TIMEOUT_S = 300
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
MAX_RAYJOB_NAME = 47  # KubeRay: 63 minus the suffixes it appends for the cluster and its pods
COMMANDS = ("train", "tune")

_VERSION_TAG = re.compile(r"^(\d+\.\d+\.\d+)(?:[-_.+].*)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes resource quantity (the pattern the CRDs use), e.g. 32Gi, 500M, 1.5e9.
_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def render_manifests(
    spec: RunSpec,
    image: str,
    namespace: str = "default",
    gpus_per_worker: float | None = None,
    command: str = "train",
    include_cluster: bool = False,
    *,
    ray_version: str | None = None,
    mount_path: str | None = None,
    memory_per_worker: str | None = None,
    active_deadline_s: int = 86400,
    tune: TuneConfig | None = None,
) -> list[dict[str, Any]]:
    """Render the Kubernetes objects that run `ferry <command>` with this config on KubeRay.

    Args:
        spec: the validated run config; it travels to the head pod in a ConfigMap.
        image: container image with Ferry installed, tagged with its Ray version
            (e.g. `rayproject/ray:2.60.0-py311-gpu` -> rayVersion "2.60.0").
        namespace: namespace of every object.
        gpus_per_worker: overrides `scaling.gpus_per_worker` in the pods *and* in the config.
        command: `train` or `tune`.
        include_cluster: also render a long-lived, autoscaling RayCluster (+ NetworkPolicy) and
            make the RayJob select it instead of creating its own cluster.
        ray_version: Ray version of the image, needed when its tag does not start with one.
        mount_path: where the PVC is mounted; must contain `run.storage_path` (default: it).
        memory_per_worker: memory of each worker pod; default 4Gi per CPU + 32Gi per GPU, >= 8Gi.
        active_deadline_s: the RayJob fails when it runs longer than this (start-up included).
        tune: the search's tune: block; required with command="tune". It travels in the
            ConfigMap with the run config, and its max_concurrent_trials (default 1) sizes the
            cluster: scaling.num_workers worker pods per concurrent trial.

    Returns:
        [ConfigMap, RayJob], or [ConfigMap, RayCluster, NetworkPolicy, RayJob] with include_cluster.

    Raises:
        ConfigError (a ValueError): every bad input, one `"<key>=<value>: <rule>. <fix>."` each.
    """
    # Here, not at the top: the `ferry` parser imports this module, and pydantic would add a
    # noticeable delay to every command, `ferry jobs ...` included.
    from trainers.config_load import build_spec, dump_spec
    from trainers.errors import ConfigError
    from tuning.load import build_search

    problems = _check_inputs(
        spec, image, namespace, gpus_per_worker, command, memory_per_worker, active_deadline_s
    )
    search = tune if command == "tune" else None
    if command == "tune" and tune is None:
        problems.append(
            "--command=tune: the config has no tune: block, and `ferry tune` in the pod needs "
            "one. Add a tune: block (see examples/tune_tiny_lora.yaml) or use --command train."
        )
    elif command == "train" and tune is not None:
        log.warning("tune: ignored with --command=train (the RayJob runs `ferry train`).")
    if search is not None:
        try:  # the space against this run config (a search file was checked when loaded)
            build_search({**spec.model_dump(mode="json"), "tune": search.model_dump(mode="json")})
        except ConfigError as e:
            problems += e.problems
    version = _ray_version(image, ray_version, problems)
    storage = spec.run.storage_path
    mount = _mount_path(storage, mount_path, problems)
    base = _k8s_name(spec.run.name)
    job_name = f"{base}-{command}"
    if len(job_name) > MAX_RAYJOB_NAME:
        problems.append(
            f"run.name={spec.run.name}: too long for a RayJob name ('{job_name}' > "
            f"{MAX_RAYJOB_NAME} characters). Use a shorter run.name."
        )
    if problems:
        raise ConfigError(problems)

    # The override must reach the config too, or Ray Train would request the old GPU count.
    raw = spec.model_dump(mode="json")
    if gpus_per_worker is not None:
        raw["scaling"]["gpus_per_worker"] = gpus_per_worker
    if mount is not None:
        # Every pod mounts the same ReadWriteMany PVC there; `ferry train` verifies it per node.
        raw["run"]["storage_shared"] = True
    run_spec = build_spec(raw)  # cross-field rules again (e.g. fp16 needs a GPU)
    for warning in _paths_pods_cannot_see(run_spec, mount):
        log.warning(warning)

    s = run_spec.scaling
    gpus = math.ceil(s.gpus_per_worker)  # a pod gets whole GPUs
    # `ferry tune` sizes its concurrency by the cluster it finds at start, so the pods of every
    # concurrent trial are there from the start (an autoscaler would never be asked for them).
    trials = (search.max_concurrent_trials or 1) if search is not None else 1
    pods = s.num_workers * trials
    # Ray Data needs free logical CPUs besides the training workers' (else its reads wait
    # forever), and each trial's driver holds tune.trial_cpus; the head advertises none, so the
    # worker pods carry a share of both.
    drivers = trials * search.trial_cpus if search is not None else 0.0
    cpus = math.ceil(s.cpus_per_worker + (s.data_cpus + drivers) / pods)
    plan = _Plan(
        name=base,
        job_name=job_name,
        config_map=f"{job_name}-config",
        namespace=namespace,
        image=image,
        ray_version=version,
        mount_path=mount,
        workers=pods,
        worker_resources={
            "cpu": str(cpus),
            "memory": memory_per_worker or f"{max(8, 4 * cpus + 32 * gpus)}Gi",
            **({"nvidia.com/gpu": str(gpus)} if gpus else {}),
        },
        deadline_s=active_deadline_s,
    )
    header = (
        f"# Run config for `ferry {command}` in the pod, rendered by `ferry k8s render` "
        f"(validated; edit the source config and render again).\n"
    )
    run_yaml = dump_spec(run_spec)
    if search is not None:
        # The whole search file: `ferry tune` reads the tune: block from the same file.
        block = search.model_dump(mode="json")
        # Only the distribution each searched key uses: the other kinds are all None.
        block["space"] = {
            key: dist.model_dump(mode="json", exclude_none=True)
            for key, dist in search.space.items()
        }
        run_yaml += yaml.safe_dump({"tune": block}, sort_keys=False)
    config_map = _config_map(plan, header + run_yaml)
    if not include_cluster:
        return [config_map, _ray_job(plan, command, cluster=_cluster_spec(plan, long_lived=False))]
    return [
        config_map,
        _ray_cluster(plan),
        _network_policy(plan),
        _ray_job(plan, command, cluster=None),
    ]


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """Objects -> one multi-document YAML string (multi-line strings as `|` blocks)."""
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


@dataclass(frozen=True)
class _Plan:
    """What the objects are built from: names, image, volume and pod sizes."""

    name: str
    job_name: str
    config_map: str
    namespace: str
    image: str
    ray_version: str
    mount_path: str | None  # None: storage is a bucket URI, no shared volume
    workers: int  # worker pods: scaling.num_workers, times the concurrent trials of a search
    worker_resources: dict[str, str]
    deadline_s: int


def _check_inputs(
    spec: RunSpec,
    image: str,
    namespace: str,
    gpus_per_worker: float | None,
    command: str,
    memory_per_worker: str | None,
    deadline_s: int,
) -> list[str]:
    p: list[str] = []
    if not image or not image.strip() or any(c.isspace() for c in image):
        p.append(
            f"--image={image or ''}: required. Pass the container image that has ferry installed."
        )
    if not _DNS_LABEL.match(namespace or "") or len(namespace) > 63:
        p.append(
            f"--namespace={namespace}: must be a Kubernetes name (lowercase letters, digits, '-'). "
            "Pass an existing namespace."
        )
    if gpus_per_worker is not None and not (
        math.isfinite(gpus_per_worker) and gpus_per_worker >= 0
    ):
        p.append(
            f"--gpus-per-worker={gpus_per_worker:g}: must be >= 0. "
            "Pass the GPUs each training worker needs, or 0 for CPU-only workers."
        )
    if command not in COMMANDS:
        p.append(f"--command={command}: must be one of {', '.join(COMMANDS)}. Use train or tune.")
    if memory_per_worker is not None and not _QUANTITY.match(memory_per_worker):
        p.append(
            f"--memory-per-worker={memory_per_worker}: not a Kubernetes quantity. Use e.g. 64Gi."
        )
    if deadline_s < 1:
        p.append(f"--deadline-s={deadline_s}: must be >= 1. Pass the run's time limit in seconds.")
    workers = spec.scaling.num_workers
    if not isinstance(workers, int) or workers < 1:
        p.append(
            f"scaling.num_workers={workers}: must be >= 1 (one Ray worker pod per training "
            "worker). Set scaling.num_workers in the config or with --set."
        )
    return p


def _ray_version(image: str, explicit: str | None, problems: list[str]) -> str:
    """rayVersion must equal the Ray in the image: KubeRay picks probes and features by it."""
    ref = (image or "").split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    m = _VERSION_TAG.match(tag)
    tagged = m.group(1) if m else None
    if explicit is not None and not re.fullmatch(r"\d+\.\d+\.\d+", explicit):
        problems.append(
            f"--ray-version={explicit}: must look like 2.60.0. Pass the image's Ray version."
        )
        return explicit
    if tagged and explicit and tagged != explicit:
        problems.append(
            f"--ray-version={explicit}: differs from the version in the image tag ({tagged}). "
            "Drop --ray-version or fix the image tag."
        )
    version = explicit or tagged
    if version is None:
        if image and image.strip():
            problems.append(
                f"--image={image}: no Ray version in the tag. Tag the image with its Ray version "
                "(e.g. :2.60.0-py311-gpu) or pass --ray-version."
            )
        return ""
    if tuple(int(x) for x in version.split(".")) < MIN_RAY_FOR_TOKEN_AUTH:
        problems.append(
            f"--image={image}: Ray {version} has no token authentication (needs >= 2.52.0). "
            "Use an image with a newer Ray, or pass --ray-version if the tag is not a Ray version."
        )
    return version


def _mount_path(storage: str, mount_path: str | None, problems: list[str]) -> str | None:
    """Where the PVC goes: None for a bucket URI, else mount_path or the storage path itself."""
    from trainers.storage import is_uri

    if is_uri(storage):
        if mount_path:
            log.warning(
                "--mount-path=%s: ignored, run.storage_path=%s is a URI (no volume).",
                mount_path,
                storage,
            )
        return None
    if not storage.startswith("/"):
        problems.append(
            f"run.storage_path={storage}: must be an absolute path (where pods mount the shared "
            "volume) or a bucket URI. Set e.g. /mnt/ferry/runs or s3://bucket/runs."
        )
        return None
    mount = (mount_path or storage).rstrip("/") or "/"
    if mount == "/" or not mount.startswith("/") or not _is_under(storage, mount):
        problems.append(
            f"--mount-path={mount_path}: must be an absolute path (not /) that contains "
            f"run.storage_path={storage} (checkpoints go to the shared volume). "
            "Pass a parent of the storage path or drop --mount-path."
        )
    return mount


def _k8s_name(run_name: str) -> str:
    """run.name -> a DNS-1035 label (what KubeRay requires), deterministically."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    return name if name[:1].isalpha() else f"ferry-{name}".rstrip("-")


def _is_under(path: str, parent: str) -> bool:
    return parent == "/" or path == parent or path.startswith(parent.rstrip("/") + "/")


def _paths_pods_cannot_see(spec: RunSpec, mount: str | None) -> list[str]:
    """Local input paths outside the shared volume exist in a pod only if the image has them."""
    items: list[tuple[str, str | None]] = [
        *((f"data.train_files[{i}]", f) for i, f in enumerate(spec.data.train_files)),
        *((f"data.validation_files[{i}]", f) for i, f in enumerate(spec.data.validation_files)),
        ("data.cache_dir", spec.data.cache_dir),
        ("deepspeed.config_file", spec.deepspeed.config_file),
        ("model.name_or_path", spec.model.name_or_path),
    ]
    where = f"the shared volume ({mount})" if mount else "any shared volume (storage is a URI)"
    return [
        f"{key}={value}: a local path outside {where}; pods see it only if the image contains "
        f"it. Put it under {mount or 'a bucket'} or use a bucket URI."
        for key, value in items
        if value and value.startswith("/") and not (mount and _is_under(value, mount))
    ]


def _config_map(plan: _Plan, run_yaml: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, plan.config_map),
        "data": {"run.yaml": run_yaml},
    }


def _ray_job(plan: _Plan, command: str, cluster: dict[str, Any] | None) -> dict[str, Any]:
    """A RayJob with its own cluster (`cluster`), or selecting the long-lived one (None)."""
    submitter_container: dict[str, Any] = {
        "name": "ray-job-submitter",
        "image": plan.image,
        "env": _auth_env(),
        "resources": _requests_equal_limits(SIDECAR_RESOURCES),
        "securityContext": _container_security(),
    }
    submitter_pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": _pod_security(),
        "containers": [submitter_container],
    }
    if cluster is not None:
        spec: dict[str, Any] = {
            "entrypoint": f"ferry {command} {CONFIG_DIR}/run.yaml",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
        }
    else:
        # A long-lived head cannot mount each run's ConfigMap: the submitter mounts it and
        # uploads it as the job's working_dir. KubeRay rejects a TTL without shutdown, and a
        # selected cluster is never shut down by a RayJob.
        spec = {
            "entrypoint": f"ferry {command} run.yaml",
            "runtimeEnvYAML": f"working_dir: {CONFIG_DIR}\n",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": False,
        }
        submitter_container["volumeMounts"] = [_config_mount()]
        submitter_pod["volumes"] = [_config_volume(plan)]
    spec["backoffLimit"] = BACKOFF_LIMIT
    spec["activeDeadlineSeconds"] = plan.deadline_s
    spec["submitterPodTemplate"] = {
        "metadata": {"labels": {CLIENT_LABEL: "true"}},
        "spec": submitter_pod,
    }
    if cluster is not None:
        spec["rayClusterSpec"] = cluster
    else:
        spec["clusterSelector"] = {"ray.io/cluster": plan.name}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(plan, plan.job_name),
        "spec": spec,
    }


def _ray_cluster(plan: _Plan) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(plan, plan.name),
        "spec": _cluster_spec(plan, long_lived=True),
    }


def _cluster_spec(plan: _Plan, long_lived: bool) -> dict[str, Any]:
    """Head (0 CPUs, dashboard in the pod network) + one group of identical worker pods.

    A RayJob's own cluster has exactly `workers` pods and its head mounts the run config; the
    long-lived cluster autoscales from 0 workers and gets each run's config as a working_dir.
    """
    spec: dict[str, Any] = {
        "rayVersion": plan.ray_version,
        "authOptions": {"mode": "token", "secretName": SECRET_NAME},
        "enableInTreeAutoscaling": long_lived,
    }
    if long_lived:
        spec["autoscalerOptions"] = {
            "idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_S,
            "resources": _requests_equal_limits(SIDECAR_RESOURCES),
            "securityContext": _container_security(),
        }
    head_mounts = _volume_mounts(plan) + ([] if long_lived else [_config_mount()])
    head_volumes = _volumes(plan) + ([] if long_lived else [_config_volume(plan)])
    spec["headGroupSpec"] = {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": {
                "securityContext": _pod_security(),
                "containers": [
                    {
                        "name": "ray-head",
                        "image": plan.image,
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                        ],
                        "env": _auth_env() + _hf_env(),
                        "resources": _requests_equal_limits(HEAD_RESOURCES),
                        "securityContext": _container_security(),
                        "volumeMounts": head_mounts,
                    }
                ],
                "volumes": head_volumes,
            }
        },
    }
    worker_pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": "ray-worker",
                "image": plan.image,
                "env": _auth_env() + _hf_env(),
                "resources": _requests_equal_limits(plan.worker_resources),
                "securityContext": _container_security(),
                "volumeMounts": _volume_mounts(plan),
            }
        ],
        "volumes": _volumes(plan),
    }
    if "nvidia.com/gpu" in plan.worker_resources:
        worker_pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    spec["workerGroupSpecs"] = [
        {
            "groupName": "gpu" if "nvidia.com/gpu" in plan.worker_resources else "cpu",
            "replicas": 0 if long_lived else plan.workers,
            "minReplicas": 0 if long_lived else plan.workers,
            "maxReplicas": plan.workers,
            "template": {"spec": worker_pod},
        }
    ]
    return spec


def _network_policy(plan: _Plan) -> dict[str, Any]:
    """Ingress to the cluster's pods: from its own pods (any port) and clients (8265 only)."""
    own_pods = {"podSelector": {"matchLabels": {"ray.io/cluster": plan.name}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(plan, f"{plan.name}-ray"),
        "spec": {
            **own_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own_pods]},
                {
                    "from": [
                        {"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}},
                        {
                            "namespaceSelector": {},
                            "podSelector": {
                                "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
                            },
                        },
                    ],
                    "ports": [{"protocol": "TCP", "port": 8265}],
                },
            ],
        },
    }


def _metadata(plan: _Plan, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": plan.namespace,
        "labels": {"app.kubernetes.io/name": "ferry", "ferry.io/run": plan.name},
    }


def _requests_equal_limits(resources: dict[str, str]) -> dict[str, dict[str, str]]:
    return {"requests": dict(resources), "limits": dict(resources)}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _auth_env() -> list[dict[str, Any]]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": AUTH_TOKEN_KEY}},
        },
    ]


def _hf_env() -> list[dict[str, Any]]:
    return [
        {
            "name": "HF_TOKEN",
            "valueFrom": {
                "secretKeyRef": {"name": SECRET_NAME, "key": HF_TOKEN_KEY, "optional": True}
            },
        }
    ]


def _volume_mounts(plan: _Plan) -> list[dict[str, Any]]:
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if plan.mount_path:
        mounts.append({"name": "shared", "mountPath": plan.mount_path})
    return mounts


def _volumes(plan: _Plan) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if plan.mount_path:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": PVC_NAME}})
    return volumes


def _config_mount() -> dict[str, Any]:
    return {"name": "run-config", "mountPath": CONFIG_DIR, "readOnly": True}


def _config_volume(plan: _Plan) -> dict[str, Any]:
    return {"name": "run-config", "configMap": {"name": plan.config_map}}


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the embedded run config) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)
