"""Airflow DAG: progressive delivery of a served model (canary, A/B experiment, shadow)."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import FailureAlert
from recsys.delivery.analysis import RolloutAnalysisOperator
from recsys.families import rollout_dag_id, served_models
from recsys.scheduling import (
    DEFAULT_POOL,
    MONITORING_QUEUE,
    ROLLOUT_PRIORITY,
    SERVING_QUEUE,
    WEIGHT_RULE,
)

DOC = """
### Rollout: canary, A/B experiment or shadow
One such DAG per served model (`rollout`, `rollout_reranker`, `rollout_recommend`). Trigger it
with the candidate `version` (a registered version; `recsys deploy --canary` and the pipelines'
`rollout` param do) and a `mode`:

* **canary**: the candidate gets `steps` percent of the routed traffic in turn (default
  5 -> 25 -> 50 -> 100), each held for `windows_per_step` windows of `window_s` seconds.
  It is promoted when every step passes, and aborted the moment it breaches.
* **experiment**: a fixed `split` for `duration_minutes` or `sample_size` impressions. The
  per-arm click-through (feedback log) is compared with a significance test and logged to
  MLflow. With `promote_if_better`, a significantly better candidate is promoted.
* **shadow**: `shadow_share` of the traffic is mirrored to the candidate and its answers are
  discarded. Errors, latency and top-k overlap with the stable version are reported.

**start** loads the candidate beside the version that serves, smoke-tests it, and puts the
model's router (`<model>_router`) in front. Clients that take part call the router; a routing
key (user or session id) keeps a shopper on one arm.

**analyze** waits in the triggerer, not in a worker slot. Every `check_interval_s` seconds it
reads Triton's per-version metrics. The candidate breaches on an error rate over
`max_error_rate`, or over the stable version's by `max_error_rate_increase`; on a rejected rate
over `max_rejected_rate`; on a mean latency over `max_mean_latency_ms` or `max_latency_ratio` x
stable; or on a p99 over `max_p99_latency_ms`. Errors abort at once; latency only after
`latency_windows` closed windows in a row (a fresh model is slow while it warms up). A breach
needs `min_requests` candidate requests.
With `require_not_worse`, a step also waits until the feedback shows the candidate is not
significantly worse. On a breach the analysis cuts the candidate's weight to 0 at once.

**finish** promotes (champion/previous aliases move), aborts (candidate unloaded, tagged, audit
record, one alert) or ends an experiment or shadow quietly. Every outcome is logged to MLflow
(experiment `rollouts`) and tagged on both registry versions. Its tasks rank above training and
drift checks (priority 500) but stay out of the monitor's reserved pool: an abort has already
stopped the candidate's traffic in the triggerer, `finish` only unloads and records.

