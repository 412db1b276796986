"""Airflow DAG: compare a sample of served queries with the training queries; on drift, alert and
ask for retraining through an Asset; when the check cannot see the served queries, alert once.

Thin wiring only: the check, the alert/audit and the retraining request are functions of
``recsys.monitoring.drift``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import FailureAlert
from recsys.assets import retraining_request
from recsys.families import available, drift_dag_id, get_family
from recsys.model_pipeline import family_settings
from recsys.scheduling import DEFAULT_POOL, DRIFT_PRIORITY, MONITORING_QUEUE, WEIGHT_RULE

DOC = """
### Input drift
One such DAG per model family: `query_drift` for search (described here), `input_drift_<family>`
for the others (recommendation: the share of requests from unknown users, of unknown items in
sessions, and the shift of the served items' popularity against the training data). The
plumbing below (samples, state, blind checks, alerts, Asset) is the same for every family.

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


def drift_dag(family: str):
    """The drift DAG of ``family``'s served model."""
    spec = get_family(family)
    asset = retraining_request(family)

    @dag(
        dag_id=drift_dag_id(family),
        schedule=timedelta(hours=1),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=[family, "monitoring", "drift"],
        doc_md=DOC,
        is_paused_upon_creation=False,
        default_args={
            "retries": 1,
            "retry_delay": timedelta(minutes=2),
            "on_failure_callback": FailureAlert("", family),
            "pool": DEFAULT_POOL,
            "priority_weight": DRIFT_PRIORITY,
            "weight_rule": WEIGHT_RULE,
            "queue": MONITORING_QUEUE,
        },
        params={
            "retrain_on_drift": Param(True, type="boolean"),
            "min_queries": Param(None, type=["null", "integer"], minimum=1),
            **{name: Param(None, **schema) for name, schema in spec.drift_params().items()},
        },
    )
    def query_drift():
        @task
        def check_drift() -> dict:
            from recsys.monitoring.config import DRIFT_THRESHOLD_FIELDS, load_drift_thresholds
            from recsys.monitoring.drift import check_query_drift

            settings = family_settings(family)
            params = get_current_context()["params"]
            overrides = {k: v for k, v in params.items() if k in DRIFT_THRESHOLD_FIELDS}
            limits = {
                k: v
                for k, v in params.items()
                if k not in DRIFT_THRESHOLD_FIELDS and k != "retrain_on_drift" and v is not None
            }
            thresholds = load_drift_thresholds(settings.model_name, overrides=overrides)
            return check_query_drift(settings, thresholds=thresholds, family_limits=limits)

        @task.short_circuit
        def drifted(verdict: dict) -> bool:
            return bool(verdict["drift"])

        @task
        def alert_and_audit(verdict: dict) -> None:
            from recsys.monitoring.drift import record_drift

            record_drift(family_settings(family), verdict)

        @task.short_circuit
        def retraining_wanted(verdict: dict) -> bool:
            return bool(verdict["retrain_due"]) and bool(
                get_current_context()["params"]["retrain_on_drift"]
            )

        @task(outlets=[asset])
        def request_retraining(verdict: dict) -> None:
            from recsys.monitoring.drift import record_retraining_request

            record = record_retraining_request(family_settings(family), verdict)
            get_current_context()["outlet_events"][asset].extra = {
                "model": record["model"],
                "version": record["version"],
                "reason": record["reason"],
            }

        @task.short_circuit
        def newly_blind(verdict: dict) -> bool:
            return bool(verdict["blind_alert_due"])

        @task
        def alert_blind(verdict: dict) -> None:
            from recsys.monitoring.drift import record_blind

            record_blind(family_settings(family), verdict)

        @task.short_circuit
        def seeing_again(verdict: dict) -> bool:
            return bool(verdict["outage_over"])

        @task
        def audit_seeing_again(verdict: dict) -> None:
            from recsys.monitoring.drift import record_seeing_again

            record_seeing_again(family_settings(family), verdict)

        verdict = check_drift()
        (
            drifted(verdict)
            >> alert_and_audit(verdict)
            >> retraining_wanted(verdict)
            >> request_retraining(verdict)
        )
        newly_blind(verdict) >> alert_blind(verdict)
        seeing_again(verdict) >> audit_seeing_again(verdict)

    return query_drift()


for _family in available():
    drift_dag(_family)
