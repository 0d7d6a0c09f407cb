"""The cluster configuration under ``infra/``, validated by parsers, schemas and the stack's own loaders.

There is no Kubernetes cluster, Docker engine or GPU here, so every file is checked by the code
that will read it, or by the schema of the release it targets:

- every file under ``infra/`` is globbed and must belong to a known kind (a new file cannot escape);
- built-in Kubernetes objects: the strict JSON schemas of Kubernetes ``K8S_VERSION`` bundled in
  ``kubernetes-validate`` (unknown fields are errors);
- the RayCluster: the fields of KubeRay ``KUBERAY_RELEASE``'s CRD (allowed keys, required keys,
  ``rayStartParams`` values as strings), its pod templates as ``core/v1`` PodTemplateSpec;
- DeepSpeed configs: merged with the paper recipe (``training/deepspeed_config.py``), then DeepSpeed's own
  ``DeepSpeedConfig`` at a data-parallel world of 128; no JSON sets a key the recipe decides;
- the Prefect work pool: the server's ``WorkPoolCreate`` validation, the variables as a JSON schema,
  and the Job that prefect-kubernetes' worker renders from it (validated as ``batch/v1`` Job);
- ``infra/prefect/prefect.yaml``: the model ``prefect deploy`` loads it into, and the flow's signature;
- the MLflow command line (MLflow's click parser), the Prefect database settings (Prefect's
  Settings), the S3 lifecycle rules (botocore's S3 model), the Dockerfile's pins;
- cross-file names (Services, ports, Secrets, ConfigMaps, images) and the absence of secret values.

Each checker also has a test that feeds it a broken input, so a checker that silently passes
everything fails the suite.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import tomllib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
INFRA = ROOT / "infra"
RUNBOOK = ROOT / "docs" / "cluster.md"  # the walk-through from an empty cluster to a scheduled run
RECIPE = ROOT / "configs" / "cpt-3.9b-900b.yaml"

K8S_VERSION = "1.33"  # Kubernetes schema version the built-in objects are validated against
KUBERAY_RELEASE = "v1.5.1"  # the KubeRay release whose RayCluster CRD fields are listed below
WORLD_SIZE = 128  # 16 worker pods x 8 H100
NAMESPACE = "trecflow"
APP_UID = 10001

# RayCluster (ray.io/v1) fields of KubeRay v1.5.1 (ray-operator/apis/ray/v1/raycluster_types.go).
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
RAYCLUSTER_SPEC_REQUIRED = {"headGroupSpec"}
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType",
}
HEAD_GROUP_REQUIRED = {"template"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "template", "minReplicas", "maxReplicas"}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer"}

# torch==2.13.0's Linux wheel on PyPI requires cuda-toolkit==13.0.3: DeepSpeed's JIT builds need
# an nvcc of the same CUDA major version in the runtime image.
TORCH_CUDA_MAJOR = 13

# The variables the code reads (trecflow.settings, trecflow.tracking, Ray, Prefect, boto3).
FLOW_RUN_ENV = {
    "TRECFLOW_STORE", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL", "RAY_ADDRESS", "TRECFLOW_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
}
RAY_POD_ENV = FLOW_RUN_ENV - {"RAY_ADDRESS"}  # KubeRay sets RAY_ADDRESS inside Ray pods


# ---------------------------------------------------------------------------------------------
# Loading


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(INFRA).as_posix()


def classify(path: Path) -> str:
    """The kind of an infra file; 'unknown' fails test_every_infra_file_is_checked."""
    name = rel(path)
    if name == "kustomization.yaml":
        return "kustomization"
    if name == "prefect/prefect.yaml":
        return "prefect-yaml"
    if name == "prefect/base-job-template.json":
        return "work-pool-template"
    if re.fullmatch(r"deepspeed/zero[123]\.json", name):
        return "deepspeed"
    if name == "s3/lifecycle.json":
        return "s3-lifecycle"
    if name == "prefect/zombie-flow-runs.yaml":
        return "automation"
    if name == "docker/Dockerfile":
        return "dockerfile"
    if name == "docker/Dockerfile.dockerignore":
        return "dockerignore"
    if path.suffix == ".md":
        return "doc"
    if path.suffix in {".yaml", ".yml"}:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            return "manifest"
    return "unknown"


def manifest_files() -> list[Path]:
    return [p for p in infra_files() if classify(p) == "manifest"]


def load_objects() -> list[tuple[str, dict]]:
    """(file, object) for every Kubernetes object in every manifest file."""
    objects = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append((rel(path), doc))
    return objects


OBJECTS = load_objects()
BUILTIN = [(f, o) for f, o in OBJECTS if o["apiVersion"] != "ray.io/v1"]


def obj_id(item: tuple[str, dict]) -> str:
    path, obj = item
    return f"{path}:{obj['kind']}/{obj['metadata']['name']}"


def find(kind: str, name: str | None = None) -> dict:
    matches = [o for _, o in OBJECTS if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def raycluster() -> dict:
    return find("RayCluster")


def template_json() -> dict:
    return json.loads((INFRA / "prefect" / "base-job-template.json").read_text())


def prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())


def readme() -> str:
    """The infra notes, the main README and the runbook (docs/cluster.md, which creates the Secrets)."""
    return "\n".join(path.read_text() for path in (INFRA / "README.md", INFRA.parent / "README.md", RUNBOOK))


def pod_templates() -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every workload and Ray group."""
    for path, obj in OBJECTS:
        kind = obj["kind"]
        if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{path}:{kind}/{obj['metadata']['name']}", obj["spec"]["template"]
        elif kind == "RayCluster":
            yield f"{path}:head", obj["spec"]["headGroupSpec"]["template"]
            for group in obj["spec"].get("workerGroupSpecs", []):
                yield f"{path}:{group['groupName']}", group["template"]
    yield "prefect/base-job-template.json", template_json()["job_configuration"]["job_manifest"]["spec"]["template"]


