"""A small client for Airflow 3's REST API (v2) as used by the demo and operators' scripts.

It authenticates through the auth manager's ``/auth/token`` endpoint, so it works against any
Airflow 3 api-server, not only the embedded one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests

TERMINAL_STATES = {"success", "failed"}
PAGE_LIMIT = 100
"""Rows per page of list endpoints: the api-server's default page is 50 and its maximum 100, so
a DAG with more tasks than one page would silently lose the rest without paging."""


class AirflowApiError(RuntimeError):
    """The api-server refused or failed a request; the message carries its answer."""


def parse_api_time(value: Any) -> datetime | None:
    """An API timestamp (ISO 8601, ``Z`` or offset) as an aware datetime; ``None`` stays None."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class TaskInstance:
    """One task instance of a DAG run as the REST API reports it (the fields progress needs).

    ``map_index`` is -1 for an unmapped task; a mapped task has one instance per index, which
    is why progress keys on ``(task_id, map_index)`` and not on the task id alone.
    """

    task_id: str
    state: str | None
    map_index: int = -1
    try_number: int = 0
    start_date: datetime | None = None
    end_date: datetime | None = None

    @property
    def label(self) -> str:
        """``task_id``, or ``task_id[i]`` for one instance of a mapped task."""
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    @classmethod
    def from_api(cls, row: dict[str, Any]) -> TaskInstance:
        return cls(
            task_id=str(row["task_id"]),
            state=row.get("state"),
            map_index=-1 if row.get("map_index") is None else int(row["map_index"]),
            try_number=int(row.get("try_number") or 0),
            start_date=parse_api_time(row.get("start_date")),
            end_date=parse_api_time(row.get("end_date")),
        )


def format_elapsed(seconds: float | None) -> str:
    """``12m05s`` style (``?`` when unknown): short enough to align task lines in a column."""
    if seconds is None:
        return "?"
    hours, rest = divmod(max(round(seconds), 0), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def task_progress_line(task: TaskInstance, elapsed_s: float | None) -> str:
    """One line for a finished task: time since the run started, name, final state."""
    return f"  [{format_elapsed(elapsed_s):>8}] {task.label:<32} {task.state}"


class AirflowClient:
    def __init__(
        self, base_url: str, username: str, password: str, timeout_s: float = 30.0
    ) -> None:
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        # The embedded stack's SQLite metadata DB answers a concurrent write with "database is
        # locked", which the api-server returns as 500 "Database error". Calls that are safe to
        # repeat (reads, pause/unpause, clears) try again a few times; a trigger (POST) never
        # does, so a run is never started twice. The last answer is what the caller sees.
        retry = Retry(
            total=4,
            connect=0,
            read=0,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "PATCH", "PUT", "DELETE"}),
            backoff_factor=0.5,
            raise_on_status=False,
        )
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))
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
        return self.run(dag_id, run_id)["state"]

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout_s: float = 1800.0, poll_s: float = 5.0
    ) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.run_state(dag_id, run_id)) not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise AirflowApiError(f"{dag_id} run {run_id} still {state} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return state

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """The DAG run as the API returns it (``state``, ``start_date``, ``queued_at``, ...)."""
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstance]:
        """Every task instance of the run, all pages of the API's answer."""
        path = f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        rows: list[dict[str, Any]] = []
        while True:
            data = self._call("GET", path, params={"limit": PAGE_LIMIT, "offset": len(rows)})
            page = data.get("task_instances", [])
            rows += page
            if not page or len(rows) >= int(data.get("total_entries", len(rows))):
                return [TaskInstance.from_api(row) for row in rows]

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        """One task instance as the API reports it, every field (``scheduled_when``,
        ``queued_when``, ``start_date``, ``end_date``, ``pool``, ``try_number``, ...)."""
        run = quote(run_id, safe="")
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}")

    def pool(self, name: str) -> dict[str, Any]:
        """A pool's slots and how many are running, queued, scheduled, deferred and open."""
        return self._call("GET", f"/pools/{quote(name, safe='')}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``{task_id: state}`` (a mapped task shows the state of its last instance)."""
        return {ti.task_id: ti.state for ti in self.task_instances(dag_id, run_id)}

    def ui_run_url(self, dag_id: str, run_id: str) -> str:
        """Where a person watches the run in the Airflow 3 UI: its grid and task states.

        The UI's route is ``/dags/:dagId/runs/:runId`` (Airflow's own
        ``build_airflow_dagrun_url``); run ids hold ``:`` and ``+``, so they are quoted.
        """
        return f"{self.base_url}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"

    def runs(self, dag_id: str, limit: int = 20) -> list[dict[str, Any]]:
        data = self._call(
            "GET", f"/dags/{dag_id}/dagRuns", params={"limit": limit, "order_by": "-run_after"}
        )
        return data.get("dag_runs", [])
