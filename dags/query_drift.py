"""Airflow DAG: compare a sample of served queries with the training queries; on drift, alert and
ask for retraining through an Asset; when the check cannot see the served queries, alert once.

Thin wiring only: the check, the alert/audit and the retraining request are functions of
``recsys.monitoring.drift``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import task_failure_alert
from recsys.assets import RETRAINING_REQUEST
from recsys.scheduling import DEFAULT_POOL, DRIFT_PRIORITY, WEIGHT_RULE

DOC = """
### Query drift
Every hour: read the queries Triton's model sampled for the serving version since the last check
(`RECSYS_QUERY_SAMPLE_DIR`, share `RECSYS_QUERY_SAMPLE_RATE`) and compare them with the training
queries of that version (`query_reference.json`, written at export): token/word length
distribution (PSI), out-of-vocabulary rate, `[UNK]` token rate and the shift of the embedding
centroid. Limits come from the `drift` section of `RECSYS_MONITOR_CONFIG`, overridden by any
param set for this run. Too few sampled queries is no judgement; they are kept for the next run.

On drift: an alert goes to `RECSYS_ALERT_WEBHOOK` and a `query_drift` record to the audit log,
and, with `retrain_on_drift` (default) and outside the retraining cooldown, an event on the
Asset `recsys://product_search/retraining-request`, which schedules `search_model_pipeline`.
The cooldown is read from the audit log's `retraining_requested` records, so a lost or corrupt
drift state file (reported in the verdict) never causes a second request.

Blind check: when Triton served enough queries of the version (its own `nv_inference_count`)
that samples were due and none arrived (the sample folder gone, not writable or full, or
tritonserver and Airflow disagreeing on `RECSYS_QUERY_SAMPLE_DIR`/`_RATE`), the verdict is
*blind* (not "too few queries") and names what is wrong with the folder when it can see it:
`alert_blind` posts one alert and a `query_drift_blind` audit record per outage,
hourly runs during the outage stay quiet, and the first run that sees samples again writes
`query_drift_seeing_again`. Sampling off on purpose (`RECSYS_QUERY_SAMPLE_RATE=0`) is no outage.

Unpaused on creation: a monitor must run on a fresh stack, and it does nothing until samples
arrive. Tasks run in the `default_pool` at priority 100 (absolute), below the metrics monitor.
"""


@dag(
    dag_id="query_drift",
    schedule=timedelta(hours=1),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["search", "monitoring", "drift"],
    doc_md=DOC,
    is_paused_upon_creation=False,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(minutes=2),
        "on_failure_callback": task_failure_alert,
        "pool": DEFAULT_POOL,
        "priority_weight": DRIFT_PRIORITY,
        "weight_rule": WEIGHT_RULE,
    },
    params={
        "retrain_on_drift": Param(True, type="boolean"),
        "min_queries": Param(None, type=["null", "integer"], minimum=1),
        "max_length_psi": Param(None, type=["null", "number"], exclusiveMinimum=0),
        "max_oov_rate_increase": Param(None, type=["null", "number"], exclusiveMinimum=0),
        "max_unk_rate_increase": Param(None, type=["null", "number"], exclusiveMinimum=0),
        "max_centroid_shift": Param(None, type=["null", "number"], exclusiveMinimum=0),
    },
)
def query_drift():
    @task
    def check_drift() -> dict:
        from recsys.config import load_settings
        from recsys.monitoring.config import load_drift_thresholds
        from recsys.monitoring.drift import check_query_drift

        settings = load_settings()
        params = get_current_context()["params"]
        overrides = {k: v for k, v in params.items() if k != "retrain_on_drift"}
        thresholds = load_drift_thresholds(settings.model_name, overrides=overrides)
        return check_query_drift(settings, thresholds=thresholds)

    @task.short_circuit
    def drifted(verdict: dict) -> bool:
        return bool(verdict["drift"])

    @task
    def alert_and_audit(verdict: dict) -> None:
        from recsys.config import load_settings
        from recsys.monitoring.drift import record_drift

        record_drift(load_settings(), verdict)

    @task.short_circuit
    def retraining_wanted(verdict: dict) -> bool:
        return bool(verdict["retrain_due"]) and bool(
            get_current_context()["params"]["retrain_on_drift"]
        )

    @task(outlets=[RETRAINING_REQUEST])
    def request_retraining(verdict: dict) -> None:
        from recsys.config import load_settings
        from recsys.monitoring.drift import record_retraining_request

        record = record_retraining_request(load_settings(), verdict)
        get_current_context()["outlet_events"][RETRAINING_REQUEST].extra = {
            "model": record["model"],
            "version": record["version"],
            "reason": record["reason"],
        }

    @task.short_circuit
    def newly_blind(verdict: dict) -> bool:
        return bool(verdict["blind_alert_due"])

    @task
    def alert_blind(verdict: dict) -> None:
        from recsys.config import load_settings
        from recsys.monitoring.drift import record_blind

        record_blind(load_settings(), verdict)

    @task.short_circuit
    def seeing_again(verdict: dict) -> bool:
        return bool(verdict["outage_over"])

    @task
    def audit_seeing_again(verdict: dict) -> None:
        from recsys.config import load_settings
        from recsys.monitoring.drift import record_seeing_again

        record_seeing_again(load_settings(), verdict)

    verdict = check_drift()
    (
        drifted(verdict)
        >> alert_and_audit(verdict)
        >> retraining_wanted(verdict)
        >> request_retraining(verdict)
    )
    newly_blind(verdict) >> alert_blind(verdict)
    seeing_again(verdict) >> audit_seeing_again(verdict)


query_drift()
