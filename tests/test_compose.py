"""Static checks of the Docker Compose deployment, the ones ``docker compose config`` and a first
``up`` would catch, plus the Envoy, Prometheus and Grafana files it mounts.

There is no Docker engine where the tests run, so the compose file is checked as data: images
pinned (or built from the repository's Dockerfiles), ports well-formed and bound to loopback
unless an operator opens them (the Triton replicas publish nothing: Envoy's gRPC port is the one
inference address), every bind mount present in the repository, dependencies and healthchecks
consistent, secrets only from the environment (interpolated the way ``docker compose config``
does), Airflow on CeleryExecutor with a worker for every queue the DAGs use, Envoy balancing
over every replica with health checks, Prometheus discovering every replica, MLflow's artifacts
in MinIO, and every metric the dashboard queries present in a real Triton 2.51 scrape
(``tests/fixtures/triton_metrics_after.txt``) or made by Prometheus itself (``up``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yaml"
ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recsys-serving.json"
TRITON_SCRAPE = ROOT / "tests" / "fixtures" / "triton_metrics_after.txt"
ROUTER_SCRAPE = ROOT / "tests" / "fixtures" / "triton_metrics_router.txt"
"""A real scrape with a model's router and a shadow candidate (the progressive-delivery metrics)."""

DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
ONE_SHOT = {"airflow-init", "minio-init"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|FERNET", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}")
ANY_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?+]([^}]*))?\}")
URL_CREDENTIALS = re.compile(r"://[^:/@\s]*:(\$\{[^}]*\}|[^@\s]+)@")
"""``scheme://user:PASSWORD@``, the password either literal or one ``${...}`` (which may hold
spaces: the message of ``${VAR:?message}``)."""
IMAGE_TAG = "${RECSYS_IMAGE_TAG:-dev}"
BUILT_IMAGES = {
    "deploy/docker/airflow.Dockerfile": "recsys/airflow",
    "deploy/docker/triton.Dockerfile": "recsys/triton",
    "deploy/docker/mlflow.Dockerfile": "recsys/mlflow",
}
"""The images docker-compose.yaml builds from the lock, by Dockerfile (docker-compose.gpu.yaml
builds the ``-gpu`` variants of the first two)."""
EXPECTED_QUEUES = {"training", "serving", "monitoring"}
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus writes itself for every target (not in any scrape)."""
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def triton_metric_names() -> set[str]:
    """The series names Prometheus stores from a real Triton 2.51 scrape.

    The parser names counter families without ``_total`` and gives their samples a synthesized
    ``_total``; Triton's counters have no such suffix and Prometheus keeps the exposed name, so
    for counters only the family name counts. Summaries add their ``_sum`` / ``_count``.
    """
    names: set[str] = set()
    for scrape in (TRITON_SCRAPE, ROUTER_SCRAPE):
        text = scrape.read_text()
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            if family.type != "counter":
                names.update(sample.name for sample in family.samples)
        # A counter exposed *with* ``_total`` (the serving models' own, e.g.
        # recsys_router_requests_total) is stored by Prometheus under that exposed name.
        names.update(
            name for name in re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M)
            if name.endswith("_total")
        )  # fmt: skip
    assert "nv_inference_request_success" in names
    assert "nv_inference_request_success_total" not in names
    assert "nv_inference_request_summary_us_count" in names
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _walk_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _walk_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _walk_strings(value)]
    return []


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _long_running(services: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, svc in services.items() if svc.get("restart") != "no"]


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def _airflow_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name.startswith("airflow-")}


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name.startswith("airflow-worker-")}


def _option(command: list[str], flag: str) -> str:
    assert isinstance(command, list) and command.count(flag) == 1, f"{flag} once in {command}"
    return command[command.index(flag) + 1]


class MissingVariable(KeyError):
    """``${VAR:?message}`` with VAR unset or empty: ``docker compose config`` fails with it."""


_INTERPOLATION = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^}]*\})*))?\})"
)


def interpolate(value: str, env: dict[str, str]) -> str:
    """One string as ``docker compose config`` interpolates it: ``$$`` is a literal ``$``;
    ``${VAR}``, ``${VAR:-default}`` / ``${VAR-default}`` (``:`` also replaces an empty value),
    ``${VAR:?message}`` / ``${VAR?message}`` (fail), ``${VAR:+alt}`` / ``${VAR+alt}``."""

    def substitute(match: re.Match[str]) -> str:
        if match[1]:
            return "$"
        name, operator, argument = match[2], match[3], match[4] or ""
        present = name in env and (env[name] != "" or not (operator or "").startswith(":"))
        if operator in (":-", "-"):
            return env[name] if present else interpolate(argument, env)
        if operator in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {argument}")
            return env[name]
        if operator in (":+", "+"):
            return interpolate(argument, env) if present else ""
        return env.get(name, "")

    return _INTERPOLATION.sub(substitute, value)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    """The parsed compose file with every string value interpolated (keys and comments are not,
    as with compose)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env) for value in node]
    return node


def _required_variables(compose: dict[str, Any]) -> set[str]:
    """Variables the file demands (``${VAR:?message}``) in its values (comments don't count)."""
    return {
        m.group(1)
        for text in _walk_strings(compose)
        for m in ANY_VAR.finditer(text)
        if REQUIRED_VAR.fullmatch(m.group(0))
    }


