"""Airflow DAG: watch Triton's Prometheus metrics and roll back a breaching model.

Every minute: scrape :8002/metrics, compute error rate and latency over the window since the last
scrape, decide with hysteresis, and when the breach is sustained load the previous good version.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

DOC = """
### Triton monitor
Scrapes Triton's metrics endpoint each minute and compares the window since the previous scrape
with the thresholds below. A window with too few requests is never judged (no traffic is not an
outage, and not a recovery either). When `consecutive_windows` windows in a row breach, the
`rollback` task loads the previous known-good registry version into Triton, verifies it with a
smoke query, moves the `champion` / `previous` aliases, tags the bad version with the reason and
writes an audit record and an alert.
"""


@dag(
    dag_id="triton_monitor",
    schedule=timedelta(minutes=1),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["search", "monitoring", "rollback"],
    doc_md=DOC,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=15)},
    params={
        "max_error_rate": Param(0.05, type="number", minimum=0, maximum=1),
        "max_mean_latency_ms": Param(1000.0, type="number", exclusiveMinimum=0),
        "min_requests": Param(5, type="integer", minimum=1),
        "consecutive_windows": Param(1, type="integer", minimum=1),
        "smoke_query": Param("angle bracket", type="string", minLength=1),
    },
)
def triton_monitor():
    @task
    def check_metrics() -> dict:
        from recsys.config import load_settings
        from recsys.monitoring.policy import Thresholds, check_once

        settings = load_settings()
        params = get_current_context()["params"]
        thresholds = Thresholds(
            max_error_rate=params["max_error_rate"],
            max_mean_latency_ms=params["max_mean_latency_ms"],
            min_requests=params["min_requests"],
            consecutive_windows=params["consecutive_windows"],
        )
        verdict = check_once(
            settings.triton_metrics_url, settings.model_name, settings.monitor_state, thresholds
        )
        return verdict.to_dict()

    @task.short_circuit
    def breach_is_sustained(verdict: dict) -> bool:
        return bool(verdict["should_rollback"])

    @task(retries=0)
    def rollback(verdict: dict) -> dict:
        from recsys.config import load_settings
        from recsys.rollback import rollback as run_rollback

        params = get_current_context()["params"]
        return run_rollback(
            load_settings(),
            "; ".join(verdict["reasons"]),
            verdict.get("stats") or {},
            smoke_query=params["smoke_query"],
        )

    verdict = check_metrics()
    breach_is_sustained(verdict) >> rollback(verdict)


triton_monitor()
