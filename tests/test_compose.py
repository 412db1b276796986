"""Static checks of the Docker Compose deployment, the ones ``docker compose config`` and a first
``up`` would catch, plus the Prometheus and Grafana files it mounts.

There is no Docker engine where the tests run, so the compose file is checked as data: images
pinned, ports well-formed and bound to loopback unless an operator opens them (Triton's HTTP and
metrics ports not published at all), every bind mount present in the repository, dependencies and
healthchecks consistent, secrets only from the environment, and every metric the dashboard
queries present in a real Triton 2.51 scrape (``tests/fixtures/triton_metrics_after.txt``).
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
TRITON_PIP_INSTALL = (
    "pip install --quiet ${RECSYS_ORT_PACKAGE:-onnxruntime} tokenizers 'numpy<2' bm25s PyStemmer"
)
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recsys-serving.json"
TRITON_SCRAPE = ROOT / "tests" / "fixtures" / "triton_metrics_after.txt"
ROUTER_SCRAPE = ROOT / "tests" / "fixtures" / "triton_metrics_router.txt"
"""A real scrape with a model's router and a shadow candidate (the progressive-delivery metrics)."""

DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
ONE_SHOT = {"airflow-init"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|FERNET", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}")
ANY_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?+]([^}]*))?\}")
URL_CREDENTIALS = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
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


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert {
        "postgres", "mlflow", "triton", "prometheus", "grafana", "airflow-init",
        "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    } <= set(services)  # fmt: skip
    assert services["mlflow"]["image"] == "ghcr.io/mlflow/mlflow:v3.17.2"
    assert services["triton"]["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    for name in services:
        if name.startswith("airflow-"):
            assert services[name]["image"] == "apache/airflow:3.3.2-python3.11", name


def test_images_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), (
            f"{name}: image {image!r} has no tag"
        )
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: unpinned tag {tag!r}"


PUBLISHED_PORT = re.compile(
    r"(?P<address>\$\{(?P<var>[A-Z_][A-Z0-9_]*):-(?P<default>[^}]+)\}|[0-9.]+|\[[0-9a-f:]+\])"
    r":(?P<host>\d+):(?P<container>\d+)"
)
"""``ADDRESS:HOST:CONTAINER`` where ADDRESS is an IP or ``${VAR:-default IP}``."""
UI_PORTS = {"mlflow": 5000, "airflow-api-server": 8080, "prometheus": 9090, "grafana": 3000}
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
    assert ("triton", "RECSYS_PUBLISH_ADDRESS") in variables
    assert {(name, "RECSYS_UI_ADDRESS") for name in UI_PORTS} <= variables
    for var in ("RECSYS_PUBLISH_ADDRESS", "RECSYS_UI_ADDRESS"):
        assert var in COMPOSE.read_text().split("\nname:")[0], f"header comment explains {var}"


def test_triton_publishes_only_grpc_inference(services: dict[str, dict[str, Any]]) -> None:
    """HTTP (8000) and metrics (8002) are reachable inside the compose network only: the
    healthcheck and Prometheus use them there, and nothing on the host or the network can."""
    triton = services["triton"]
    ports = _published(services)["triton"]
    assert [(int(m["host"]), int(m["container"])) for m in ports] == [
        (TRITON_GRPC_PORT, TRITON_GRPC_PORT)
    ]
    internal = {TRITON_HTTP_PORT, TRITON_METRICS_PORT}
    for name, published in _published(services).items():
        for match in published:
            assert int(match["host"]) not in internal, f"{name} publishes {match[0]!r}"
    assert f"localhost:{TRITON_HTTP_PORT}" in " ".join(triton["healthcheck"]["test"])


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
    assert services["airflow-scheduler"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


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
    for name, svc in compose["services"].items():
        for key, value in _environment(svc).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # _FILE: a path
                assert REQUIRED_VAR.fullmatch(value), f"{name}: {key} must be ${{VAR:?msg}}"
                secret_vars.add(key)
        for text in _walk_strings(svc):
            for password in URL_CREDENTIALS.findall(text):
                assert REQUIRED_VAR.fullmatch(password), f"{name}: literal URL password"
    raw = COMPOSE.read_text()
    # Every interpolation of a secret-looking variable is the failing ${VAR:?} form, so a
    # missing secret stops `docker compose up` instead of starting with an empty password.
    for match in ANY_VAR.finditer(raw):
        if SECRET_NAME.search(match.group(1)):
            assert REQUIRED_VAR.fullmatch(match.group(0)), match.group(0)
    assert {
        "POSTGRES_PASSWORD", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD",
    } <= secret_vars  # fmt: skip


def test_gpu_override_reserves_gpus_for_triton() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) == {"triton"}
    devices = override["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # ... and the models run ONNX Runtime on it: CUDA provider, from onnxruntime-gpu.
    environment = override["services"]["triton"]["environment"]
    assert environment == {"RECSYS_ORT_DEVICE": "cuda", "RECSYS_ORT_PACKAGE": "onnxruntime-gpu"}


def test_triton_installs_what_the_served_models_import(services: dict[str, dict[str, Any]]) -> None:
    """The python-backend models import onnxruntime, tokenizers, and for hybrid retrieval
    bm25s and PyStemmer; the CPU default runs ONNX Runtime on the CPU."""
    triton = services["triton"]
    command = (
        " ".join(triton["command"]) if isinstance(triton["command"], list) else triton["command"]
    )
    for package in ("${RECSYS_ORT_PACKAGE:-onnxruntime}", "tokenizers", "bm25s", "PyStemmer"):
        assert package in command.replace("$$", "$"), package
    assert triton["environment"]["RECSYS_ORT_DEVICE"] == "cpu"


def test_prometheus_scrapes_triton_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    triton = jobs["triton"]
    targets = [t for group in triton["static_configs"] for t in group["targets"]]
    assert "triton:8002" in targets
    assert triton.get("metrics_path", "/metrics") == "/metrics"
    assert not any(port.endswith(":8002") for port in services["triton"]["ports"])
    assert "--metrics-config=summary_latencies=true" in services["triton"]["command"]
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
        unknown = names - triton_metric_names
        assert not unknown, f"{where}: {sorted(unknown)} not exported by Triton 2.51"
        all_names |= names
    assert {
        "nv_inference_request_success", "nv_inference_request_failure",
        "nv_inference_request_summary_us", "nv_inference_queue_duration_us",
        "nv_cpu_utilization", "nv_cpu_memory_used_bytes",
    } <= all_names  # fmt: skip


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
    """Triton writes its query samples into the state volume that the Airflow workers mount as
    ``RECSYS_HOME``, at the path their settings default to (``<home>/query_samples``)."""
    triton, scheduler = services["triton"], services["airflow-scheduler"]
    sample_dir = _environment(triton)["RECSYS_QUERY_SAMPLE_DIR"]
    home = _environment(scheduler)["RECSYS_HOME"]
    assert sample_dir == f"{home}/query_samples"
    assert f"recsys-state:{home}" in triton["volumes"]
    assert f"recsys-state:{home}" in scheduler["volumes"]


def test_airflow_isolates_monitoring_as_the_embedded_stack_does(
    services: dict[str, dict[str, Any]],
) -> None:
    """Same pools file, same executor size: the capped pools leave the monitoring slots free."""
    from recsys.scheduling import POOLS_FILE, executor_parallelism

    env = services["airflow-scheduler"]["environment"]
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) == executor_parallelism()
    init = " ".join(services["airflow-init"]["command"])
    mounted = "/opt/recsys/" + str(POOLS_FILE.relative_to(ROOT))
    assert f"airflow pools import {mounted}" in init
    assert init.index("db migrate") < init.index("pools import")
    assert env["RECSYS_PIPELINE_SCHEDULE"] == "${RECSYS_PIPELINE_SCHEDULE:-none}"


def test_triton_command_restricts_operator_apis_and_keeps_the_key_off_argv(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Run the Triton service's own shell command, as the container would (``$$`` is compose's
    escape for ``$``), with the pip step skipped and tritonserver replaced by a probe that
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
    assert TRITON_PIP_INSTALL in command
    assert "/opt/recsys/keyguard.c" in command and "exec tritonserver" in command
    command = (
        command.replace(TRITON_PIP_INSTALL, "true")
        .replace("/opt/recsys/keyguard.c", str(ROOT / "recsys" / "triton" / "keyguard.c"))
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