def _dockerfile_args(path: Path) -> dict[str, str | None]:
    """``ARG NAME[=default]`` lines of a Dockerfile."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", line)
        if match:
            found[match[1]] = match[2]
    return found


def _envoy() -> dict[str, Any]:
    config = yaml.safe_load(ENVOY.read_text())
    assert isinstance(config, dict)
    return config


def _envoy_route_clusters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes of a listener's HTTP connection manager(s)."""
    routes = []
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            manager = network_filter["typed_config"]
            assert manager["@type"].endswith("HttpConnectionManager"), manager["@type"]
            assert [f["name"] for f in manager["http_filters"]][-1] == "envoy.filters.http.router"
            for host in manager["route_config"]["virtual_hosts"]:
                routes.extend(host["routes"])
    return routes


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert {
        "postgres", "valkey", "minio", "minio-init", "mlflow", "triton", "envoy", "prometheus",
        "grafana", "airflow-init", "airflow-api-server", "airflow-scheduler",
        "airflow-dag-processor", "airflow-triggerer", "airflow-worker-training",
        "airflow-worker-serving", "airflow-worker-monitoring",
    } == set(services)  # fmt: skip
    assert services["mlflow"]["image"] == f"recsys/mlflow:{IMAGE_TAG}"
    assert services["triton"]["image"] == f"recsys/triton:{IMAGE_TAG}"
    for name, svc in _airflow_services(services).items():
        assert svc["image"] == f"recsys/airflow:{IMAGE_TAG}", name
        assert svc["build"]["dockerfile"] == "deploy/docker/airflow.Dockerfile", name


def _from_images(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), re.M)


def _assert_pinned(where: str, image: str) -> None:
    assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), (
        f"{where}: image {image!r} has no tag"
    )
    tag = image.rsplit(":", 1)[-1]
    assert tag != "latest" and re.search(r"\d", tag), f"{where}: unpinned tag {tag!r}"


def test_images_pinned(services: dict[str, dict[str, Any]]) -> None:
    """Pulled images name a concrete tag; built ones are tagged ``$RECSYS_IMAGE_TAG`` (``dev``
    by default) and start FROM a pinned base image."""
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        if "build" not in svc:
            _assert_pinned(name, image)
            continue
        assert image.endswith(f":{IMAGE_TAG}"), f"{name}: built image {image!r}"
        dockerfile = ROOT / svc["build"]["dockerfile"]
        bases = [base for base in _from_images(dockerfile) if not base.startswith("$")]
        assert bases, f"{dockerfile.name} has no FROM"
        for base in bases:
            _assert_pinned(f"{name} ({dockerfile.name})", base)


def test_images_are_built_from_the_repository_dockerfiles(
    services: dict[str, dict[str, Any]],
) -> None:
    """The Airflow, Triton and MLflow images are built from the lock (deploy/docker), so no
    service installs packages when it starts."""
    built = {name: svc for name, svc in services.items() if "build" in svc}
    assert {name for name in built if not name.startswith("airflow-")} == {"triton", "mlflow"}
    for name, svc in built.items():
        build = svc["build"]
        assert build["context"] == ".", name
        dockerfile = build["dockerfile"]
        assert dockerfile in BUILT_IMAGES, f"{name}: unexpected {dockerfile}"
        assert (ROOT / dockerfile).is_file(), f"{name}: {dockerfile} missing"
        assert svc["image"] == f"{BUILT_IMAGES[dockerfile]}:{IMAGE_TAG}", name
    for name, svc in services.items():
        command = _command(svc)
        assert "pip install" not in command, f"{name} installs packages at start"
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in _environment(svc), name
    # The build arguments the GPU override sets are the Dockerfiles' own, with CPU defaults.
    assert _dockerfile_args(ROOT / "deploy/docker/airflow.Dockerfile")["TORCH_INDEX_URL"] == (
        "https://download.pytorch.org/whl/cpu"
    )
    assert _dockerfile_args(ROOT / "deploy/docker/triton.Dockerfile")["ORT_PACKAGE"] == (
        "onnxruntime"
    )


PUBLISHED_PORT = re.compile(
    r"(?P<address>\$\{(?P<var>[A-Z_][A-Z0-9_]*):-(?P<default>[^}]+)\}|[0-9.]+|\[[0-9a-f:]+\])"
    r":(?P<host>\d+):(?P<container>\d+)"
)
"""``ADDRESS:HOST:CONTAINER`` where ADDRESS is an IP or ``${VAR:-default IP}``."""
UI_PORTS = {
    "mlflow": 5000, "airflow-api-server": 8080, "prometheus": 9090, "grafana": 3000, "minio": 9001,
}  # fmt: skip
TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT = 8001, 8000, 8002


def _published(services: dict[str, dict[str, Any]]) -> dict[str, list[re.Match[str]]]:
    """Every service's published ports, parsed; a port that does not parse fails the test."""
    found = {}
    for name, svc in services.items():
        found[name] = []
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: port {port!r} must be a quoted string"
            match = PUBLISHED_PORT.fullmatch(port)
            assert match, f"{name}: {port!r} does not name a host address (ADDRESS:HOST:CONTAINER)"
            found[name].append(match)
    return found


def _default_address(match: re.Match[str]) -> str:
    """The host address a port binds to when no variable is set."""
    return match["default"] if match["var"] else match["address"].strip("[]")


def test_ports_are_address_host_container(services: dict[str, dict[str, Any]]) -> None:
    seen: set[int] = set()
    for name, ports in _published(services).items():
        for match in ports:
            host, container = int(match["host"]), int(match["container"])
            assert 0 < host < 65536 and 0 < container < 65536, f"{name}: {match[0]!r}"
            assert host not in seen, f"host port {host} published twice"
            seen.add(host)
    assert seen == {TRITON_GRPC_PORT, *UI_PORTS.values()}


