"""Static checks of the Kubernetes deployment in ``deploy/k8s``.

No cluster runs where the tests run, so the manifests are checked as data: every built-in
object against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields
fail), the Prometheus Operator's PodMonitor by hand, the Airflow Helm values against the
chart's own values schema (vendored in ``deploy/k8s/schemas``), the kustomizations by building
them when ``kubectl`` is there, and the wiring between the pieces: Services select the pods
they front, the HPA scales the Deployment on a metric the adapter serves, every Secret and
volume referred to exists, the platform's environment points at the Services, and the
Celery worker sets cover the platform's queues.

The last group checks that ``docker-compose.yaml`` and the manifests describe the same
platform: the same images, Triton ports and server flags, executor, and the same variables
carried by secrets. It is written against the compose file's target layout (images built from
``deploy/docker``, CeleryExecutor).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from recsys import scheduling
from recsys.triton.replicas import parse_replicas

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
GPU = K8S / "gpu"
VALUES = K8S / "airflow-values.yaml"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
CHART_SCHEMA = K8S / "schemas" / "airflow-chart-1.19.0.values.schema.json"
CHART_SCHEMA_README = K8S / "schemas" / "README.md"
COMPOSE = ROOT / "docker-compose.yaml"
TRITON_SCRAPE = ROOT / "tests" / "fixtures" / "triton_metrics_after.txt"

HELM_VALUES = {VALUES, ADAPTER_VALUES}
"""YAML files that are Helm values, not Kubernetes objects."""
KUBERNETES_VERSIONS = ("1.33", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests target, and the newest the validator knows."""
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}

PLATFORM_IMAGES = {
    "airflow": "recsys/airflow",
    "triton": "recsys/triton",
    "mlflow": "recsys/mlflow",
}
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TRITON_FLAGS = (
    "--model-control-mode=explicit",
    "--grpc-restricted-protocol=",
    "--http-restricted-api=",
    "--metrics-config=summary_latencies=true",
)
PLATFORM_QUEUES = {"training", "serving", "monitoring", "default"}
SECRET_VAR = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|FERNET", re.IGNORECASE)
COMPOSE_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")
CHART_SECRET_ENV = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": ("data", "metadataSecretName"),
    "AIRFLOW__CELERY__RESULT_BACKEND": ("data", "resultBackendSecretName"),
    "AIRFLOW__CELERY__BROKER_URL": ("data", "brokerUrlSecretName"),
    "AIRFLOW__CORE__FERNET_KEY": ("fernetKeySecretName",),
    "AIRFLOW__API__SECRET_KEY": ("apiSecretKeySecretName",),
    "AIRFLOW__API_AUTH__JWT_SECRET": ("jwtSecretName",),
}
"""Airflow settings the chart itself fills from a Secret named in the values (path to it)."""
CHART_SECRET_KEYS = {
    ("data", "metadataSecretName"): "connection",
    ("data", "resultBackendSecretName"): "connection",
    ("data", "brokerUrlSecretName"): "connection",
    ("redis", "passwordSecretName"): "password",
    ("fernetKeySecretName",): "fernet-key",
    ("apiSecretKeySecretName",): "api-secret-key",
    ("jwtSecretName",): "jwt-secret",
}
"""The key the chart reads from each Secret named in the values."""


# --- loading ---------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _is_kustomization(path: Path) -> bool:
    return path.name == "kustomization.yaml"


def _patch_files() -> set[Path]:
    """Partial objects that kustomizations patch into the base (validated once built)."""
    patches = set()
    for path in _yaml_files():
        if _is_kustomization(path):
            for patch in _load(path)[0].get("patches", []):
                patches.add((path.parent / patch["path"]).resolve())
    return patches


