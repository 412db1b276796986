"""The monitor through the running stack: scheduler, triggerer and LocalExecutor together.

A training run holds every slot of the ``training`` pool (the pipeline's two training tasks on
an endless number of epochs). A faulty version is then deployed with the CLI under client
traffic. The scheduled ``triton_monitor`` must see the breach from its watch in the triggerer,
get a worker slot for its rollback while training keeps both training slots, and put v1 back.
It must send exactly one alert, naming the right model and DAG, with no failed monitor run.

This is the isolation guarantee of the monitoring issue, observed on real scheduled runs rather
than under ``dag.test()``. It takes a few minutes (one stack start); speed is measured in
``benchmarks/time_to_rollback_airflow.py``, not asserted here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys.families.search.client import search
from tests.stack_testing import apply_environment, isolated_stack_environment, wait_for

pytestmark = pytest.mark.e2e

MONITOR = "triton_monitor"
PIPELINE = "search_model_pipeline"
QUERY = "angle bracket galvanized steel"


class Traffic(threading.Thread):
    """Client queries over gRPC, ~20 per second, each outcome timestamped."""

    def __init__(self, grpc_url: str, model: str) -> None:
        super().__init__(daemon=True)
        from recsys.triton.control import TritonControl

        self.control = TritonControl(grpc_url, timeout_s=10)
        self.model = model
        self.outcomes: list[tuple[float, bool]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:  # varied queries: an answer from Triton's response cache proves nothing
                search(self.control, self.model, f"{QUERY} {len(self.outcomes) % 11}", top_k=3)
                ok = True
            except Exception:
                ok = False
            self.outcomes.append((time.time(), ok))
            self.stop_event.wait(0.05)


@pytest.fixture
def stack_env(monkeypatch, tmp_path: Path, webhook) -> Iterator[Any]:
    """The embedded stack as `recsys stack up` starts it, on free ports and a fresh state
    folder, with alerts going to the test's webhook; stopped afterwards."""
    from recsys import stack
    from recsys.config import load_settings

    apply_environment(isolated_stack_environment(tmp_path), monkeypatch)
    settings = load_settings()
    try:
        stack.up(settings, timeout_s=300, echo=lambda _: None)
        yield settings
    finally:
        stack.down(settings, echo=lambda _: None)


