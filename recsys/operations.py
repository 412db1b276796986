"""Operator actions behind the ``recsys`` command: deploy a registered version, trigger and
follow a training run, and gather a status report.

They live here rather than in the CLI so that scripts, notebooks and tests call the same code
the command runs, and so the CLI stays a thin layer of argument parsing and printing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import Settings, check_model_name, check_version_number

log = logging.getLogger(__name__)

PIPELINE_DAG = "search_model_pipeline"
# Airflow task states after which a task will not run again in this dag run.
FINISHED_TASK_STATES = {"success", "failed", "skipped", "upstream_failed", "removed"}


class VersionNotRegisteredError(ValueError):
    """The requested version does not exist in the registry (bad input, not an outage: a
    ValueError, so the CLI exits 2; a registry that fails or refuses the lookup raises
    :class:`~recsys.registry.RegistryUnavailableError` instead, exit 3)."""


class TrainingRunFailedError(RuntimeError):
    """A pipeline run ended in a state other than success; the message names the failed task."""


# -- deploy -----------------------------------------------------------------------------------


def registered_run_id(settings: Settings, version: int) -> str:
    """The MLflow run that produced ``version``.

    Raises :class:`VersionNotRegisteredError` only when MLflow says the version (or the model)
    does not exist; any other registry failure (server error, refused login, dropped
    connection) raises :class:`~recsys.registry.RegistryUnavailableError` naming it, because
    "not registered" would send the operator hunting for a typo during an outage."""
    from mlflow.exceptions import MlflowException

    from recsys import registry

    uri = settings.mlflow_tracking_uri
    mlflow_client = registry.client(uri)
    try:
        model_version = mlflow_client.get_model_version(settings.model_name, str(int(version)))
    except MlflowException as exc:
        if not registry.is_not_found(exc):
            what = f"looking up {settings.model_name} version {version}"
            raise registry.request_error(exc, uri, what) from exc
        raise VersionNotRegisteredError(
            f"{settings.model_name} version {version} is not registered in "
            f"{settings.mlflow_tracking_uri}"
        ) from exc
    if not model_version.run_id:
        raise VersionNotRegisteredError(
            f"{settings.model_name} version {version} has no MLflow run to rebuild it from"
        )
    return model_version.run_id


def download_serving_artifacts(settings: Settings, version: int, dst: Path) -> Path:
    """Fetch the ``serving/`` folder that registration logged with ``version``'s run.

    Registration logs the complete Triton version folder next to the ONNX model precisely so
    that a lost or deleted version directory can be rebuilt from the registry alone.
    """
    from mlflow.artifacts import download_artifacts

    run_id = registered_run_id(settings, version)
    local = download_artifacts(
        run_id=run_id,
        artifact_path="serving",
        dst_path=str(dst),
        tracking_uri=settings.mlflow_tracking_uri,
    )
    return Path(local)


def version_dir(settings: Settings, version: int) -> Path:
    """``<triton_repo>/<model>/<version>``; the name and version are checked first, so the path
    stays in the repository whoever calls this."""
    model = check_model_name(settings.model_name)
    return settings.triton_repo / model / str(check_version_number(version))


def deploy_registered_version(
    settings: Settings,
    version: int,
    *,
    smoke_request: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve an already-registered ``version`` and make it ``champion``.

    ``smoke_request`` overrides the smoke question the version's export recorded (its family
    says what it looks like). ``serving`` overrides the platform's serving knobs
    (``instance_count``, ``max_batch_size``, ``dynamic_batching``, ``max_queue_delay_us``,
    ``intra_op_threads``; see :func:`recsys.deploy.deploy_model`): they are pinned when the
    version is published, so they apply to a version rebuilt from MLflow, and a version whose
    folder exists with other knobs is refused (``ValueError``). Both paths go through
    :func:`recsys.deploy.deploy_model` (load, smoke test, promote, audit; what Triton served
    before is restored on failure). A version whose Triton directory is missing is first
    rebuilt from its run's ``serving/`` artifacts; one whose directory exists is loaded in
    place. The result says which.
    """
    from recsys.deploy import deploy_model

    settings.serving_knobs(serving)  # bad knobs are bad input before anything is asked
    return _serve_registered(
        settings,
        version,
        lambda artifacts: deploy_model(settings, version, artifacts, smoke_request, serving),
    )