def _manifest_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object written in deploy/k8s (not kustomizations, patches, values)."""
    docs = []
    patches = _patch_files()
    for path in _yaml_files():
        if path in HELM_VALUES or _is_kustomization(path) or path.resolve() in patches:
            continue
        docs.extend((path, doc) for doc in _load(path))
    return docs


def _doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


MANIFESTS = _manifest_docs()
BUILTIN = [item for item in MANIFESTS if (item[1]["apiVersion"], item[1]["kind"]) not in CRD_KINDS]


def _base_objects() -> list[dict[str, Any]]:
    """The objects of deploy/k8s/base (what `kubectl apply -k deploy/k8s` creates)."""
    return [doc for path, doc in MANIFESTS if path.parent == BASE]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _base_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s/base, found {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"{deployment['metadata']['name']} has no container {name}"
    return found[0]


def _command_text(container: dict[str, Any]) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _image_repository(image: str) -> str:
    """``registry/name:tag@digest`` -> ``registry/name`` (compose's ``${VAR:-x}`` tags too)."""
    image = re.sub(r"\$\{[^}]*\}", "", image).split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    return image[:colon] if colon > slash else image


def _secret_refs(node: Any) -> set[tuple[str, str]]:
    """Every ``secretKeyRef`` (name, key) anywhere below ``node``."""
    found: set[tuple[str, str]] = set()
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict):
            found.add((ref["name"], ref["key"]))
        for value in node.values():
            found |= _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _secret_refs(value)
    return found


