"""The deferrable metrics check: the trigger survives serialisation, reports failures as events,
and the operator turns them back into the task failure the monitor relies on. The end-to-end
path through the triggerer (``dag.test()`` runs triggers inline) is exercised by test_e2e."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string

from recsys.monitoring.metrics import MetricsUnavailableError
from recsys.monitoring.policy import Thresholds
from recsys.monitoring.trigger import MetricsCheckOperator, MetricsCheckTrigger
from tests.triton_testing import free_port


def _first_event(trigger: MetricsCheckTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("trigger yielded nothing")

    return asyncio.run(first())


def test_trigger_round_trips_through_its_serialised_form(tmp_path: Path) -> None:
    trigger = MetricsCheckTrigger(
        "http://127.0.0.1:1/metrics", "search", str(tmp_path / "s.json"), Thresholds().to_dict()
    )
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_unreachable_metrics_become_an_error_event_and_a_failed_task(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    url = f"http://127.0.0.1:{free_port()}/metrics"
    trigger = MetricsCheckTrigger(url, "search", str(state), Thresholds().to_dict())
    event = _first_event(trigger)
    assert event["status"] == "error" and event["error_type"] == "MetricsUnavailableError"
    assert url in event["message"]
    assert not state.exists()  # nothing judged, nothing stored

    operator = MetricsCheckOperator(task_id="check_metrics")
    with pytest.raises(MetricsUnavailableError, match="unreachable"):
        operator.execute_complete({}, event)
    verdict = {"should_rollback": False, "reasons": ["ok"]}
    assert operator.execute_complete({}, {"status": "ok", "verdict": verdict}) == verdict