def _serve_registered(
    settings: Settings, version: int, serve: Callable[[str | None], dict[str, Any]]
) -> dict[str, Any]:
    """``serve(artifacts_dir)`` for a registered ``version``: ``None`` when its version folder
    is in the repository (loaded in place), else the serving artifacts rebuilt from its run's
    ``serving/`` in MLflow (a temporary folder, removed afterwards). Adds ``rebuilt``."""
    version_dir(settings, version)  # a bad name or version is bad input before anything is asked
    registered_run_id(settings, version)  # fail as bad input before touching Triton
    if version_dir(settings, version).exists():
        return {**serve(None), "rebuilt": False}
    with tempfile.TemporaryDirectory(prefix=f"recsys-rebuild-{version}-") as tmp:
        artifacts = download_serving_artifacts(settings, version, Path(tmp))
        log.info("rebuilding %s v%d from %s", settings.model_name, version, artifacts)
        result = serve(str(artifacts))
    return {**result, "rebuilt": True}


# -- training runs ----------------------------------------------------------------------------


def build_train_conf(
    *,
    data_path: str | Path | None = None,
    base_model: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """The ``conf`` of a ``search_model_pipeline`` run: only what the user set, so the DAG's
    param defaults apply to the rest. Paths are made absolute because Airflow's workers run in
    another directory; bad values fail here (ValueError) instead of as a rejected trigger."""
    conf: dict[str, Any] = {}
    if data_path is not None:
        path = Path(data_path).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"training data {data_path} does not exist")
        conf["data_path"] = str(path)
    if base_model is not None:
        if not base_model.strip():
            raise ValueError("--base-model must not be empty")
        conf["base_model"] = base_model
    for name, value, minimum in (
        ("epochs", epochs, 1),
        ("max_steps", max_steps, 0),
        ("max_rows", max_rows, 0),
    ):
        if value is None:
            continue
        if int(value) < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
        conf[name] = int(value)
    return conf


def airflow_client(settings: Settings):
    """An authenticated client for the local stack's api-server (the demo's credentials)."""
    import requests

    from recsys import stack
    from recsys.airflow_client import AirflowClient

    url = f"http://127.0.0.1:{settings.airflow_port}"
    try:
        return AirflowClient(url, stack.AIRFLOW_USER, stack.airflow_password(settings))
    except requests.ConnectionError as exc:
        raise ConnectionError(
            f"Airflow api-server at {url} is unreachable; start the stack with `recsys stack up`"
        ) from exc


def trigger_training(
    client: Any, conf: dict[str, Any], *, unpause: bool = False, dag_id: str = PIPELINE_DAG
) -> tuple[str, bool]:
    """Trigger one pipeline run; return its id and whether the DAG is (still) paused.

    Unpausing is opt-in: an unpaused DAG also starts its scheduled runs, which an operator who
    only wanted one run may not expect."""
    dag = client.wait_for_dag(dag_id, timeout_s=60)
    paused = bool(dag.get("is_paused"))
    if paused and unpause:
        client.set_paused(dag_id, False)
        paused = False
    return client.trigger(dag_id, conf), paused


@dataclass
class RunOutcome:
    run_id: str
    state: str
    tasks: dict[str, str] = field(default_factory=dict)

    @property
    def failed_tasks(self) -> list[str]:
        """Tasks that failed themselves (not those skipped because an upstream task failed)."""
        return sorted(t for t, s in self.tasks.items() if s == "failed")

    @property
    def not_run_tasks(self) -> list[str]:
        return sorted(t for t, s in self.tasks.items() if s == "upstream_failed")


