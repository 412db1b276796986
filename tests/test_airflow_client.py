"""The Airflow REST client against a server that fails the way the embedded stack's api-server
does under SQLite contention: a 500 "Database error" on the first try of a write."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from recsys.airflow_client import AirflowApiError, AirflowClient

LOCKED = {"detail": {"reason": "Database error", "message": "database is locked"}}


class _FlakyApi(BaseHTTPRequestHandler):
    """Answers every API call 500 the first ``fail_first`` times per (method, path), then 200;
    counts the calls it saw."""

    calls: ClassVar[dict[tuple[str, str], int]] = {}
    fail_first: ClassVar[int] = 1

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/auth/token":
            self._send(201, {"access_token": "t"})
            return
        key = (self.command, self.path)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.fail_first:
            self._send(500, LOCKED)
        else:
            self._send(200, {"dag_id": "d", "is_paused": True, "dag_run_id": "r"})

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def flaky_api() -> Iterator[str]:
    _FlakyApi.calls = {}
    _FlakyApi.fail_first = 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_locked_database_on_a_repeatable_call_is_tried_again(flaky_api: str) -> None:
    client = AirflowClient(flaky_api, "admin", "pw")
    client.set_paused("d", True)  # PATCH: 500 once, then 200
    assert _FlakyApi.calls[("PATCH", "/api/v2/dags/d")] == 2


def test_a_trigger_is_never_sent_twice(flaky_api: str) -> None:
    client = AirflowClient(flaky_api, "admin", "pw")
    with pytest.raises(AirflowApiError, match=r"500.*Database error"):
        client.trigger("d")
    assert _FlakyApi.calls[("POST", "/api/v2/dags/d/dagRuns")] == 1


def test_a_lasting_error_is_reported_with_the_servers_answer(flaky_api: str) -> None:
    _FlakyApi.fail_first = 100
    client = AirflowClient(flaky_api, "admin", "pw")
    with pytest.raises(AirflowApiError, match=r"PATCH /dags/d: 500 .*database is locked"):
        client.set_paused("d", True)
    assert _FlakyApi.calls[("PATCH", "/api/v2/dags/d")] == 5  # the first try and 4 retries
