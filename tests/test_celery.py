"""The embedded stack with ``--executor celery``: tasks go to the worker of their queue.

`recsys stack up --executor celery` starts the stack's own Redis (the broker) and one
``airflow celery worker`` per queue. A task on ``training`` holds the training worker's slots'
attention (it runs until the test releases it); a task on ``monitoring`` triggered meanwhile must
run on the monitoring worker and finish while training is still busy. Celery's own view through
the broker (``inspect active``), the task's process tree and the workers' logs say which worker
ran what; the REST API says which queue. ``down`` must leave no worker and no Redis behind.

The stack parses only ``tests/fixtures/celery_dags`` (Airflow's dag bundle list, from the
environment): nothing else competes for the cores. It needs the real ``redis-server`` binary,
which ``scripts/setup.sh`` installs; without it the test fails, it does not skip.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.stack_testing import (
    LOCAL_SERVICES,
    apply_environment,
    isolated_stack_environment,
    wait_for,
)
from tests.triton_testing import free_port

pytestmark = pytest.mark.celery

DAGS = Path(__file__).resolve().parent / "fixtures" / "celery_dags"
HOLD, PROBE = "celery_training_hold", "celery_monitoring_probe"
CELERY_SERVICES = {
    "redis",
    "airflow-worker-training",
    "airflow-worker-serving",
    "airflow-worker-monitoring",
}


@pytest.fixture
def celery_stack(monkeypatch, tmp_path: Path) -> Iterator[Any]:
    """The embedded stack as `recsys stack up --executor celery` starts it, on free ports and a
    fresh state folder, parsing only the test's DAGs; stopped afterwards (again)."""
    from recsys import stack
    from recsys.config import load_settings

    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: the celery executor needs the real binary "
            "(scripts/setup.sh installs it: apt-get install redis-server)"
        )
    env = isolated_stack_environment(tmp_path)
    bundle = {
        "name": "celery-routing",
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(DAGS)},
    }
    env.update(
        {
            "RECSYS_REDIS_PORT": str(free_port()),
            "RECSYS_AIRFLOW_EXECUTOR": None,
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps([bundle]),
        }
    )
    apply_environment(env, monkeypatch)
    settings = load_settings()
    try:
        stack.up(settings, timeout_s=300, echo=print, executor="celery")
        yield settings
    finally:
        stack.down(settings, echo=print)