def follow_run(
    client: Any,
    run_id: str,
    *,
    dag_id: str = PIPELINE_DAG,
    poll_s: float = 5.0,
    timeout_s: float = 6 * 3600.0,
    on_progress: Callable[[int, int, dict[str, str]], None] | None = None,
    on_task_finished: Callable[[Any, float | None], None] | None = None,
) -> RunOutcome:
    """Poll a run until it ends, reporting ``(finished tasks, all tasks, states)`` each poll;
    raise :class:`TrainingRunFailedError` naming the failed task(s) unless it succeeded.

    ``on_task_finished(task, elapsed_s)`` is called once per task instance
    (:class:`~recsys.airflow_client.TaskInstance`) when it reaches a final state, in the order
    the tasks ended, with the seconds from the run's start to the task's end: a pipeline run
    takes many minutes, and a person watching wants to see it move, not one verdict at the
    end. A finished task without an end date (Airflow sets one even on tasks that never ran,
    but the API allows none) is timed when this poll saw it, on this machine's clock."""
    from datetime import UTC, datetime

    from recsys.airflow_client import TERMINAL_STATES, AirflowApiError, parse_api_time

    deadline = time.monotonic() + timeout_s
    reported: set[tuple[str, int]] = set()
    while True:
        run = client.run(dag_id, run_id)
        state = run["state"]
        instances = client.task_instances(dag_id, run_id)
        tasks = {ti.task_id: ti.state for ti in instances}
        if on_progress is not None:
            done = sum(1 for s in tasks.values() if s in FINISHED_TASK_STATES)
            on_progress(done, len(tasks), tasks)
        if on_task_finished is not None:
            started = parse_api_time(run.get("start_date") or run.get("queued_at"))
            now = datetime.now(UTC)
            new = [
                ti
                for ti in instances
                if ti.state in FINISHED_TASK_STATES and (ti.task_id, ti.map_index) not in reported
            ]
            for ti in sorted(new, key=lambda t: (t.end_date or now, t.task_id, t.map_index)):
                reported.add((ti.task_id, ti.map_index))
                ended = ti.end_date or now
                on_task_finished(ti, (ended - started).total_seconds() if started else None)
        if state in TERMINAL_STATES:
            break
        if time.monotonic() > deadline:
            raise AirflowApiError(f"{dag_id} run {run_id} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
    outcome = RunOutcome(run_id=run_id, state=state, tasks=tasks)
    if state != "success":
        failed = ", ".join(outcome.failed_tasks) or "unknown task"
        skipped = f" (not run: {', '.join(outcome.not_run_tasks)})" if outcome.not_run_tasks else ""
        raise TrainingRunFailedError(
            f"{dag_id} run {run_id} {state} at task {failed}{skipped}; "
            "see the task log in the Airflow UI"
        )
    return outcome


# -- status -----------------------------------------------------------------------------------


@dataclass
class StatusReport:
    """Each section holds its data or, when its service is down, ``error`` says why."""

    services: list[dict[str, Any]] = field(default_factory=list)
    services_error: str | None = None
    triton_versions: list[int] | None = None
    triton_error: str | None = None
    aliases: dict[str, int | None] | None = None
    registry_error: str | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    audit_error: str | None = None
    rollout: str | None = None
    """The rollout under way (canary, experiment, shadow) in one line; ``None`` when none."""
    rollout_error: str | None = None

    @property
    def healthy(self) -> bool:
        """Triton and MLflow answered (the stack's own services are optional: either may run
        elsewhere)."""
        return self.triton_error is None and self.registry_error is None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


def platform_status(settings: Settings, audit_records: int = 3) -> StatusReport:
    """Ask every part of the platform what it holds; never raises for a service that is down."""
    from recsys import registry
    from recsys.audit import read_records
    from recsys.triton.control import TritonControl

    report = StatusReport()
    try:
        from recsys import stack

        report.services = [row for row in stack.status(settings) if row["pid"]]
    except Exception as exc:  # the launcher's view is optional; keep reporting the rest
        report.services_error = _one_line(exc)

    try:
        with TritonControl(settings.triton_grpc_url, timeout_s=5.0) as control:
            if not control.is_live():
                raise ConnectionError(f"Triton at {settings.triton_grpc_url} is unreachable")
            report.triton_versions = control.loaded_versions(settings.model_name)
    except Exception as exc:
        report.triton_error = _one_line(exc)

    try:
        uri = settings.mlflow_tracking_uri
        registry.ensure_reachable(uri)
        report.aliases = {
            alias: registry.alias_version(uri, settings.model_name, alias)
            for alias in (registry.CHAMPION, registry.PREVIOUS)
        }
    except Exception as exc:
        report.registry_error = _one_line(exc)

    try:
        from recsys.delivery.rollout import active_rollout

        routing = active_rollout(settings)
        if routing is not None:
            share = (
                f"{routing.shadow_share:.0%} mirrored"
                if routing.mode == "shadow"
                else f"{routing.candidate_weight:.0%} of routed traffic"
            )
            report.rollout = (
                f"{routing.mode} of v{routing.candidate} against v{routing.stable}, {share} "
                f"({routing.rollout_id})"
            )
    except Exception as exc:
        report.rollout_error = _one_line(exc)

    try:
        report.audit = read_records(settings.audit_log, settings.model_name)[-audit_records:]
    except OSError as exc:
        report.audit_error = _one_line(exc)
    return report


def start_registered_rollout(settings: Settings, version: int, **options: Any) -> dict[str, Any]:
    """:func:`recsys.delivery.rollout.start_rollout` for an already-registered ``version``,
    rebuilding its version folder from MLflow first when the repository lacks it (as
    :func:`deploy_registered_version` does); ``options`` are ``start_rollout``'s."""
    from recsys.delivery.rollout import start_rollout

    return _serve_registered(
        settings, version, lambda artifacts: start_rollout(settings, version, artifacts, **options)
    )
