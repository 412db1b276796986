"""Fault injection against the real components: a slow version, a Triton crash, MLflow down
during a rollback, a half-written version folder, a garbage metrics endpoint, a registry whose
database fails or that refuses a login, and a version that keeps draining after a rollback.

Each test ends with the service answering from a good version, a clear error where something
could not be done, and nothing lost: the registry, the monitor state and the audit log say what
really happened. No mocks; faults are made by the model's own ``fault_injection``, by killing
real server processes, by a real local HTTP server serving garbage, by breaking the MLflow
server's database or logging in as a user with fewer rights (see tests/test_registry_errors.py).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from recsys import registry
from recsys.audit import read_records
from recsys.cli import main
from recsys.config import Settings, load_settings
from recsys.deploy import deploy_model, register_model
from recsys.families.search.client import search
from recsys.monitoring.config import load_thresholds
from recsys.monitoring.metrics import MetricsUnavailableError
from recsys.monitoring.policy import MonitorState, Thresholds, check_once
from recsys.registry import RegistryRequestError
from recsys.rollback import (
    ROLLBACK_COMPLETED,
    ROLLBACK_PENDING,
    DeployFailedError,
    RollbackError,
    RollbackRegistryPendingError,
    complete_pending_rollback,
    pending_rollbacks,
    rollback,
)
from recsys.triton.control import TritonControl, VersionsNotRetiredError
from recsys.triton.repository import COMPLETE_MARKER, IncompleteArtifactsError
from tests.test_registry_errors import create_mlflow_user, failing_registry_db, log_in_as
from tests.triton_testing import TritonHarness, free_port, settled_value

QUERY = "angle bracket"


@dataclass
class Env:
    """A platform for one test with handles on the processes a test may kill."""

    settings: Settings
    triton: TritonHarness
    control: TritonControl

    def register(self, artifacts_dir: Path) -> int:
        run_id = registry.start_training_run(
            self.settings.mlflow_tracking_uri, "fault-tests", "t", {"epochs": 1}, {}
        )
        lineage = {"data_hash": "h"}
        return register_model(self.settings, run_id, str(artifacts_dir), lineage)["version"]

    def deploy(self, artifacts_dir: Path) -> int:
        version = self.register(artifacts_dir)
        deploy_model(self.settings, version, str(artifacts_dir), {"query": QUERY, "top_k": 5})
        return version

    def aliases(self) -> tuple[int | None, int | None]:
        uri, model = self.settings.mlflow_tracking_uri, self.settings.model_name
        return (
            registry.alias_version(uri, model, registry.CHAMPION),
            registry.alias_version(uri, model, registry.PREVIOUS),
        )

    def actions(self) -> list[str]:
        return [r["action"] for r in read_records(self.settings.audit_log)]


@pytest.fixture
def env(platform_and_triton) -> Env:
    """Like ``platform``, but keeps the Triton harness so a test can kill the server."""
    settings, triton = platform_and_triton
    return Env(settings=settings, triton=triton, control=TritonControl(settings.triton_grpc_url))


@pytest.fixture
def artifacts(search_artifacts):
    return search_artifacts


class PrivateMlflow:
    """An ``mlflow server`` of this test only (the session's is shared), so it can be stopped
    and started again on the same port and database."""

    def __init__(self, home: Path) -> None:
        from recsys.stack import mlflow_service

        self.home = home
        self.settings = dataclasses.replace(load_settings(), home=home, mlflow_port=free_port())
        self.service = mlflow_service(self.settings, dict(os.environ))
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return self.service.ui

    def start(self) -> None:
        from recsys.stack import spawn, wait_healthy

        log_path = self.home / "mlflow.log"
        self.process = spawn(self.service, log_path, self.home)
        wait_healthy(self.service, self.process, log_path, time.monotonic() + 120)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)  # gunicorn/uvicorn workers share the group
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def private_mlflow(tmp_path) -> Iterator[PrivateMlflow]:
    server = PrivateMlflow(tmp_path / "mlflow")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _traffic(control: TritonControl, model: str, n: int) -> int:
    """Send ``n`` queries; return how many failed."""
    failures = 0
    for i in range(n):
        try:
            search(control, model, f"{QUERY} {i}", top_k=3)
        except Exception:
            failures += 1
    return failures


def _state_bytes(settings: Settings) -> bytes | None:
    path = settings.monitor_state
    return path.read_bytes() if path.exists() else None


# --------------------------------------------------------------------------------- (a)


def test_slow_version_breaches_latency_threshold_and_is_rolled_back(env, artifacts, tmp_path):
    """A version that answers its smoke query and then sleeps 300 ms per request breaches the
    per-model p99 limit from the config file and is rolled back; v1 answers fast again."""
    model = env.settings.model_name
    v1 = env.deploy(artifacts("good"))
    healthy = search(env.control, model, QUERY, top_k=5)
    v2 = env.deploy(artifacts("slow", {"mode": "sleep", "sleep_ms": 300, "after_requests": 1}))
    config = tmp_path / "monitor.yaml"
    config.write_text(
        "defaults: {min_requests: 5, max_error_rate: 0.05}\n"
        f"models:\n  {model}: {{max_mean_latency_ms: 5000, max_p99_latency_ms: 200}}\n"
    )
    thresholds = load_thresholds(model, config)
    assert thresholds.max_p99_latency_ms == 200 and thresholds.max_mean_latency_ms == 5000

    url = env.settings.triton_metrics_url
    # The deploy stored a baseline, so this first check already judges the (quiet) window since.
    quiet = check_once(url, model, env.settings.monitor_state, thresholds)
    assert not quiet.should_rollback and quiet.stats is not None and quiet.stats.requests == 0
    assert _traffic(env.control, model, 8) == 0  # slow, not failing
    verdict = check_once(url, model, env.settings.monitor_state, thresholds)

    assert verdict.should_rollback, verdict.reasons
    assert any("p99 latency" in reason for reason in verdict.reasons), verdict.reasons
    assert verdict.success_rate == 1.0 and verdict.p99_latency_ms > 200
    record = rollback(
        env.settings, "; ".join(verdict.reasons), verdict.to_dict(), smoke_request={"query": QUERY}
    )

    assert (record["from_version"], record["to_version"]) == (v2, v1)
    assert env.control.loaded_versions(model) == [v1]
    # v1 answers as before; that it is fast again is the monitor's judgement below, not a
    # wall-clock assertion that a loaded CI machine could break.
    assert search(env.control, model, QUERY, top_k=5) == healthy
    assert env.aliases() == (v1, None)
    assert env.actions() == ["deploy", "deploy", "rollback"]
    # The rollback stored a fresh baseline: the very next check judges the restored v1.
    assert _traffic(env.control, model, 6) == 0
    after = check_once(url, model, env.settings.monitor_state, thresholds)
    assert after.stats is not None and not after.breached, after.reasons
    assert after.consecutive == 0


# --------------------------------------------------------------------------------- (b)


def test_triton_killed_mid_run_stops_the_monitor_without_a_rollback(env, artifacts):
    """SIGKILL of the whole Triton process group between two checks: the check fails with
    MetricsUnavailableError naming the endpoint, the monitor state, the registry and the audit
    log are untouched, and after a restart the champion is redeployed from its sealed folder."""
    model = env.settings.model_name
    uri = env.settings.mlflow_tracking_uri
    v1 = env.deploy(artifacts("v1"))
    v2 = env.deploy(artifacts("v2"))
    url = env.settings.triton_metrics_url
    check_once(url, model, env.settings.monitor_state)  # baseline
    assert _traffic(env.control, model, 3) == 0
    state_before = _state_bytes(env.settings)

    server = env.triton.server
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()  # reap it and clean its shared memory, as a supervisor would

    with pytest.raises(MetricsUnavailableError, match=f"{url} is unreachable"):
        check_once(url, model, env.settings.monitor_state)
    assert _state_bytes(env.settings) == state_before
    assert env.aliases() == (v2, v1)
    assert registry.TAG_ROLLED_BACK not in MlflowClient(uri).get_model_version(model, str(v2)).tags
    assert env.actions() == ["deploy", "deploy"]

    server.start(timeout_s=60)
    deploy_model(
        env.settings, v2, None, {"query": QUERY, "top_k": 5}
    )  # the champion, from its immutable folder
    assert env.control.loaded_versions(model) == [v2]
    assert len(search(env.control, model, QUERY, top_k=5)) == 5
    assert env.aliases() == (v2, v1)


# --------------------------------------------------------------------------------- (c)


def test_mlflow_down_during_rollback_switches_serving_first_and_leaves_update_pending(
    env, artifacts, private_mlflow, monkeypatch, capsys, dagbag, webhook
):
    """MLflow stops after v2 (raises under traffic) became champion. The monitor DAG's
    rollback still puts v1 back into Triton (versions planned from Triton and the audit log),
    then fails with a RegistryUnavailableError that says the registry update is pending; the
    audit log records the switch, and the incident pages once (the rollback's own alert; the
    failed task's callback records it as already alerted). ``recsys rollback
    --complete-pending`` says MLflow is still down (exit 3) and keeps it pending; once MLflow
    is back, it replays the update and the registry agrees."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_mlflow.uri)
    env.settings = dataclasses.replace(env.settings, mlflow_tracking_uri=private_mlflow.uri)
    model = env.settings.model_name
    v1 = env.deploy(artifacts("v1"))
    healthy = search(env.control, model, QUERY, top_k=5)
    v2 = env.deploy(artifacts("v2", {"mode": "raise", "after_requests": 1}))
    assert _traffic(env.control, model, 6) == 6

    private_mlflow.stop()
    monitor = dagbag.get_dag("triton_monitor")
    run = monitor.test(
        run_conf={"check_interval_s": 1, "watch_minutes": 2, "smoke_request": {"query": QUERY}}
    )
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {"watch_metrics": "success", "rollback": "failed"}, states
    received = [webhook.next(), *webhook.all()]
    assert len(received) == 1, received
    assert "registry update is PENDING" in received[0]["title"]
    assert [r["action"] for r in read_records(env.settings.alerts_log)] == [
        "alert",
        "alert_suppressed",
    ]

    assert env.control.loaded_versions(model) == [v1]
    assert search(env.control, model, QUERY, top_k=5) == healthy
    last = read_records(env.settings.audit_log)[-1]
    assert last["action"] == ROLLBACK_PENDING
    assert last["serving_switched"] is True and last["registry_updated"] is False
    assert (last["from_version"], last["to_version"], last["planned_from"]) == (
        v2,
        v1,
        "audit log",
    )
    assert "unreachable" in last["registry_error"]
    assert [r["to_version"] for r in pending_rollbacks(env.settings)] == [v1]

    assert main(["rollback", "--complete-pending"]) == 3  # MLflow is still down
    assert "unreachable" in capsys.readouterr().err
    assert [r["to_version"] for r in pending_rollbacks(env.settings)] == [v1]

    private_mlflow.start()
    assert env.aliases() == (v2, v1)  # the registry is behind what serves...
    assert main(["rollback", "--complete-pending"]) == 0
    assert f"registry updated for the rollback from v{v2} to v{v1}" in capsys.readouterr().out
    assert env.aliases() == (v1, None)  # ...until the pending update is replayed
    tags = MlflowClient(private_mlflow.uri).get_model_version(model, str(v2)).tags
    assert tags[registry.TAG_ROLLED_BACK] == "true"
    assert pending_rollbacks(env.settings) == []
    assert env.actions()[-1] == ROLLBACK_COMPLETED
    assert main(["rollback", "--complete-pending"]) == 0  # nothing left: a no-op
    assert "no rollback has a pending registry update" in capsys.readouterr().out
    assert env.actions()[-1] == ROLLBACK_COMPLETED


# --------------------------------------------------------------------------------- (d)


def test_half_written_version_is_refused_and_the_current_version_keeps_serving(env, artifacts):
    """v1's folder loses its COMPLETE marker (a copy interrupted half-way): the rollback refuses
    to hand it to Triton, v2 keeps serving, the registry still says v2 and the failure is in
    the audit log. Resealing v1 by republishing it makes the same rollback succeed."""
    model = env.settings.model_name
    good = artifacts("v1")
    v1 = env.deploy(good)
    v2 = env.deploy(artifacts("v2"))
    folder = env.settings.triton_repo / model / str(v1)
    (folder / COMPLETE_MARKER).unlink()

    with pytest.raises(RollbackError, match=f"v{v2} keeps serving") as failure:
        rollback(env.settings, "error rate 1.0 > 0.05", smoke_request={"query": QUERY})
    assert isinstance(failure.value.__cause__, IncompleteArtifactsError)
    assert COMPLETE_MARKER in str(failure.value)
    assert env.control.loaded_versions(model) == [v2]
    assert len(search(env.control, model, QUERY, top_k=5)) == 5
    assert env.aliases() == (v2, v1)
    assert env.actions() == ["deploy", "deploy", "rollback_failed"]

    import shutil

    from recsys.triton.repository import publish_version

    shutil.rmtree(folder)
    publish_version(env.settings.triton_repo, model, v1, good)
    rollback(env.settings, "error rate 1.0 > 0.05", smoke_request={"query": QUERY})
    assert env.control.loaded_versions(model) == [v1]
    assert env.aliases() == (v1, None)


# --------------------------------------------------------------------------------- (e)


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>502 Bad Gateway</body></html>\n\x00\xff{not prometheus"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_garbage_metrics_endpoint_is_unavailable_and_changes_nothing(env, artifacts):
    """A proxy answering 200 with an HTML page instead of Triton's metrics must not read as "no
    traffic": the check raises MetricsUnavailableError naming the URL and what came back, the
    stored baseline and breach count stay as they were, and v1 keeps serving."""
    model = env.settings.model_name
    v1 = env.deploy(artifacts("v1"))
    check_once(env.settings.triton_metrics_url, model, env.settings.monitor_state)
    before = MonitorState.load(env.settings.monitor_state)
    state_bytes = _state_bytes(env.settings)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with pytest.raises(MetricsUnavailableError, match=r"unparseable|no Triton") as failure:
            check_once(url, model, env.settings.monitor_state, Thresholds(min_requests=1))
        assert url in str(failure.value) and "Bad Gateway" in str(failure.value)
    finally:
        server.shutdown()
        server.server_close()
    assert _state_bytes(env.settings) == state_bytes
    assert MonitorState.load(env.settings.monitor_state) == before
    assert env.control.loaded_versions(model) == [v1]
    assert len(search(env.control, model, QUERY, top_k=5)) == 5
    assert env.aliases() == (v1, None)
    assert env.actions() == ["deploy"]
    json.dumps(before.to_dict())  # still a valid record


# --------------------------------------------------------------------------------- (f)


def test_failing_registry_database_blocks_deploys_and_rollback_plans_from_triton(
    env, artifacts, private_mlflow, monkeypatch, capsys
):
    """MLflow answers its health check but its database fails every registry read (503). A
    deploy fails before it touches Triton (nothing unloaded, nothing loaded); the rollback of
    the broken v2 does not stop at "no champion": it plans from Triton and the audit log,
    switches to v1, and leaves the registry update pending, saying MLflow failed (with its
    error), not that it is unreachable. Once the database is back the update is replayed."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_mlflow.uri)
    env.settings = dataclasses.replace(env.settings, mlflow_tracking_uri=private_mlflow.uri)
    model = env.settings.model_name
    v1 = env.deploy(artifacts("v1"))
    v2 = env.deploy(artifacts("v2", {"mode": "raise", "after_requests": 1}))
    v3_dir = artifacts("v3")
    v3 = env.register(v3_dir)
    assert _traffic(env.control, model, 3) == 3

    with failing_registry_db(private_mlflow.home / "mlflow" / "mlflow.db", monkeypatch):
        with pytest.raises(RegistryRequestError, match="503"):
            deploy_model(env.settings, v3, str(v3_dir), {"query": QUERY, "top_k": 5})
        assert env.control.loaded_versions(model) == [v2]
        assert not (env.settings.triton_repo / model / str(v3)).exists()
        assert env.actions() == ["deploy", "deploy"]

        with pytest.raises(
            RollbackRegistryPendingError, match="MLflow failed reading the registry"
        ) as failure:
            rollback(
                env.settings,
                "error rate 100% > 5%",
                {"failures": 3},
                smoke_request={"query": QUERY},
            )
        assert "503" in str(failure.value) and "unreachable" not in str(failure.value)
        assert env.control.loaded_versions(model) == [v1]
        last = read_records(env.settings.audit_log)[-1]
        assert last["action"] == ROLLBACK_PENDING and last["planned_from"] == "audit log"
        assert (last["from_version"], last["to_version"]) == (v2, v1)
        assert "failed reading" in last["registry_failure"] and "503" in last["registry_error"]

        assert main(["rollback", "--complete-pending"]) == 3  # the database still fails
        assert "RegistryRequestError" in capsys.readouterr().err
        assert [r["to_version"] for r in pending_rollbacks(env.settings)] == [v1]

    assert env.aliases() == (v2, v1)
    assert main(["rollback", "--complete-pending"]) == 0
    assert env.aliases() == (v1, None)
    assert env.actions()[-1] == ROLLBACK_COMPLETED


# --------------------------------------------------------------------------------- (g)


def test_refused_registry_update_stays_pending_and_a_failed_deploy_restores_what_triton_serves(
    env, artifacts, monkeypatch
):
    """An operator whose MLflow login may read the model but not change it rolls back by hand:
    Triton switches to v1, the registry update is PENDING because MLflow refused it (its
    PERMISSION_DENIED and the login named, not "unreachable"), and no message claims a breach.
    The registry now lags (champion v2) while v1 serves; a broken v3 then fails to deploy and
    the deploy restores v1, what Triton served, not the alias's v2."""
    model, uri = env.settings.model_name, env.settings.mlflow_tracking_uri
    admin = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    v1 = env.deploy(artifacts("v1"))
    v2 = env.deploy(artifacts("v2"))
    v3_dir = artifacts("v3", {"mode": "raise", "after_requests": 0})
    v3 = env.register(v3_dir)
    reader = create_mlflow_user(uri, {model: "READ"})
    log_in_as(monkeypatch, reader)

    with pytest.raises(
        RollbackRegistryPendingError, match="MLflow refused the registry update"
    ) as failure:
        rollback(env.settings, "manual rollback (recsys rollback)", smoke_request={"query": QUERY})
    message = str(failure.value)
    assert "PERMISSION_DENIED" in message and reader[0] in message
    assert "unreachable" not in message and "breach" not in message
    assert read_records(env.settings.alerts_log)[-1]["title"] == message
    last = read_records(env.settings.audit_log)[-1]
    assert env.control.loaded_versions(model) == [v1]
    assert last["action"] == ROLLBACK_PENDING and last["planned_from"] == "registry"
    assert (last["from_version"], last["to_version"]) == (v2, v1)
    assert "refused" in last["registry_failure"]
    assert env.aliases() == (v2, v1)  # the reader may read: the registry lags what serves

    with pytest.raises(DeployFailedError, match="injected fault") as failed:
        deploy_model(env.settings, v3, str(v3_dir), {"query": QUERY, "top_k": 5})
    assert f"restored v{v1} (v{v1} served before the attempt)" in str(failed.value)
    assert f"Triton serves v{v1} of {model} now" in str(failed.value)
    assert env.control.loaded_versions(model) == [v1]
    failed_record, restored_record = read_records(env.settings.audit_log)[-2:]
    assert failed_record["action"] == "deploy_failed" and failed_record["version"] == v3
    assert failed_record["served_before"] == [v1] and failed_record["restoring"] == v1
    assert restored_record["action"] == "deploy_restored"
    assert restored_record["restored"] == v1 and restored_record["serving_now"] == [v1]

    log_in_as(monkeypatch, admin)
    assert [r["to_version"] for r in complete_pending_rollback(env.settings)] == [v1]
    assert env.aliases() == (v1, None)


# --------------------------------------------------------------------------------- (h)


def _pending(metrics_url: str, model: str, version: int) -> float:
    """Triton's gauge of requests queued on one version (waiting, not yet executing)."""
    import requests

    text = requests.get(metrics_url, timeout=5).text
    for labels, value in re.findall(
        r"^nv_inference_pending_request_count\{([^}]*)\}\s+(\S+)$", text, re.MULTILINE
    ):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == model and found.get("version") == str(version):
            return float(value)
    return 0.0


def _successes(control: TritonControl, model: str, version: int) -> int:
    """Requests one version answered successfully, from Triton's own statistics."""
    stats = control.inference_statistics(model, version)
    return sum(
        int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))
        for entry in stats.get("model_stats", [])
    )


def _wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_version_still_draining_after_a_rollback_is_named_while_v1_serves(
    env, artifacts, monkeypatch
):
    """A rollback from a version whose requests take 6 s, with requests in flight. Triton makes
    v1 READY and v2 UNLOADING at once (v2 finishes what it accepted). Past the retire timeout the
    rollback does not carry on silently: it completes (v1 smoke-tested, registry and audit log
    updated, alert sent) and raises VersionsNotRetiredError naming v2 (UNLOADING) and saying v1
    serves. New requests go to v1 meanwhile, every in-flight request completes, then v2 leaves."""
    model = env.settings.model_name
    v1 = env.deploy(artifacts("v1"))
    v2 = env.deploy(artifacts("slow", {"mode": "sleep", "sleep_ms": 6000, "after_requests": 1}))
    url = env.settings.triton_metrics_url
    results: list[str] = []

    def query(i: int) -> None:
        try:
            search(TritonControl(env.settings.triton_grpc_url), model, f"{QUERY} {i}", top_k=3)
            results.append("ok")
        except Exception as exc:
            results.append(repr(exc))

    # One request running on v2 and at least one queued behind it: v2 is busy for >= 6 s more.
    threads: list[threading.Thread] = []
    while not _wait_for(lambda: _pending(url, model, v2) >= 1, 0.3):
        assert len(threads) < 10, "no request ever queued on the slow version"
        threads.append(threading.Thread(target=query, args=(len(threads),), daemon=True))
        threads[-1].start()

    monkeypatch.setenv("RECSYS_TRITON_RETIRE_TIMEOUT_S", "0.5")
    with pytest.raises(VersionsNotRetiredError) as leftover:
        rollback(env.settings, "p99 latency 6000 ms > 200 ms", smoke_request={"query": QUERY})
    error = leftover.value
    assert (error.version, error.still_loaded) == (v1, {v2: "UNLOADING"})
    text = str(error)
    assert f"{model} v{v1} is READY" in text and f"v{v2} (UNLOADING) still loaded" in text
    assert f"rolled back from v{v2}: v{v1} passed its smoke query" in text
    assert env.control.loaded_versions(model) == [v1]
    record = read_records(env.settings.audit_log)[-1]
    assert record["action"] == "rollback" and record["registry_updated"] is True
    assert record["not_retired"] == {str(v2): "UNLOADING"}
    assert env.aliases() == (v1, None)
    alert = read_records(env.settings.alerts_log)[-1]
    assert (
        alert["title"]
        == f"{model} rolled back from v{v2} to v{v1}; still loaded: v{v2} (UNLOADING)"
    )

    before = _successes(env.control, model, v1)
    assert len(search(env.control, model, QUERY, top_k=5)) == 5  # no version asked for
    assert settled_value(lambda: _successes(env.control, model, v1), before + 1) == before + 1

    for thread in threads:
        thread.join(timeout=120)
    assert results == ["ok"] * len(threads)  # nothing v2 had accepted was lost
    assert _wait_for(lambda: env.control.version_states(model).get(v2) == "UNAVAILABLE", 60)
