"""The metrics watch that runs in Airflow's triggerer, checked against a real Triton.

Each test drives :meth:`MetricsWatchTrigger.step` (one check, what ``run()`` does every few
seconds in a thread) or ``run()`` itself. The cases: the watch ends with the verdict as the
task's XCom when a rollback is due; it ends quietly when its period is over; it sends one alert
per metrics outage, however many checks and watch runs it spans, and none for a blip; and it
does not retry a rollback that already failed and was alerted. The path through the real
scheduler and triggerer is in test_stack_monitoring.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string
from airflow.triggers.base import TaskSuccessEvent

from recsys.audit import append_record, read_records
from recsys.monitoring.policy import MonitorState, Thresholds
from recsys.monitoring.trigger import (
    MONITOR_BLIND,
    MONITOR_RESTORED,
    MetricsWatchTrigger,
    watch_result,
)
from tests.triton_testing import free_port, infer_flaky, metric_value, settled_value

THRESHOLDS = Thresholds(max_error_rate=0.05, min_requests=5, consecutive_windows=1).to_dict()


def watch(tmp_path: Path, metrics_url: str, model: str = "flaky", **options: Any):
    """A watch of ``model`` with its state, audit and alert logs under ``tmp_path``."""
    return MetricsWatchTrigger(
        metrics_url,
        model,
        str(tmp_path / "monitor" / "state.json"),
        THRESHOLDS,
        watch_until=options.pop("watch_until", time.time() + 600),
        audit_log=str(tmp_path / "audit.jsonl"),
        alerts_log=str(tmp_path / "alerts.jsonl"),
        dag_id="triton_monitor",
        run_id="manual__test",
        task_id="watch_metrics",
        **options,
    )


def loaded_flaky(flaky_triton) -> tuple[Any, Any]:
    harness, client = flaky_triton
    client.load_model("flaky", headers=harness.admin_headers, client_timeout=60)
    return harness, client


def send(client: Any, harness: Any, ok: int, failing: int) -> None:
    """``ok`` good then ``failing`` failing requests, and wait until Triton counted them all."""
    before = sum(metric_value(harness.metrics_url, f, "flaky", "1") for f in ("success", "failure"))
    outcomes = [infer_flaky(client, 1.0) for _ in range(ok)]
    outcomes += [infer_flaky(client, -1.0) for _ in range(failing)]
    assert outcomes == [True] * ok + [False] * failing
    settled_value(
        lambda: sum(
            metric_value(harness.metrics_url, f, "flaky", "1") for f in ("success", "failure")
        ),
        before + ok + failing,
    )


def test_trigger_round_trips_through_its_serialised_form(tmp_path: Path) -> None:
    trigger = watch(tmp_path, "http://127.0.0.1:1/metrics", check_interval_s=2.5)
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["watch_until"] == trigger.watch_until  # absolute: a restart does not extend it


def test_watch_result_takes_the_triggerers_json_and_refuses_anything_else() -> None:
    verdict = {"should_rollback": True, "reasons": ["error rate 100%"]}
    assert watch_result(json.dumps(verdict)) == verdict  # how the triggerer's XCom arrives
    assert watch_result(verdict) == verdict  # how dag.test() hands it over
    for garbage in ("not json", "[1, 2]", {"reasons": []}, None):
        with pytest.raises((TypeError, ValueError)):
            watch_result(garbage)


def test_a_sustained_breach_ends_the_watch_with_the_verdict_as_xcom(flaky_triton, tmp_path):
    harness, client = loaded_flaky(flaky_triton)
    trigger = watch(tmp_path, harness.metrics_url, check_interval_s=0.2)
    assert trigger.step() is None  # the first check stores the baseline
    send(client, harness, ok=1, failing=5)

    async def first_event() -> Any:
        async for event in trigger.run():
            return event
        raise AssertionError("the watch yielded nothing")

    event = asyncio.run(first_event())
    # Ends the task in the triggerer (never resumes on a worker: see the module docstring).
    assert isinstance(event, TaskSuccessEvent)
    result = event.xcoms["return_value"]
    assert result["should_rollback"] is True and result["model"] == "flaky"
    assert result["stats"]["failures"] == 5 and result["stats"]["requests"] == 6
    assert result["stats"]["failures_by_reason"] == {"BACKEND": 5.0}
    assert result["watch"]["ended_because"] == "rollback due"
    assert result["watch"]["breaching_windows"] == result["watch"]["judged_windows"] == 1
    stored = MonitorState.load(trigger.state_path).last_verdicts["flaky"]
    assert stored["watch"] == result["watch"]  # what dag.test()'s resumed task returns


def test_hysteresis_keeps_the_watch_going_until_enough_windows_breach(flaky_triton, tmp_path):
    harness, client = loaded_flaky(flaky_triton)
    trigger = watch(tmp_path, harness.metrics_url)
    trigger.thresholds = {**THRESHOLDS, "consecutive_windows": 2}
    assert trigger.step() is None
    send(client, harness, ok=0, failing=5)
    assert trigger.step() is None  # one breaching window of the two needed
    send(client, harness, ok=2, failing=0)
    assert trigger.step() is None  # too few requests yet: the window grows, no decision
    send(client, harness, ok=3, failing=0)
    assert trigger.step() is None  # a healthy window resets the count
    send(client, harness, ok=0, failing=5)
    assert trigger.step() is None
    send(client, harness, ok=0, failing=5)
    result = trigger.step()
    assert result is not None and result["should_rollback"] and result["consecutive"] == 2


def test_the_watch_ends_quietly_when_its_period_is_over(flaky_triton, tmp_path):
    harness, client = loaded_flaky(flaky_triton)
    trigger = watch(tmp_path, harness.metrics_url, watch_until=time.time() + 3600)
    assert trigger.step() is None
    send(client, harness, ok=6, failing=0)
    result = trigger.step(now=time.time() + 7200)
    assert result is not None and result["should_rollback"] is False
    assert result["watch"]["ended_because"] == "watch period over"
    assert any(reason.startswith("healthy") for reason in result["reasons"]), result["reasons"]


def test_one_metrics_outage_gives_one_alert_and_its_end_is_audited(flaky_triton, tmp_path, webhook):
    harness, _ = loaded_flaky(flaky_triton)
    down = f"http://127.0.0.1:{free_port()}/metrics"
    trigger = watch(tmp_path, down, metrics_grace_s=30)
    t0 = time.time()
    assert trigger.step(now=t0) is None
    assert trigger.step(now=t0 + 10) is None  # a blip shorter than the grace: no alert
    assert read_records(tmp_path / "alerts.jsonl") == []
    assert trigger.step(now=t0 + 31) is None
    assert trigger.step(now=t0 + 60) is None
    # The next watch run, while the outage lasts: still the same incident.
    assert watch(tmp_path, down, metrics_grace_s=30).step(now=t0 + 300) is None

    alerts = read_records(tmp_path / "alerts.jsonl")
    assert [a["action"] for a in alerts] == ["alert"]
    received = [webhook.next(), *webhook.all()]
    assert len(received) == 1
    alert = received[0]
    assert (alert["model"], alert["dag_id"], alert["kind"]) == (
        "flaky",
        "triton_monitor",
        MONITOR_BLIND,
    )
    assert down in alert["error"] and alert["unavailable_for_s"] == pytest.approx(31, abs=1)
    assert trigger.summary.unavailable_checks == 4

    # Metrics readable again: the outage closes with an audit record and no second alert.
    back = watch(tmp_path, harness.metrics_url, metrics_grace_s=30)
    assert back.step() is None
    actions = [r["action"] for r in read_records(tmp_path / "audit.jsonl", "flaky")]
    assert actions == [MONITOR_BLIND, MONITOR_RESTORED]
    assert webhook.all() == []
    assert "flaky" not in MonitorState.load(back.state_path).outages


def test_a_failed_rollback_is_not_attempted_again_every_check(flaky_triton, tmp_path):
    harness, client = loaded_flaky(flaky_triton)
    audit = tmp_path / "audit.jsonl"
    append_record(audit, "deploy", "flaky", version=1)
    append_record(
        audit, "rollback_failed", "flaky", from_version=1, to_version=0, error="no good version"
    )
    trigger = watch(tmp_path, harness.metrics_url)
    assert trigger.step() is None
    send(client, harness, ok=0, failing=5)
    assert trigger.step() is None  # breached, rollback due, but already failed and alerted
    assert trigger.summary.suppressed_rollbacks == 1
    assert "a person must act" in trigger.summary.notes[0]

    append_record(audit, "deploy", "flaky", version=1)  # someone acted
    send(client, harness, ok=0, failing=5)
    result = trigger.step()
    assert result is not None and result["should_rollback"]