def containers() -> Iterator[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every container and init container."""
    for where, template in pod_templates():
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where}:{container['name']}", container, spec


def recipe():
    from trecflow.recipe import load_recipe

    return load_recipe(RECIPE)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def configmap_data() -> dict[str, str]:
    return find("ConfigMap", "trecflow-env")["data"]


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if isinstance(container.get("env"), list)}


def envfrom_names(container: dict) -> set[str]:
    """Names a container's envFrom brings in: ConfigMap keys (from infra) and Secret keys (from the README)."""
    names: set[str] = set()
    secrets = readme_secrets()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(find("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            names |= secrets.get(source["secretRef"]["name"], set())
    return names


def readme_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the README's `kubectl create secret generic` commands."""
    text = readme().replace("\\\n", " ")
    secrets: dict[str, set[str]] = {}
    for match in re.finditer(r"kubectl\b[^\n]*?create secret generic ([a-z0-9-]+)([^\n]*)", text):
        keys = set(re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", match.group(2)))
        secrets.setdefault(match.group(1), set()).update(keys)
    return secrets


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (CPU cores or bytes)."""
    text = str(value)
    units = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "m": 1e-3,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {value!r}"
    number, unit = match.groups()
    assert unit in units or unit == "", f"unknown unit in {value!r}"
    return float(number) * units.get(unit, 1)


def k8s_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def as_pod_template(template: dict, name: str = "check") -> dict:
    """A PodTemplateSpec wrapped as a core/v1 PodTemplate object, so the built-in schema applies."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


# ---------------------------------------------------------------------------------------------
# Every file is checked


def test_validation_dependencies_are_installed():
    """The validators come from the `test` extras: kubernetes-validate and prefect-kubernetes."""
    import importlib.util

    missing = [m for m in ("kubernetes_validate", "prefect_kubernetes", "deepspeed", "jsonschema", "botocore") if importlib.util.find_spec(m) is None]
    assert not missing, f"install the test extras (missing: {missing})"


def test_every_infra_file_is_checked():
    kinds = {rel(p): classify(p) for p in infra_files()}
    unknown = sorted(name for name, kind in kinds.items() if kind == "unknown")
    assert not unknown, f"files under infra/ that no test knows how to validate: {unknown}"
    for required in ["manifest", "deepspeed", "prefect-yaml", "work-pool-template", "dockerfile", "s3-lifecycle", "doc"]:
        assert required in kinds.values(), f"no {required} file under infra/"
    assert sorted(n for n, k in kinds.items() if k == "deepspeed") == [
        "deepspeed/zero1.json", "deepspeed/zero2.json", "deepspeed/zero3.json"
    ]


@pytest.mark.parametrize("path", infra_files(), ids=rel)
def test_every_yaml_and_json_file_parses(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    elif path.suffix in {".yaml", ".yml"}:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs)
    else:
        assert path.read_text().strip(), f"{rel(path)} is empty"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == sorted(rel(p) for p in manifest_files())
    assert listed[0] == "k8s/namespace.yaml", "the namespace must come first"


# ---------------------------------------------------------------------------------------------
# Built-in Kubernetes objects


@pytest.mark.parametrize("item", BUILTIN, ids=obj_id)
def test_builtin_object_matches_kubernetes_schema(item):
    path, obj = item
    k8s_validate(obj)
    if obj["kind"] != "Namespace":
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj_id(item)} is not in {NAMESPACE}"
    assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "trecflow"


def test_schema_validation_rejects_bad_objects():
    import kubernetes_validate

    deployment = copy.deepcopy(find("Deployment", "trecflow-mlflow"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)
    deployment = copy.deepcopy(find("Deployment", "trecflow-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of `resources`
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment)


def test_workloads_have_resources_security_context_and_pinned_images():
    seen = 0
    for where, container, spec in containers():
        seen += 1
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: no cpu/memory {kind}"
        for key, request in resources["requests"].items():
            limit = resources["limits"].get(key)
            if isinstance(request, str) and "{{" in request:
                continue  # work-pool variables: checked on the rendered Job
            assert limit is not None and parse_quantity(request) <= parse_quantity(limit), f"{where}: {key}"
        image = container["image"]
        if "{{" not in image:
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest" and "/" not in tag, f"{where}: unpinned image {image}"
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, f"{where}: runAsUser"
    assert seen >= 7


def test_services_select_pods_and_name_their_ports():
    workloads = [o for _, o in OBJECTS if o["kind"] in {"Deployment", "StatefulSet"}]
    for service in (o for _, o in OBJECTS if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: no container port {target}"
    for workload in workloads:
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_env_references_expand_from_earlier_variables():
    """Kubernetes expands $(VAR) only from variables defined earlier in the same container."""
    checked = 0
    for where, container, _ in containers():
        defined: set[str] = set()
        for entry in container.get("env", []) if isinstance(container.get("env"), list) else []:
            for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", entry.get("value", "")):
                assert reference in defined, f"{where}: {entry['name']} uses $({reference}) before it is defined"
                checked += 1
            defined.add(entry["name"])
    assert checked >= 1


def test_readme_secrets_take_values_from_the_shell_only():
    text = readme().replace("\\\n", " ")
    literals = re.findall(r"--from-literal=[A-Za-z0-9_.-]+=(\S+)", text)
    assert len(literals) == 4
    for value in literals:
        assert re.match(r"^\"?\$", value), f"a literal Secret value in the README: {value}"


def test_referenced_configmaps_and_secrets_exist():
    secrets = readme_secrets()
    assert set(secrets) == {"trecflow-s3", "trecflow-postgres", "trecflow-ray-auth"}
    configmaps = {o["metadata"]["name"]: o for _, o in OBJECTS if o["kind"] == "ConfigMap"}
    references = 0
    for where, container, spec in containers():
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, where
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, f"{where}: Secret {source['secretRef']['name']} is never created"
            references += 1
        for entry in container.get("env", []) if isinstance(container.get("env"), list) else []:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref['name']}/{ref['key']} is never created"
                references += 1
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, where
    assert references >= 10


# ---------------------------------------------------------------------------------------------
# KubeRay


def kuberay_problems(cluster: dict) -> list[str]:
    """What KubeRay v1.5.1's RayCluster CRD (or its operator) would reject in ``cluster``."""
    problems = []
    if cluster.get("apiVersion") != "ray.io/v1" or cluster.get("kind") != "RayCluster":
        problems.append("not a ray.io/v1 RayCluster")
    problems += [f"unknown top-level field {k}" for k in set(cluster) - {"apiVersion", "kind", "metadata", "spec"}]
    spec = cluster.get("spec", {})
    problems += [f"unknown spec field {k}" for k in set(spec) - RAYCLUSTER_SPEC_FIELDS]
    problems += [f"missing spec field {k}" for k in RAYCLUSTER_SPEC_REQUIRED - set(spec)]
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}), HEAD_GROUP_FIELDS, HEAD_GROUP_REQUIRED)]
    groups += [
        (f"workerGroupSpecs[{i}]", group, WORKER_GROUP_FIELDS, WORKER_GROUP_REQUIRED)
        for i, group in enumerate(spec.get("workerGroupSpecs", []))
    ]
    for where, group, allowed, required in groups:
        problems += [f"{where}: unknown field {k}" for k in set(group) - allowed]
        problems += [f"{where}: missing field {k}" for k in required - set(group)]
        for key, value in group.get("rayStartParams", {}).items():
            if not isinstance(value, str):
                problems.append(f"{where}.rayStartParams.{key}: {value!r} is not a string")
        for key in ("replicas", "minReplicas", "maxReplicas", "numOfHosts"):
            if key in group and (not isinstance(group[key], int) or group[key] < 0):
                problems.append(f"{where}.{key}: not a non-negative integer")
        if {"minReplicas", "maxReplicas"} <= set(group) and not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"{where}: replicas outside [minReplicas, maxReplicas]")
        template = group.get("template", {})
        if not template.get("spec", {}).get("containers"):
            problems.append(f"{where}: the pod template has no container")
    head = spec.get("headGroupSpec", {})
    if "serviceType" in head and head["serviceType"] not in SERVICE_TYPES:
        problems.append(f"headGroupSpec.serviceType {head['serviceType']!r}")
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        problems.append("duplicate worker groupName")
    return problems


