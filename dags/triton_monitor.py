"""Airflow DAG: watch Triton's Prometheus metrics and roll back a breaching model.

A watch of ``watch_minutes`` in the triggerer checks every ``check_interval_s`` seconds; when a
breach is sustained it ends and the ``rollback`` task loads the previous good version. The next
run starts when one ends (a 20-second schedule with ``max_active_runs=1``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import FailureAlert
from recsys.families import monitor_dag_id, served_models
from recsys.monitoring.trigger import MetricsWatchOperator
from recsys.scheduling import (
    MONITORING_POOL,
    MONITORING_PRIORITY,
    MONITORING_QUEUE,
    WEIGHT_RULE,
)

log = logging.getLogger(__name__)

DOC = """
### Triton monitor
One such DAG per served model of every model family: `triton_monitor` watches the search
bi-encoder (`RECSYS_MODEL_NAME`), `triton_monitor_reranker` the bi-encoder + reranker model
(`<model>_reranker`), `triton_monitor_recommend` the recommender
(`RECSYS_RECOMMEND_MODEL_NAME`). The machinery is the same for all: it judges Triton's metrics
and never looks inside the model.

**watch_metrics** waits in Airflow's triggerer, not in a worker slot. Every `check_interval_s`
seconds it scrapes Triton's metrics endpoint. It judges the window since the last judged one as
soon as that window holds `min_requests` requests (or is `max_window_s` old), against the
model's thresholds. Those come from `RECSYS_MONITOR_CONFIG` (YAML/JSON, `defaults` plus
per-model entries), overridden by any threshold param set for this run. Unset params defer to
the file. A window with too few requests is never judged: no traffic is not an outage, and not
a recovery either. Requests the model refuses itself (bad or oversized queries, which Triton
counts as successes) breach over `max_rejected_rate`. Host CPU and memory utilisation
(Triton's `nv_cpu_*` gauges) breach too when their limits are set. The watch ends when
`consecutive_windows` windows in a row breach, or after `watch_minutes`. Its XCom is the last
verdict plus what the watch did.

**rollback** runs only after a sustained breach (it is skipped otherwise). It loads the
previous known-good registry version into Triton, verifies it with a smoke query pinned to that
version, moves the `champion` / `previous` aliases, tags the bad version with the reason, and
writes an audit record and an alert.

**Where to read the verdict**: the `rollback` task's log starts with one `Verdict on <model>:`
line (rollback due or not, why, and why the watch ended); the full verdict is the
`watch_metrics` task's XCom.

Isolation: both tasks are in the `monitoring` pool with the highest priority. The `training`
pool and the default pool cannot fill the executor, so a rollback gets a worker slot within
seconds even while training holds every training slot.

Alerts, one per incident. Metrics that stay unreadable for `metrics_grace_s` send one alert,
which is remembered until they are back. A task that fails for good alerts once; the same
failure again within an hour is recorded, not paged. A failed rollback is not retried for 15
minutes.
"""


def verdict_line(verdict: dict[str, Any]) -> str:
    """The watch's verdict in one log line, for a person reading the task log in the UI: the
    XCom holds everything, but nobody should have to read JSON to learn whether the model was
    rolled back and why."""
    watch = verdict.get("watch") or {}
    outcome = "rollback due" if verdict.get("should_rollback") else "no rollback"
    reasons = "; ".join(verdict.get("reasons") or ["no verdict"])
    ended = watch.get("ended_because") or "unknown"
    judged, breaching = watch.get("judged_windows", 0), watch.get("breaching_windows", 0)
    return (
        f"Verdict on {verdict.get('model', '?')}: {outcome} ({reasons}); watch ended: {ended}, "
        f"{judged} windows judged, {breaching} breaching"
    )


def monitor_dag(dag_id: str, model_suffix: str, family: str | None = None):
    """The monitor DAG of the served model ``RECSYS_MODEL_NAME + model_suffix`` (with
    ``family``: that family's model name + ``model_suffix``)."""
    alert = FailureAlert(model_suffix, family)

    @dag(
        dag_id=dag_id,
        # A watch lasts `watch_minutes`; with one active run at a time the next one starts as
        # soon as it ends (at most 20 s after the previous one started, so the gap after a
        # quick rollback run is short), and a run that fails at once repeats at most every 20 s.
        schedule=timedelta(seconds=20),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        # A monitor must watch from the first start of the stack; it judges nothing until a
        # model serves.
        is_paused_upon_creation=False,
        tags=[family or "search", "monitoring", "rollback"],
        doc_md=DOC,
        default_args={
            # A watch is not retried: the next scheduled run (seconds later) is the retry.
            "retries": 0,
            "pool": MONITORING_POOL,
            "priority_weight": MONITORING_PRIORITY,
            "weight_rule": WEIGHT_RULE,
            "queue": MONITORING_QUEUE,
            "on_failure_callback": alert,
        },
        params={
            "check_interval_s": Param(
                5.0, type="number", minimum=1, maximum=60, description="Seconds between checks"
            ),
            "watch_minutes": Param(
                15.0,
                type="number",
                exclusiveMinimum=0,
                maximum=240,
                description="How long one run watches before the next run takes over",
            ),
            "metrics_grace_s": Param(
                60.0,
                type="number",
                minimum=0,
                description="Unreadable metrics for this long send one alert",
            ),
            "max_error_rate": Param(None, type=["null", "number"], minimum=0, maximum=1),
            "max_rejected_rate": Param(None, type=["null", "number"], minimum=0, maximum=1),
            "max_mean_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "max_p99_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "min_requests": Param(None, type=["null", "integer"], minimum=1),
            "max_window_s": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "consecutive_windows": Param(None, type=["null", "integer"], minimum=1),
            "max_cpu_utilization": Param(
                None, type=["null", "number"], exclusiveMinimum=0, maximum=1
            ),
            "max_memory_utilization": Param(
                None, type=["null", "number"], exclusiveMinimum=0, maximum=1
            ),
            "smoke_request": Param(
                None,
                type=["null", "object"],
                description=(
                    "Question the restored version must answer, e.g. "
                    '{"query": "cordless drill"} or {"user": "A1"}; null = the one its export '
                    "recorded"
                ),
            ),
        },
    )
    def triton_monitor():
        watch = MetricsWatchOperator(
            task_id="watch_metrics", model_suffix=model_suffix, family=family
        )

        # No retry: after a partial rollback (Triton switched, registry pending) a second
        # attempt would plan from Triton, which now serves the good version. A failed rollback
        # alerts once, and a person finishes it (`recsys rollback --complete-pending`).
        @task
        def rollback(verdict: dict | str) -> dict:
            """Roll back when the watch ended on a sustained breach; skipped otherwise."""
            from airflow.sdk.exceptions import AirflowSkipException

            from recsys.config import load_settings, served_model_settings
            from recsys.monitoring.trigger import watch_result
            from recsys.rollback import rollback as run_rollback

            verdict = watch_result(verdict)
            log.info("%s", verdict_line(verdict))
            if not verdict["should_rollback"]:
                raise AirflowSkipException(
                    "no rollback due: " + "; ".join(verdict.get("reasons") or ["no verdict"])
                )
            params = get_current_context()["params"]
            metrics = {
                **(verdict.get("stats") or {}),
                "success_rate": verdict.get("success_rate"),
                "p99_latency_ms": verdict.get("p99_latency_ms"),
            }
            return run_rollback(
                served_model_settings(load_settings(), model_suffix, family),
                "; ".join(verdict["reasons"]),
                metrics,
                smoke_request=params["smoke_request"],
            )

        rollback(watch.output)

    return triton_monitor()


for _family, _suffixes in served_models().items():
    for _suffix in _suffixes:
        monitor_dag(monitor_dag_id(_family, _suffix), _suffix, _family)