def test_rollback_runs_while_training_holds_every_training_slot(
    stack_env, webhook, tiny_bert_dir, homedepot_sample, tmp_path
):
    from recsys import registry, stack
    from recsys.airflow_client import AirflowClient
    from recsys.audit import read_records
    from recsys.cli import main
    from recsys.deploy import deploy_model, register_model
    from recsys.scheduling import TRAINING_POOL
    from recsys.triton.control import TritonControl
    from tests.triton_testing import build_test_serving_artifacts

    settings = stack_env
    model, uri = settings.model_name, settings.mlflow_tracking_uri
    airflow = AirflowClient(
        f"http://127.0.0.1:{settings.airflow_port}",
        stack.AIRFLOW_USER,
        stack.airflow_password(settings),
    )

    # v1 serves; the faulty v2 is registered. It raises once it has answered 100 requests
    # (a few seconds of the traffic below): its deploy's smoke query, pinned to v2, passes
    # first, as a fault that only shows under load would.
    good = build_test_serving_artifacts(tmp_path / "good")
    bad = build_test_serving_artifacts(tmp_path / "bad", {"mode": "raise", "after_requests": 100})
    versions = []
    for artifacts in (good, bad):
        run_id = registry.start_training_run(uri, "stack-monitoring", "t", {}, {})
        versions.append(register_model(settings, run_id, str(artifacts), {})["version"])
    v1, v2 = versions
    deploy_model(settings, v1, str(good), {"query": QUERY, "top_k": 3})

    # A training run that holds both training slots for as long as the test lasts.
    airflow.wait_for_dag(PIPELINE)
    airflow.set_paused(PIPELINE, False)
    training_run = airflow.trigger(
        PIPELINE,
        {
            "data_path": str(homedepot_sample),
            "base_model": str(tiny_bert_dir),
            "epochs": 100000,
            "batch_size": 8,
            "reranker_epochs": 100000,
            "reranker_batch_size": 8,
            "min_gain": 1.0,
        },
    )

    def training_slots_busy() -> bool:
        states = airflow.task_states(PIPELINE, training_run)
        return states.get("fine_tune") == "running" == states.get("fine_tune_reranker")

    wait_for("both training tasks running", training_slots_busy, timeout_s=600, poll_s=2)

    # The monitor watches on its own (unpaused at creation): a watch is deferred.
    def watching() -> bool:
        runs = [r for r in airflow.runs(MONITOR, limit=5) if r["state"] == "running"]
        return any(
            airflow.task_states(MONITOR, r["dag_run_id"]).get("watch_metrics") == "deferred"
            for r in runs
        )

    wait_for("the triton_monitor watch in the triggerer", watching, timeout_s=180, poll_s=2)

    traffic = Traffic(settings.triton_grpc_url, model)
    traffic.start()
    try:
        wait_for("healthy traffic", lambda: sum(ok for _, ok in traffic.outcomes) >= 20, 60)
        deployed_at = time.time()
        assert main(["deploy", "--version", str(v2), "--smoke-query", QUERY, "--top-k", "3"]) == 0

        def rollback_records() -> list[dict[str, Any]]:
            records = read_records(settings.audit_log, model)
            return [r for r in records if r["action"] == "rollback"]

        # The audit record is the rollback's last step: Triton, aliases and tags come first.
        rollbacks = wait_for("the monitor's rollback", rollback_records, timeout_s=300)
        rolled_back_at = time.time()
        wait_for(
            "clients served again",
            lambda: any(ok for t, ok in traffic.outcomes if t > rolled_back_at),
            timeout_s=30,
        )
    finally:
        traffic.stop_event.set()
        traffic.join(15)
    assert any(not ok for t, ok in traffic.outcomes if t > deployed_at), "v2 never failed"

    # The rollback was the scheduled monitor's, through a worker slot, while training held
    # every training slot.
    assert [(r["from_version"], r["to_version"], r["actor"]) for r in rollbacks] == [
        (v2, v1, MONITOR)
    ]
    assert TritonControl(settings.triton_grpc_url).loaded_versions(model) == [v1]
    assert registry.alias_version(uri, model, registry.CHAMPION) == v1

    def successful_rollback_tasks() -> list[Any]:
        # The audit record is written just before the task is marked done.
        return [
            ti
            for run in airflow.runs(MONITOR, limit=50)
            for ti in airflow.task_instances(MONITOR, run["dag_run_id"])
            if ti.task_id == "rollback" and ti.state == "success"
        ]

    rollback_tis = wait_for("the rollback task's success", successful_rollback_tasks, 120)
    assert len(rollback_tis) == 1, rollback_tis
    rollback_ti = rollback_tis[0]
    training = {
        ti.task_id: ti
        for ti in airflow.task_instances(PIPELINE, training_run)
        if ti.task_id in ("fine_tune", "fine_tune_reranker")
    }
    assert {ti.state for ti in training.values()} == {"running"}, training
    assert all(ti.start_date < rollback_ti.start_date for ti in training.values())
    pool = airflow.pool(TRAINING_POOL)
    assert pool["running_slots"] == pool["slots"] == 2, pool

    # One incident, one alert, naming the right model and DAG; no monitor run failed.
    alerts = [r for r in read_records(settings.alerts_log) if r["action"] == "alert"]
    assert [a["title"] for a in alerts] == [f"{model} rolled back from v{v2} to v{v1}"], alerts
    received = [webhook.next(), *webhook.all()]
    assert [(a["model"], a["from_version"], a["to_version"]) for a in received] == [(model, v2, v1)]
    for dag_id in (MONITOR, f"{MONITOR}_reranker"):
        states = [r["state"] for r in airflow.runs(dag_id, limit=100)]
        assert "failed" not in states, (dag_id, states)
