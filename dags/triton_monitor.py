"""Airflow DAG: watch Triton's Prometheus metrics and roll back a breaching model.

Every minute: scrape :8002/metrics, compute error rate and latency over the window since the last
scrape, decide with hysteresis, and when the breach is sustained load the previous good version.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import task_failure_alert
from recsys.config import SERVED_MODEL_SUFFIXES
from recsys.monitoring.trigger import MetricsCheckOperator

DOC = """
### Triton monitor
One such DAG per served model: `triton_monitor` watches the bi-encoder (`RECSYS_MODEL_NAME`),
`triton_monitor_reranker` the bi-encoder + reranker model (`<model>_reranker`).
Scrapes Triton's metrics endpoint each minute (deferred to the triggerer, so the wait holds no
worker slot) and compares the window since the previous scrape with the model's thresholds:
those of `RECSYS_MONITOR_CONFIG` (YAML/JSON, `defaults` plus per-model entries), overridden by
any threshold param set for this run (unset params defer to the file). A window with too few
requests is never judged (no traffic is not an outage, and not a recovery either). Host CPU and
memory utilisation (Triton's `nv_cpu_*` gauges) breach too when their limits are set. When
`consecutive_windows` windows in a row breach, the `rollback` task loads the previous known-good
registry version into Triton, verifies it with a smoke query, moves the `champion` / `previous`
aliases, tags the bad version with the reason and writes an audit record and an alert. Any task
that fails for good (metrics unreachable, a rollback that could not switch, a registry update
left pending) posts an alert to `RECSYS_ALERT_WEBHOOK`, and so does the failed run.
"""


def monitor_dag(dag_id: str, model_suffix: str):
    """The monitor DAG of the served model ``RECSYS_MODEL_NAME + model_suffix``."""

    @dag(
        dag_id=dag_id,
        schedule=timedelta(minutes=1),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["search", "monitoring", "rollback"],
        doc_md=DOC,
        default_args={
            "retries": 1,
            "retry_delay": timedelta(seconds=15),
            "on_failure_callback": task_failure_alert,
        },
        on_failure_callback=task_failure_alert,
        params={
            "max_error_rate": Param(None, type=["null", "number"], minimum=0, maximum=1),
            "max_mean_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "max_p99_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "min_requests": Param(None, type=["null", "integer"], minimum=1),
            "consecutive_windows": Param(None, type=["null", "integer"], minimum=1),
            "max_cpu_utilization": Param(
                None, type=["null", "number"], exclusiveMinimum=0, maximum=1
            ),
            "max_memory_utilization": Param(
                None, type=["null", "number"], exclusiveMinimum=0, maximum=1
            ),
            "smoke_query": Param("angle bracket", type="string", minLength=1),
        },
    )
    def triton_monitor():
        # Deferrable: the scrape waits in the triggerer, not in a worker slot.
        check_metrics = MetricsCheckOperator(task_id="check_metrics", model_suffix=model_suffix)

        @task.short_circuit
        def breach_is_sustained(verdict: dict) -> bool:
            return bool(verdict["should_rollback"])

        @task(retries=0)
        def rollback(verdict: dict) -> dict:
            from recsys.config import load_settings, served_model_settings
            from recsys.rollback import rollback as run_rollback

            params = get_current_context()["params"]
            metrics = {
                **(verdict.get("stats") or {}),
                "success_rate": verdict.get("success_rate"),
                "p99_latency_ms": verdict.get("p99_latency_ms"),
            }
            return run_rollback(
                served_model_settings(load_settings(), model_suffix),
                "; ".join(verdict["reasons"]),
                metrics,
                smoke_query=params["smoke_query"],
            )

        verdict = check_metrics.output
        breach_is_sustained(verdict) >> rollback(verdict)

    return triton_monitor()


for _suffix in SERVED_MODEL_SUFFIXES.values():
    monitor_dag(f"triton_monitor{_suffix}", _suffix)