def _claims(node: Any) -> set[str]:
    """Every PersistentVolumeClaim name a volume list below ``node`` mounts."""
    found: set[str] = set()
    if isinstance(node, dict):
        pvc = node.get("persistentVolumeClaim")
        if isinstance(pvc, dict):
            found.add(pvc["claimName"])
        for value in node.values():
            found |= _claims(value)
    elif isinstance(node, list):
        for value in node:
            found |= _claims(value)
    return found


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    data = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def chart_schema() -> dict[str, Any]:
    return json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def worker_sets(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sets = values["workers"]["celery"]["sets"]
    names = [s["name"] for s in sets]
    assert len(names) == len(set(names)), f"worker set names repeat: {names}"
    return {s["name"]: s for s in sets}


@pytest.fixture(scope="module")
def example_secrets() -> dict[str, dict[str, str]]:
    secrets = {}
    for doc in _load(SECRETS_EXAMPLE):
        assert doc["kind"] == "Secret"
        assert doc["metadata"]["namespace"] == "recsys"
        secrets[doc["metadata"]["name"]] = doc.get("stringData", {})
    return secrets


@pytest.fixture(scope="module")
def triton() -> dict[str, Any]:
    return _one("Deployment", "triton")


@pytest.fixture(scope="module")
def mlflow() -> dict[str, Any]:
    return _one("Deployment", "mlflow")


@pytest.fixture(scope="module")
def compose() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data["services"]


# --- every file ------------------------------------------------------------------------------


def test_every_yaml_file_is_a_manifest_kustomization_or_known_values_file():
    assert _yaml_files(), "deploy/k8s holds no YAML"
    for path in _yaml_files():
        docs = _load(path)
        assert docs, f"{path} is empty"
        if path in HELM_VALUES:
            assert len(docs) == 1 and isinstance(docs[0], dict)
        elif _is_kustomization(path):
            assert docs[0]["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        elif path.resolve() in _patch_files():
            (doc,) = docs
            assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        else:
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {doc}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", BUILTIN, ids=_doc_id)
def test_builtin_objects_validate_strictly(item: tuple[Path, dict[str, Any]], version: str):
    _, doc = item
    kubernetes_validate.validate(doc, version, strict=True)


def test_validator_rejects_unknown_fields():
    """The strict validation above would catch a misspelt field."""
    deployment = json.loads(json.dumps(_one("Deployment", "triton")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_names_are_unique_per_kind():
    seen: set[tuple[str, str]] = set()
    for doc in _base_objects():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


def test_pod_monitor_scrapes_triton_metrics_port(triton: dict[str, Any]):
    monitor = _one("PodMonitor", "triton")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= _pod_labels(triton).items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    assert _container_ports(_container(triton, "triton"))["metrics"] == TRITON_PORTS["metrics"]
    (endpoint,) = endpoints
    assert endpoint["interval"] == "5s"
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
    assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])


# --- kustomize -------------------------------------------------------------------------------


def test_kustomizations_list_every_manifest():
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in BASE.glob("*.yaml") if not _is_kustomization(p)}
    assert set(base["resources"]) == on_disk
    assert base["namespace"] == "recsys"
    namespaces = [d for d in _base_objects() if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == ["recsys"]
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]
    gpu = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert gpu["resources"] == ["../base"]
    # Placeholders must never be applied by `kubectl apply -k`.
    for kustomization in (base, top, gpu):
        assert "secrets.example.yaml" not in json.dumps(kustomization)


def test_kustomize_images_name_the_platform_images():
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in base["images"]}
    assert set(images) == {PLATFORM_IMAGES["triton"], PLATFORM_IMAGES["mlflow"]}
    written = {
        _image_repository(c["image"]): c["image"].rsplit(":", 1)[1]
        for d in _base_objects()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    for name, image in images.items():
        assert written[name] == image["newTag"], f"{name}: manifest and kustomization tags differ"


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize folder`` renders. Without kubectl, the same rendering done here
    for the features these kustomizations use (resources, namespace, labels, images, strategic
    merge patches of containers by name), so the checks below run on every machine."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return _render(folder)
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _render(folder: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = folder / resource
        if path.is_dir():
            objects.extend(_render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for doc in objects:
        if spec.get("namespace") and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
        for labels in spec.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    for patch in spec.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text())
        for doc in objects:
            if (doc["kind"], doc["metadata"]["name"]) == (
                patch["target"]["kind"],
                patch["target"]["name"],
            ):
                _merge(doc, body)
    for image in spec.get("images", []):
        for doc in objects:
            for container in _pod_containers(doc):
                repository, _, tag = container["image"].partition(":")
                if repository == image["name"]:
                    container["image"] = (
                        f"{image.get('newName', repository)}:{image.get('newTag', tag)}"
                    )
    return objects


def _pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge as Kubernetes does it for these fields: maps merge, lists of named
    items (containers, env) merge by name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(i, dict) and "name" in i for i in value + current)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    current.append(item)
        else:
            target[key] = value


def _by_name(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Env entries in name order: their order means nothing here (no ``$(VAR)`` references)."""
    return sorted(items or [], key=lambda item: item["name"])


def test_the_fallback_rendering_agrees_with_kubectl():
    """When kubectl is here, the rendering the tests use without it must match it on what
    they check (names, namespaces, images, GPU limits, env)."""
    if shutil.which("kubectl") is None:  # the other tests still run, on _render
        pytest.skip("no kubectl to compare the fallback rendering with")
    for folder in (K8S, GPU):
        rendered, ours = _kustomize(folder), _render(folder)

        def summary(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
            return {
                (d["kind"], d["metadata"]["name"]): (
                    d["metadata"].get("namespace"),
                    [
                        (c["name"], c["image"], c.get("resources"), _by_name(c.get("env")))
                        for c in _pod_containers(d)
                    ],
                )
                for d in objects
            }

        assert summary(ours) == summary(rendered), folder


@pytest.mark.parametrize("folder", [K8S, GPU], ids=["cpu", "gpu"])
def test_kustomize_builds_valid_objects_in_the_namespace(folder: Path):
    objects = _kustomize(folder)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in objects}
    assert {("Deployment", "triton"), ("Deployment", "mlflow"), ("Service", "triton")} <= kinds
    for doc in objects:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "recsys", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "recsys"
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_gpu_overlay_renders_a_gpu_triton():
    (triton,) = [
        d
        for d in _kustomize(GPU)
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "triton"
    ]
    container = _container(triton, "triton")
    assert _image_repository(container["image"]) == "recsys/triton-gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"]  # the base's limits survive the patch
    assert _env(container)["RECSYS_ORT_DEVICE"]["value"] == "cuda"
    assert len([e for e in container["env"] if e["name"] == "RECSYS_ORT_DEVICE"]) == 1


def test_gpu_patch_requests_a_gpu_and_cuda():
    """The overlay's intent, checked without kustomize."""
    gpu = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert {"name": "recsys/triton", "newName": "recsys/triton-gpu"} in gpu["images"]
    (patch,) = gpu["patches"]
    assert patch["target"]["kind"] == "Deployment" and patch["target"]["name"] == "triton"
    body = yaml.safe_load((GPU / patch["path"]).read_text())
    pod = body["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "triton"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert _env(container)["RECSYS_ORT_DEVICE"]["value"] == "cuda"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


# --- Triton ----------------------------------------------------------------------------------


def test_triton_ports_and_probes(triton: dict[str, Any]):
    container = _container(triton, "triton")
    assert _container_ports(container) == TRITON_PORTS
    ready = container["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v2/health/ready", 8000)
    live = container["livenessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/v2/health/live", 8000)
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    # The liveness probe only starts once the server is up: give it minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_triton_serves_the_shared_repository_with_compose_flags(triton: dict[str, Any]):
    container = _container(triton, "triton")
    command = _command_text(container)
    for flag in TRITON_FLAGS:
        assert flag in command
    assert "--allow-gpu-metrics=false" in command
    (repository,) = re.findall(r"--model-repository=(\S+)", command)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in triton["spec"]["template"]["spec"]["volumes"]}
    mount = mounts[repository]
    assert mount.get("readOnly") is True  # only the Airflow workers publish versions
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "recsys-model-repo"
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    state = volumes[mounts["/opt/recsys-state"]["name"]]
    assert state["persistentVolumeClaim"]["claimName"] == "recsys-state"
    assert _env(container)["RECSYS_QUERY_SAMPLE_DIR"]["value"].startswith("/opt/recsys-state/")
    # The admin key only ever from a Secret, never a literal.
    key = _env(container)["RECSYS_TRITON_ADMIN_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"] == "recsys-triton-admin"


def test_triton_resources_and_rollout(triton: dict[str, Any]):
    container = _container(triton, "triton")
    assert container["resources"]["requests"]["cpu"]  # the HPA's CPU utilization needs it
    assert container["resources"]["limits"]["memory"]
    assert triton["spec"]["replicas"] == 2
    assert triton["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = _one("PodDisruptionBudget", "triton")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(triton).items()


def _check_service_fronts(service: dict[str, Any], deployment: dict[str, Any]) -> None:
    selector = service["spec"]["selector"]
    assert selector, f"{service['metadata']['name']} selects nothing"
    assert selector.items() <= _pod_labels(deployment).items()
    assert selector.items() <= deployment["spec"]["selector"]["matchLabels"].items() or (
        deployment["spec"]["selector"]["matchLabels"].items() <= selector.items()
    )
    ports: dict[str, int] = {}
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        ports |= _container_ports(container)
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), f"{port} reaches no container port"


def test_triton_services(triton: dict[str, Any]):
    service = _one("Service", "triton")
    _check_service_fronts(service, triton)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == TRITON_PORTS
    assert service["spec"].get("clusterIP") != "None"


def test_headless_service_lists_every_ready_replica(triton: dict[str, Any], values: dict[str, Any]):
    headless = _one("Service", "triton-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    _check_service_fronts(headless, triton)
    # The platform discovers the replicas through exactly this Service and these ports.
    env = {e["name"]: e["value"] for e in values["env"]}
    (entry,) = parse_replicas(env["RECSYS_TRITON_REPLICAS"])
    assert entry.dns and entry.host == "triton-replicas"
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    assert (entry.grpc_port, entry.metrics_port) == (ports["grpc"], ports["metrics"])
    assert env["RECSYS_TRITON_HOST"] == _one("Service", "triton")["metadata"]["name"]


def test_hpa_scales_triton_on_queue_time_and_cpu(triton: dict[str, Any]):
    hpa = _one("HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "triton",
    )
    assert hpa["spec"]["minReplicas"] == triton["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue"
    # prometheus-adapter serves the metric under exactly this name.
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert pods["metric"]["name"] in served


def test_adapter_rule_reads_metrics_a_real_triton_exports():
    text = TRITON_SCRAPE.read_text()
    scraped = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE))
    assert {f.name for f in text_string_to_metric_families(text)}  # a well-formed scrape
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    for rule in adapter["rules"]["custom"]:
        (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
        assert series in scraped
        used = set(re.findall(r"\b(nv_\w+)\{", rule["metricsQuery"]))
        assert used and used <= scraped, used - scraped
        assert (
            "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        )
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


# --- MLflow and storage ----------------------------------------------------------------------


def test_mlflow_server(mlflow: dict[str, Any], values: dict[str, Any]):
    container = _container(mlflow, "mlflow")
    command = _command_text(container)
    assert "mlflow server --app-name basic-auth" in command
    assert "--artifacts-destination s3://mlflow/artifacts" in command
    assert "--port 5000" in command
    ready = container["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/health", 5000)
    env = _env(container)
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]["value"]).scheme in {"http", "https"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "recsys-s3"
    for name in (
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_AUTH_DATABASE_URI",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert "value" not in env[name], f"{name} must come from a Secret"
    service = _one("Service", "mlflow")
    _check_service_fronts(service, mlflow)
    # The Airflow pods reach it where MLFLOW_TRACKING_URI says, and MLflow accepts that Host.
    uri = urlsplit({e["name"]: e["value"] for e in values["env"]}["MLFLOW_TRACKING_URI"])
    assert uri.hostname == "mlflow" and uri.port in {p["port"] for p in service["spec"]["ports"]}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert uri.netloc in allowed and uri.hostname in allowed


def test_pvcs_are_read_write_many_and_every_claim_exists(values: dict[str, Any]):
    pvcs = {
        d["metadata"]["name"]: d for d in _base_objects() if d["kind"] == "PersistentVolumeClaim"
    }
    assert set(pvcs) == {"recsys-model-repo", "recsys-state"}
    for pvc in pvcs.values():
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    used = _claims(_base_objects()) | _claims(values)
    assert used == set(pvcs)


# --- Secrets ---------------------------------------------------------------------------------


def _values_secret_refs(values: dict[str, Any]) -> set[tuple[str, str]]:
    refs = {(s["secretName"], s["secretKey"]) for s in values["secret"]}
    refs |= {(_dig(values, path), key) for path, key in CHART_SECRET_KEYS.items()}
    return refs | _secret_refs(values)


def test_every_secret_referred_to_is_in_the_example(
    values: dict[str, Any], example_secrets: dict[str, dict[str, str]]
):
    refs = _secret_refs(_base_objects()) | _values_secret_refs(values)
    missing = {(name, key) for name, key in refs if key not in example_secrets.get(name, {})}
    assert not missing, f"not in secrets.example.yaml: {sorted(missing)}"
    unused = set(example_secrets) - {name for name, _ in refs}
    assert not unused, f"example Secrets nothing uses: {sorted(unused)}"


def test_example_secrets_are_only_placeholders(example_secrets: dict[str, dict[str, str]]):
    for name, data in example_secrets.items():
        assert data, f"{name} has no stringData"
        for key, value in data.items():
            assert "CHANGE-ME" in value, f"{name}/{key} looks like a real value"
    text = SECRETS_EXAMPLE.read_text()
    assert "EXAMPLE ONLY" in text and "never commit" in text.lower()
    assert "secrets.yaml" in (K8S / ".gitignore").read_text().split()


def test_the_redis_password_matches_the_broker_url(example_secrets: dict[str, dict[str, str]]):
    password = example_secrets["recsys-airflow-redis"]["password"]
    broker = urlsplit(example_secrets["recsys-airflow-broker"]["connection"])
    assert broker.password == password
    assert broker.hostname == "airflow-redis"  # the chart's Redis Service for release `airflow`


def test_no_literal_secret_in_any_manifest():
    for path, doc in MANIFESTS:
        if doc["kind"] == "Secret":
            continue
        for container in (
            doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            for item in container.get("env", []):
                if SECRET_VAR.search(item["name"]):
                    assert "valueFrom" in item, f"{path}: {item['name']} is a literal"


# --- Airflow Helm values ---------------------------------------------------------------------


def test_vendored_chart_schema_is_the_documented_file():
    digest = hashlib.sha256(CHART_SCHEMA.read_bytes()).hexdigest()
    readme = CHART_SCHEMA_README.read_text()
    assert digest in readme
    assert "1.19.0" in readme and "github.com/apache/airflow" in readme
    assert "Apache License 2.0" in readme


def test_values_validate_against_the_chart_schema(
    values: dict[str, Any], chart_schema: dict[str, Any]
):
    jsonschema.Draft7Validator.check_schema(chart_schema)
    errors = sorted(jsonschema.Draft7Validator(chart_schema).iter_errors(values), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_chart_schema_rejects_unknown_keys(values: dict[str, Any], chart_schema: dict[str, Any]):
    """The schema is strict where the values are: a misspelt key would fail the test above."""
    for path in (
        ("workers",),
        ("redis",),
        ("data",),
        ("images", "airflow"),
        ("createUserJob",),
    ):
        broken = json.loads(json.dumps(values))
        _dig(broken, path)["no_such_key"] = True
        assert not jsonschema.Draft7Validator(chart_schema).is_valid(broken), path


def _subschema(chart_schema: dict[str, Any], *path: str) -> dict[str, Any]:
    node = chart_schema
    for key in path:
        node = node["properties"][key]
    return {**node, "definitions": chart_schema["definitions"]}


def test_worker_set_keys_are_keys_the_chart_merges(
    worker_sets: dict[str, dict[str, Any]], chart_schema: dict[str, Any]
):
    """The schema takes any key in a set; the chart merges each over `workers` and
    `workers.celery`, so a key must be one of theirs and of their type."""
    workers = _subschema(chart_schema, "workers")
    celery = _subschema(chart_schema, "workers", "celery")
    for name, worker_set in worker_sets.items():
        for key, value in worker_set.items():
            if key == "name":
                continue
            owner = celery if key in celery["properties"] else workers
            assert key in owner["properties"], f"set {name}: the chart has no workers.{key}"
            schema = {**owner["properties"][key], "definitions": chart_schema["definitions"]}
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(value))
            assert not errors, f"set {name}.{key}: {[e.message for e in errors]}"


def test_airflow_runs_celery_with_the_platform_image(values: dict[str, Any]):
    assert values["executor"] == "CeleryExecutor"
    assert values["airflowVersion"] == values["defaultAirflowTag"] == "3.3.2"
    assert values["images"]["airflow"]["repository"] == PLATFORM_IMAGES["airflow"]
    assert values["defaultAirflowRepository"] == PLATFORM_IMAGES["airflow"]
    assert values["redis"]["enabled"] is True
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"] == "recsys-airflow-metadata"
    assert values["data"]["resultBackendSecretName"]
    assert values["workers"]["celery"]["enableDefault"] is False


def test_worker_sets_cover_the_platform_queues(
    worker_sets: dict[str, dict[str, Any]], values: dict[str, Any]
):
    queues = {name: set(s["queue"].split(",")) for name, s in worker_sets.items()}
    served = set().union(*queues.values())
    assert served >= PLATFORM_QUEUES
    assert set(scheduling.QUEUES) | {scheduling.AIRFLOW_DEFAULT_QUEUE} == served
    assert values["config"]["operators"]["default_queue"] == scheduling.AIRFLOW_DEFAULT_QUEUE
    # Monitoring never waits behind training: its queue has a worker set of its own.
    owners = [name for name, q in queues.items() if scheduling.MONITORING_QUEUE in q]
    assert owners == ["monitoring"] and queues["monitoring"] == {scheduling.MONITORING_QUEUE}
    assert scheduling.MONITORING_QUEUE not in queues["training"]


def test_training_workers_run_on_gpu_nodes(worker_sets: dict[str, dict[str, Any]]):
    training = worker_sets["training"]
    assert training["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert training["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in training["tolerations"])
    for name, other in worker_sets.items():
        if name != "training":
            assert "nvidia.com/gpu" not in json.dumps(other.get("resources", {}))


def test_worker_sets_have_the_platform_task_slots(worker_sets: dict[str, dict[str, Any]]):
    """Each queue gets the slots recsys.scheduling gives its worker (the embedded stack's and
    compose's --concurrency), spread over replicas x AIRFLOW__CELERY__WORKER_CONCURRENCY."""
    slots = {}
    for worker_set in worker_sets.values():
        env = {e["name"]: e["value"] for e in worker_set["env"]}
        per_worker = int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"])
        queue = worker_set["queue"].split(",")[0]
        slots[queue] = worker_set["replicas"] * per_worker
    assert slots == scheduling.worker_concurrency()


def test_parallelism_matches_the_pools(values: dict[str, Any]):
    assert values["config"]["core"]["parallelism"] == scheduling.executor_parallelism()


def test_airflow_platform_environment(values: dict[str, Any]):
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["RECSYS_TRITON_HOST"] == "triton"
    assert env["RECSYS_TRITON_REPLICAS"] == "dns+triton-replicas:8001:8002"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    secret_env = {s["envName"]: s for s in values["secret"]}
    assert secret_env["RECSYS_TRITON_ADMIN_KEY"]["secretName"] == "recsys-triton-admin"
    assert secret_env["MLFLOW_TRACKING_PASSWORD"]["secretName"] == "recsys-mlflow"
    assert not set(env) & set(secret_env)
    for name in env:
        assert not SECRET_VAR.search(name), f"{name} is set as a literal in the values"
    # The workers publish into the repository every Triton replica reads.
    mounts = {m["mountPath"]: m["name"] for m in values["workers"]["extraVolumeMounts"]}
    volumes = {v["name"]: v for v in values["workers"]["extraVolumes"]}
    repo_volume = volumes[mounts[env["RECSYS_TRITON_REPO"]]]
    assert repo_volume["persistentVolumeClaim"]["claimName"] == "recsys-model-repo"
    state_mounts = {m["mountPath"]: m["name"] for m in values["volumeMounts"]}
    state = {v["name"]: v for v in values["volumes"]}[state_mounts[env["RECSYS_HOME"]]]
    assert state["persistentVolumeClaim"]["claimName"] == "recsys-state"


def test_admin_password_never_in_values_or_argv(values: dict[str, Any]):
    job = values["createUserJob"]
    assert "password" not in json.dumps(job.get("defaultUser", {}))
    env = {e["name"]: e for e in job["env"]}
    assert (
        env["AIRFLOW_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "recsys-airflow-admin"
    )
    script = job["args"][-1]
    assert "printf" in script and "-p " not in script and "--password" not in script


# --- consistency with docker-compose.yaml ----------------------------------------------------


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _compose_command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _compose_airflow(compose: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in compose.items() if name.startswith("airflow")}
    assert found, "docker-compose.yaml has no airflow-* service"
    return found


def _secret_carried(env: dict[str, str]) -> set[str]:
    """Compose variables whose value interpolates a secret from the environment."""
    return {
        name
        for name, value in env.items()
        if any(SECRET_VAR.search(v) for v in COMPOSE_VAR.findall(value))
    }


def test_compose_and_k8s_use_the_same_images(
    compose: dict[str, dict[str, Any]],
    values: dict[str, Any],
    triton: dict[str, Any],
    mlflow: dict[str, Any],
):
    k8s = {
        "airflow": values["images"]["airflow"]["repository"],
        "triton": _image_repository(_container(triton, "triton")["image"]),
        "mlflow": _image_repository(_container(mlflow, "mlflow")["image"]),
    }
    airflow_images = {_image_repository(s["image"]) for s in _compose_airflow(compose).values()}
    compose_images = {
        "airflow": airflow_images.pop() if len(airflow_images) == 1 else sorted(airflow_images),
        "triton": _image_repository(compose["triton"]["image"]),
        "mlflow": _image_repository(compose["mlflow"]["image"]),
    }
    assert k8s == PLATFORM_IMAGES
    assert compose_images == k8s


def test_compose_and_k8s_run_triton_alike(
    compose: dict[str, dict[str, Any]], triton: dict[str, Any]
):
    service = compose["triton"]
    compose_command = _compose_command(service)
    k8s_command = _command_text(_container(triton, "triton"))
    for flag in TRITON_FLAGS:
        assert flag in compose_command, f"compose's triton lost {flag}"
        assert flag in k8s_command
    compose_ports = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
    compose_ports |= {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    assert compose_ports == set(TRITON_PORTS.values())
    assert set(_container_ports(_container(triton, "triton")).values()) == compose_ports


def test_compose_and_k8s_use_the_same_executor(
    compose: dict[str, dict[str, Any]], values: dict[str, Any]
):
    executors = {
        _compose_env(s).get("AIRFLOW__CORE__EXECUTOR") for s in _compose_airflow(compose).values()
    }
    assert executors == {values["executor"]}


def test_compose_secrets_are_secrets_in_k8s(
    compose: dict[str, dict[str, Any]],
    values: dict[str, Any],
    triton: dict[str, Any],
    mlflow: dict[str, Any],
):
    """Every variable compose fills from a secret (a password, key or token) is carried by a
    Kubernetes Secret on the same component, under the same name or by the chart's own
    setting for it."""
    airflow_k8s = {s["envName"] for s in values["secret"]}
    airflow_k8s |= {e["name"] for e in values["createUserJob"]["env"] if "valueFrom" in e}
    for variable, path in CHART_SECRET_ENV.items():
        if _dig(values, path):
            airflow_k8s.add(variable)
    checked = {
        "airflow": (
            set().union(
                *(_secret_carried(_compose_env(s)) for s in _compose_airflow(compose).values())
            ),
            airflow_k8s,
        ),
        "triton": (_secret_carried(_compose_env(compose["triton"])), _secret_names(triton)),
        "mlflow": (_secret_carried(_compose_env(compose["mlflow"])), _secret_names(mlflow)),
    }
    assert {"RECSYS_TRITON_ADMIN_KEY", "MLFLOW_TRACKING_PASSWORD"} <= checked["airflow"][0]
    for component, (in_compose, in_k8s) in checked.items():
        assert in_compose, f"compose's {component} takes no secret at all?"
        missing = in_compose - in_k8s
        assert not missing, (
            f"{component}: secret in compose, not from a Secret in k8s: {sorted(missing)}"
        )


def _secret_names(deployment: dict[str, Any]) -> set[str]:
    return {
        item["name"]
        for container in deployment["spec"]["template"]["spec"]["containers"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