While a rollout is under way, the model's monitor judges only the stable version, and a deploy
of the model is refused. A rollback ends the rollout.
"""


def rollout_dag(dag_id: str, model_suffix: str, family: str):
    """The rollout DAG of the served model ``family`` model name + ``model_suffix``."""
    alert = FailureAlert(model_suffix, family)

    @dag(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=False,
        tags=[family, "deployment", "canary"],
        doc_md=DOC,
        default_args={
            # Only `start` is retried (it takes over a rollout it already started); a second
            # promote or abort after a partial one would act on the wrong serving state.
            "retries": 0,
            "retry_delay": timedelta(seconds=10),
            "pool": DEFAULT_POOL,
            "priority_weight": ROLLOUT_PRIORITY,
            "weight_rule": WEIGHT_RULE,
            # The analysis and `finish` (promote or abort) never wait behind training.
            "queue": MONITORING_QUEUE,
            "on_failure_callback": alert,
        },
        params={
            "version": Param(None, type=["null", "integer"], minimum=1,
                             description="Registered version to roll out"),
            "mode": Param("canary", enum=["canary", "experiment", "shadow"]),
            "steps": Param([5, 25, 50, 100], type="array",
                           description="Canary weights in percent, ascending"),
            "windows_per_step": Param(2, type="integer", minimum=1),
            "window_s": Param(30.0, type="number", exclusiveMinimum=0),
            "check_interval_s": Param(2.0, type="number", minimum=0.5, maximum=60),
            "min_requests": Param(10, type="integer", minimum=1,
                                  description="Candidate requests before a window is judged"),
            "max_error_rate": Param(0.02, type="number", minimum=0, maximum=1),
            "max_error_rate_increase": Param(0.01, type="number", minimum=0, maximum=1),
            "max_rejected_rate": Param(0.5, type="number", minimum=0, maximum=1),
            "max_mean_latency_ms": Param(1000.0, type="number", exclusiveMinimum=0),
            "max_latency_ratio": Param(2.0, type="number", exclusiveMinimum=0),
            "max_p99_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0),
            "latency_windows": Param(2, type="integer", minimum=1,
                                     description="Closed windows in a row over a latency limit"),
            "require_not_worse": Param(False, type="boolean",
                                       description="Canary: online CTR must not be worse"),
            "alpha": Param(0.05, type="number", exclusiveMinimum=0, exclusiveMaximum=0.5),
            "min_impressions": Param(200, type="integer", minimum=1),
            "split": Param(50.0, type="number", exclusiveMinimum=0, exclusiveMaximum=100,
                           description="Experiment: percent of traffic to the candidate"),
            "duration_minutes": Param(10.0, type="number", exclusiveMinimum=0),
            "sample_size": Param(0, type="integer", minimum=0,
                                 description="Experiment: end at this many impressions (0: time)"),
            "shadow_share": Param(0.1, type="number", exclusiveMinimum=0, maximum=1),
            "promote_if_better": Param(False, type="boolean"),
            "max_minutes": Param(120.0, type="number", exclusiveMinimum=0),
            "smoke_request": Param(None, type=["null", "object"]),
        },
    )  # fmt: skip
    def rollout():
        @task(retries=1, queue=SERVING_QUEUE)
        def start() -> dict:
            """Load the candidate beside the stable version behind the router (idempotent:
            a rollout of this version already under way is taken over)."""
            from recsys.config import load_settings, served_model_settings
            from recsys.delivery.rollout import active_rollout, start_weight
            from recsys.operations import start_registered_rollout

            params = get_current_context()["params"]
            if params["version"] is None:
                raise ValueError("trigger this DAG with the candidate `version` to roll out")
            settings = served_model_settings(load_settings(), model_suffix, family)
            current = active_rollout(settings)
            if current is not None and current.candidate == params["version"]:
                return {"rollout_id": current.rollout_id, "taken_over": True}
            mode = params["mode"]
            return start_registered_rollout(
                settings,
                int(params["version"]),
                mode=mode,
                weight=start_weight(mode, params["steps"], params["split"]),
                shadow_share=float(params["shadow_share"]) if mode == "shadow" else 0.0,
                smoke_request=params["smoke_request"],
                reason=f"rollout DAG {dag_id}",
            )

        analyze = RolloutAnalysisOperator(
            task_id="analyze", model_suffix=model_suffix, family=family
        )

        @task
        def finish(result: dict | str) -> dict:
            """Carry out the analysis's decision and log the rollout to MLflow."""
            from recsys.config import load_settings, served_model_settings
            from recsys.delivery import rollout as actions
            from recsys.delivery.analysis import (
                ABORT,
                POLICY_PARAMS,
                PROMOTE,
                SUPERSEDED,
                analysis_result,
            )
            from recsys.delivery.experiment import log_rollout

            result = analysis_result(result)
            settings = served_model_settings(load_settings(), model_suffix, family)
            params = get_current_context()["params"]
            if result["decision"] == SUPERSEDED:
                return result
            reason = "; ".join(result["reasons"])
            report = {k: v for k, v in result.items() if k != "windows"}
            rollout_id = result["rollout_id"]
            if result["decision"] == PROMOTE:
                done = actions.promote_rollout(settings, reason, report, rollout_id=rollout_id)
            elif result["decision"] == ABORT:
                done = actions.abort_rollout(settings, reason, report, rollout_id=rollout_id)
            else:
                done = actions.end_rollout(settings, reason, report, rollout_id=rollout_id)
            policy = {name: params.get(name) for name in POLICY_PARAMS if name in params}
            run_id = log_rollout(settings, result, policy)
            return {**result, "done": {k: v for k, v in done.items() if k != "record"},
                    "mlflow_run_id": run_id}  # fmt: skip

        start() >> analyze
        finish(analyze.output)

    return rollout()


for _family, _suffixes in served_models().items():
    for _suffix in _suffixes:
        rollout_dag(rollout_dag_id(_family, _suffix), _suffix, _family)
