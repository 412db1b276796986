"""Start, stop and inspect the single-machine stack from PyPI packages (no Docker needed).

Services: Triton (bundled binary from nvidia-pytriton, explicit model control), an MLflow server
(SQLite backend, local artifact store) and Airflow 3 as separate api-server, scheduler,
dag-processor and triggerer processes on SQLite. All bind to 127.0.0.1. Each service's PID and
start time are recorded, and `down` signals only processes whose PID and start time still match
what was started, so it never kills anything it did not start.

Security on one machine: besides binding to loopback, Triton's model control needs the admin
key, MLflow runs its ``basic-auth`` app (admin password generated, never the default) and
Airflow its SimpleAuthManager with a generated password. Secrets live in
``$RECSYS_HOME/stack/secrets`` (mode 0600, see :mod:`recsys.credentials`), reach services and
Airflow workers through the environment or files, and are masked in what this module records;
the Airflow password is never printed, only the file that holds it.

Executors: LocalExecutor by default. ``up(executor="celery")`` (``recsys stack up --executor
celery``, default ``$RECSYS_AIRFLOW_EXECUTOR``) runs Airflow's CeleryExecutor instead: a Redis
server of the stack's own (loopback, ``$RECSYS_REDIS_PORT``, a generated password in a 0600
config file, no persistence) is the broker, ``celery-results.db`` (SQLite) the result backend,
and one ``airflow celery worker`` per queue of :data:`recsys.scheduling.QUEUES` runs the tasks
routed to it, so the ``monitoring``
worker runs a rollback while the ``training`` worker is busy. A worker is healthy when it
answers a Celery ping through the broker. The executor a stack was started with is recorded
until ``down``.

Local users: the state folder (``$RECSYS_HOME``) is private to its owner (0700, tightened on
``up`` when it is wider), and every service and Airflow command starts with umask
:data:`SERVICE_UMASK`, so the databases (``mlflow.db``, ``basic_auth.db``, ``airflow.db``),
artifacts, logs and the sampled customer queries come out 0600/0700. Database files made
before this rule are tightened on ``up`` too (:func:`prepare_state_dirs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from recsys.config import PROJECT_ROOT, Settings
from recsys.credentials import (
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USER_ENV,
    TRITON_ADMIN_KEY_ENV,
    mlflow_credentials,
    redact_command,
    secrets_dir,
    stored_secret,
    triton_admin_key,
)
from recsys.scheduling import (
    AIRFLOW_DEFAULT_QUEUE,
    POOLS_FILE,
    QUEUES,
    SERVING_QUEUE,
    executor_parallelism,
    worker_concurrency,
)

AIRFLOW_USER = "admin"
AIRFLOW_PASSWORD_SECRET = "airflow_admin_password"
"""Name of the generated Airflow admin password under ``$RECSYS_HOME/stack/secrets``."""
SERVICE_UMASK = 0o077
"""umask of every process the stack starts: what they create only their owner can read."""
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
TRITON_CACHE_BYTES_ENV = "RECSYS_TRITON_CACHE_BYTES"
"""Size in bytes of Triton's response cache (default 64 MiB; 0 starts Triton without one)."""

LOCAL_EXECUTOR = "local"
CELERY_EXECUTOR = "celery"
EXECUTORS = {LOCAL_EXECUTOR: "LocalExecutor", CELERY_EXECUTOR: "CeleryExecutor"}
"""``up``'s executor choices and the Airflow executor each runs."""
EXECUTOR_ENV = "RECSYS_AIRFLOW_EXECUTOR"
"""The executor ``recsys stack up`` uses when ``--executor`` is not given (``local``)."""
REDIS_PORT_ENV = "RECSYS_REDIS_PORT"
"""Port of the stack's Redis (Celery broker and results; only with the celery executor)."""
DEFAULT_REDIS_PORT = 6389
"""Not Redis's 6379: a system Redis may already listen there."""
REDIS_PASSWORD_SECRET = "redis_password"
"""Name of the generated Redis password under ``$RECSYS_HOME/stack/secrets``."""
REDIS_SERVICE = "redis"


