"""Several Triton replicas: deploys and rollbacks switch every replica or none, and the monitor
judges each replica and the whole. Two real Triton servers on different ports share one model
repository, as replicas behind a load balancer share a volume."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys import registry
from recsys.audit import read_records
from recsys.config import load_settings
from recsys.deploy import deploy_model
from recsys.families.search.client import SearchError, search
from recsys.monitoring.policy import MonitorState, Thresholds, check_once, metrics_targets
from recsys.rollback import DeployFailedError, RollbackError, rollback
from recsys.triton.control import TritonControl
from recsys.triton.replicas import (
    ReplicaDiscoveryError,
    ReplicaSpecError,
    TritonReplica,
    parse_replicas,
    resolve_entries,
)
from recsys.triton.server import TritonServer, cleanup_shared_memory
from tests.stack_testing import wait_for
from tests.triton_testing import free_port, register_version, settled_value

SMOKE = {"query": "angle bracket", "top_k": 5}
QUERIES = ["angle bracket", "deck screws", "wood glue", "paint roller", "door hinge"]

# -- the replica list --------------------------------------------------------------------------


def test_a_replica_list_names_hosts_ports_and_dns_names() -> None:
    entries = parse_replicas("a=10.0.0.5:8001:8002, b=triton-1:9001:9002,dns+localhost:8001:8002")
    assert [(e.name, e.host, e.grpc_port, e.metrics_port, e.dns) for e in entries] == [
        ("a", "10.0.0.5", 8001, 8002, False),
        ("b", "triton-1", 9001, 9002, False),
        (None, "localhost", 8001, 8002, True),
    ]
    replicas = resolve_entries(entries)
    assert replicas[:2] == [
        TritonReplica("a", "10.0.0.5", 8001, 8002),
        TritonReplica("b", "triton-1", 9001, 9002),
    ]
    # localhost resolves to at least one loopback address, each its own replica
    resolved = replicas[2:]
    assert resolved and all(r.name.startswith("localhost/") for r in resolved)
    assert {r.host for r in resolved} <= {"127.0.0.1", "::1"}
    assert resolved[0].metrics_url.endswith(":8002/metrics")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("a=host:8001", "not [name=]host:grpc_port:metrics_port"),
        ("a=host:0:8002", "gRPC port must be 1-65535"),
        ("a=host:8001:x", "metrics port must be 1-65535"),
        ("bad name=host:8001:8002", "replica name"),
        ("a=ho$t:8001:8002", "is not a host name"),
        ("a=h1:8001:8002,a=h2:8001:8002", "same name twice"),
        ("a=h1:8001:8002,b=h1:8001:8002", "same endpoint twice"),
        (" , ", "lists no replica"),
    ],
)
def test_a_malformed_replica_list_is_refused_naming_the_entry(spec: str, says: str) -> None:
    with pytest.raises(ReplicaSpecError, match=re.escape(says)):
        parse_replicas(spec)


def test_settings_refuse_a_bad_list_at_start_and_resolve_dns_on_use(monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_TRITON_REPLICAS", "a=h1:8001")
    with pytest.raises(ValueError, match="RECSYS_TRITON_REPLICAS entry 'a=h1:8001'"):
        load_settings()
    monkeypatch.setenv("RECSYS_TRITON_REPLICAS", "dns+no-such-replica.invalid:8001:8002")
    settings = load_settings()  # parsing succeeds; the name is looked up when used
    with pytest.raises(ReplicaDiscoveryError, match=re.escape("no-such-replica.invalid")):
        settings.triton_replicas()
    monkeypatch.delenv("RECSYS_TRITON_REPLICAS")
    monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", "18001")
    single = load_settings()
    assert not single.has_replicas
    assert [r.grpc_url for r in single.triton_replicas()] == [single.triton_grpc_url]
    assert metrics_targets(single) == single.triton_metrics_url


# -- two real replicas -------------------------------------------------------------------------


class Replicas:
    """Two real Triton servers ``a`` and ``b`` sharing one repository, and the platform's
    settings pointed at them (clients call ``a``, as they would call a load balancer)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.repo = root / "repo"
        self.repo.mkdir(parents=True)
        self.servers: dict[str, TritonServer] = {}

    def start(self, name: str, **environment: str) -> TritonServer:
        """Start replica ``name`` (again, after a stop), with extra server ``environment``."""
        from recsys.credentials import triton_admin_key

        old = self.servers.get(name)
        ports = (
            (old.http_port, old.grpc_port, old.metrics_port)
            if old
            else (free_port(), free_port(), free_port())
        )
        server = TritonServer(
            self.repo,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            log_path=self.root / name / "triton.log",
            workdir=self.root / name / "server",
            admin_key=triton_admin_key(load_settings(), create=True),
        )
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # the server (and its python stubs) inherit it
        try:
            server.start(timeout_s=90)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.servers[name] = server
        return server

    def kill(self, name: str) -> None:
        """SIGKILL replica ``name``'s whole process group, as a machine or OOM kill would."""
        server = self.servers[name]
        process = server._process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        server._process = None
        cleanup_shared_memory(server.shm_prefix)

    def configure(self) -> Any:
        """Point the platform at both replicas; returns fresh settings."""
        a, b = self.servers["a"], self.servers["b"]
        self.monkeypatch.setenv(
            "RECSYS_TRITON_REPLICAS",
            f"a=127.0.0.1:{a.grpc_port}:{a.metrics_port},b=127.0.0.1:{b.grpc_port}:{b.metrics_port}",
        )
        self.monkeypatch.setenv("RECSYS_TRITON_HTTP_PORT", str(a.http_port))
        self.monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(a.grpc_port))
        self.monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(a.metrics_port))
        return load_settings()

    def control(self, name: str) -> TritonControl:
        return TritonControl(f"127.0.0.1:{self.servers[name].grpc_port}", timeout_s=30)

    def serving(self, model: str) -> dict[str, list[int]]:
        result = {}
        for name in self.servers:
            with self.control(name) as control:
                result[name] = control.loaded_versions(model)
        return result

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def replicas(monkeypatch, tmp_path, mlflow_server) -> Iterator[Replicas]:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_TRITON_REPO", str(tmp_path / "triton" / "repo"))
    monkeypatch.setenv("RECSYS_MODEL_NAME", f"product_search_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("RECSYS_TRITON_INSTANCES", "1")  # one instance: per-replica counts exact
    monkeypatch.delenv("RECSYS_ALERT_WEBHOOK", raising=False)
    monkeypatch.delenv("RECSYS_MONITOR_CONFIG", raising=False)
    fleet = Replicas(tmp_path / "triton", monkeypatch)
    try:
        fleet.start("a")
        fleet.start("b")
        yield fleet
    finally:
        fleet.stop()


def actions(settings: Any) -> list[tuple[str, str | None]]:
    return [
        (r["action"], r.get("replica") or r.get("failed_replica"))
        for r in read_records(settings.audit_log, settings.model_name)
    ]


def test_a_deploy_switches_every_replica_before_the_alias_moves(replicas, search_artifacts):
    settings = replicas.configure()
    model = settings.model_name
    good = search_artifacts("good")
    v1 = register_version(settings, good)
    result = deploy_model(settings, v1, str(good), SMOKE)
    assert result["replicas"] == ["a", "b"]
    assert replicas.serving(model) == {"a": [v1], "b": [v1]}
    v2 = register_version(settings, good)
    deploy_model(settings, v2, str(good), SMOKE)
    assert replicas.serving(model) == {"a": [v2], "b": [v2]}
    for name in ("a", "b"):  # both answer the same query the same way
        with replicas.control(name) as control:
            assert search(control, model, "angle bracket", 5)
    assert registry.alias_version(settings.mlflow_tracking_uri, model, "champion") == v2
    deploys = [r for r in read_records(settings.audit_log, model) if r["action"] == "deploy"]
    assert [r["replicas"] for r in deploys] == [["a", "b"], ["a", "b"]]
    # The monitor baselined every replica at the switch
    state = MonitorState.load(settings.monitor_state)
    assert {f"{model}@a", f"{model}@b"} <= set(state.snapshots)


def test_a_replica_that_fails_to_load_sends_the_others_back(replicas, search_artifacts):
    settings = replicas.configure()
    model = settings.model_name
    good = search_artifacts("good")
    v1 = register_version(settings, good)
    deploy_model(settings, v1, str(good), SMOKE)
    # Replica b comes back from a restart on a host whose ONNX Runtime lacks the CUDA provider
    # it is told to use: every load there fails, while a is fine.
    replicas.servers["b"].stop()
    replicas.start("b", RECSYS_ORT_DEVICE="cuda")
    v2 = register_version(settings, good)
    with pytest.raises(DeployFailedError) as failure:
        deploy_model(settings, v2, str(good), SMOKE)
    message = str(failure.value)
    assert f"v{v2} failed on replica b" in message
    assert "CUDA" in message or "cuda" in message
    assert f"replica a back on v{v1}" in message
    # a switched to v2, then went back; b serves nothing (it served nothing before)
    assert replicas.serving(model) == {"a": [v1], "b": []}
    assert registry.alias_version(settings.mlflow_tracking_uri, model, "champion") == v1
    assert actions(settings)[-2:] == [("deploy_failed", "b"), ("replica_reverted", "a")]
    reverted = read_records(settings.audit_log, model)[-1]
    assert reverted["restored"] == [v1] and reverted["serving_now"] == [v1]
    with replicas.control("a") as control:
        assert search(control, model, "deck screws", 3, version=v1)


def test_a_replica_killed_during_rollback_fails_it_cleanly(replicas, search_artifacts):
    settings = replicas.configure()
    model = settings.model_name
    good = search_artifacts("good")
    v1 = register_version(settings, good)
    deploy_model(settings, v1, str(good), SMOKE)
    v2 = register_version(settings, good)
    deploy_model(settings, v2, str(good), SMOKE)
    assert replicas.serving(model) == {"a": [v2], "b": [v2]}

    # Kill b the moment a serves v1 again: the rollback is then past a and on its way to b.
    killed = threading.Event()

    def kill_b_once_a_switched() -> None:
        with replicas.control("a") as control:
            wait_for(
                f"replica a to serve v{v1}",
                lambda: control.loaded_versions(model) == [v1],
                timeout_s=120,
                poll_s=0.02,
            )
        replicas.kill("b")
        killed.set()

    killer = threading.Thread(target=kill_b_once_a_switched, daemon=True)
    killer.start()
    with pytest.raises(RollbackError) as failure:
        rollback(settings, "test: breach", {"error_rate": 1.0}, smoke_request=SMOKE)
    killer.join(timeout=60)
    assert killed.is_set()
    message = str(failure.value)
    assert f"from v{v2} to v{v1} failed on replica b" in message
    assert f"replica a back on v{v2}" in message
    assert "replica b could NOT be reverted" in message
    with replicas.control("a") as control:  # a went back: the fleet agrees with the registry
        assert control.loaded_versions(model) == [v2]
    assert registry.alias_version(settings.mlflow_tracking_uri, model, "champion") == v2
    records = read_records(settings.audit_log, model)
    failed = next(r for r in records if r["action"] == "rollback_failed")
    assert failed["failed_replica"] == "b" and failed["replicas"] == ["a", "b"]
    assert failed["reverted_replicas"] == ["a"]
    # newest switch first: b (down, reported), then a
    assert [(r["action"], r["replica"]) for r in records if "replica_rev" in r["action"]] == [
        ("replica_revert_failed", "b"),
        ("replica_reverted", "a"),
    ]


def _traffic(replicas: Replicas, name: str, model: str, count: int) -> int:
    """``count`` queries to replica ``name``; returns how many failed."""
    failed = 0
    with replicas.control(name) as control:
        for i in range(count):
            try:
                search(control, model, QUERIES[i % len(QUERIES)], 5)
            except SearchError:
                failed += 1
    return failed


def _settled(replicas: Replicas, model: str, expected: dict[str, float]) -> None:
    """Wait until each replica's metrics count ``expected`` requests of ``model``: Triton
    records a request's statistics just after answering it."""
    from recsys.monitoring.metrics import scrape

    def requests(name: str) -> float:
        snapshot = scrape(f"http://127.0.0.1:{replicas.servers[name].metrics_port}/metrics")
        return sum(c.success + c.failure for (m, _), c in snapshot.models.items() if m == model)

    seen = {name: settled_value(lambda n=name: requests(n), count, timeout_s=15)
            for name, count in expected.items()}  # fmt: skip
    assert seen == expected


def _watch(settings: Any, **options: Any) -> Any:
    """The monitor's metrics watch over every replica, as the monitor DAG defers it."""
    from recsys.monitoring.trigger import MetricsWatchTrigger
    from recsys.triton.replicas import format_entries

    return MetricsWatchTrigger(
        settings.triton_metrics_url,
        settings.model_name,
        str(settings.monitor_state),
        Thresholds(max_error_rate=0.05, min_requests=5).to_dict(),
        watch_until=time.time() + 600,
        audit_log=str(settings.audit_log),
        alerts_log=str(settings.alerts_log),
        dag_id="triton_monitor",
        replicas=format_entries(settings.triton_replica_entries),
        **options,
    )


def test_the_monitor_names_a_single_bad_replica_and_rolls_back_a_bad_version(
    replicas, search_artifacts
):
    settings = replicas.configure()
    model = settings.model_name
    # Every instance of this version raises once it has answered 20 requests (one instance per
    # replica): a replica that gets more traffic fails first, as a sick host would.
    faulty = search_artifacts("faulty", fault={"mode": "raise", "after_requests": 20})
    version = register_version(settings, faulty)
    deploy_model(settings, version, str(faulty), SMOKE)  # one smoke request on each replica
    trigger = _watch(settings)
    assert _traffic(replicas, "a", model, 10) == 0  # a: 11 answered, healthy
    assert _traffic(replicas, "b", model, 30) == 11  # b: 19 more answered, then 11 failures
    _settled(replicas, model, {"a": 11, "b": 31})
    assert trigger.step() is None  # the whole (11 of 41 failed) breaches, but only b does
    verdict = MonitorState.load(settings.monitor_state).last_verdicts[model]
    assert verdict["bad_replica"] == "b" and not verdict["should_rollback"]
    assert verdict["replicas"]["b"]["breached"] and not verdict["replicas"]["a"]["breached"]
    assert "no rollback" in " ".join(verdict["reasons"])
    alerts = [line for line in settings.alerts_log.read_text().splitlines() if "replica" in line]
    assert len(alerts) == 1 and "replica b is unhealthy" in alerts[0] and model in alerts[0]
    assert ("replica_unhealthy", "b") in actions(settings)
    # b keeps failing: still one alert for the one sick replica
    assert _traffic(replicas, "b", model, 6) == 6
    assert _traffic(replicas, "a", model, 5) == 0
    _settled(replicas, model, {"a": 16, "b": 37})
    assert trigger.step() is None
    alerts = [line for line in settings.alerts_log.read_text().splitlines() if "replica" in line]
    assert len(alerts) == 1
    # Now a fails too: the version is bad everywhere, and the whole calls for a rollback.
    assert _traffic(replicas, "a", model, 10) == 6
    assert _traffic(replicas, "b", model, 5) == 5
    _settled(replicas, model, {"a": 26, "b": 42})
    result = trigger.step()
    assert result is not None and result["should_rollback"]
    assert result["bad_replica"] is None
    assert "breaching replicas: a, b" in " ".join(result["reasons"])


def test_a_replica_whose_metrics_are_unreadable_is_left_out_and_named(replicas, search_artifacts):
    settings = replicas.configure()
    model = settings.model_name
    good = search_artifacts("good")
    deploy_model(settings, register_version(settings, good), str(good), SMOKE)
    targets = metrics_targets(settings)
    assert set(targets) == {"a", "b"}
    thresholds = Thresholds(min_requests=5)
    check_once(targets, model, settings.monitor_state, thresholds)  # baselines
    replicas.kill("b")
    _traffic(replicas, "a", model, 8)
    _settled(replicas, model, {"a": 9})
    first = check_once(targets, model, settings.monitor_state, thresholds, replica_grace_s=3600)
    assert first.judged and not first.breached  # judged on a alone
    assert first.replicas["b"]["unreadable"] and first.replica_events == []  # within grace
    later = check_once(targets, model, settings.monitor_state, thresholds, replica_grace_s=0)
    assert [(e["kind"], e["replica"]) for e in later.replica_events] == [("replica_blind", "b")]
    again = check_once(targets, model, settings.monitor_state, thresholds, replica_grace_s=0)
    assert again.replica_events == []  # one outage, one event


def _b_restarted_after_a_deploy(replicas: Replicas, search_artifacts: Any) -> tuple[Any, int]:
    """v1 deployed on both replicas, then b restarted: explicit model control starts it with
    nothing loaded. Returns the settings and v1."""
    settings = replicas.configure()
    good = search_artifacts("good")
    v1 = register_version(settings, good)
    deploy_model(settings, v1, str(good), SMOKE)
    replicas.servers["b"].stop()
    replicas.start("b")
    return settings, v1


def test_a_replica_that_restarted_empty_is_brought_to_the_champion(
    replicas, search_artifacts, capsys
):
    from recsys.cli import main

    settings, v1 = _b_restarted_after_a_deploy(replicas, search_artifacts)
    model = settings.model_name
    # The watch notices at its next check and ends, so that the next watch loads it there
    watch = _watch(settings)
    ended = watch.step()
    assert ended is not None and not ended["should_rollback"]
    assert f"replica(s) b serve no version of {model}" in ended["watch"]["ended_because"]
    assert ended["empty_replicas"] == ["b"]
    # ... unless syncing b already failed when this watch started (alerted then): no loop
    assert _watch(settings, unsyncable=["b"]).step() is None
    assert main(["replicas", "status"]) == 0
    out = capsys.readouterr().out
    assert f"a {' ' * 23}v{v1}" in out and f"b {' ' * 23}nothing loaded" in out
    assert main(["replicas", "sync"]) == 0
    out = capsys.readouterr().out
    assert "b                        synced (served [])" in out
    assert "a                        in_sync" in out
    assert replicas.serving(model) == {"a": [v1], "b": [v1]}
    synced = read_records(settings.audit_log, model)[-1]
    assert synced["action"] == "replica_synced" and synced["replica"] == "b"
    assert synced["version"] == v1 and synced["was"] == []
    with replicas.control("b") as control:
        assert search(control, model, "wood glue", 3, version=v1)
    # b down: status says so with exit 3; sync leaves it to the monitor and syncs nothing
    replicas.kill("b")
    assert main(["replicas", "status"]) == 3
    assert "unreachable" in capsys.readouterr().out
    assert main(["replicas", "sync"]) == 0
    assert "b                        unreachable" in capsys.readouterr().out


def test_the_monitor_dag_loads_the_champion_on_a_restarted_replica(
    replicas, search_artifacts, dagbag
):
    settings, v1 = _b_restarted_after_a_deploy(replicas, search_artifacts)
    model = settings.model_name
    assert replicas.serving(model) == {"a": [v1], "b": []}
    monitor = dagbag.get_dag("triton_monitor")
    run = monitor.test(run_conf={"watch_minutes": 0.05, "check_interval_s": 1.0})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states["rollback"] == "skipped", states
    assert replicas.serving(model) == {"a": [v1], "b": [v1]}
    synced = [r for r in read_records(settings.audit_log, model) if r["action"] == "replica_synced"]
    assert [(r["replica"], r["version"], r["was"]) for r in synced] == [("b", v1, [])]
