"""Every shipped and rendered Kubernetes manifest, validated against the KubeRay v1 CRD schemas.

The CRDs (KubeRay v1.7) are read from `../shared/kuberay-crds` relative to the repository root, or
from `FERRY_KUBERAY_CRDS`. Their schemas leave most objects open, so `additionalProperties: false`
is added to every object schema that lists its properties: a misspelt field fails here, not at
`kubectl apply` (where it would be pruned in silence). Core objects (ConfigMap, NetworkPolicy, PVC,
Pod) get small schemas of their own, reusing the CRDs' Kubernetes sub-schemas where they exist.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.cli import build_parser, main
from cluster.k8s import dump_manifests, render_manifests
from trainers.config import RunSpec
from trainers.config_load import build_spec
from trainers.errors import ConfigError
from tuning.config import TuneConfig
from tuning.load import load_search
from tuning.resources import size_trials

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SHIPPED = sorted(K8S.glob("*.yaml"))
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


# ---------------------------------------------------------------- schemas


def _crd_dir() -> Path:
    return Path(os.environ.get("FERRY_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))


@pytest.fixture(scope="session")
def validators(pytestconfig) -> dict[str, jsonschema.Draft7Validator]:
    """kind -> validator, for every kind the manifests contain."""
    cache = getattr(pytestconfig, "cache", None)
    crds = {kind: _crd_schema(kind, cache) for kind in ("RayCluster", "RayJob")}
    schemas = {**crds, **_core_schemas(crds["RayCluster"])}
    return {kind: jsonschema.Draft7Validator(schema) for kind, schema in schemas.items()}


def _crd_schema(kind: str, cache: pytest.Cache | None) -> dict[str, Any]:
    path = (
        _crd_dir()
        / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    )
    if not path.is_file():
        pytest.fail(f"KubeRay CRD not found at {path}. Set FERRY_KUBERAY_CRDS to the CRD folder.")
    # Parsing the 2 MB of CRD YAML takes seconds; the closed schema is kept as JSON in pytest's
    # cache until the CRD file or this test file changes.
    stamp = [
        str(path),
        path.stat().st_size,
        path.stat().st_mtime_ns,
        Path(__file__).stat().st_mtime_ns,
    ]
    key = f"ferry/kuberay-crd/{kind}"
    cached = cache.get(key, None) if cache is not None else None
    if cached and cached.get("stamp") == stamp:
        return cached["schema"]
    crd = yaml.load(path.read_text(), Loader=_Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    if cache is not None:
        cache.set(key, {"stamp": stamp, "schema": schema})
    return schema


def _strict(node: Any) -> Any:
    """Close every object schema that lists its properties; int-or-string -> anyOf int | string."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string"):
        string: dict[str, Any] = {"type": "string"}
        if "pattern" in node:
            string["pattern"] = node["pattern"]
        return {"anyOf": [{"type": "integer"}, string]}
    out = {
        k: _strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()}
        for k, v in node.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_NAME = {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def _core(api_version: str, kind: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", *properties],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            **properties,
        },
        "additionalProperties": False,
    }


def _core_schemas(raycluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = raycluster["properties"]["spec"]["properties"]
    pod_spec = cluster["headGroupSpec"]["properties"]["template"]["properties"]["spec"]
    # KubeRay's own network policy field embeds the Kubernetes NetworkPolicy rule schemas.
    head_policy = cluster["networkPolicy"]["properties"]["head"]["properties"]
    selector = head_policy["ingressRules"]["items"]["properties"]["from"]["items"]["properties"][
        "podSelector"
    ]
    quantity = {
        "anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+[A-Za-z]*$"}]
    }
    return {
        "ConfigMap": _core(
            "v1", "ConfigMap", data={"type": "object", "additionalProperties": {"type": "string"}}
        ),
        "Pod": _core("v1", "Pod", spec=pod_spec),
        "PersistentVolumeClaim": _core(
            "v1",
            "PersistentVolumeClaim",
            spec={
                "type": "object",
                "required": ["accessModes", "resources"],
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": [
                                "ReadWriteOnce",
                                "ReadOnlyMany",
                                "ReadWriteMany",
                                "ReadWriteOncePod",
                            ]
                        },
                    },
                    "storageClassName": {"type": "string"},
                    "volumeMode": {"enum": ["Filesystem", "Block"]},
                    "resources": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {
                            "requests": {
                                "type": "object",
                                "required": ["storage"],
                                "properties": {"storage": quantity},
                                "additionalProperties": False,
                            }
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        ),
        "NetworkPolicy": _core(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            spec={
                "type": "object",
                "required": ["podSelector"],
                "properties": {
                    "podSelector": selector,
                    "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                    "ingress": {"type": "array", "items": head_policy["ingressRules"]["items"]},
                    "egress": {"type": "array", "items": head_policy["egressRules"]["items"]},
                },
                "additionalProperties": False,
            },
        ),
    }