class StackError(RuntimeError):
    """A service did not start or stop; the message names it and its log file."""


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str | None
    ui: str | None = None
    probe: Callable[[], bool] | None = None
    """Health check that is not an HTTP GET (Redis's PING, a Celery worker's ping)."""
    after_servers: bool = False
    """Started only once every server answers: it runs or schedules tasks, and a task whose
    worker cannot reach the api-server's execution API fails."""


def _bin(name: str) -> str:
    """An executable of this virtualenv (so services run the same packages as the library)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _private_home(settings: Settings) -> Path:
    """The state folder, created private (0700) when it does not exist yet."""
    home = settings.home
    if not home.is_dir():
        home.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            home.mkdir(mode=PRIVATE_DIR_MODE)
            home.chmod(PRIVATE_DIR_MODE)
    return home


def stack_dir(settings: Settings) -> Path:
    path = _private_home(settings) / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tighten(path: Path, mode: int, echo, what: str) -> None:
    """``chmod`` ``path`` to ``mode`` when it is wider, saying so; a path this user cannot
    change (someone else's) is reported, not fatal."""
    try:
        current = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    if not current & ~mode:
        return
    try:
        path.chmod(mode)
    except PermissionError as exc:
        echo(f"  WARNING: {what} {path} is mode {current:04o} and cannot be tightened ({exc})")
        return
    echo(f"  {what} {path} was mode {current:04o}; now {mode:04o} (owner only)")


_DATABASES = (
    ("mlflow", "mlflow.db"),
    ("mlflow", "basic_auth.db"),
    ("airflow", "airflow.db"),
)
_SQLITE_SIDE_FILES = ("", "-journal", "-wal", "-shm")


def prepare_state_dirs(settings: Settings, echo=print) -> None:
    """Make the state folder private before any service writes to it: create ``$RECSYS_HOME``
    0700 (or tighten an existing one, with a log line), and tighten the databases and the
    sampled customer queries that earlier versions left readable to every local user.

    New files need nothing more: services and Airflow commands start with
    :data:`SERVICE_UMASK`. A query sample folder outside the state folder
    (``RECSYS_QUERY_SAMPLE_DIR``) is created 0700 but an existing one is left as it is: it may
    be shared, and this launcher does not own it."""
    home = _private_home(settings)
    _tighten(home, PRIVATE_DIR_MODE, echo, "state folder")
    for folder, name in _DATABASES:
        for side in _SQLITE_SIDE_FILES:
            _tighten(home / folder / f"{name}{side}", PRIVATE_FILE_MODE, echo, "database")
    samples = settings.query_sample_dir
    if not samples.exists():
        samples.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        samples.chmod(PRIVATE_DIR_MODE)
    elif samples.resolve().is_relative_to(home.resolve()):
        _tighten_tree(samples, echo, "query samples")


def _tighten_tree(root: Path, echo, what: str) -> None:
    """Folders 0700 and files 0600 from ``root`` down (symlinks are neither followed nor
    changed); one log line for the whole tree."""
    changed = 0

    def tighten(path: Path, mode: int) -> None:
        nonlocal changed
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if not path.is_symlink() and path.stat().st_mode & 0o777 & ~mode:
                path.chmod(mode)
                changed += 1

    tighten(root, PRIVATE_DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            tighten(Path(folder, name), PRIVATE_DIR_MODE)
        for name in files:
            tighten(Path(folder, name), PRIVATE_FILE_MODE)
    if changed:
        echo(f"  {what}: {changed} files and folders under {root} tightened to owner only")


def _secret(settings: Settings, name: str, nbytes: int = 24) -> str:
    """A random secret kept in the state folder (mode 0600), never in code or logs."""
    value = stored_secret(settings.home, name, nbytes)
    assert value is not None  # created on demand
    return value


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, without a world-readable window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def service_credentials(settings: Settings) -> dict[str, str]:
    """The secrets Airflow tasks need as clients: the Triton admin key for deploys and
    rollbacks, and the MLflow login that MLflow's client reads from its environment."""
    credentials = mlflow_credentials(settings, create=True)
    assert credentials is not None
    return {
        TRITON_ADMIN_KEY_ENV: triton_admin_key(settings, create=True) or "",
        MLFLOW_USER_ENV: credentials[0],
        MLFLOW_PASSWORD_ENV: credentials[1],
    }


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
        "RECSYS_QUERY_SAMPLE_DIR": str(settings.query_sample_dir),
        "RECSYS_QUERY_SAMPLE_RATE": repr(settings.query_sample_rate),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def airflow_env(settings: Settings, executor: str | None = None) -> dict[str, str]:
    """Airflow configuration for a single-machine deployment on SQLite, loopback only, with
    ``executor`` (default: the stack's, :func:`stack_executor`)."""
    executor = executor or stack_executor(settings)
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "simple_auth_manager_passwords.json"
    if not passwords.exists():
        _write_private(
            passwords, json.dumps({AIRFLOW_USER: _secret(settings, AIRFLOW_PASSWORD_SECRET, 12)})
        )
    api = f"http://127.0.0.1:{settings.airflow_port}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": EXECUTORS[executor],
        # Capped pools + reserved monitoring slots (recsys.scheduling, deploy/airflow/pools.json).
        "AIRFLOW__CORE__PARALLELISM": str(executor_parallelism()),
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
        **service_credentials(settings),
        **(celery_env(settings) if executor == CELERY_EXECUTOR else {}),
    }


def resolve_executor(executor: str | None = None) -> str:
    """``executor``, else ``$RECSYS_AIRFLOW_EXECUTOR``, else ``local``; one of
    :data:`EXECUTORS`."""
    value = (executor or os.environ.get(EXECUTOR_ENV, "").strip() or LOCAL_EXECUTOR).lower()
    if value not in EXECUTORS:
        raise StackError(f"unknown executor {value!r}: choose one of {', '.join(EXECUTORS)}")
    return value


def _executor_file(settings: Settings) -> Path:
    return stack_dir(settings) / "executor"


def stack_executor(settings: Settings) -> str:
    """The executor the stack was started with (recorded by ``up`` until ``down``), else the
    one ``up`` would choose now (:func:`resolve_executor`)."""
    path = _executor_file(settings)
    recorded = path.read_text().strip() if path.exists() else ""
    return recorded if recorded in EXECUTORS else resolve_executor()


def redis_port() -> int:
    """``$RECSYS_REDIS_PORT``, else :data:`DEFAULT_REDIS_PORT`."""
    raw = os.environ.get(REDIS_PORT_ENV, "").strip()
    try:
        port = int(raw) if raw else DEFAULT_REDIS_PORT
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise StackError(f"${REDIS_PORT_ENV}={raw!r} is not a TCP port")
    return port


def redis_url(settings: Settings, db: int) -> str:
    """The stack's Redis, database ``db``, with its password (a secret: never log it)."""
    password = _secret(settings, REDIS_PASSWORD_SECRET)
    return f"redis://:{password}@127.0.0.1:{redis_port()}/{db}"


def celery_results_db(settings: Settings) -> Path:
    """Celery's result backend: a SQLite file of its own (not Airflow's metadata DB)."""
    return stack_dir(settings) / "celery-results.db"


def celery_env(settings: Settings) -> dict[str, str]:
    """CeleryExecutor's configuration: the stack's Redis as broker (db 0), and a SQLite
    database of its own as result backend (Airflow warns against a Redis result backend and
    recommends a database; a file of its own keeps the workers' writes out of ``airflow.db``)."""
    return {
        "AIRFLOW__CELERY__BROKER_URL": redis_url(settings, 0),
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+sqlite:///{celery_results_db(settings)}",
        # Celery's default for Redis, set so Airflow does not warn that it is unset: a task not
        # acknowledged within a day (acks are late) is redelivered, and Airflow ignores the copy.
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": AIRFLOW_DEFAULT_QUEUE,
    }


def redis_config(settings: Settings) -> Path:
    """Write (mode 0600) the config of the stack's Redis and return its path: loopback only,
    the generated password (in the file, never in argv), no persistence (``save ""``, no
    append-only file): a lost queue is re-sent by Airflow's scheduler, not restored."""
    folder = stack_dir(settings) / "redis"
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    path = folder / "redis.conf"
    _write_private(
        path,
        "bind 127.0.0.1\n"
        "protected-mode yes\n"
        f"port {redis_port()}\n"
        f"requirepass {_secret(settings, REDIS_PASSWORD_SECRET)}\n"
        'save ""\n'
        "appendonly no\n"
        f"dir {folder}\n"
        'logfile ""\n'
        "daemonize no\n",
    )
    return path


def redis_alive(settings: Settings) -> bool:
    """The stack's Redis answers PING with its password."""
    import redis

    client = redis.Redis(
        host="127.0.0.1",
        port=redis_port(),
        password=_secret(settings, REDIS_PASSWORD_SECRET),
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def worker_node(queue: str) -> str:
    """The Celery node name of the worker of ``queue`` (``training@<host>``)."""
    return f"{queue}@{socket.gethostname()}"


def worker_alive(settings: Settings, node: str, timeout_s: float = 2.0) -> bool:
    """The Celery worker ``node`` answers a ping sent through the stack's broker."""
    if not redis_alive(settings):  # a ping to a broker that is down would retry for a while
        return False
    from celery import Celery

    app = Celery(broker=redis_url(settings, 0), set_as_current=False)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout_s)
    except Exception:  # broker errors of every transport: not healthy
        return False
    finally:
        app.close()
    return any(node in reply for reply in replies)


def redis_service(settings: Settings, base_env: dict[str, str]) -> Service:
    """The stack's Redis (celery executor only): Celery's broker."""
    command = [shutil.which("redis-server") or "redis-server", str(redis_config(settings))]
    return Service(
        REDIS_SERVICE,
        command,
        base_env,
        None,
        f"redis://127.0.0.1:{redis_port()} (password in {secrets_dir(settings.home)})",
        probe=lambda: redis_alive(settings),
    )


def worker_service_name(queue: str) -> str:
    return f"airflow-worker-{queue}"


def celery_worker_services(settings: Settings, af_env: dict[str, str]) -> list[Service]:
    """One ``airflow celery worker`` per queue, with :func:`recsys.scheduling.worker_concurrency`
    task slots; ``serving``'s also takes Airflow's ``default`` queue. Their log servers would
    bind every interface; the api-server reads the task log files directly, so none starts."""
    workers = []
    for queue, slots in worker_concurrency().items():
        queues = [queue, AIRFLOW_DEFAULT_QUEUE] if queue == SERVING_QUEUE else [queue]
        node = worker_node(queue)
        command = [
            _bin("airflow"), "celery", "worker",
            "--queues", ",".join(queues),
            "--concurrency", str(slots),
            "--celery-hostname", node,
            "--skip-serve-logs",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        workers.append(
            Service(
                worker_service_name(queue),
                command,
                af_env,
                None,
                f"Celery {node}, queues {','.join(queues)}, {slots} slots",
                probe=lambda node=node: worker_alive(settings, node),
                after_servers=True,
            )
        )
    return workers


CELERY_SERVICE_NAMES = (REDIS_SERVICE, *(worker_service_name(q) for q in QUEUES))


def airflow_password(settings: Settings) -> str:
    return _secret(settings, AIRFLOW_PASSWORD_SECRET, 12)


def airflow_password_file(settings: Settings) -> Path:
    """Where the Airflow admin password is kept (mode 0600; generated on first use): what the
    CLI and the demo print, so the password itself never lands in a log someone keeps."""
    airflow_password(settings)
    return secrets_dir(settings.home) / AIRFLOW_PASSWORD_SECRET


def airflow_login_hint(settings: Settings) -> str:
    """``user admin, password in <file>``: how to log in, without the password."""
    return f"user {AIRFLOW_USER}, password in {airflow_password_file(settings)}"


def mlflow_auth_config(settings: Settings) -> Path:
    """Write (mode 0600) the ini of MLflow's basic-auth app and return its path.

    The admin password comes from :func:`recsys.credentials.mlflow_credentials` (environment or
    generated secret), never MLflow's documented default. MLflow reads it only when it creates
    the admin in a fresh auth database (``basic_auth.db`` next to the tracking DB); changing it
    afterwards needs MLflow's update-password API. Everyone else gets no permission by default.
    """
    credentials = mlflow_credentials(settings, create=True)
    assert credentials is not None
    user, password = credentials
    path = settings.home / "mlflow" / "basic_auth.ini"
    auth_db = settings.home / "mlflow" / "basic_auth.db"
    _write_private(
        path,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{auth_db}\n"
        f"admin_username = {user}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return path


def mlflow_service(settings: Settings, base_env: dict[str, str]) -> Service:
    """MLflow tracking + registry server: SQLite backend, artifacts proxied to a local folder,
    every API call authenticated by the ``basic-auth`` app (only ``/health`` is open).

    The secrets reach it through a private ini file and the environment, never its argv."""
    mlflow_home = settings.home / "mlflow"
    mlflow_home.mkdir(parents=True, exist_ok=True)
    command = [
        _bin("mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(settings.mlflow_port),
        "--backend-store-uri", f"sqlite:///{mlflow_home / 'mlflow.db'}",
        "--artifacts-destination", str(mlflow_home / "artifacts"),
        "--workers", "1",
        "--app-name", "basic-auth",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{settings.mlflow_port}"
    env = {
        key: value
        for key, value in base_env.items()
        if not key.startswith("MLFLOW_AUTH_ADMIN_")  # would override the ini's admin
    }
    env.update(
        {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(settings)),
            # Signs the CSRF tokens of the auth app's forms; required by basic-auth.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(settings, "mlflow_flask_secret_key", 32),
        }
    )
    return Service("mlflow", command, env, f"{url}/health", url)


def triton_cache_bytes() -> int:
    """``$RECSYS_TRITON_CACHE_BYTES``: the response cache Triton starts with, serving the
    versions published with ``response_cache`` (the server's default when unset, 0 for none)."""
    from recsys.triton.server import DEFAULT_RESPONSE_CACHE_BYTES

    raw = os.environ.get(TRITON_CACHE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_RESPONSE_CACHE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise StackError(f"${TRITON_CACHE_BYTES_ENV}={raw!r} is not a byte count (0 or more)")
    return value


def services(settings: Settings, executor: str | None = None) -> list[Service]:
    """The stack's services in start order, for ``executor`` (default: the stack's)."""
    from recsys.triton.server import TritonServer

    executor = executor or stack_executor(settings)
    celery = executor == CELERY_EXECUTOR

    base = {**os.environ, **recsys_env(settings)}
    triton = TritonServer(
        settings.triton_repo,
        host=settings.triton_host,
        http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port,
        log_path=stack_dir(settings) / "logs" / "triton.log",
        workdir=stack_dir(settings) / "triton",
        admin_key=triton_admin_key(settings, create=True),
        response_cache_bytes=triton_cache_bytes(),
        # The model samples served queries here for the query_drift DAG.
        query_sample_dir=settings.query_sample_dir,
        query_sample_rate=settings.query_sample_rate,
    )
    af_env = {**base, **airflow_env(settings, executor)}
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
        *([redis_service(settings, base)] if celery else []),
        Service("airflow-api-server", [airflow, "api-server"], af_env, af_health,
                f"http://127.0.0.1:{settings.airflow_port}"),
        # Their log servers would bind every interface; on one machine the api-server reads the
        # task log files directly, so they are not started.
        Service("airflow-scheduler", [airflow, "scheduler", "--skip-serve-logs"], af_env, None,
                after_servers=True),
        Service("airflow-dag-processor", [airflow, "dag-processor"], af_env, None,
                after_servers=True),
        Service("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], af_env, None,
                after_servers=True),
        *(celery_worker_services(settings, af_env) if celery else []),
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


def _service_healthy(service: Service) -> bool:
    return service.probe() if service.probe is not None else _healthy(service.health_url)


def _log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _open_log(path: Path):
    """``path`` opened for appending, created 0600 (with its folder) when it is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE), "ab")


def _airflow_command(settings: Settings, args: list[str], log_name: str, timeout_s: float) -> None:
    """Run ``airflow ARGS`` once with the stack's configuration, output appended to
    ``logs/<log_name>.log``; :class:`StackError` with the log's tail if it fails."""
    env = {**os.environ, **recsys_env(settings), **airflow_env(settings)}
    log_path = stack_dir(settings) / "logs" / f"{log_name}.log"
    with _open_log(log_path) as log:
        result = subprocess.run(
            [_bin("airflow"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            umask=SERVICE_UMASK,  # `db migrate` creates airflow.db
        )
    if result.returncode != 0:
        raise StackError(
            f"airflow {' '.join(args[:2])} failed; see {log_path}:\n{_log_tail(log_path)}"
        )


def migrate_airflow_db(settings: Settings) -> None:
    """Create or upgrade Airflow's SQLite metadata database, then its pools, before its
    services start."""
    _airflow_command(settings, ["db", "migrate"], "airflow-db-migrate", 600)
    import_pools(settings)


def import_pools(settings: Settings) -> None:
    """Create or update the Airflow pools of ``deploy/airflow/pools.json`` (training, monitoring,
    the capped default pool) in the metadata DB. Runs at every ``up``, so a changed file takes
    effect on the next start; without the pools the platform's tasks would never be queued."""
    _airflow_command(settings, ["pools", "import", str(POOLS_FILE)], "airflow-pools", 300)


def spawn(service: Service, log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``service`` detached in its own session, output appended to ``log_path``, with
    umask :data:`SERVICE_UMASK`: its databases, artifacts, logs and the query samples it
    writes (and those of its children: Airflow's task workers, Triton's python backend) are
    its owner's only."""
    with _open_log(log_path) as log:
        return subprocess.Popen(
            service.command,
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            start_new_session=True,
            umask=SERVICE_UMASK,
        )


def wait_healthy(
    service: Service, process: subprocess.Popen, log_path: Path, deadline: float
) -> None:
    """Block until ``service`` answers its health check; fail with its log if it dies or the
    monotonic ``deadline`` passes."""
    while not _service_healthy(service):
        if process.poll() is not None:
            raise StackError(
                f"{service.name} exited with code {process.returncode}; log {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} not healthy in time; log {log_path}")
        time.sleep(0.5)


@contextlib.contextmanager
def running_mlflow_server(home: Path, port: int, timeout_s: float = 120.0) -> Iterator[str]:
    """A throwaway MLflow server (same command as the stack's) for tests and benchmarks;
    yields its URI and stops its whole process tree on exit."""
    import dataclasses

    from recsys.config import load_settings

    settings = dataclasses.replace(load_settings(), home=home, mlflow_port=port)
    service = mlflow_service(settings, dict(os.environ))
    log_path = home / "mlflow.log"
    process = spawn(service, log_path, home)
    try:
        wait_healthy(service, process, log_path, time.monotonic() + timeout_s)
        yield str(service.ui)
    finally:
        _terminate_tree(process.pid, 15)
        process.wait(timeout=5)


def up(
    settings: Settings, timeout_s: float = 180.0, echo=print, executor: str | None = None
) -> list[Service]:
    """Start every service that is not already running and wait until each is healthy.

    Two phases: the servers (Triton, MLflow, Redis with the celery executor, Airflow's
    api-server) start together and are waited for, and only then the scheduler, dag-processor,
    triggerer and Celery workers. The scheduler starts tasks at once, and a task whose worker
    cannot reach the api-server's execution API fails (the first monitor runs of a fresh stack
    did, and each alerted).

    ``executor``: ``local`` or ``celery`` (default ``$RECSYS_AIRFLOW_EXECUTOR``, else
    ``local``). A stack that runs keeps its executor: switching needs ``down`` first."""
    executor = resolve_executor(executor)
    running = stack_executor(settings)
    if running != executor and any(
        _running_pid(settings, service.name) for service in services(settings, running)
    ):
        raise StackError(
            f"the stack runs with the {running} executor; `recsys stack down` before starting "
            f"it with {executor}"
        )
    if executor == CELERY_EXECUTOR and shutil.which("redis-server") is None:
        raise StackError(
            "the celery executor needs a Redis server binary, and `redis-server` is not on PATH: "
            "install it (`apt-get install redis-server`; scripts/setup.sh does) or start the "
            "stack with the default `--executor local`"
        )
    prepare_state_dirs(settings, echo)
    _executor_file(settings).write_text(executor + "\n")
    settings.triton_repo.mkdir(parents=True, exist_ok=True)
    migrate_airflow_db(settings)
    deadline = time.monotonic() + timeout_s
    all_services = services(settings, executor)
    servers = [s for s in all_services if not s.after_servers]
    workers = [s for s in all_services if s.after_servers]
    for phase in (servers, workers):
        started = [_start(settings, service, echo) for service in phase]
        waiting = [entry for entry in started if entry and entry[0].probe is not None]
        if waiting:
            names = ", ".join(service.name for service, _, _ in waiting)
            echo(f"  waiting for {names} to answer (up to {deadline - time.monotonic():.0f}s)")
        for service, process, log_path in filter(None, started):
            wait_healthy(service, process, log_path, deadline)
    return all_services


def _start(
    settings: Settings, service: Service, echo
) -> tuple[Service, subprocess.Popen, Path] | None:
    """Spawn ``service`` unless this launcher's process for it still runs; record its PID."""
    if _running_pid(settings, service.name):
        echo(f"  {service.name}: already running")
        return None
    log_path = stack_dir(settings) / "logs" / f"{service.name}.log"
    process = spawn(service, log_path, settings.home)
    path = _pid_file(settings, service.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": process.pid,
        "create_time": psutil.Process(process.pid).create_time(),
        # The Triton argv holds the admin key; a PID file is no place for it.
        "command": redact_command(service.command),
    }
    path.write_text(json.dumps(record))
    echo(f"  {service.name}: started (pid {process.pid}, log {log_path})")
    return service, process, log_path


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
    """Stop, in reverse start order (the Celery workers before Redis), only the processes this
    launcher started, then forget the stack's executor."""
    celery = stack_executor(settings) == CELERY_EXECUTOR or any(
        _pid_file(settings, name).exists() for name in CELERY_SERVICE_NAMES
    )
    for service in reversed(services(settings, CELERY_EXECUTOR if celery else LOCAL_EXECUTOR)):
        pid = _running_pid(settings, service.name)
        if pid is not None:
            _terminate_tree(pid, timeout_s)
            echo(f"  {service.name}: stopped (pid {pid})")
            if service.name == "triton":
                from recsys.triton.server import cleanup_shared_memory

                cleanup_shared_memory()
        _pid_file(settings, service.name).unlink(missing_ok=True)
    _executor_file(settings).unlink(missing_ok=True)


def status(settings: Settings) -> list[dict[str, object]]:
    """One row per service: running PID (or None), health, and where its UI or API is."""
    rows = []
    for service in services(settings):
        pid = _running_pid(settings, service.name)
        rows.append(
            {
                "service": service.name,
                "pid": pid,
                "healthy": bool(pid) and _service_healthy(service),
                "endpoint": service.ui or "",
            }
        )
    return rows
