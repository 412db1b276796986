"""Start, stop and inspect the single-machine stack from PyPI packages (no Docker needed).

Services: Triton (bundled binary from nvidia-pytriton, explicit model control), an MLflow server
(SQLite backend, local artifact store) and Airflow 3 as separate api-server, scheduler,
dag-processor and triggerer processes on SQLite. All bind to 127.0.0.1. Each service's PID and
start time are recorded, and `down` signals only processes whose PID and start time still match
what was started, so it never kills anything it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from recsys.config import PROJECT_ROOT, Settings

AIRFLOW_USER = "admin"


class StackError(RuntimeError):
    """A service did not start or stop; the message names it and its log file."""


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str | None
    ui: str | None = None


def _bin(name: str) -> str:
    """An executable of this virtualenv (so services run the same packages as the library)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def stack_dir(settings: Settings) -> Path:
    path = settings.home / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _secret(settings: Settings, name: str, nbytes: int = 24) -> str:
    """A random secret kept in the state folder (mode 0600), never in code or logs."""
    path = stack_dir(settings) / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(secrets.token_urlsafe(nbytes))
        path.chmod(0o600)
    return path.read_text().strip()


def recsys_env(settings: Settings) -> dict[str, str]:
    """Variables every service and Airflow task inherits so they all see one configuration."""
    return {
        "RECSYS_HOME": str(settings.home),
        "RECSYS_TRITON_REPO": str(settings.triton_repo),
        "RECSYS_DATA_PATH": str(settings.data_path),
        "RECSYS_MODEL_NAME": settings.model_name,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "RECSYS_TRITON_HOST": settings.triton_host,
        "RECSYS_TRITON_HTTP_PORT": str(settings.triton_http_port),
        "RECSYS_TRITON_GRPC_PORT": str(settings.triton_grpc_port),
        "RECSYS_TRITON_METRICS_PORT": str(settings.triton_metrics_port),
        "RECSYS_MLFLOW_PORT": str(settings.mlflow_port),
        "RECSYS_AIRFLOW_PORT": str(settings.airflow_port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def airflow_env(settings: Settings) -> dict[str, str]:
    """Airflow configuration for a single-machine deployment on SQLite, loopback only."""
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "simple_auth_manager_passwords.json"
    if not passwords.exists():
        passwords.write_text(
            json.dumps({AIRFLOW_USER: _secret(settings, "airflow_admin_password", 12)})
        )
        passwords.chmod(0o600)
    api = f"http://127.0.0.1:{settings.airflow_port}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{AIRFLOW_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": api,
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(settings, "airflow_jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": _secret(settings, "airflow_api_secret"),
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    }


def airflow_password(settings: Settings) -> str:
    return _secret(settings, "airflow_admin_password", 12)


def mlflow_service(settings: Settings, base_env: dict[str, str]) -> Service:
    """MLflow tracking + registry server: SQLite backend, artifacts proxied to a local folder."""
    mlflow_home = settings.home / "mlflow"
    mlflow_home.mkdir(parents=True, exist_ok=True)
    command = [
        _bin("mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(settings.mlflow_port),
        "--backend-store-uri", f"sqlite:///{mlflow_home / 'mlflow.db'}",
        "--artifacts-destination", str(mlflow_home / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{settings.mlflow_port}"
    return Service(
        "mlflow",
        command,
        {**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        f"{url}/health",
        url,
    )


def services(settings: Settings) -> list[Service]:
    """The stack's services in start order."""
    from recsys.triton.server import TritonServer

    base = {**os.environ, **recsys_env(settings)}
    triton = TritonServer(
        settings.triton_repo,
        host=settings.triton_host,
        http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port,
        log_path=stack_dir(settings) / "logs" / "triton.log",
        workdir=stack_dir(settings) / "triton",
    )
    af_env = {**base, **airflow_env(settings)}
    airflow = _bin("airflow")
    af_health = f"http://127.0.0.1:{settings.airflow_port}/api/v2/monitor/health"
    return [
        Service(
            "triton",
            triton.command(),
            {**base, **triton.environment()},
            f"http://{settings.triton_http_url}/v2/health/live",
            f"gRPC {settings.triton_grpc_url}, HTTP {settings.triton_http_url}, "
            f"metrics {settings.triton_metrics_url}",
        ),
        mlflow_service(settings, base),
        Service("airflow-api-server", [airflow, "api-server"], af_env, af_health,
                f"http://127.0.0.1:{settings.airflow_port}"),
        # Their log servers would bind every interface; on one machine the api-server reads the
        # task log files directly, so they are not started.
        Service("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], af_env, None),
        Service("airflow-dag-processor", [airflow, "dag-processor"], af_env, None),
        Service("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], af_env, None),
    ]  # fmt: skip


def _pid_file(settings: Settings, name: str) -> Path:
    return stack_dir(settings) / "pids" / f"{name}.json"


def _running_pid(settings: Settings, name: str) -> int | None:
    """The PID of a service this launcher started, if that very process still runs.

    A process is identified by PID *and* start time: services rename themselves (Airflow sets
    its process title), and a recycled PID must never be mistaken for one of ours.
    """
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    try:
        process = psutil.Process(int(record["pid"]))
        same = abs(process.create_time() - float(record["create_time"])) < 0.05
        alive = process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError):
        return None
    return process.pid if same and alive else None


def _healthy(url: str | None) -> bool:
    if url is None:
        return True
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def migrate_airflow_db(settings: Settings) -> None:
    """Create or upgrade Airflow's SQLite metadata database before its services start."""
    env = {**os.environ, **recsys_env(settings), **airflow_env(settings)}
    log_path = stack_dir(settings) / "logs" / "airflow-db-migrate.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        result = subprocess.run(
            [_bin("airflow"), "db", "migrate"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    if result.returncode != 0:
        raise StackError(f"airflow db migrate failed; see {log_path}:\n{_log_tail(log_path)}")


def spawn(service: Service, log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``service`` detached in its own session, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            service.command,
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            start_new_session=True,
        )


def wait_healthy(
    service: Service, process: subprocess.Popen, log_path: Path, deadline: float
) -> None:
    """Block until ``service`` answers its health check; fail with its log if it dies or the
    monotonic ``deadline`` passes."""
    while not _healthy(service.health_url):
        if process.poll() is not None:
            raise StackError(
                f"{service.name} exited with code {process.returncode}; log {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} not healthy in time; log {log_path}")
        time.sleep(0.5)


def up(settings: Settings, timeout_s: float = 180.0, echo=print) -> list[Service]:
    """Start every service that is not already running and wait until each is healthy."""
    settings.triton_repo.mkdir(parents=True, exist_ok=True)
    migrate_airflow_db(settings)
    started = []
    for service in services(settings):
        if _running_pid(settings, service.name):
            echo(f"  {service.name}: already running")
            continue
        log_path = stack_dir(settings) / "logs" / f"{service.name}.log"
        process = spawn(service, log_path, settings.home)
        path = _pid_file(settings, service.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": process.pid,
            "create_time": psutil.Process(process.pid).create_time(),
            "command": service.command,
        }
        path.write_text(json.dumps(record))
        started.append((service, process, log_path))
        echo(f"  {service.name}: started (pid {process.pid}, log {log_path})")
    deadline = time.monotonic() + timeout_s
    for service, process, log_path in started:
        wait_healthy(service, process, log_path, deadline)
    return services(settings)


def _terminate_tree(pid: int, timeout_s: float) -> None:
    """SIGTERM a service and every descendant (Airflow runs tasks in their own sessions, so
    signalling the process group alone would orphan a running task), then SIGKILL leftovers."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def down(settings: Settings, timeout_s: float = 30.0, echo=print) -> None:
    """Stop, in reverse start order, only the processes this launcher started."""
    for service in reversed(services(settings)):
        pid = _running_pid(settings, service.name)
        if pid is not None:
            _terminate_tree(pid, timeout_s)
            echo(f"  {service.name}: stopped (pid {pid})")
            if service.name == "triton":
                from recsys.triton.server import cleanup_shared_memory

                cleanup_shared_memory()
        _pid_file(settings, service.name).unlink(missing_ok=True)


def status(settings: Settings) -> list[dict[str, object]]:
    """One row per service: running PID (or None), health, and where its UI or API is."""
    rows = []
    for service in services(settings):
        pid = _running_pid(settings, service.name)
        rows.append(
            {
                "service": service.name,
                "pid": pid,
                "healthy": bool(pid) and _healthy(service.health_url),
                "endpoint": service.ui or "",
            }
        )
    return rows