def _active_on_workers(settings) -> dict[str, str]:
    """``{worker node: what it is executing now}`` (JSON text), asked through the broker."""
    from celery import Celery

    from recsys import stack

    app = Celery(broker=stack.redis_url(settings, 0), set_as_current=False)
    try:
        replies = app.control.inspect(timeout=3).active() or {}
    finally:
        app.close()
    return {node: json.dumps(tasks) for node, tasks in replies.items()}


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_a_monitoring_task_runs_on_its_own_worker_while_training_is_busy(celery_stack, tmp_path):
    from recsys import stack
    from recsys.airflow_client import AirflowClient
    from recsys.scheduling import MONITORING_QUEUE, SERVING_QUEUE, TRAINING_QUEUE

    settings = celery_stack
    started = time.monotonic()
    rows = {row["service"]: row for row in stack.status(settings)}
    assert set(rows) == LOCAL_SERVICES | CELERY_SERVICES
    assert all(row["healthy"] for row in rows.values()), rows
    assert (stack.stack_dir(settings) / "executor").read_text().strip() == "celery"

    # Redis listens on loopback only, and answers nobody without the generated password.
    redis_pid = rows["redis"]["pid"]
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.pid == redis_pid and c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", stack.redis_port())}, listening
    with socket.create_connection(("127.0.0.1", stack.redis_port()), timeout=5) as conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(100).startswith(b"-NOAUTH"), "Redis answered without a password"
    config = stack.stack_dir(settings) / "redis" / "redis.conf"
    assert config.stat().st_mode & 0o777 == 0o600
    assert all("requirepass" not in arg for arg in psutil.Process(redis_pid).cmdline())

    airflow = AirflowClient(
        f"http://127.0.0.1:{settings.airflow_port}",
        stack.AIRFLOW_USER,
        stack.airflow_password(settings),
    )
    airflow.wait_for_dag(HOLD, timeout_s=180)
    airflow.wait_for_dag(PROBE, timeout_s=180)
    nodes = {queue: stack.worker_node(queue) for queue in (TRAINING_QUEUE, MONITORING_QUEUE)}
    worker_pids = {
        queue: stack._running_pid(settings, stack.worker_service_name(queue))
        for queue in (TRAINING_QUEUE, SERVING_QUEUE, MONITORING_QUEUE)
    }

    # A training task that runs until the test releases it.
    release = tmp_path / "release-training"
    hold_run = airflow.trigger(HOLD, {"release_file": str(release), "timeout_s": 240})

    def hold_running() -> dict[str, Any] | None:
        ti = airflow.task_instance(HOLD, hold_run, "hold")
        assert ti["state"] not in ("failed", "upstream_failed"), ti
        return ti if ti["state"] == "running" and ti["pid"] else None

    hold_ti = wait_for("the training task running", hold_running, timeout_s=180)
    assert hold_ti["queue"] == TRAINING_QUEUE
    # Celery's view through the broker: the training worker executes it, no other worker does.
    active = _active_on_workers(settings)
    assert hold_ti["id"] in active[nodes[TRAINING_QUEUE]], active
    assert not any(hold_ti["id"] in text for node, text in active.items() if "training" not in node)
    # The task's process is one of the training worker's.
    assert hold_ti["pid"] in {p.pid for p in _tree(worker_pids[TRAINING_QUEUE])}

    # A monitoring task meanwhile: done on the monitoring worker while training still runs.
    probe_run = airflow.trigger(PROBE)

    def probe_done() -> str | None:
        state = airflow.run_state(PROBE, probe_run)
        return state if state in ("success", "failed") else None

    assert wait_for("the monitoring task", probe_done, timeout_s=120) == "success"
    probe_ti = airflow.task_instance(PROBE, probe_run, "probe")
    assert probe_ti["state"] == "success" and probe_ti["queue"] == MONITORING_QUEUE, probe_ti
    assert not release.exists()
    assert airflow.task_instance(HOLD, hold_run, "hold")["state"] == "running"
    assert hold_ti["id"] in _active_on_workers(settings)[nodes[TRAINING_QUEUE]]

    # Each worker's log names the task instances it executed, and only those.
    logs = {
        queue: (
            stack.stack_dir(settings) / "logs" / f"{stack.worker_service_name(queue)}.log"
        ).read_text(errors="replace")
        for queue in worker_pids
    }
    ran = {queue: {ti for ti in (hold_ti["id"], probe_ti["id"]) if ti in log}
           for queue, log in logs.items()}  # fmt: skip
    assert ran == {
        TRAINING_QUEUE: {hold_ti["id"]},
        SERVING_QUEUE: set(),
        MONITORING_QUEUE: {probe_ti["id"]},
    }, ran

    # Released, the training task finishes on its worker.
    release.touch()

    def hold_done() -> str | None:
        state = airflow.run_state(HOLD, hold_run)
        return state if state in ("success", "failed") else None

    assert wait_for("the training task", hold_done, timeout_s=120) == "success"
    hold_ti = airflow.task_instance(HOLD, hold_run, "hold")
    assert hold_ti["state"] == "success" and hold_ti["queue"] == TRAINING_QUEUE
    print(f"routing checks took {time.monotonic() - started:.0f}s")

    # `down` leaves no worker (nor a task of one) and no Redis.
    processes = [p for pid in (*worker_pids.values(), redis_pid) for p in _tree(pid)]
    stack.down(settings, echo=print)
    _gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, alive
    assert all(row["pid"] is None for row in stack.status(settings))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.redis_port()), timeout=2).close()
    assert not (stack.stack_dir(settings) / "executor").exists()