def test_every_published_port_defaults_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    """No port is published on every interface by default: each names its host address, and
    with no variable set that address is a loopback one. Opening one takes an explicit
    ``RECSYS_PUBLISH_ADDRESS`` (inference) or ``RECSYS_UI_ADDRESS`` (UIs)."""
    import ipaddress

    variables = set()
    for name, ports in _published(services).items():
        for match in ports:
            address = ipaddress.ip_address(_default_address(match))
            assert address.is_loopback, f"{name}: {match[0]!r} binds {address} by default"
            if match["var"]:
                variables.add((name, match["var"]))
    # Inference and the UIs open separately: serving clients must not expose the UIs.
    assert ("envoy", "RECSYS_PUBLISH_ADDRESS") in variables
    assert {(name, "RECSYS_UI_ADDRESS") for name in UI_PORTS} <= variables
    for var in ("RECSYS_PUBLISH_ADDRESS", "RECSYS_UI_ADDRESS"):
        assert var in COMPOSE.read_text().split("\nname:")[0], f"header comment explains {var}"


def test_triton_replicas_publish_nothing_and_envoy_publishes_grpc(
    services: dict[str, dict[str, Any]],
) -> None:
    """The Triton service runs several replicas, so it can publish no host port (two
    containers cannot bind one) and has no container_name; clients reach the replicas through
    Envoy, whose gRPC port is the only inference port on the host. Triton's HTTP and metrics
    ports, Envoy's HTTP and stats listeners, Valkey and MinIO's S3 API stay in the network."""
    triton, envoy = services["triton"], services["envoy"]
    assert "ports" not in triton and "container_name" not in triton
    assert triton["deploy"]["replicas"] == "${RECSYS_TRITON_REPLICA_COUNT:-2}"
    assert {TRITON_HTTP_PORT, TRITON_GRPC_PORT, TRITON_METRICS_PORT} == {
        int(port) for port in triton["expose"]
    }
    assert [(int(m["host"]), int(m["container"])) for m in _published(services)["envoy"]] == [
        (TRITON_GRPC_PORT, TRITON_GRPC_PORT)
    ]
    internal = {TRITON_HTTP_PORT, TRITON_METRICS_PORT, 9901, 9902, 6379, 9000, 5432}
    for name, published in _published(services).items():
        for match in published:
            assert int(match["host"]) not in internal, f"{name} publishes {match[0]!r}"
            assert int(match["container"]) not in internal, f"{name} publishes {match[0]!r}"
    assert {8000, 9902} == {int(port) for port in envoy["expose"]}
    assert f"localhost:{TRITON_HTTP_PORT}" in " ".join(triton["healthcheck"]["test"])


def test_replica_count_interpolates_like_compose(compose: dict[str, Any]) -> None:
    """``deploy.replicas`` is an integer once interpolated: 2 by default, the operator's
    ``RECSYS_TRITON_REPLICA_COUNT`` otherwise (compose converts the string)."""
    env = {name: "x" for name in _required_variables(compose)}
    default = interpolated(compose, env)["services"]["triton"]["deploy"]["replicas"]
    assert int(default) == 2
    scaled = interpolated(compose, {**env, "RECSYS_TRITON_REPLICA_COUNT": "3"})
    assert int(scaled["services"]["triton"]["deploy"]["replicas"]) == 3


def test_compose_config_fails_without_each_secret(compose: dict[str, Any]) -> None:
    """Interpolated as ``docker compose config`` does it: with every required variable set the
    file resolves (no ``${`` left, ``$$`` unescaped), and leaving any one out fails, naming it."""
    required = _required_variables(compose)
    assert {
        "POSTGRES_PASSWORD", "VALKEY_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
        "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD",
        "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "RECSYS_TRITON_ADMIN_KEY",
        "GRAFANA_ADMIN_PASSWORD", "RECSYS_DATA_DIR",
    } == required  # fmt: skip
    env = {name: f"value-of-{name.lower()}" for name in required}
    resolved = interpolated(compose, env)
    # Only compose's escapes ($${HOSTNAME} for the container's shell) leave a "${".
    for before, after in zip(_walk_strings(compose), _walk_strings(resolved), strict=True):
        assert after.count("${") == before.count("$${"), before
    broker = _environment(resolved["services"]["airflow-scheduler"])["AIRFLOW__CELERY__BROKER_URL"]
    assert broker == "redis://default:value-of-valkey_password@valkey:6379/0"
    assert "$RECSYS_TRITON_ADMIN_KEY" in resolved["services"]["triton"]["command"]
    for name in sorted(required):
        with pytest.raises(MissingVariable, match=name):
            interpolated(compose, {k: v for k, v in env.items() if k != name})
        with pytest.raises(MissingVariable, match=name):
            interpolated(compose, {**env, name: ""})


def test_interpolation_emulation() -> None:
    env = {"A": "1", "E": ""}
    assert interpolate("$${A} ${A} ${B:-x} ${E:-y} ${E-z} ${A:+on} ${B:+on}", env) == (
        "${A} 1 x y  on "
    )
    with pytest.raises(MissingVariable, match="B: say B"):
        interpolate("${B:?say B}", env)
    with pytest.raises(MissingVariable, match="E"):
        interpolate("${E:?set E}", env)
    assert interpolate("${E?set E}", env) == ""


