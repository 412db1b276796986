"""A small client for Airflow 3's REST API (v2) as used by the demo and operators' scripts.

It authenticates through the auth manager's ``/auth/token`` endpoint, so it works against any
Airflow 3 api-server, not only the embedded one.
"""

from __future__ import annotations

import time
from typing import Any

import requests

TERMINAL_STATES = {"success", "failed"}


class AirflowApiError(RuntimeError):
    """The api-server refused or failed a request; the message carries its answer."""


class AirflowClient:
    def __init__(
        self, base_url: str, username: str, password: str, timeout_s: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        response = self._session.post(
            f"{self.base_url}/auth/token",
            json={"username": username, "password": password},
            timeout=timeout_s,
        )
        if response.status_code >= 300:
            raise AirflowApiError(
                f"login to {self.base_url} failed: {response.status_code} {response.text}"
            )
        self._session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._session.request(
            method, f"{self.base_url}/api/v2{path}", timeout=self.timeout_s, **kwargs
        )
        if response.status_code >= 300:
            raise AirflowApiError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else {}

    def wait_for_dag(self, dag_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id`` (fresh stacks need a moment)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._call("GET", f"/dags/{dag_id}")
            except AirflowApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self._call(
            "POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}}
        )
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout_s: float = 1800.0, poll_s: float = 5.0
    ) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.run_state(dag_id, run_id)) not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise AirflowApiError(f"{dag_id} run {run_id} still {state} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return state

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        data = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in data.get("task_instances", [])}

    def runs(self, dag_id: str, limit: int = 20) -> list[dict[str, Any]]:
        data = self._call(
            "GET", f"/dags/{dag_id}/dagRuns", params={"limit": limit, "order_by": "-run_after"}
        )
        return data.get("dag_runs", [])