_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035 label: KubeRay object names


def _errors(doc: dict[str, Any], validators: dict[str, jsonschema.Draft7Validator]) -> list[str]:
    kind = doc.get("kind")
    if kind not in validators:
        return [f"kind={kind}: no schema for this kind"]
    errs = sorted(validators[kind].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    out = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errs]
    if kind in ("RayCluster", "RayJob") and not _NAME_RE.match(doc["metadata"].get("name", "")):
        out.append(f"metadata.name={doc['metadata'].get('name')}: not a DNS-1035 label")
    return out


def assert_valid(validators: dict[str, Any], docs: list[dict[str, Any]], where: str) -> None:
    problems = [
        f"{where}: {d.get('kind')} {d.get('metadata', {}).get('name')}: {e}"
        for d in docs
        for e in _errors(d, validators)
    ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- manifests


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _readme_docs() -> list[dict[str, Any]]:
    text = (K8S / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return [d for b in blocks for d in yaml.safe_load_all(b) if d is not None]


def _spec(**sections: Any) -> RunSpec:
    raw = {
        "model": {"preset": "tiny-llama"},
        "task": {"type": "causal_lm"},
        "data": {"train_files": ["/mnt/ferry/runs/data/x.jsonl"]},
        "run": {"name": "tiny", "storage_path": "/mnt/ferry/runs"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_spec(raw)


def _search(max_concurrent_trials: int | None = None) -> TuneConfig:
    return TuneConfig(
        space={"train.learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
        max_concurrent_trials=max_concurrent_trials,
    )


def _rendered() -> list[tuple[str, list[dict[str, Any]]]]:
    gpu = _spec(scaling={"num_workers": 2, "gpus_per_worker": 1})
    bucket = _spec(
        run={"storage_path": "s3://bucket/runs"}, data={"train_files": ["s3://b/x.jsonl"]}
    )
    return [
        ("train-gpu", render_manifests(gpu, IMAGE)),
        (
            "tune-gpu",
            render_manifests(gpu, IMAGE, namespace="ferry", command="tune", tune=_search(3)),
        ),
        ("train-cluster", render_manifests(gpu, IMAGE, include_cluster=True)),
        ("train-cpu-bucket", render_manifests(bucket, "rayproject/ray:2.60.0-py311")),
        (
            "train-cpu-cluster",
            render_manifests(bucket, IMAGE, gpus_per_worker=0, include_cluster=True),
        ),
    ]


def _all_docs() -> list[tuple[str, list[dict[str, Any]]]]:
    return [(p.name, _load(p)) for p in SHIPPED] + [("README.md", _readme_docs())] + _rendered()


def _shipped(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _load(K8S / name) if d["kind"] == kind]
    return doc


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    """Every key path, list positions collapsed to [] (structure, not values or lengths)."""
    if isinstance(node, dict):
        return {
            p for k, v in node.items() for p in ({f"{prefix}.{k}"} | _key_paths(v, f"{prefix}.{k}"))
        }
    if isinstance(node, list):
        return {p for v in node for p in _key_paths(v, f"{prefix}[]")}
    return set()


def _cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pods = [c["headGroupSpec"]["template"]["spec"] for c in _cluster_specs(doc)]
    pods += [
        g["template"]["spec"] for c in _cluster_specs(doc) for g in c.get("workerGroupSpecs", [])
    ]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods.append(doc["spec"]["submitterPodTemplate"]["spec"])
    return pods


# ---------------------------------------------------------------- tests


def test_shipped_files_exist():
    assert {p.name for p in SHIPPED} == {
        "ray-cluster.gpu.yaml",
        "ray-job.train.yaml",
        "ray-job.tune.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_matches_crd_schema(path, validators):
    docs = _load(path)
    assert docs, f"{path.name} is empty"
    assert_valid(validators, docs, path.name)


def test_readme_manifests_match_schemas(validators):
    docs = _readme_docs()
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Pod", "RayJob"}
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "ferry-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert_valid(validators, docs, "k8s/README.md")


def test_rendered_manifests_match_crd_schemas(validators):
    for name, docs in _rendered():
        assert_valid(validators, docs, name)
        assert list(yaml.safe_load_all(dump_manifests(docs))) == docs, name


def test_validator_rejects_typos_and_accepts_int_or_string(validators):
    job = _shipped("ray-job.train.yaml", "RayJob")
    assert _errors(job, validators) == []

    def edited(edit) -> list[str]:
        doc = yaml.safe_load(yaml.safe_dump(job))  # a deep copy
        edit(doc["spec"], doc["spec"]["rayClusterSpec"]["headGroupSpec"])
        return _errors(doc, validators)

    def head_container(head: dict) -> dict:
        return head["template"]["spec"]["containers"][0]

    assert any(
        "shutdownAfterJobFinish" in e
        for e in edited(lambda spec, head: spec.update(shutdownAfterJobFinish=True))
    )
    assert any(
        "imagePullPolicyy" in e
        for e in edited(lambda spec, head: head_container(head).update(imagePullPolicyy="Always"))
    )
    assert any(
        "rayStartParams" in e
        for e in edited(lambda spec, head: head["rayStartParams"].update({"num-cpus": 0}))
    )
    # x-kubernetes-int-or-string: a quantity or a port may be an int or a string.
    assert (
        edited(lambda spec, head: head_container(head)["resources"]["limits"].update(cpu=2)) == []
    )
    assert _errors({**job, "kind": "Deployment"}, validators) == [
        "kind=Deployment: no schema for this kind"
    ]


def _check_cluster(ctx: str, cluster: dict[str, Any]) -> None:
    for pod in [
        cluster["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in cluster["workerGroupSpecs"]),
    ]:
        ray = pod["containers"][0]
        assert ray["name"] in ("ray-head", "ray-worker"), f"{ctx}: Ray container not first"
        tag = re.search(r":(\d+\.\d+\.\d+)(?:[-_.+]|$)", ray["image"])
        assert tag and tag.group(1) == cluster["rayVersion"], f"{ctx}: rayVersion != image tag"
        env = {e["name"]: e for e in ray["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", ctx
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token", ctx
    head = cluster["headGroupSpec"]["rayStartParams"]
    params = [head, *(g.get("rayStartParams", {}) for g in cluster["workerGroupSpecs"])]
    assert all(isinstance(v, str) for p in params for v in p.values()), ctx
    assert head["num-cpus"] == "0", f"{ctx}: the head must not run work"
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ferry-secrets"}, ctx
    if cluster.get("enableInTreeAutoscaling"):
        resources = cluster["autoscalerOptions"]["resources"]
        assert resources["requests"] == resources["limits"], ctx


def _check_pod(ctx: str, pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True, ctx
    assert pod["securityContext"]["runAsUser"] != 0, ctx
    for c in pod["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, ctx
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], ctx
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert "memory" in limits, f"{ctx}: {c['name']} has no memory limit"
        for key in ("cpu", "memory", "nvidia.com/gpu"):
            assert requests.get(key) == limits.get(key), f"{ctx}: {c['name']} {key} req != limit"


def _check_job(ctx: str, spec: dict[str, Any]) -> None:
    assert spec["backoffLimit"] >= 1, ctx
    assert spec["activeDeadlineSeconds"] > 0, ctx
    assert spec["entrypoint"].startswith(("ferry train ", "ferry tune ")), ctx
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), ctx
    if "rayClusterSpec" in spec:
        assert spec["shutdownAfterJobFinishes"] is True, ctx
        assert spec["ttlSecondsAfterFinished"] > 0, ctx
    else:  # KubeRay rejects a TTL without shutdown; a selected cluster is never shut down
        assert spec["shutdownAfterJobFinishes"] is False, ctx
        assert "ttlSecondsAfterFinished" not in spec, ctx


def test_invariants_hold_in_every_manifest():
    """STYLE.md rule 17 and the security settings, in shipped, README and rendered manifests."""
    for where, docs in _all_docs():
        for doc in docs:
            ctx = f"{where}: {doc['kind']} {doc['metadata']['name']}"
            for cluster in _cluster_specs(doc):
                _check_cluster(ctx, cluster)
            for pod in _pod_specs(doc):
                _check_pod(ctx, pod)
            if doc["kind"] == "RayJob":
                _check_job(ctx, doc["spec"])


def test_run_configs_travel_in_configmaps_and_reach_the_shared_volume():
    """The embedded run config is a valid Ferry config, mounted where the entrypoint reads it, and
    its storage path is on the volume that head and workers mount."""
    for where, docs in [(p.name, _load(p)) for p in SHIPPED] + _rendered():
        for job in (d for d in docs if d["kind"] == "RayJob"):
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
            raw = yaml.safe_load(cm["data"]["run.yaml"])
            # A search's ConfigMap carries its tune: block for `ferry tune`.
            assert ("tune" in raw) == job["spec"]["entrypoint"].startswith("ferry tune "), where
            tune = raw.pop("tune", None)
            if tune is not None:
                TuneConfig.model_validate(tune)
            spec = build_spec(raw)
            # Own cluster: mounted on its head; long-lived cluster: on the submitter (working_dir).
            config_volumes = [
                v for p in _pod_specs(job) for v in p.get("volumes", []) if "configMap" in v
            ]
            assert [v["configMap"]["name"] for v in config_volumes] == [cm["metadata"]["name"]], (
                where
            )
            clusters = _cluster_specs(job) or [c for d in docs for c in _cluster_specs(d)]
            if "rayClusterSpec" in job["spec"]:
                assert job["spec"]["entrypoint"].endswith(" /etc/ferry/run.yaml"), where
            for cluster in clusters:
                pods = [
                    cluster["headGroupSpec"]["template"]["spec"],
                    *(g["template"]["spec"] for g in cluster["workerGroupSpecs"]),
                ]
                for pod in pods:
                    mounts = {
                        m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]
                    }
                    claims = {
                        v["name"]: v["persistentVolumeClaim"]["claimName"]
                        for v in pod["volumes"]
                        if "persistentVolumeClaim" in v
                    }
                    if "://" in spec.run.storage_path:
                        assert not claims, f"{where}: bucket storage needs no volume"
                        continue
                    assert claims == {"shared": "ferry-shared"}, where
                    assert (spec.run.storage_path + "/").startswith(
                        mounts["shared"].rstrip("/") + "/"
                    )


def test_shipped_train_job_is_the_render_of_its_config():
    cm = _shipped("ray-job.train.yaml", "ConfigMap")
    shipped = _shipped("ray-job.train.yaml", "RayJob")
    spec = build_spec(yaml.safe_load(cm["data"]["run.yaml"]))
    docs = render_manifests(spec, IMAGE, mount_path="/mnt/ferry")
    rendered = next(d for d in docs if d["kind"] == "RayJob")
    only_rendered = _key_paths(rendered["spec"]) - _key_paths(shipped["spec"])
    only_shipped = _key_paths(shipped["spec"]) - _key_paths(rendered["spec"])
    assert not only_rendered and not only_shipped, (sorted(only_rendered), sorted(only_shipped))
    assert rendered["spec"] == shipped["spec"]
    assert rendered["metadata"]["name"] == shipped["metadata"]["name"]
    assert docs[0]["metadata"]["name"] == cm["metadata"]["name"]


def _render_cli(capsys, *argv: str) -> list[dict[str, Any]]:
    """`ferry k8s render ARGV` as the user runs it: its stdout, parsed."""
    code = main(["k8s", "render", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return list(yaml.safe_load_all(out))


def _search_of(run_yaml: str, path: Path) -> tuple[RunSpec, TuneConfig]:
    """What `ferry tune` reads from a ConfigMap's run.yaml: the run config and its tune block."""
    path.write_text(run_yaml)
    search = load_search(str(path))
    return search.base, search.tune


def test_render_tune_ships_the_whole_search_config(tmp_path, capsys):
    """`ferry tune` in the pod needs the tune: block; the ConfigMap must carry it."""
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "sweep", "storage_path": "/mnt/ferry/runs"},
                "model": {"preset": "tiny-llama"},
                "task": {"type": "causal_lm"},
                "data": {"train_files": ["/mnt/ferry/runs/data/x.jsonl"]},
                "scaling": {"num_workers": 2},
                "tune": {
                    "space": {"train.learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
                    "num_samples": 4,
                    "max_concurrent_trials": 2,
                },
            }
        )
    )
    docs = _render_cli(capsys, str(config), "--image", IMAGE, "--command", "tune")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    spec, tune = _search_of(cm["data"]["run.yaml"], tmp_path / "rendered.yaml")
    assert list(tune.space) == ["train.learning_rate"]
    assert (tune.num_samples, tune.max_concurrent_trials) == (4, 2)
    assert spec.run.name == "sweep" and spec.run.storage_shared is True


def test_shipped_tune_job_is_the_render_of_its_search_config(tmp_path, capsys):
    cm = _shipped("ray-job.tune.yaml", "ConfigMap")
    shipped = _shipped("ray-job.tune.yaml", "RayJob")
    source = tmp_path / "search.yaml"
    spec, tune = _search_of(cm["data"]["run.yaml"], source)
    docs = _render_cli(
        capsys,
        str(source),
        *("--image", IMAGE, "--command", "tune", "--mount-path", "/mnt/ferry"),
        *("--deadline-s", "172800"),
    )
    rendered = next(d for d in docs if d["kind"] == "RayJob")
    only_rendered = _key_paths(rendered["spec"]) - _key_paths(shipped["spec"])
    only_shipped = _key_paths(shipped["spec"]) - _key_paths(rendered["spec"])
    assert not only_rendered and not only_shipped, (sorted(only_rendered), sorted(only_shipped))
    assert rendered["spec"] == shipped["spec"]
    assert rendered["metadata"]["name"] == shipped["metadata"]["name"]
    rendered_cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert rendered_cm["metadata"]["name"] == cm["metadata"]["name"]
    # The rendered ConfigMap holds the same search as the shipped one, tune: block included.
    assert _search_of(rendered_cm["data"]["run.yaml"], tmp_path / "rendered.yaml") == (spec, tune)


def test_shipped_cluster_is_the_render_with_cluster():
    spec = _spec(
        run={"name": "ferry"},
        scaling={"num_workers": 4, "gpus_per_worker": 1, "cpus_per_worker": 7, "data_cpus": 4},
    )
    docs = {
        d["kind"]: d
        for d in render_manifests(spec, IMAGE, include_cluster=True, mount_path="/mnt/ferry")
    }
    for kind in ("RayCluster", "NetworkPolicy"):
        shipped = _shipped("ray-cluster.gpu.yaml", kind)
        assert _key_paths(docs[kind]["spec"]) == _key_paths(shipped["spec"]), kind
        assert docs[kind]["spec"] == shipped["spec"], kind
        assert docs[kind]["metadata"]["name"] == shipped["metadata"]["name"], kind
    readme_job = next(d for d in _readme_docs() if d["kind"] == "RayJob")
    assert _key_paths(docs["RayJob"]["spec"]) == _key_paths(readme_job["spec"])
    assert docs["RayJob"]["spec"]["clusterSelector"] == {"ray.io/cluster": "ferry"}


def test_tune_job_is_the_train_job_with_pods_for_every_concurrent_trial():
    train = _shipped("ray-job.train.yaml", "RayJob")["spec"]
    tune = _shipped("ray-job.tune.yaml", "RayJob")["spec"]
    assert tune["entrypoint"] == "ferry tune /etc/ferry/run.yaml"
    assert _key_paths(tune) == _key_paths(train)
    run = yaml.safe_load(_shipped("ray-job.tune.yaml", "ConfigMap")["data"]["run.yaml"])
    trials, workers = run["tune"]["max_concurrent_trials"], run["scaling"]["num_workers"]
    (group,) = tune["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == trials * workers


def test_render_follows_the_config():
    spec = _spec(
        run={"name": "My_Run.v2"},
        scaling={"num_workers": 3, "cpus_per_worker": 2, "gpus_per_worker": 0.5},
    )
    cm, job = render_manifests(
        spec,
        "registry.example.com/ferry:2.60.1-py311-gpu",
        namespace="ml",
        gpus_per_worker=2,
        command="tune",
        memory_per_worker="100Gi",
        tune=_search(),
    )
    assert job["metadata"] == {
        "name": "my-run-v2-tune",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/name": "ferry", "ferry.io/run": "my-run-v2"},
    }
    assert cm["metadata"]["name"] == "my-run-v2-tune-config"
    assert job["spec"]["entrypoint"] == "ferry tune /etc/ferry/run.yaml"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.1"
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    res = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert res == {"cpu": "3", "memory": "100Gi", "nvidia.com/gpu": "2"}  # ceil(2 + 1/3) CPUs
    # The GPU override is written into the config too, so Ray Train requests what the pods have.
    run = yaml.safe_load(cm["data"]["run.yaml"])
    assert TuneConfig.model_validate(run.pop("tune")) == _search()
    assert build_spec(run).scaling.gpus_per_worker == 2
    cpu_job = render_manifests(spec, IMAGE, gpus_per_worker=0)[1]
    cpu_pod = cpu_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu_pod


def test_render_tune_sizes_the_cluster_so_ferry_tune_runs_its_concurrent_trials():
    """`ferry tune` counts the trials that fit the cluster it finds (trial drivers and Ray Data
    included): the rendered pods must hold exactly tune.max_concurrent_trials of them."""
    spec = _spec(
        scaling={"num_workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 7, "data_cpus": 2}
    )
    for trials, pods in ((None, 2), (1, 2), (4, 8)):
        search = _search(trials)
        cm, job = render_manifests(spec, IMAGE, command="tune", tune=search)
        (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cluster = {"CPU": pods * float(limits["cpu"]), "GPU": float(pods)}
        assert size_trials(spec, search, cluster) == (trials or 1, []), (trials, limits)
    with pytest.raises(
        ConfigError,
        match=r"^--command=tune: the config has no tune: block, and `ferry tune` in the pod "
        r"needs one\. Add a tune: block",
    ):
        render_manifests(spec, IMAGE, command="tune")
    bad = TuneConfig(space={"lora.rnk": {"choice": [4, 8]}})
    with pytest.raises(ConfigError, match=r"^tune\.space\.lora\.rnk: no key 'rnk' in lora"):
        render_manifests(spec, IMAGE, command="tune", tune=bad)


def test_render_without_version_tag_needs_ray_version():
    spec = _spec()
    with pytest.raises(
        ValueError,
        match=r"--image=registry.example.com/ferry:latest: no Ray "
        r"version in the tag\. .*--ray-version",
    ):
        render_manifests(spec, "registry.example.com/ferry:latest")
    job = render_manifests(spec, "localhost:5000/ferry", ray_version="2.60.0")[1]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    with pytest.raises(
        ValueError,
        match=r"--ray-version=2\.59\.0: differs from the version in the "
        r"image tag \(2\.60\.0\)",
    ):
        render_manifests(spec, IMAGE, ray_version="2.59.0")
    with pytest.raises(ValueError, match=r"Ray 2\.40\.0 has no token authentication"):
        render_manifests(spec, "rayproject/ray:2.40.0-py311-gpu")


def test_render_rejects_bad_inputs_with_clear_messages():
    spec = _spec()
    no_workers = spec.model_copy(
        update={"scaling": spec.scaling.model_copy(update={"num_workers": 0})}
    )
    with pytest.raises(
        ValueError,
        match=r"^scaling\.num_workers=0: must be >= 1 .*\. Set "
        r"scaling\.num_workers",
    ):
        render_manifests(no_workers, IMAGE)
    with pytest.raises(ValueError, match=r"^--gpus-per-worker=-1: must be >= 0\. Pass"):
        render_manifests(spec, IMAGE, gpus_per_worker=-1)
    with pytest.raises(
        ValueError,
        match=r"^--image=: required\. Pass the container image that has "
        r"ferry installed\.$",
    ):
        render_manifests(spec, "")
    with pytest.raises(ValueError, match=r"--command=serve: must be one of train, tune"):
        render_manifests(spec, IMAGE, command="serve")
    relative = spec.model_copy(update={"run": spec.run.model_copy(update={"storage_path": "runs"})})
    with pytest.raises(ValueError, match=r"run\.storage_path=runs: must be an absolute path"):
        render_manifests(relative, IMAGE)
    with pytest.raises(
        ValueError,
        match=r"--mount-path=/data: must be an absolute path \(not /\) that "
        r"contains run\.storage_path=/mnt/ferry/runs",
    ):
        render_manifests(spec, IMAGE, mount_path="/data")
    with pytest.raises(ValueError, match=r"run\.name=a{45}: too long for a RayJob name"):
        render_manifests(_spec(run={"name": "a" * 45}), IMAGE)
    with pytest.raises(ValueError, match=r"train\.precision=fp16: fp16 training needs a GPU"):
        render_manifests(
            _spec(train={"precision": "fp16"}, scaling={"gpus_per_worker": 1}),
            IMAGE,
            gpus_per_worker=0,
        )


def test_render_reports_every_problem_at_once():
    spec = _spec()
    no_workers = spec.model_copy(
        update={"scaling": spec.scaling.model_copy(update={"num_workers": 0})}
    )
    with pytest.raises(ConfigError) as info:
        render_manifests(
            no_workers, "", namespace="Bad_NS", gpus_per_worker=-2, memory_per_worker="lots"
        )
    keys = [p.split("=", 1)[0] for p in info.value.problems]
    assert keys == [
        "--image",
        "--namespace",
        "--gpus-per-worker",
        "--memory-per-worker",
        "scaling.num_workers",
    ]
    assert all(re.match(r"^\S+=.*: .+\. .+\.$", p) for p in info.value.problems), (
        info.value.problems
    )


def test_render_warns_about_local_paths_pods_cannot_see():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ferry.cluster")
    logger.addHandler(handler)
    try:
        render_manifests(
            _spec(data={"train_files": ["/home/me/x.jsonl", "/mnt/ferry/runs/y.jsonl"]}), IMAGE
        )
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert messages == [
        "data.train_files[0]=/home/me/x.jsonl: a local path outside the shared volume "
        "(/mnt/ferry/runs); pods see it only if the image contains it. Put it under "
        "/mnt/ferry/runs or use a bucket URI."
    ]


def test_cli_render_prints_valid_manifests(tmp_path, capsys, validators):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "cli-run", "storage_path": "/mnt/ferry/runs"},
                "model": {"preset": "tiny-llama"},
                "task": {"type": "causal_lm"},
                "data": {"train_files": ["/mnt/ferry/runs/data/x.jsonl"]},
            }
        )
    )
    parser = build_parser()
    args = parser.parse_args(
        [
            "k8s",
            "render",
            str(config),
            "--image",
            IMAGE,
            "--namespace",
            "ml",
            "--gpus-per-worker",
            "1",
            "--with-cluster",
            "--set",
            "scaling.num_workers=2",
        ]
    )
    assert args.debug is False  # cli.main reads it when reporting errors
    assert args.func(args) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayCluster", "NetworkPolicy", "RayJob"]
    assert_valid(validators, docs, "ferry k8s render")
    assert docs[1]["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 2
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    args = parser.parse_args(["k8s", "render", str(config)])
    with pytest.raises(ConfigError, match=r"--image=: required"):
        args.func(args)