def test_bind_mounts_exist_and_named_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            assert isinstance(volume, str), f"{name}: long volume syntax not expected"
            source = volume.split(":")[0] if not volume.startswith("${") else None
            if source is None:
                # Operator-supplied host folder: it must be demanded, never silently defaulted.
                assert REQUIRED_VAR.match(volume), f"{name}: {volume!r} needs ${{VAR:?message}}"
                continue
            if source.startswith((".", "/")):
                assert (ROOT / source).resolve().exists(), f"{name}: {source} missing in repo"
                assert (ROOT / source).resolve().is_relative_to(ROOT), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: named volume {source!r} not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_depends_on_targets_and_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must state conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert target != name
            condition = spec["condition"]
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {target}: {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{target} is not a one-shot service"
    # No cycles: a topological order exists.
    remaining = {n: set(s.get("depends_on") or {}) for n, s in services.items()}
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"depends_on cycle among {sorted(remaining)}"
        for n in ready:
            del remaining[n]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["prometheus"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["envoy"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == (
        "service_completed_successfully"
    )
    # The workers run the tasks, so they (not the scheduler) wait for what the tasks call.
    for name, worker in _workers(services).items():
        for target in ("postgres", "valkey", "mlflow", "triton", "envoy"):
            assert worker["depends_on"][target]["condition"] == "service_healthy", (name, target)
    assert services["airflow-scheduler"]["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert not {"mlflow", "triton"} & set(services["airflow-scheduler"]["depends_on"])


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    long_running = _long_running(services)
    assert set(services) - set(long_running) == ONE_SHOT
    for name in long_running:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) >= 2, name
        assert int(check.get("retries", 0)) > 0, name


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    secret_vars: set[str] = set()
    url_passwords = 0
    for name, svc in compose["services"].items():
        for key, value in _environment(svc).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # _FILE: a path
                assert REQUIRED_VAR.fullmatch(value), f"{name}: {key} must be ${{VAR:?msg}}"
                secret_vars.add(key)
        for text in _walk_strings(svc):
            for password in URL_CREDENTIALS.findall(text):
                assert REQUIRED_VAR.fullmatch(password), f"{name}: literal URL password"
            url_passwords += 1 if URL_CREDENTIALS.search(text) else 0
    raw = COMPOSE.read_text()
    # Every interpolation of a secret-looking variable is the failing ${VAR:?} form, so a
    # missing secret stops `docker compose up` instead of starting with an empty password.
    for match in ANY_VAR.finditer(raw):
        if SECRET_NAME.search(match.group(1)):
            assert REQUIRED_VAR.fullmatch(match.group(0)), match.group(0)
    assert {
        "POSTGRES_PASSWORD", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "VALKEY_PASSWORD",
        "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
    } <= secret_vars  # fmt: skip
    # The URL check saw the URLs that carry passwords (Postgres, the broker, MinIO for mc).
    assert url_passwords >= 4


def test_url_credentials_pattern() -> None:
    assert URL_CREDENTIALS.search("redis://default:${P:?set P (hex)}@valkey:6379/0")[1] == (
        "${P:?set P (hex)}"
    )
    assert URL_CREDENTIALS.search("redis://:hunter2@valkey")[1] == "hunter2"
    assert not URL_CREDENTIALS.search("http://mlflow:5000/api")


GPU_DEVICES = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_gpu_override_reserves_gpus_for_triton_and_the_training_worker(
    services: dict[str, dict[str, Any]],
) -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(override) == {"triton", "airflow-worker-training"}
    for name, svc in override.items():
        assert svc["deploy"]["resources"]["reservations"]["devices"] == GPU_DEVICES, name
        # Compose merges `build` key by key: same Dockerfile as the base, other arguments.
        assert svc["build"]["dockerfile"] == services[name]["build"]["dockerfile"], name
        assert svc["build"]["context"] == services[name]["build"]["context"], name
        declared = _dockerfile_args(ROOT / svc["build"]["dockerfile"])
        assert set(svc["build"]["args"]) <= set(declared), name
    # ... the models run ONNX Runtime on it: CUDA provider, from onnxruntime-gpu.
    triton = override["triton"]
    assert triton["image"] == f"recsys/triton-gpu:{IMAGE_TAG}"
    assert triton["build"]["args"] == {"ORT_PACKAGE": "onnxruntime-gpu"}
    assert triton["environment"] == {"RECSYS_ORT_DEVICE": "cuda"}
    # The replica count stays the base file's (the override's deploy adds resources only).
    assert set(triton["deploy"]) == {"resources"}
    worker = override["airflow-worker-training"]
    assert worker["image"] == f"recsys/airflow-gpu:{IMAGE_TAG}"
    assert worker["build"]["args"] == {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128"}
    # Only the training worker gets the GPU: the queue GPU work is routed to.
    assert "--queues" in services["airflow-worker-training"]["command"]
    assert _option(services["airflow-worker-training"]["command"], "--queues") == "training"


def test_triton_image_installs_what_the_served_models_import(
    services: dict[str, dict[str, Any]],
) -> None:
    """The python-backend models import onnxruntime, tokenizers, and for hybrid retrieval
    bm25s and PyStemmer: the Triton image installs them (CPU onnxruntime by default); the
    container installs nothing when it starts and runs ONNX Runtime on the CPU."""
    triton = services["triton"]
    # Instructions with their continuation lines joined.
    dockerfile = (ROOT / triton["build"]["dockerfile"]).read_text().replace("\\\n", " ")
    install = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert install, "triton.Dockerfile installs nothing"
    for package in ('"${ORT_PACKAGE}"', "tokenizers", '"numpy<2"', "bm25s", "PyStemmer"):
        assert any(package in line for line in install), package
    assert "pip" not in triton["command"]
    assert triton["environment"]["RECSYS_ORT_DEVICE"] == "cpu"


def test_prometheus_discovers_every_triton_replica(services: dict[str, dict[str, Any]]) -> None:
    """Prometheus asks Docker's DNS for every address of ``triton`` (one per replica) and
    scrapes each on the metrics port, labelling it ``replica`` (the address) next to the
    ``instance`` it keeps."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    triton = jobs["triton"]
    assert "static_configs" not in triton
    assert triton["dns_sd_configs"] == [
        {"names": ["triton"], "type": "A", "port": TRITON_METRICS_PORT, "refresh_interval": "10s"}
    ]
    assert triton["scrape_interval"] == "5s"
    assert triton.get("metrics_path", "/metrics") == "/metrics"
    relabels = triton["relabel_configs"]
    assert not any(r.get("target_label") == "instance" for r in relabels), "instance is kept"
    replica = [r for r in relabels if r.get("target_label") == "replica"]
    assert len(replica) == 1 and replica[0]["source_labels"] == ["__address__"]
    # Prometheus anchors relabel regexes; applied to a discovered target:
    address = f"172.18.0.7:{TRITON_METRICS_PORT}"
    match = re.fullmatch(replica[0]["regex"], address)
    assert match and match.expand(replica[0]["replacement"].replace("$", "\\")) == "172.18.0.7"
    assert "ports" not in services["triton"]
    assert "--metrics-config=summary_latencies=true" in services["triton"]["command"]
    # Envoy's own metrics, through its read-only stats listener.
    envoy = jobs["envoy"]
    assert envoy["metrics_path"] == "/stats/prometheus"
    assert [t for g in envoy["static_configs"] for t in g["targets"]] == ["envoy:9902"]
    mounts = services["prometheus"]["volumes"]
    assert any(
        m.startswith("./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml")
        for m in mounts
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_grafana_provisioning_points_at_mounted_dashboards(
    services: dict[str, dict[str, Any]], dashboard: dict[str, Any]
) -> None:
    mounts = {
        m.split(":")[1]: m.split(":")[0]
        for m in services["grafana"]["volumes"]
        if m.startswith("./")
    }
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = [
        provider
        for path in (GRAFANA_PROVISIONING / "dashboards").glob("*.yml")
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        container_dir = provider["options"]["path"]
        assert mounts.get(container_dir) == "./deploy/grafana/dashboards", container_dir
        assert (ROOT / mounts[container_dir] / DASHBOARD.name).is_file()
    datasources = [
        source
        for path in (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    assert [(d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090")
    ]
    uids = {d["uid"] for d in datasources}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    found += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if a.get("expr")]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            # label_values(metric, label): the second argument is a label, not a metric.
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            found.append((variable["name"], match.group(1) if match else query))
    return found


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in ``{...}`` or ``by (...)``), durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    text = re.sub(r"\$\w+", "", text)
    text = re.sub(r"\b[a-zA-Z_:][\w:]*\s*\(", "(", text)
    names = set(re.findall(r"\b[a-zA-Z_:][\w:]*\b", text))
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def test_promql_name_extraction() -> None:
    expr = (
        'sum by (version) (rate(a_total{model="$model",x="y z"}[$__rate_interval])) '
        '/ max without (quantile) (b_us{quantile="0.5"} offset 30s) unless c'
    )
    assert promql_metric_names(expr) == {"a_total", "b_us", "c"}


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "recsys-serving"
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    assert "nv_inference_request_success" in used["Request rate"]
    assert "nv_inference_request_failure" in used["Request rate"]
    assert "nv_inference_request_failure" in used["Error rate"]
    assert "/" in used["Error rate"]
    latency = used["Latency p50 / p99 / mean"]
    assert 'nv_inference_request_summary_us{model="$model",quantile="0.5"}' in latency
    assert 'nv_inference_request_summary_us{model="$model",quantile="0.99"}' in latency
    assert "nv_inference_queue_duration_us" in used["Queue time"]
    assert used["CPU utilization"] == "nv_cpu_utilization"
    routed = used["Routed traffic per arm (canary / A/B)"]
    assert "recsys_router_requests_total" in routed and "by (arm)" in routed
    assert "recsys_shadow_topk_overlap_total" in used["Shadow candidate: top-k overlap and errors"]
    assert "nv_cpu_memory_used_bytes" in used["CPU memory"]
    version = by_title["Current model version"]
    assert version["type"] == "stat" and version["options"]["textMode"] == "name"
    assert "> 0" in used["Current model version"]  # versions with traffic only
    events = [a for a in dashboard["annotations"]["list"] if a.get("expr")]
    assert any("rollback" in a["name"] for a in events)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]


def test_dashboard_metrics_exist_in_real_triton_scrape(
    dashboard: dict[str, Any], triton_metric_names: set[str]
) -> None:
    all_names: set[str] = set()
    for where, expr in _exprs(dashboard):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - triton_metric_names - PROMETHEUS_SERIES
        assert not unknown, f"{where}: {sorted(unknown)} not exported by Triton 2.51"
        all_names |= names
    assert {
        "nv_inference_request_success", "nv_inference_request_failure",
        "nv_inference_request_summary_us", "nv_inference_queue_duration_us",
        "nv_cpu_utilization", "nv_cpu_memory_used_bytes",
    } <= all_names  # fmt: skip


def test_dashboard_per_replica_panels(dashboard: dict[str, Any]) -> None:
    """With several replicas the dashboard shows each: how many are up, which versions each
    has loaded, and request rate, error rate and p99 latency per replica, filtered by the
    ``$replica`` variable (the label Prometheus' relabelling sets)."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    replica = variables["replica"]
    assert replica["query"]["query"] == 'label_values(up{job="triton"}, replica)'
    assert replica["multi"] and replica["includeAll"] and replica["allValue"] == ".*"
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    per_replica = {
        title: panel
        for title, panel in by_title.items()
        if "per replica" in title or "replicas" in title
    }
    assert set(per_replica) == {
        "Triton replicas up", "Loaded versions per replica", "Request rate per replica",
        "Error rate per replica", "Latency p99 per replica",
    }  # fmt: skip
    up = [t["expr"] for t in per_replica.pop("Triton replicas up")["targets"]]
    assert up == ['sum(up{job="triton"})', 'count(up{job="triton"})']
    for title, panel in per_replica.items():
        for target in panel["targets"]:
            expr = target["expr"]
            assert re.search(r"\bby \((replica|instance)\b", expr), f"{title}: {expr}"
            assert 'replica=~"$replica"' in expr and 'model="$model"' in expr, title
            assert (
                "{{replica}}" in target["legendFormat"]
                or "{{instance}}" in (target["legendFormat"])
            ), title
            # Every aggregation of a per-replica ratio keeps the replica apart.
            assert expr.count("by (") == expr.count("by (replica"), f"{title}: {expr}"
    used = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    assert "nv_inference_request_success" in used["Request rate per replica"]
    assert "nv_inference_request_failure" in used["Request rate per replica"]
    assert "/" in used["Error rate per replica"]
    assert 'quantile="0.99"' in used["Latency p99 per replica"]
    assert by_title["Triton replicas up"]["type"] == "stat"


def test_triton_starts_with_response_cache(services: dict[str, dict[str, Any]]) -> None:
    """Versions published with ``response_cache`` are only cached by a server that has one."""
    triton = services["triton"]
    assert "--cache-config=local,size=$$RECSYS_TRITON_CACHE_BYTES" in triton["command"]
    assert _environment(triton)["RECSYS_TRITON_CACHE_BYTES"] == (
        "${RECSYS_TRITON_CACHE_BYTES:-67108864}"
    )


def test_triton_samples_queries_where_the_drift_dag_reads_them(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every Triton replica writes its query samples into the state volume that the Airflow
    workers mount as ``RECSYS_HOME``, at the path their settings default to
    (``<home>/query_samples``), where the drift check (monitoring worker) reads them."""
    triton = services["triton"]
    sample_dir = _environment(triton)["RECSYS_QUERY_SAMPLE_DIR"]
    assert f"recsys-state:{sample_dir.rsplit('/', 1)[0]}" in triton["volumes"]
    for name, worker in _workers(services).items():
        home = _environment(worker)["RECSYS_HOME"]
        assert sample_dir == f"{home}/query_samples", name
        assert f"recsys-state:{home}" in worker["volumes"], name


def test_airflow_isolates_monitoring_as_the_embedded_stack_does(
    services: dict[str, dict[str, Any]],
) -> None:
    """Same pools file, same executor size: the capped pools leave the monitoring slots free."""
    from recsys.scheduling import POOLS_FILE, executor_parallelism

    for name, svc in _airflow_services(services).items():
        env = _environment(svc)
        assert int(env["AIRFLOW__CORE__PARALLELISM"]) == executor_parallelism(), name
    init = " ".join(services["airflow-init"]["command"])
    mounted = "/opt/recsys/" + str(POOLS_FILE.relative_to(ROOT))
    assert f"airflow pools import {mounted}" in init
    assert init.index("db migrate") < init.index("pools import")
    assert env["RECSYS_PIPELINE_SCHEDULE"] == "${RECSYS_PIPELINE_SCHEDULE:-none}"


def test_triton_command_restricts_operator_apis_and_keeps_the_key_off_argv(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Run the Triton service's own shell command, as the container would (``$$`` is compose's
    escape for ``$``), with tritonserver replaced by a probe that
    reports the argv it parsed and the argv /proc shows other users."""
    import shlex
    import subprocess
    import sys

    command = services["triton"]["command"].replace("$$", "$")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys\n"
        "shown = open('/proc/self/cmdline', 'rb').read().decode()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'shown': shown}))\n"
    )
    assert "/opt/recsys/keyguard.c" in command and "exec tritonserver" in command
    command = (
        command.replace("/opt/recsys/keyguard.c", str(ROOT / "recsys" / "triton" / "keyguard.c"))
        .replace("/tmp/keyguard.so", str(tmp_path / "keyguard.so"))
        .replace("exec tritonserver", f"exec {sys.executable} {probe}")
    )
    key = "compose-test-key-0123456789"
    result = subprocess.run(
        shlex.split(command),  # compose splits the folded string like a shell: bash -c "..."
        env={"PATH": "/usr/bin:/bin", "RECSYS_TRITON_ADMIN_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    operator = "model-repository,model-config,shared-memory,statistics,trace,logging"
    assert f"--grpc-restricted-protocol={operator}:recsys-admin-key={key}" in seen["argv"]
    assert f"--http-restricted-api=inference,{operator}:recsys-admin-key={key}" in seen["argv"]
    assert key not in seen["shown"] and "@RECSYS_TRITON_ADMIN_KEY@" in seen["shown"]


# --- Airflow on CeleryExecutor: broker, result backend, a worker per queue -------------------


def test_celery_executor_with_valkey_broker_and_postgres_results(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in _airflow_services(services).items():
        env = _environment(svc)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert re.fullmatch(
            r"redis://default:\$\{VALKEY_PASSWORD:\?[^}]+\}@valkey:6379/\d+",
            env["AIRFLOW__CELERY__BROKER_URL"],
        ), name
        assert re.fullmatch(
            r"db\+postgresql://airflow:\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres/airflow",
            env["AIRFLOW__CELERY__RESULT_BACKEND"],
        ), name
    valkey = services["valkey"]
    assert valkey["image"].startswith("valkey/valkey:")
    assert "ports" not in valkey and valkey["expose"] == ["6379"]
    assert REQUIRED_VAR.fullmatch(_environment(valkey)["VALKEY_PASSWORD"])
    # The password reaches the server through a config file, not its argv (/proc), and the
    # healthcheck authenticates through the environment, not `-a`.
    command = _command(valkey)
    assert "requirepass" in command and "--requirepass" not in command
    assert "exec docker-entrypoint.sh valkey-server /tmp/valkey.conf" in command
    check = " ".join(valkey["healthcheck"]["test"])
    assert "VALKEYCLI_AUTH=" in check and " -a " not in check and "PONG" in check
    assert "valkey-data:/data" in valkey["volumes"]


def test_a_celery_worker_for_every_queue_the_dags_use(services: dict[str, dict[str, Any]]) -> None:
    """Every queue of recsys.scheduling (and Airflow's default queue) is consumed by exactly one
    worker, named after its first queue, with the official liveness probe and as many task slots
    as the queue's pool needs; the scheduler, api-server, dag-processor and triggerer run no
    tasks."""
    from recsys import scheduling

    constants = {
        name: value
        for name, value in vars(scheduling).items()
        if name.endswith("_QUEUE") and isinstance(value, str)
    }
    assert set(constants.values()) >= EXPECTED_QUEUES
    served: dict[str, str] = {}
    for name, worker in _workers(services).items():
        command = worker["command"]
        assert command[:2] == ["celery", "worker"], name
        queues = _option(command, "--queues").split(",")
        assert name == f"airflow-worker-{queues[0]}", name
        for queue in queues:
            assert queue not in served, f"{queue} consumed by {served.get(queue)} and {name}"
            served[queue] = name
        check = " ".join(worker["healthcheck"]["test"])
        assert "celery_executor.app inspect ping" in check and "celery@$${HOSTNAME}" in check
        assert _environment(worker)["DUMB_INIT_SETSID"] == "0", name  # warm shutdown
        assert worker["restart"] == "unless-stopped", name
    assert set(served) == EXPECTED_QUEUES | {"default"}
    for constant, queue in constants.items():
        assert queue in served, f"recsys.scheduling.{constant}={queue!r} has no worker"
    default_queue = _environment(services["airflow-scheduler"])["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]
    assert served[default_queue] == "airflow-worker-serving"
    # Task slots: what recsys.scheduling gives each queue (the embedded stack runs the same).
    concurrency = {
        name: int(_option(worker["command"], "--concurrency"))
        for name, worker in _workers(services).items()
    }
    if hasattr(scheduling, "worker_concurrency"):
        expected = scheduling.worker_concurrency()
        assert {served[queue]: slots for queue, slots in expected.items()} == concurrency
    pools = scheduling.pool_slots()
    assert concurrency["airflow-worker-training"] >= pools[scheduling.TRAINING_POOL]
    assert concurrency["airflow-worker-monitoring"] >= pools[scheduling.MONITORING_POOL]
    for name in ("airflow-scheduler", "airflow-api-server", "airflow-dag-processor"):
        assert "worker" not in _command(services[name]), name


QUEUE_REFERENCE = re.compile(
    r"""(?:\bqueue\s*=\s*|["']queue["']\s*:\s*|\.queue\s*=\s*)([A-Za-z_][\w.]*|["'][^"']*["'])"""
)


def test_every_queue_a_task_names_is_served(services: dict[str, dict[str, Any]]) -> None:
    """The DAGs (and the pipeline builders in recsys/) name queues only through the constants
    of recsys.scheduling, and each of those queues has a worker here."""
    from recsys import scheduling

    served = {
        queue
        for worker in _workers(services).values()
        for queue in _option(worker["command"], "--queues").split(",")
    }
    found: dict[str, str] = {}
    sources = sorted((ROOT / "dags").glob("*.py")) + sorted((ROOT / "recsys").rglob("*.py"))
    for path in sources:
        for match in QUEUE_REFERENCE.finditer(path.read_text()):
            reference = match[1]
            where = f"{path.relative_to(ROOT)}: queue = {reference}"
            if reference[0] in "\"'":
                queue = reference.strip("\"'")
            else:
                constant = reference.rsplit(".", 1)[-1]
                if not constant.endswith("_QUEUE"):
                    continue  # a variable passed through (e.g. a parameter named queue)
                assert hasattr(scheduling, constant), f"{where}: not in recsys.scheduling"
                queue = getattr(scheduling, constant)
            assert queue in served, f"{where}: queue {queue!r} has no worker"
            found[where] = queue
    # The scan does see the DAGs' queues (it is not passing on nothing).
    assert {scheduling.TRAINING_QUEUE, scheduling.MONITORING_QUEUE} <= set(found.values())


# --- Triton replicas behind Envoy ------------------------------------------------------------


def test_envoy_balances_grpc_and_http_over_every_ready_replica(
    services: dict[str, dict[str, Any]],
) -> None:
    config = _envoy()
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    ports = {
        name: listener["address"]["socket_address"]["port_value"]
        for name, listener in listeners.items()
    }
    assert ports == {"triton_grpc": TRITON_GRPC_PORT, "triton_http": TRITON_HTTP_PORT,
                     "envoy_stats": 9902}  # fmt: skip
    upstream_port = {"triton_grpc": TRITON_GRPC_PORT, "triton_http": TRITON_HTTP_PORT}
    for listener_name, port in upstream_port.items():
        routes = _envoy_route_clusters(listeners[listener_name])
        assert [route["route"]["cluster"] for route in routes] == [listener_name]
        cluster = clusters[listener_name]
        assert cluster["type"] == "STRICT_DNS", listener_name  # every replica's address
        assert cluster["lb_policy"] in {"ROUND_ROBIN", "LEAST_REQUEST"}
        assert cluster["ignore_health_on_host_removal"] is True
        assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
        endpoints = [
            lb["endpoint"]
            for group in cluster["load_assignment"]["endpoints"]
            for lb in group["lb_endpoints"]
        ]
        assert len(endpoints) == 1
        socket = endpoints[0]["address"]["socket_address"]
        assert (socket["address"], socket["port_value"]) == ("triton", port)
        # Readiness over Triton's HTTP port, also for the gRPC cluster.
        assert endpoints[0]["health_check_config"]["port_value"] == TRITON_HTTP_PORT
        (check,) = cluster["health_checks"]
        assert check["http_health_check"]["path"] == "/v2/health/ready"
        assert check["http_health_check"].get("codec_client_type", "HTTP1") == "HTTP1"
        assert check["unhealthy_threshold"] >= 1 and check["healthy_threshold"] >= 1
        assert check["no_traffic_interval"] == check["interval"]
        assert "outlier_detection" in cluster
    # gRPC: HTTP/2 on both sides, gRPC requests only.
    grpc_cluster = clusters["triton_grpc"]
    options = grpc_cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    manager = listeners["triton_grpc"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["codec_type"] == "HTTP2"
    (grpc_route,) = _envoy_route_clusters(listeners["triton_grpc"])
    assert grpc_route["match"] == {"prefix": "/", "grpc": {}}
    assert "connect-failure" in grpc_route["route"]["retry_policy"]["retry_on"]
    # Every typed config names a v3 Envoy API type.
    for text in _walk_strings(config):
        if text.startswith("type.googleapis.com/"):
            assert text.startswith("type.googleapis.com/envoy.") and ".v3." in text, text


def test_envoy_admin_stays_in_the_container(services: dict[str, dict[str, Any]]) -> None:
    """The admin API (which can stop Envoy or fail its health) listens on the container's
    loopback; the network sees only its Prometheus stats and readiness, by exact path."""
    config = _envoy()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    routes = _envoy_route_clusters(listeners["envoy_stats"])
    assert sorted(route["match"]["path"] for route in routes) == ["/ready", "/stats/prometheus"]
    assert {route["route"]["cluster"] for route in routes} == {"envoy_admin"}
    admin = clusters["envoy_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    socket = admin["endpoint"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"]) == ("127.0.0.1", admin_port)
    envoy = services["envoy"]
    mount = "./deploy/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro"
    assert mount in envoy["volumes"]
    assert _option(envoy["command"], "--config-path") == "/etc/envoy/envoy.yaml"
    check = " ".join(envoy["healthcheck"]["test"])
    assert f"/dev/tcp/127.0.0.1/{admin_port}" in check and "/ready" in check


def test_clients_call_the_balancer_and_the_platform_every_replica(
    services: dict[str, dict[str, Any]],
) -> None:
    """Inference goes through Envoy like any client's; deploys, rollbacks and the monitor reach
    each replica through ``RECSYS_TRITON_REPLICAS`` (``dns+``: every address ``triton`` has)."""
    from recsys.triton.replicas import REPLICAS_ENV

    for name, svc in _airflow_services(services).items():
        env = _environment(svc)
        assert env["RECSYS_TRITON_HOST"] == "envoy", name
        assert env[REPLICAS_ENV] == (f"dns+triton:{TRITON_GRPC_PORT}:{TRITON_METRICS_PORT}"), name


# --- MLflow artifacts in MinIO ---------------------------------------------------------------


def test_mlflow_serves_artifacts_from_minio(compose: dict[str, Any]) -> None:
    """MLflow proxies artifacts (``--serve-artifacts``) to the ``mlflow`` bucket, which the
    one-shot minio-init creates; only the MLflow server holds S3 credentials (the MinIO ones,
    from the environment); the Airflow workers upload through MLflow."""
    services = compose["services"]
    mlflow = services["mlflow"]
    command = _command(mlflow)
    assert "--serve-artifacts" in command
    destination = re.search(r"--artifacts-destination (\S+?)\"?$", command.strip())
    assert destination and destination[1] == "s3://mlflow/artifacts"
    bucket = destination[1].split("/")[2]
    env = _environment(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert re.fullmatch(r"\$\{MINIO_ROOT_USER:\?[^}]+\}", env["AWS_ACCESS_KEY_ID"])
    assert re.fullmatch(r"\$\{MINIO_ROOT_PASSWORD:\?[^}]+\}", env["AWS_SECRET_ACCESS_KEY"])
    assert "MLFLOW_ARTIFACTS_DESTINATION" not in env and "volumes" not in mlflow
    assert "mlflow-artifacts" not in (compose.get("volumes") or {})
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert "minio-data:/data" in minio["volumes"]
    minio_env = _environment(minio)
    assert REQUIRED_VAR.fullmatch(minio_env["MINIO_ROOT_USER"])
    assert REQUIRED_VAR.fullmatch(minio_env["MINIO_ROOT_PASSWORD"])
    # S3 API inside the network; the console is a UI port (loopback unless RECSYS_UI_ADDRESS).
    assert [(int(m["host"]), int(m["container"])) for m in _published(services)["minio"]] == [
        (9001, 9001)
    ]
    assert _option(minio["command"], "--console-address") == ":9001"
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc:RELEASE.")
    assert init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert f"mc mb --ignore-existing minio/{bucket}" in _command(init)
    assert f"mc anonymous set none minio/{bucket}" in _command(init)
    # mc gets the credentials from MC_HOST_<alias>, not its argv.
    assert re.fullmatch(
        r"http://\$\{MINIO_ROOT_USER:\?[^}]+\}:\$\{MINIO_ROOT_PASSWORD:\?[^}]+\}@minio:9000",
        _environment(init)["MC_HOST_minio"],
    )
    for name, svc in _airflow_services(services).items():
        assert not {k for k in _environment(svc) if k.startswith("AWS_")}, name
        assert _environment(svc)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
