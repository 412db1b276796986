"""Alerts reach a real webhook: after a rollback with the versions, reason and metrics, and from
the DAGs' ``on_failure_callback`` when a task fails for good.

The receiver is a real ``http.server`` on 127.0.0.1 in a thread, so the JSON is checked as a
chat or paging service would get it.
"""

from __future__ import annotations

import pytest

from recsys.families.search.client import search


def test_rollback_alert_carries_model_versions_reason_and_metrics(
    platform, webhook, tiny_bert_dir, homedepot_sample, tmp_path
):
    from recsys import registry
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.deploy import deploy_model, register_model
    from recsys.families.search.export import build_serving_artifacts
    from recsys.monitoring.policy import Thresholds, check_once
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
        deploy_model(platform, version, str(out), {"query": "angle bracket", "top_k": 5})
        versions.append(version)
    v1, v2 = versions

    thresholds = Thresholds(min_requests=5)
    check_once(platform.triton_metrics_url, model, platform.monitor_state, thresholds)
    control = TritonControl(platform.triton_grpc_url)
    for i in range(6):
        with pytest.raises(Exception, match="injected fault"):
            search(control, model, f"angle bracket {i}", top_k=3)
    verdict = check_once(platform.triton_metrics_url, model, platform.monitor_state, thresholds)
    assert verdict.should_rollback and verdict.success_rate == 0.0
    rollback(
        platform,
        "; ".join(verdict.reasons),
        verdict.to_dict(),
        smoke_request={"query": "angle bracket"},
    )

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


def test_every_task_alerts_and_names_the_model_its_dag_is_about(dagbag):
    from recsys.alerts import FailureAlert

    expected = {"search_model_pipeline", "triton_monitor", "triton_monitor_reranker", "query_drift"}
    expected |= {"rollout", "rollout_reranker"}
    recommend = {
        "recommend_model_pipeline", "triton_monitor_recommend", "input_drift_recommend",
        "rollout_recommend",
    }  # fmt: skip
    assert expected | recommend <= set(dagbag.dags)
    suffix = {"triton_monitor_reranker": "_reranker", "rollout_reranker": "_reranker"}
    for dag_id, dag in dagbag.dags.items():
        assert not dag.has_on_failure_callback, dag_id  # a run failure would repeat a task's
        for task in dag.tasks:
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            family = "recommend" if dag_id in recommend else None
            wanted = FailureAlert(suffix.get(dag_id, ""), family)
            assert wanted in callbacks, (dag_id, task.task_id)


def test_unreadable_metrics_alert_once_per_outage_naming_model_and_dag(
    dagbag, webhook, monkeypatch, tmp_path, caplog
):
    """The reranker's monitor DAG against a metrics port where nothing listens: its watch (run
    inline by dag.test()) alerts once the grace period is over, naming the reranker model and
    its DAG, nothing is judged or rolled back, and the next run, same outage, stays quiet."""
    from recsys.audit import read_records
    from recsys.config import load_settings
    from tests.triton_testing import free_port

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(free_port()))
    monitor = dagbag.get_dag("triton_monitor_reranker")
    conf = {"check_interval_s": 1, "metrics_grace_s": 2, "watch_minutes": 0.1}
    for _ in range(2):
        run = monitor.test(run_conf=conf)
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states == {"watch_metrics": "success", "rollback": "skipped"}, states
    # dag.test() runs a deferred task's trigger inline: the check really went to a trigger.
    assert "running trigger in line" in caplog.text

    model = load_settings().model_name + "_reranker"
    received = [webhook.next(), *webhook.all()]
    assert len(received) == 1, received
    alert = received[0]
    assert (alert["model"], alert["dag_id"], alert["task_id"]) == (
        model,
        "triton_monitor_reranker",
        "watch_metrics",
    )
    assert alert["kind"] == "monitor_metrics_unavailable" and "unreachable" in alert["error"]
    settings = load_settings()
    assert [r["action"] for r in read_records(settings.alerts_log)] == ["alert"]
    assert [r["action"] for r in read_records(settings.audit_log, model)] == [
        "monitor_metrics_unavailable"
    ]


def test_a_task_failure_alerts_once_and_its_repeats_are_recorded_not_sent(
    dagbag, webhook, monkeypatch, tmp_path
):
    """A monitor whose thresholds file is broken fails at once, every run. The first failure is
    an alert naming the reranker model, DAG, task and error; the same failure of the next run
    is recorded as ``alert_suppressed`` and not paged again."""
    from recsys.audit import read_records
    from recsys.config import load_settings

    config = tmp_path / "monitor.yaml"
    config.write_text("defaults: {max_error_rte: 0.1}\n")  # a typo: unknown key
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_MONITOR_CONFIG", str(config))
    monitor = dagbag.get_dag("triton_monitor_reranker")
    for _ in range(2):
        run = monitor.test()
        assert {ti.task_id: ti.state for ti in run.get_task_instances()}["watch_metrics"] == (
            "failed"
        )

    received = [webhook.next(), *webhook.all()]
    assert len(received) == 1, received
    alert = received[0]
    assert alert["model"] == load_settings().model_name + "_reranker"
    assert (alert["dag_id"], alert["task_id"]) == ("triton_monitor_reranker", "watch_metrics")
    assert alert["error_type"] == "MonitorConfigError" and "max_error_rte" in alert["error"]
    actions = [r["action"] for r in read_records(load_settings().alerts_log)]
    assert actions == ["alert", "alert_suppressed"]
