"""The embedded stack: Triton, MLflow and Airflow's four services start on loopback, answer
their health checks and the Airflow login, and `down` stops exactly what `up` started."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import psutil
import pytest
import requests

from tests.stack_testing import LOCAL_SERVICES, apply_environment, isolated_stack_environment


@pytest.fixture
def stack_settings(monkeypatch, tmp_path):
    from recsys.config import load_settings

    apply_environment(isolated_stack_environment(tmp_path), monkeypatch)
    return load_settings()


def _non_loopback_listeners(pids: set[int]) -> set[str]:
    """Addresses the given processes listen on that are reachable from outside the machine."""
    exposed = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            address = ipaddress.ip_address(conn.laddr.ip)
            mapped = getattr(address, "ipv4_mapped", None)
            if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
                exposed.add(f"{conn.laddr.ip}:{conn.laddr.port}")
    return exposed


def test_stack_up_status_login_and_down(stack_settings):
    from recsys import stack
    from recsys.airflow_client import AirflowClient

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stack.up(stack_settings, echo=lambda _: None)
        rows = {row["service"]: row for row in stack.status(stack_settings)}
        assert set(rows) == LOCAL_SERVICES
        assert all(row["healthy"] for row in rows.values()), rows

        pids = set()
        for row in rows.values():
            root = psutil.Process(row["pid"])
            pids |= {root.pid, *(child.pid for child in root.children(recursive=True))}
        assert _non_loopback_listeners(pids) == set()

        airflow = AirflowClient(
            f"http://127.0.0.1:{stack_settings.airflow_port}",
            stack.AIRFLOW_USER,
            stack.airflow_password(stack_settings),
        )
        assert airflow.wait_for_dag("search_model_pipeline", timeout_s=120)["dag_id"]
        unauthenticated = requests.get(
            f"http://127.0.0.1:{stack_settings.airflow_port}/api/v2/dags", timeout=10
        )
        assert unauthenticated.status_code == 401
        assert (
            requests.get(f"http://127.0.0.1:{stack_settings.mlflow_port}/health", timeout=5).text
            == "OK"
        )

        # A PID file whose process is not the one started (recycled PID) is never signalled.
        pid_file = stack.stack_dir(stack_settings) / "pids" / "airflow-triggerer.json"
        real = json.loads(pid_file.read_text())
        pid_file.write_text(json.dumps({**real, "pid": bystander.pid}))
        assert stack.status(stack_settings)[-1]["pid"] is None
        pid_file.write_text(json.dumps(real))

        stack.down(stack_settings, echo=lambda _: None)
        assert all(row["pid"] is None for row in stack.status(stack_settings))
        assert not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
        )
        assert bystander.poll() is None
    finally:
        stack.down(stack_settings, echo=lambda _: None)
        bystander.kill()