def test_raycluster_fields_are_those_of_the_named_kuberay_release():
    cluster = raycluster()
    assert kuberay_problems(cluster) == []
    assert KUBERAY_RELEASE in (INFRA / "kuberay" / "raycluster.yaml").read_text()
    assert cluster["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["spec"].__setitem__("workerGroupSpec", []),  # typo of workerGroupSpecs
        lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("gpus", 8),
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("replicas", 17),
        lambda c: c["spec"]["headGroupSpec"].__setitem__("serviceType", "Internal"),
    ],
    ids=["spec-typo", "worker-unknown-field", "non-string-param", "no-group-name", "replicas-over-max", "service-type"],
)
def test_kuberay_checker_rejects_broken_clusters(mutate):
    cluster = copy.deepcopy(raycluster())
    mutate(cluster)
    assert kuberay_problems(cluster)


def test_raycluster_pod_templates_are_valid_pod_template_specs():
    import kubernetes_validate

    cluster = raycluster()
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        k8s_validate(as_pod_template(template))
    broken = copy.deepcopy(templates[-1])
    broken["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = {"count": 8}
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(as_pod_template(broken))


def test_raycluster_sizing_matches_the_job():
    cluster = raycluster()
    spec = cluster["spec"]
    assert spec["rayVersion"] == lock_pins()["ray"]
    assert spec.get("enableInTreeAutoscaling") is False
    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 16
    assert workers.get("numOfHosts", 1) == 1
    pod = workers["template"]["spec"]
    ray = pod["containers"][0]
    assert ray["name"] == "ray-worker"
    gpus = int(ray["resources"]["limits"]["nvidia.com/gpu"])
    assert ray["resources"]["requests"]["nvidia.com/gpu"] == ray["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 8 and workers["replicas"] * gpus == WORLD_SIZE
    assert ray["resources"]["requests"] == ray["resources"]["limits"], "Guaranteed QoS: requests = limits"
    # One pod per 8-GPU node: fits an H100 node such as p5.48xlarge (192 vCPU, 2 TiB).
    assert parse_quantity(ray["resources"]["limits"]["cpu"]) <= 192
    memory = parse_quantity(ray["resources"]["limits"]["memory"])
    assert memory <= 2048 * 2**30
    assert pod["nodeSelector"].get("nvidia.com/gpu.product", "").startswith("NVIDIA-H100")
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "address" not in workers["rayStartParams"], "KubeRay sets the workers' address"


@pytest.mark.parametrize("group", ["head", "h100"])
def test_ray_pods_have_a_memory_backed_shm_larger_than_the_object_store(group):
    spec = raycluster()["spec"]
    g = spec["headGroupSpec"] if group == "head" else next(w for w in spec["workerGroupSpecs"] if w["groupName"] == group)
    pod = g["template"]["spec"]
    ray = pod["containers"][0]
    (shm_mount,) = [m for m in ray["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == shm_mount["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    shm_size = parse_quantity(shm["emptyDir"]["sizeLimit"])
    object_store = int(g["rayStartParams"]["object-store-memory"])
    assert 0 < object_store < shm_size
    memory_backed = sum(parse_quantity(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    assert memory_backed < parse_quantity(ray["resources"]["limits"]["memory"])


def test_ray_pods_get_the_job_environment_and_the_auth_token():
    cluster = raycluster()
    groups = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in groups:
        ray = group["template"]["spec"]["containers"][0]
        assert ray["image"] == runtime_image()
        available = env_names(ray) | envfrom_names(ray)
        assert RAY_POD_ENV <= available, f"missing in Ray pods: {sorted(RAY_POD_ENV - available)}"
        assert "RAY_ADDRESS" not in available, "KubeRay sets RAY_ADDRESS in Ray pods"
        env = {e["name"]: e for e in ray["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "trecflow-ray-auth", "key": "auth_token"}


FLOW_RUN_ENV_EXTRA = {"TRECFLOW_BUCKET", "TRECFLOW_RAY_CODE"}


def test_head_ports_match_the_flow_runs_jobs_api_address(monkeypatch):
    cluster = raycluster()
    head = cluster["spec"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    address = urlparse(flow_run_env()["RAY_ADDRESS"])
    assert address.scheme == "http"
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local"
    assert address.port == ports["dashboard"] == 8265
    assert ports["gcs-server"] == 6379 and 10001 not in ports.values(), "Ray Client is refused: not exposed"
    params = head["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0" and params.get("include-dashboard", "true") == "true"
    from trecflow.ray_jobs import jobs_address

    monkeypatch.setenv("RAY_ADDRESS", flow_run_env()["RAY_ADDRESS"])
    assert jobs_address() == flow_run_env()["RAY_ADDRESS"]


def test_ray_pods_and_flow_runs_share_settings_and_run_the_images_code():
    data = configmap_data()
    assert data["TRECFLOW_RAY_CODE"] == "image"
    assert data["TRECFLOW_STORE"].startswith(f"s3://{data['TRECFLOW_BUCKET']}/")
    from trecflow.ray_jobs import FORWARDED_ENV

    cluster = raycluster()
    flow = template_json()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    containers = [g["template"]["spec"]["containers"][0] for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]]
    for container in containers + [flow]:
        available = env_names(container) | envfrom_names(container)
        assert FLOW_RUN_ENV_EXTRA <= available
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= available, "credentials come from the pod, not the runtime_env"
        assert set(FORWARDED_ENV) - {"TRECFLOW_LEASE_SECONDS"} <= available
    for container in containers:
        assert container.get("workingDir") == dockerfile_workdir("runtime")


def test_runtime_image_carries_the_deepspeed_json_the_recipe_names():
    named = recipe().training.deepspeed_config
    assert named is not None and str(named).startswith("infra/deepspeed/")
    assert "COPY infra/deepspeed ./infra/deepspeed" in dockerfile_stages()["runtime"]
    ignored = [line.strip() for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()]
    assert ignored.index("!infra/deepspeed") > ignored.index("infra")


def test_worker_observer_watches_its_namespace(monkeypatch):
    from prefect_kubernetes.settings import KubernetesSettings

    worker = find("Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in worker["env"]}
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES", env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"])
    assert KubernetesSettings().observer.namespaces == {NAMESPACE}


def test_zombie_automation_is_prefects_and_outlasts_the_heartbeat():
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    raw = yaml.safe_load((INFRA / "prefect" / "zombie-flow-runs.yaml").read_text())
    assert set(raw) <= set(AutomationCore.model_fields), "AutomationCore ignores unknown keys"
    assert set(raw["trigger"]) <= set(EventTrigger.model_fields)
    automation = AutomationCore.model_validate(raw)
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                              "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"} and trigger.threshold == 1
    heartbeat = int(configmap_data()["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert heartbeat >= 30 and trigger.within >= timedelta(seconds=3 * heartbeat)
    assert trigger.within > timedelta(seconds=180), "runs on Prefect's default heartbeat (180 s) must not be crashed"
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert "prefect automation create --from-file infra/prefect/zombie-flow-runs.yaml" in (ROOT / "docs" / "cluster.md").read_text()


def test_readme_calls_no_stage_an_open_issue():
    assert "open issue" not in readme()


# ---------------------------------------------------------------------------------------------
# DeepSpeed


@pytest.fixture(scope="module")
def deepspeed_config():
    """DeepSpeed's DeepSpeedConfig of a config dict, built at a chosen data-parallel world size
    without a launch."""
    import deepspeed.runtime.config as ds_config

    saved = ds_config.dist.get_rank

    def build(config: dict, world: int = WORLD_SIZE):
        class DataParallel:  # the `mpu` interface DeepSpeed asks for the data-parallel world size
            def get_data_parallel_world_size(self):
                return world

        ds_config.dist.get_rank = lambda group=None: 0  # no process group: rank 0 of `world`
        try:
            return ds_config.DeepSpeedConfig(copy.deepcopy(config), mpu=DataParallel())
        finally:
            ds_config.dist.get_rank = saved

    return build


DEEPSPEED_FILES = sorted((INFRA / "deepspeed").glob("zero*.json"))
# What a recipe decides (training/deepspeed_config.py merges it in): no infra JSON may set these.
RECIPE_DECIDED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization.stage", "optimizer", "scheduler", "bf16", "bfloat16", "fp16", "amp", "torch_autocast",
}


def stage_of(path: Path) -> int:
    return int(re.search(r"zero(\d)", path.name).group(1))


def paper_recipe_at(stage: int):
    """The paper recipe trained at ``stage`` (its other decisions unchanged)."""
    r = recipe()
    return r.model_copy(update={"training": r.training.model_copy(update={"zero_stage": stage})})


def merged(path: Path, stage: int | None = None) -> dict:
    """What the engine would receive: ``path`` merged with the paper recipe at the file's stage."""
    from training.deepspeed_config import engine_config

    return engine_config(paper_recipe_at(stage or stage_of(path)), path.read_text(), f"infra/{rel(path)}")


def key_paths(data: dict, prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from key_paths(value, f"{prefix}{key}.")


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.name)
def test_deepspeed_json_sets_no_key_the_recipe_decides(path):
    raw = json.loads(path.read_text())
    decided = sorted(set(key_paths(raw)) & RECIPE_DECIDED_KEYS)
    assert not decided, f"{rel(path)} sets {decided}: the recipe decides them"
    assert set(raw) == {"zero_optimization", "activation_checkpointing"}


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.name)
def test_deepspeed_config_loads_with_deepspeed_at_world_128(path, deepspeed_config):
    r = recipe()
    stage = stage_of(path)
    raw = json.loads(path.read_text())
    engine = merged(path)
    for section in ("zero_optimization", "activation_checkpointing"):
        for key, value in raw[section].items():
            assert engine[section][key] == value, f"{section}.{key}"
    config = deepspeed_config(engine)
    assert config.world_size == WORLD_SIZE
    assert config.zero_optimization_stage == stage
    sequences = r.batch.tokens // r.data.seq_len
    assert sequences * r.data.seq_len == r.batch.tokens
    assert config.train_batch_size == sequences == 1024
    assert config.train_batch_size == (
        config.train_micro_batch_size_per_gpu * config.gradient_accumulation_steps * WORLD_SIZE
    )
    assert config.train_micro_batch_size_per_gpu == r.micro_batch and config.gradient_accumulation_steps == r.training.accumulation
    assert config.bfloat16_config.enabled and not config.float16_config.enabled
    assert config.gradient_clipping == r.training.gradient_clipping
    assert config.optimizer_name == "adamw"
    params = config.optimizer_params
    assert params["lr"] == r.optimizer.peak_lr
    assert tuple(params["betas"]) == tuple(r.optimizer.betas)
    assert params["weight_decay"] == r.optimizer.weight_decay
    assert config.scheduler_name is None, "the LR schedule is trecflow's (training/schedules.py), not DeepSpeed's"
    assert config.zero_config.overlap_comm and config.zero_config.contiguous_gradients
    assert config.zero_config.reduce_bucket_size > 0 and config.zero_config.allgather_bucket_size > 0
    assert config.activation_checkpointing_config.partition_activations is False


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.name)
def test_deepspeed_json_refuses_a_recipe_that_decides_otherwise(path):
    from trecflow.recipe import RecipeError

    raw = json.loads(path.read_text())
    raw["zero_optimization"]["stage"] = stage_of(path)  # the stage it was written for, against another recipe stage
    other = 1 if stage_of(path) != 1 else 2
    with pytest.raises(RecipeError, match=rf"^infra/{re.escape(rel(path))}: zero_optimization\.stage is {stage_of(path)} "
                                          rf"but training\.zero_stage is {other}$"):
        from training.deepspeed_config import engine_config

        engine_config(paper_recipe_at(other), raw, f"infra/{rel(path)}")


def test_deepspeed_rejects_a_batch_that_does_not_divide_over_the_world(deepspeed_config):
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        deepspeed_config(merged(INFRA / "deepspeed" / "zero1.json"), world=120)


def test_deepspeed_rejects_unknown_zero_keys(deepspeed_config):
    engine = merged(INFRA / "deepspeed" / "zero2.json")
    engine["zero_optimization"]["overlap_communication"] = True  # not a DeepSpeed key
    with pytest.raises(Exception, match="overlap_communication"):
        deepspeed_config(engine)


def test_deepspeed_world_size_is_the_ray_clusters_gpu_count():
    (workers,) = raycluster()["spec"]["workerGroupSpecs"]
    gpus = workers["replicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    r = recipe()
    assert r.training.workers == gpus == WORLD_SIZE
    assert r.sequences_per_step == r.micro_batch * r.training.accumulation * gpus


def test_paper_recipe_names_its_deepspeed_json_and_the_readme_agrees():
    r = recipe()
    training = r.training
    named = f"infra/deepspeed/zero{training.zero_stage}.json"
    assert training.deepspeed_config == named, "the paper recipe names the JSON of its ZeRO stage"
    assert (ROOT / named).is_file()
    assert training.activation_checkpointing, "the README's activation memory assumes full checkpointing"
    merged(ROOT / named, training.zero_stage)  # no conflict
    text = " ".join((INFRA / "deepspeed" / "README.md").read_text().split())
    assert f"`configs/cpt-3.9b-900b.yaml` names `{named}` (`training.deepspeed_config`) with `training.zero_stage: {training.zero_stage}`" in text
    assert "`training.activation_checkpointing: true`" in text
    assert (f"micro-batch {r.micro_batch} × accumulation {training.accumulation} × {training.workers} workers = "
            f"{r.sequences_per_step} sequences per step") in text
    assert f"**ZeRO-{training.zero_stage} (`zero{training.zero_stage}.json`) is what the paper recipe runs**" in text


def test_deepspeed_readme_states_the_memory_per_stage():
    n, p = float(recipe().model.params), WORLD_SIZE
    text = (INFRA / "deepspeed" / "README.md").read_text()
    figures = {
        "ZeRO-1": 2 * n + 2 * n + 12 * n / p,
        "ZeRO-2": 2 * n + (2 * n + 12 * n) / p,
        "ZeRO-3": 16 * n / p,
    }
    for stage, bytes_per_gpu in figures.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {stage} "))
        assert f"{bytes_per_gpu / 1e9:.2f} GB" in row, f"{stage}: {bytes_per_gpu / 1e9:.2f} GB not in {row!r}"
        assert f"{80 - bytes_per_gpu / 1e9:.2f} GB" in row
    assert n == 3.9e9 and "1 GB = 1e9 bytes" in text


# ---------------------------------------------------------------------------------------------
# Prefect: work pool template, rendered Job, deployment


def test_work_pool_template_passes_prefects_server_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = template_json()
    pool = WorkPoolCreate(name=work_pool_name(), type="kubernetes", base_job_template=template)
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        WorkPoolCreate(name=work_pool_name(), type="kubernetes", base_job_template=broken)


def test_work_pool_variables_are_a_json_schema_with_valid_defaults():
    import jsonschema
    from prefect.utilities.schema_tools import validate

    variables = template_json()["variables"]
    jsonschema.validators.validator_for(variables).check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if v.get("default") is not None}
    assert defaults["namespace"] == NAMESPACE and defaults["image"] == runtime_image()
    validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    job_variables = prefect_yaml()["deployments"][0]["work_pool"]["job_variables"]
    validate(job_variables, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    with pytest.raises(Exception):
        validate({**defaults, "backoff_limit": -1}, variables, raise_on_error=True, preprocess=True, ignore_required=True)


def test_work_pool_template_fits_prefect_kubernetes_worker():
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    template = template_json()
    fields = set(KubernetesWorkerJobConfiguration.model_fields)
    assert set(template["job_configuration"]) <= fields
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])


def render_flow_run_job(template: dict, job_variables: dict) -> dict:
    """The Job manifest prefect-kubernetes' worker creates for one flow run of the deployment."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    class NoApi:  # block/variable references would need the API; the template has none
        pass

    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=NoApi())
    )
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="weekly-run"))
    return config.job_manifest


def test_rendered_flow_run_job_is_a_valid_batch_v1_job():
    job = render_flow_run_job(template_json(), prefect_yaml()["deployments"][0]["work_pool"]["job_variables"])
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes 0.8.0 insists on parallelism/completions inside the pod spec (its
    # _get_base_job_manifest); the API server drops those unknown fields. They are also set where
    # they belong, on the Job, so strip exactly these two before the strict check.
    assert pod.pop("parallelism") == 1 and pod.pop("completions") == 1
    assert job["spec"]["parallelism"] == 1 and job["spec"]["completions"] == 1
    k8s_validate(job)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == runtime_image()
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "the driver needs no GPU"
    available = {e["name"] for e in container["env"]} | envfrom_names(container)
    assert FLOW_RUN_ENV <= available, f"missing in flow-run Jobs: {sorted(FLOW_RUN_ENV - available)}"
    assert pod["securityContext"]["runAsUser"] == APP_UID


def test_rendered_job_check_catches_a_broken_template():
    import kubernetes_validate

    template = template_json()
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [
        {"configMap": {"name": "trecflow-env"}}  # should be configMapRef
    ]
    job = render_flow_run_job(template, {})
    job["spec"]["template"]["spec"].pop("parallelism")
    job["spec"]["template"]["spec"].pop("completions")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(job)


def flow_run_env() -> dict[str, str]:
    container = template_json()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def work_pool_name() -> str:
    return prefect_yaml()["deployments"][0]["work_pool"]["name"]


def test_prefect_yaml_loads_with_prefects_deploy_loader():
    from rich.console import Console

    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel

    raw = prefect_yaml()
    PrefectYamlModel.model_validate(raw)  # raises on a bad field (the CLI only prints it)
    model_keys = {f.alias or name for name, f in PrefectYamlModel.model_fields.items()} | set(PrefectYamlModel.model_fields)
    assert set(raw) <= model_keys, f"keys prefect deploy ignores: {set(raw) - model_keys}"
    for deployment in raw["deployments"]:
        assert set(deployment) <= set(DeploymentConfig.model_fields), set(deployment) - set(DeploymentConfig.model_fields)
    console = Console(file=io.StringIO())
    configs, actions = _load_deploy_configs_and_actions(INFRA / "prefect" / "prefect.yaml", console=console)
    assert "Skipping" not in console.file.getvalue(), console.file.getvalue()
    (config,) = configs
    assert config["name"] == "cpt-3.9b-900b"
    assert config["entrypoint"] == "flows/pipeline.py:cpt_pipeline"
    assert config["work_pool"]["name"] == "trecflow-k8s"
    (pull,) = actions["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": dockerfile_workdir("runtime")}}
    assert not actions["build"] and not actions["push"]
    assert raw["prefect-version"] == lock_pins()["prefect"]


def test_prefect_yaml_schedule_and_concurrency_are_valid():
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.objects import ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule

    (deployment,) = prefect_yaml()["deployments"]
    (schedule,) = deployment["schedules"]
    RawScheduleConfig.model_validate(schedule)
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == "0 6 * * 1"
    with pytest.raises(ValueError):
        CronSchedule(cron="0 6 * * 8", timezone="UTC")
    limit = deployment["concurrency_limit"]
    assert limit["limit"] == 1
    ConcurrencyOptions(collision_strategy=limit["collision_strategy"])
    with pytest.raises(ValueError):
        ConcurrencyOptions(collision_strategy="CANCEL_OLD")


def test_prefect_yaml_parameters_fit_the_flow_and_the_recipe():
    import importlib

    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    (deployment,) = prefect_yaml()["deployments"]
    file, name = deployment["entrypoint"].split(":")
    assert (ROOT / file).is_file()
    flow = getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), name)
    schema = parameter_schema(flow).model_dump()
    parameters = deployment["parameters"]
    validate(parameters, schema, raise_on_error=True, preprocess=True)
    assert set(schema["required"]) <= set(parameters)
    with pytest.raises(Exception):
        validate({"run": {**parameters["run"], "force": ["predcit"]}}, schema, raise_on_error=True, preprocess=True)
    parameters = parameters["run"]
    assert deployment["enforce_parameter_schema"] is True
    r = recipe()
    assert (ROOT / parameters["recipe_path"]).resolve() == RECIPE
    assert parameters["variant"] in r.curriculum.variants
    assert r.store.url is None, "the recipe would override TRECFLOW_STORE from the ConfigMap"


def test_worker_polls_the_deployments_pool_and_readme_creates_it():
    worker = find("Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"][0]
    assert f"--pool={work_pool_name()}" in worker["command"] and "--type=kubernetes" in worker["command"]
    assert worker["image"] == services_image()
    text = readme()
    assert f"prefect work-pool create {work_pool_name()} --type kubernetes" in text
    assert "--base-job-template infra/prefect/base-job-template.json" in text
    assert "deploy --prefect-file infra/prefect/prefect.yaml" in text
    assert f"prefect deployment run 'cpt_pipeline/{prefect_yaml()['deployments'][0]['name']}'" in text


def test_prefect_server_database_settings_build_a_postgres_url(monkeypatch):
    from prefect.settings import Settings

    server = find("Deployment", "prefect-server")["spec"]["template"]["spec"]["containers"][0]
    for entry in server["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", "placeholder"))
    url = urlparse(Settings().server.database.connection_url.get_secret_value())
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port) == service_address("trecflow-postgres")
    assert url.path == "/prefect" and url.password == "placeholder"
    assert server["command"][:3] == ["prefect", "server", "start"]


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_container() -> dict:
    return find("Deployment", "trecflow-mlflow")["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_command_line_parses_with_mlflows_cli(monkeypatch):
    import mlflow.cli

    container = mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    env = {e["name"]: e.get("value", "placeholder") for e in container["env"]}
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", env["MLFLOW_BACKEND_STORE_URI"].replace("$(POSTGRES_PASSWORD)", "placeholder"))
    params = mlflow.cli.server.make_context("mlflow server", list(container["args"])).params
    assert params["serve_artifacts"] is True
    store = configmap_data()["TRECFLOW_STORE"]
    assert params["artifacts_destination"].startswith(f"{store}/mlflow/")
    backend = urlparse(params["backend_store_uri"])
    assert backend.scheme == "postgresql" and (backend.hostname, backend.port) == service_address("trecflow-postgres")
    assert backend.path == "/mlflow"
    assert params["port"] == 5000 and params["host"] == "0.0.0.0"
    with pytest.raises(Exception):
        mlflow.cli.server.make_context("mlflow server", ["--serve-artifact"])


def test_mlflow_accepts_the_host_clients_use():
    import mlflow.cli
    from mlflow.server.security_utils import is_allowed_host_header

    params = mlflow.cli.server.make_context("mlflow server", [a for a in mlflow_container()["args"] if a.startswith("--allowed-hosts")]).params
    allowed = params["allowed_hosts"].split(",")
    uri = urlparse(configmap_data()["MLFLOW_TRACKING_URI"])
    assert (uri.hostname, uri.port) == service_address("trecflow-mlflow")
    assert is_allowed_host_header(allowed, uri.netloc)
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def service_address(name: str) -> tuple[str, int]:
    service = find("Service", name)
    return f"{name}.{NAMESPACE}.svc.cluster.local", service["spec"]["ports"][0]["port"]


def test_urls_point_at_existing_services():
    data = configmap_data()
    for key, service in [("MLFLOW_TRACKING_URI", "trecflow-mlflow"), ("PREFECT_API_URL", "prefect-server")]:
        url = urlparse(data[key])
        assert (url.hostname, url.port) == service_address(service), key
    assert urlparse(data["PREFECT_API_URL"]).path == "/api"
    worker = find("Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in worker["env"]}["PREFECT_API_URL"] == data["PREFECT_API_URL"]
    assert data["TRECFLOW_STORE"].startswith("s3://")
    assert data["AWS_ENDPOINT_URL"] == data["MLFLOW_S3_ENDPOINT_URL"]


def test_trecflow_settings_read_the_configmap(monkeypatch):
    from trecflow import settings

    data = configmap_data()
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    r = recipe()
    assert settings.store_url(r) == data["TRECFLOW_STORE"]
    assert settings.store_endpoint(r) == data["AWS_ENDPOINT_URL"]
    assert settings.tracking_uri() == data["MLFLOW_TRACKING_URI"]
    assert str(settings.home()) == data["TRECFLOW_HOME"]


# ---------------------------------------------------------------------------------------------
# Images and pins


def dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile(), re.MULTILINE))


def dockerfile_workdir(stage: str) -> str:
    return [line.split(None, 1)[1] for line in dockerfile_stages()[stage] if line.startswith("WORKDIR")][0]


def runtime_image() -> str:
    return f"registry.example.com/trecflow/trecflow:{pyproject()['project']['version']}"


def services_image() -> str:
    return f"registry.example.com/trecflow/trecflow-services:{pyproject()['project']['version']}"


def test_pyproject_direct_dependencies_are_pinned_in_the_lock():
    from packaging.requirements import Requirement

    pins = lock_pins()
    project = pyproject()["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    for line in requirements:
        requirement = Requirement(line)
        name = canonical(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{line} vs lock {pins[name]}"
        for spec in requirement.specifier:
            if spec.operator == "==":
                assert pins[name] == spec.version, f"{line} vs lock {pins[name]}"


def test_dockerfile_uses_python_311_and_installs_with_the_lock():
    from packaging.specifiers import SpecifierSet

    args = dockerfile_args()
    python = args["PYTHON_VERSION"]
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert python == "3.11" and requires.contains(f"{python}.0") and not requires.contains("3.12.0")
    makefile_pip = re.search(r"pip==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["PIP_VERSION"] == makefile_pip
    stages = dockerfile_stages()
    assert set(stages) == {"runtime", "services"}
    installs = [line for lines in stages.values() for line in lines if re.search(r"\bpip install\b", line)]
    for line in installs:
        for command in re.findall(r"pip install[^&]*", line):
            if "pip==${PIP_VERSION}" in command:
                continue
            assert re.search(r"--constraint \S*requirements\.lock", command), f"not constrained by the lock: {command}"
    runtime = " ".join(stages["runtime"])
    assert "pip install --no-cache-dir --constraint requirements.lock ." in runtime
    assert "python${PYTHON_VERSION} -m venv" in runtime
    assert "COPY configs ./configs" in runtime and "COPY pyproject.toml requirements.lock" in runtime
    assert stages["services"][0].startswith("FROM python:${PYTHON_VERSION}-")


def test_dockerfile_explicit_pins_match_pyproject_and_lock():
    pins = lock_pins()
    direct = {canonical(re.split(r"[=<>\[ ]", d)[0]): d for d in pyproject()["project"]["dependencies"]}
    explicit = re.findall(r"\b([A-Za-z0-9_.-]+)==(\$\{\w+\}|[0-9][0-9A-Za-z.]*)", re.sub(r"\\\n", " ", dockerfile()))
    checked = 0
    for name, version in explicit:
        if name == "pip":
            continue
        if canonical(name) in pins:
            assert pins[canonical(name)] == version, f"Dockerfile {name}=={version}, lock {pins[canonical(name)]}"
            checked += 1
        if canonical(name) in direct:
            assert f"=={version}" in direct[canonical(name)], f"Dockerfile {name}=={version}, pyproject {direct[canonical(name)]}"
    assert checked >= 5
    for name, version in [("prefect-kubernetes", "0.8.0"), ("psycopg2-binary", None)]:
        assert any(canonical(n) == name and (version is None or v == version) for n, v in explicit), name


def test_runtime_image_has_a_cuda_devel_base_matching_torch():
    base = dockerfile_args()["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?devel-ubuntu(\d+\.\d+)", base)
    assert match, f"not a CUDA devel image: {base}"
    assert int(match.group(1)) == TORCH_CUDA_MAJOR
    assert dockerfile_stages()["runtime"][0] == "FROM ${CUDA_IMAGE} AS runtime"
    assert lock_pins()["torch"] == "2.13.0"


def test_images_run_as_the_non_root_user_of_the_manifests():
    uid = int(dockerfile_args()["APP_UID"])
    assert uid == APP_UID
    for stage, lines in dockerfile_stages().items():
        users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] == "${APP_UID}:${APP_UID}", f"{stage} does not end as the app user"
    for where, template in pod_templates():
        image = template["spec"]["containers"][0]["image"]
        if "trecflow" in image or "{{" in image:
            assert template["spec"]["securityContext"]["runAsUser"] == uid, where


def test_manifests_use_the_images_of_this_version():
    images = {c["image"] for _, c, _ in containers() if "{{" not in c["image"]}
    ours = {i for i in images if "/trecflow/" in i}
    assert ours == {runtime_image(), services_image()}
    assert {i for i in images - ours} == {"postgres:17.6-bookworm"}
    for line in readme().splitlines():
        for tag in re.findall(r"registry\.example\.com/trecflow/[a-z-]+:[0-9A-Za-z.]+", line):
            assert tag in {runtime_image(), services_image()}, tag


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {line.strip() for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".trecflow"} <= ignored
    for needed in ["trecflow", "flows", "tasks", "training", "configs", "pyproject.toml", "requirements.lock", "README.md"]:
        assert needed not in ignored and (ROOT / needed).exists(), needed


# ---------------------------------------------------------------------------------------------
# S3 layout and lifecycle


def lifecycle_problems(config: dict) -> list[str]:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("s3")
    shape = model.operation_model("PutBucketLifecycleConfiguration").input_shape.members["LifecycleConfiguration"]
    report = ParamValidator().validate(config, shape)
    return [report.generate_report()] if report.has_errors() else []


def test_lifecycle_rules_match_botocores_s3_model_and_spare_the_outputs():
    config = json.loads((INFRA / "s3" / "lifecycle.json").read_text())
    assert lifecycle_problems(config) == []
    prefix = urlparse(configmap_data()["TRECFLOW_STORE"]).path.strip("/") + "/"
    from tasks.graph import STAGE_NAMES as STAGE_INPUTS

    protected = [f"{prefix}{stage}/" for stage in STAGE_INPUTS] + [f"{prefix}mlflow/"]
    ids = [rule["ID"] for rule in config["Rules"]]
    assert len(ids) == len(set(ids))
    for rule in config["Rules"]:
        assert rule["Status"] == "Enabled"
        rule_prefix = rule["Filter"]["Prefix"]
        assert rule_prefix.startswith(prefix), f"{rule['ID']} acts outside the store"
        if "Expiration" in rule:
            for path in protected:
                assert not path.startswith(rule_prefix), f"{rule['ID']} would expire {path}"
    assert any("AbortIncompleteMultipartUpload" in rule for rule in config["Rules"])
    bad = copy.deepcopy(config)
    bad["Rules"][0]["Status"] = True
    assert lifecycle_problems(bad)


def test_readme_describes_the_store_layout_of_every_stage():
    from tasks.graph import STAGE_NAMES as STAGE_INPUTS

    text = readme()
    for stage in STAGE_INPUTS:
        assert re.search(rf"^[├└]── {stage}/<fp>/", text, re.MULTILINE), f"{stage} missing from the S3 layout"
    assert "_MANIFEST.json" in text and "mlflow/<experiment>/" in text
    assert configmap_data()["TRECFLOW_STORE"] in text
    assert "## Running on a cluster" in text


def test_the_runbook_walks_through_the_cluster_setup_in_order():
    section = RUNBOOK.read_text().split("## From an empty cluster to a scheduled run", 1)[1].split("\n## ", 1)[0]
    version = KUBERAY_RELEASE.lstrip("v")
    assert re.search(rf"helm install kuberay-operator kuberay/kuberay-operator --version {re.escape(version)}\b", section)
    assert "kubectl apply -f infra/k8s/namespace.yaml" in section and "kubectl apply -k infra/" in section
    for secret in readme_secrets():
        assert f"create secret generic {secret}" in section
    for service, port in [("prefect-server", 4200), ("trecflow-mlflow", 5000), (f"{raycluster()['metadata']['name']}-head-svc", 8265)]:
        assert f"port-forward svc/{service} {port}:{port}" in section, service
    assert "put-bucket-lifecycle-configuration" in section and "file://infra/s3/lifecycle.json" in section
    assert "docker build -f infra/docker/Dockerfile --target runtime" in section
    positions = [section.index(s) for s in ["docker build", "helm install", "create secret", "kubectl apply -k", "work-pool create", "deploy --prefect-file", "deployment run", "port-forward svc/trecflow-mlflow"]]
    assert positions == sorted(positions), "the steps are out of order"


# ---------------------------------------------------------------------------------------------
# No secret values anywhere under infra/

SENSITIVE_KEY = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|credentials?)$")
REFERENCE = re.compile(r"^(\$\(|\$\{|\$[A-Za-z_]|\{\{|<)")
TEXT_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?!\$\(|\$\{|\$[A-Za-z_])[^@\s/'\"]+@"),
}
ASSIGNMENT = re.compile(
    r"(?i)\b([A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key))\b\s*[\"']?\s*[:=]\s*[\"']?([^\s\"',}]*)"
)
AWS_SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def secret_findings(text: str, documents: list[Any]) -> list[str]:
    findings = [name for name, pattern in TEXT_PATTERNS.items() if pattern.search(text)]
    for key, value in ASSIGNMENT.findall(text):
        if value and not REFERENCE.match(value) and not re.fullmatch(r"(?i)true|false|null|none|[0-9.]+|secretkeyref|valuefrom", value):
            findings.append(f"literal value for {key}")
    for candidate in AWS_SECRET_LIKE.findall(text):
        if re.search(r"[a-z]", candidate) and re.search(r"[A-Z]", candidate) and re.search(r"[0-9]", candidate):
            findings.append("40-character secret-like string")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and any(node.get(k) for k in ("data", "stringData")):
                findings.append(f"{where}: a Secret with data")
            if isinstance(node.get("name"), str) and "value" in node and SENSITIVE_KEY.search(node["name"].replace("_", "")):
                if node["value"] and not REFERENCE.match(str(node["value"])):
                    findings.append(f"{where}: env {node['name']} has a literal value")
            for key, value in node.items():
                if isinstance(key, str) and SENSITIVE_KEY.search(key) and isinstance(value, str) and value and not REFERENCE.match(value):
                    findings.append(f"{where}.{key}: literal value")
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    for i, document in enumerate(documents):
        walk(document, f"doc{i}")
    return findings


def parsed(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    if path.suffix in {".yaml", ".yml"}:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return []


@pytest.mark.parametrize("path", infra_files(), ids=rel)
def test_no_secret_value_in_infra(path):
    assert secret_findings(path.read_text(), parsed(path)) == []


@pytest.mark.parametrize(
    "text, documents",
    [
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", []),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", []),
        ("password: hunter2", []),
        ('{"api_key": "abc123"}', []),
        ("postgresql://trecflow:hunter2@db:5432/mlflow", []),
        ("key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", []),
        ("", [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}]),
        ("", [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}]),
        ("", [{"auth": {"token": "abc"}}]),
    ],
    ids=["aws-key-id", "private-key", "password", "api-key-json", "url-password", "aws-secret", "secret-data", "env-literal", "token-field"],
)
def test_secret_scanner_flags_leaks(text, documents):
    assert secret_findings(text, documents)


def test_secret_scanner_accepts_references():
    text = 'value: postgresql://trecflow:$(POSTGRES_PASSWORD)@db:5432/mlflow\n--from-literal=POSTGRES_PASSWORD="$(openssl rand -hex 24)"\n'
    documents = [{"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]}]
    assert secret_findings(text, documents) == []
