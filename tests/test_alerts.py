"""Alerts reach a real webhook: after a rollback with the versions, reason and metrics, and from
the DAGs' ``on_failure_callback`` when a task fails for good.

The receiver is a real ``http.server`` on 127.0.0.1 in a thread, so the JSON is checked as a
chat or paging service would get it.
"""

from __future__ import annotations

import pytest

from recsys.alerts import task_failure_alert


def test_rollback_alert_carries_model_versions_reason_and_metrics(
    platform, webhook, tiny_bert_dir, homedepot_sample, tmp_path
):
    from recsys import registry
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.export import build_serving_artifacts
    from recsys.monitoring.policy import Thresholds, check_once
    from recsys.pipeline import deploy_model, register_model
    from recsys.rollback import rollback
    from recsys.triton.control import TritonControl

    catalog = product_catalog(read_relevance_csv(homedepot_sample))
    model = platform.model_name
    versions = []
    for name, fault in (("good", None), ("bad", {"mode": "raise", "after_requests": 1})):
        out = build_serving_artifacts(
            tiny_bert_dir, catalog, tmp_path / name, model_name="x", fault_injection=fault
        )
        run_id = registry.start_training_run(platform.mlflow_tracking_uri, "alerts", "t", {}, {})
        version = register_model(platform, run_id, str(out), {})["version"]
        deploy_model(platform, version, str(out), "angle bracket", 5)
        versions.append(version)
    v1, v2 = versions

    thresholds = Thresholds(min_requests=5)
    check_once(platform.triton_metrics_url, model, platform.monitor_state, thresholds)
    control = TritonControl(platform.triton_grpc_url)
    for i in range(6):
        with pytest.raises(Exception, match="injected fault"):
            control.search(model, f"angle bracket {i}", top_k=3)
    verdict = check_once(platform.triton_metrics_url, model, platform.monitor_state, thresholds)
    assert verdict.should_rollback and verdict.success_rate == 0.0
    rollback(platform, "; ".join(verdict.reasons), verdict.to_dict(), smoke_query="angle bracket")

    alert = webhook.next()
    assert alert["model"] == model
    assert (alert["from_version"], alert["to_version"]) == (v2, v1)
    assert "error rate 100.0%" in alert["reason"]
    assert alert["metrics"]["success_rate"] == 0.0
    assert alert["metrics"]["stats"]["failures"] == 6
    assert "p99_latency_ms" in alert["metrics"]
    assert alert["registry_updated"] is True
    assert alert["title"] == f"{model} rolled back from v{v2} to v{v1}"
    assert webhook.all() == []  # exactly one alert per rollback


def test_every_dag_alerts_on_failure(dagbag):
    expected = {"search_model_pipeline", "triton_monitor", "triton_monitor_reranker", "query_drift"}
    assert expected <= set(dagbag.dags)
    for dag_id, dag in dagbag.dags.items():
        assert dag.default_args["on_failure_callback"] is task_failure_alert, dag_id
        for task in dag.tasks:
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert task_failure_alert in callbacks, (dag_id, task.task_id)


def test_monitor_task_failure_posts_an_alert(dagbag, webhook, monkeypatch, tmp_path, caplog):
    """Run the monitor DAG against a metrics port where nothing listens: ``check_metrics``
    fails for good and its ``on_failure_callback`` posts which DAG, task and error."""
    from tests.triton_testing import free_port

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(free_port()))
    monitor = dagbag.get_dag("triton_monitor")
    monkeypatch.setattr(monitor.get_task("check_metrics"), "retries", 0)  # fail at once
    run = monitor.test()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["check_metrics"] == "failed", states
    # dag.test() runs a deferred task's trigger inline: the check really went to a trigger.
    assert "running trigger in line" in caplog.text

    alerts = [webhook.next(), *webhook.all()]
    task_alerts = [a for a in alerts if a.get("task_id") == "check_metrics"]
    assert task_alerts, alerts
    alert = task_alerts[0]
    assert alert["dag_id"] == "triton_monitor"
    assert alert["error_type"] == "MetricsUnavailableError"
    assert "unreachable" in alert["error"]
