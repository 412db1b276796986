"""The training-to-serving pipeline of any model family, and the DAG factory that wires it.

Every stage that depends on what is modelled is the family's (:class:`recsys.families.base.
ModelFamily`: validate, split, train, evaluate, export, score a serving folder); everything else
is the platform's and the same for every family: the MLflow run and its lineage, the comparison
table of the model and its baselines, the champion gate on the same held-out cases (the
champion's *published folder* re-scored by the family), registration with lineage tags and
aliases, and the deploy through :func:`recsys.deploy.deploy_model` (atomic publish, explicit
load, family smoke test, aliases, audit).

:func:`pipeline_dag` builds ``<family>_model_pipeline`` from these functions; a DAG file is one
call. The search family keeps its own, older DAG (``search_model_pipeline``): it serves two
models per run (bi-encoder and reranker) and quantizes, which this generic shape does not need.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from recsys.config import Settings

log = logging.getLogger(__name__)

# GX logs one "Skipping registering function ... because it is a closure" line per API function
# when it is first imported (200+ INFO lines), which buries a pipeline task's own lines and its
# error in the Airflow UI's log view. The pipelines' DAG files import this module before any
# task imports GX, and Airflow's `namespace_levels` setting filters only its structlog loggers.
logging.getLogger("great_expectations._docs_decorators").setLevel(logging.WARNING)


class PromotionDecision(NamedTuple):
    promote: bool
    reason: str


def should_promote(
    challenger_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    metric: str = "ndcg_at_10",
    min_gain: float = 0.0,
) -> PromotionDecision:
    """Promote when the challenger beats the champion on ``metric`` by more than ``min_gain``
    (``min_gain=0``: any strict improvement; a tie keeps the champion, since a swap costs a
    deploy and risks a regression for nothing). No champion: promote."""
    if metric not in challenger_metrics:
        raise KeyError(f"challenger metrics lack {metric!r}: {sorted(challenger_metrics)}")
    challenger = float(challenger_metrics[metric])
    if champion_metrics is None:
        return PromotionDecision(True, f"no champion yet; challenger {metric}={challenger:.4f}")
    if metric not in champion_metrics:
        raise KeyError(f"champion metrics lack {metric!r}: {sorted(champion_metrics)}")
    champion = float(champion_metrics[metric])
    gain = challenger - champion
    if gain > min_gain:
        return PromotionDecision(
            True,
            f"challenger {metric}={challenger:.4f} beats champion {champion:.4f} "
            f"by {gain:+.4f} (> min_gain {min_gain:.4f})",
        )
    return PromotionDecision(
        False,
        f"challenger {metric}={challenger:.4f} vs champion {champion:.4f}: gain {gain:+.4f} "
        f"is not > min_gain {min_gain:.4f}; keeping the champion",
    )


def run_dir_for(settings: Settings, run_id: str) -> Path:
    """The working folder of one pipeline run (safe for any Airflow run id)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    path = settings.runs_dir / safe
    path.mkdir(parents=True, exist_ok=True)
    return path


def family_settings(family: str) -> Settings:
    """The platform settings aimed at ``family``'s served model."""
    from recsys.config import load_settings, served_model_settings

    return served_model_settings(load_settings(), "", family)


def data_lineage(validated: dict[str, Any]) -> dict[str, Any]:
    """What a model was trained from: the gate's data hash and path, and the code's git sha
    (the MLflow run's tags, and part of every registered version's)."""
    from recsys.registry import git_sha

    return {
        "data_hash": validated["data_hash"],
        "data_path": validated["data_path"],
        "git_sha": git_sha(),
    }


def version_lineage(
    validated: dict[str, Any],
    params: dict[str, Any],
    metrics: dict[str, Any],
    decision: dict[str, Any],
    airflow_run_id: str,
) -> dict[str, Any]:
    """Registry tags every version carries, whatever its family: data, GX result, params,
    held-out metrics, git sha, the Airflow run that made it and the champion gate's decision.

    ``gate`` says the outcome in words a person browsing the registry reads at a glance (a
    version the gate kept out but ``force_deploy`` served anyway must not look like a normal
    promotion), and ``promotion`` the gate's reason with the metric values."""
    promoted = bool(decision.get("promote"))
    forced = not promoted and bool(params.get("force_deploy"))
    reason = decision["reason"]
    if forced:
        reason += "; deployed anyway: force_deploy skips the gate (rehearsal)"
    return {
        **data_lineage(validated),
        "gx_success": str(validated["quality"]["success"]),
        "gx_result": validated["quality"],
        "params": dict(params),
        "metrics": metrics,
        "gate": "passed"
        if promoted
        else ("failed, deployed anyway (force_deploy)" if forced else "failed, not deployed"),
        "promotion": reason,
        "airflow_run_id": airflow_run_id,
    }


def train_in_run(
    settings: Settings,
    family: Any,
    split: dict[str, Any],
    run_dir: Path,
    params: dict[str, Any],
    run_name: str,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Open the MLflow run of this pipeline run (params, lineage tags), fit the family's model
    and log its training summary; return the family's result plus ``run_id``."""
    from recsys import registry

    uri = settings.mlflow_tracking_uri
    logged = {k: v for k, v in params.items() if not isinstance(v, dict | list) and v is not None}
    tags = {"family": family.name, **{k: str(v) for k, v in lineage.items()}}
    run_id = registry.start_training_run(uri, settings.model_name, run_name, logged, tags)
    trained = family.train(split, run_dir, params)
    numbers = {
        f"train_{k}": float(v)
        for k, v in (trained.get("summary") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    registry.log_metrics(uri, run_id, numbers)
    return {**trained, "run_id": run_id}


def evaluate_in_run(
    settings: Settings,
    family: Any,
    split: dict[str, Any],
    trained: dict[str, Any],
    run_dir: Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The family's model and its baselines on the same held-out cases; the model's metrics
    go to the run, the whole table (JSON, CSV, bar chart) to its ``evaluation/`` artifacts."""
    from recsys import registry, tables

    result = family.evaluate(split, trained, run_dir, params)
    uri, run_id = settings.mlflow_tracking_uri, trained["run_id"]
    registry.log_metrics(uri, run_id, result["metrics"])
    keys = tuple(result["metrics"])
    table = tables.comparison_table(result["systems"], keys=keys)
    paths = tables.write_table(table, run_dir / "evaluation" / "systems")
    paths.append(
        tables.plot_table(table, run_dir / "evaluation" / "systems.png", keys, "model vs baselines")
    )
    mlflow_client = registry.client(uri)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), "evaluation")
    return {**result, "table": table}


def find_champion(
    settings: Settings, metric: str
) -> tuple[int | None, str | None, dict[str, float] | None]:
    """``(version, version folder or None, recorded metrics or None)`` of the ``champion``.

    No champion: ``(None, None, None)``, only when the registry says so (an unreadable
    registry raises :class:`~recsys.registry.RegistryUnavailableError`). A champion whose
    published folder is gone is described by its run's recorded ``metric``."""
    from recsys import registry
    from recsys.triton.repository import IncompleteArtifactsError, verify_version_dir

    model = settings.model_name
    version = registry.alias_version(settings.mlflow_tracking_uri, model, registry.CHAMPION)
    if version is None:
        return None, None, None
    folder = settings.triton_repo / model / str(version)
    try:
        verify_version_dir(folder)
        return version, str(folder), None
    except IncompleteArtifactsError:
        log.warning("champion v%d has no complete folder at %s", version, folder)
    uri = settings.mlflow_tracking_uri
    mlflow_client = registry.client(uri)
    with registry.registry_request(uri, f"reading champion v{version}'s recorded metrics"):
        run_id = mlflow_client.get_model_version(model, str(version)).run_id
        recorded = mlflow_client.get_run(run_id).data.metrics
    if metric not in recorded:
        raise RuntimeError(
            f"champion v{version} has neither a published folder at {folder} nor a recorded "
            f"{metric!r}; cannot compare (deploy it again with `recsys deploy --version {version}`)"
        )
    return version, None, {metric: float(recorded[metric])}


def champion_gate(
    settings: Settings,
    family: Any,
    split: dict[str, Any],
    exported: dict[str, Any],
    params: dict[str, Any],
    *,
    run_dir: Path | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Challenger vs the serving champion on the SAME held-out cases, both scored as served
    (the family scores each serving folder); promote only on a gain over ``min_gain`` in the
    family's gate metric. No champion: promote. The comparison is logged with ``run_id``."""
    from recsys import registry, tables

    metric = family.gate_metric
    challenger = exported.get("metrics") or family.score_artifacts(
        Path(exported["artifacts_dir"]), split, params
    )
    version, folder, champion = find_champion(settings, metric)
    source = "none" if version is None else "recorded"
    if folder is not None:
        champion = family.score_artifacts(Path(folder), split, params)
        source = "rescored"
    decision = should_promote(
        challenger, champion, metric=metric, min_gain=float(params.get("min_gain") or 0.0)
    )
    reason = decision.reason
    if source == "recorded":
        reason += " (champion's folder is gone: its recorded metric, a different held-out set)"
    rows = {"challenger": challenger}
    if champion is not None:
        rows["champion" if source == "rescored" else "champion_recorded"] = champion
    keys = (metric,) if source == "recorded" else tuple(challenger)
    table = tables.comparison_table(rows, keys=keys)
    if run_dir is not None:
        paths = tables.write_table(table, Path(run_dir) / "evaluation" / "champion_challenger")
        if run_id is not None:
            mlflow_client = registry.client(settings.mlflow_tracking_uri)
            for path in paths:
                mlflow_client.log_artifact(run_id, str(path), "evaluation")
    log.info("champion/challenger: %s", reason)
    return {
        "promote": decision.promote,
        "reason": reason,
        "table": table,
        "champion_version": version,
        "champion_source": source,
    }


PIPELINE_PARAMS: dict[str, dict[str, Any]] = {
    "data_path": {
        "default": "",
        "type": "string",
        "description": "The shop's data export; empty = the family's default (its env variable)",
    },
    "seed": {"default": 0, "type": "integer", "description": "Seed of the model's training"},
    "min_gain": {
        "default": 0.0,
        "type": "number",
        "minimum": 0,
        "description": "Gain in the gate metric needed over the champion",
    },
    "force_deploy": {
        "default": False,
        "type": "boolean",
        "description": "Skip the champion gate (rehearsals only)",
    },
    "smoke_request": {
        "default": None,
        "type": ["null", "object"],
        "description": "The deploy's smoke question; null = the one the export recorded",
    },
    "fault_injection": {
        "default": None,
        "type": ["null", "object"],
        "description": (
            'Rehearsal only: {"mode": "raise", "after_requests": 5} '
            'or {"mode": "sleep", "sleep_ms": 500}'
        ),
    },
}
"""The params every family's generic pipeline has; the family adds its own."""

ROLLOUT_PARAMS: dict[str, dict[str, Any]] = {
    "rollout": {
        "default": "all_at_once",
        "enum": ["all_at_once", "canary", "shadow"],
        "description": (
            "all_at_once: the new version takes all traffic; canary: it takes canary_steps in "
            "turn behind the router, judged by the rollout DAG; shadow: it gets mirrored traffic"
        ),
    },
    "canary_steps": {
        "default": [5, 25, 50, 100],
        "type": "array",
        "description": "Canary weights in percent, ascending",
    },
}
"""The deploy's rollout params, shared by every pipeline DAG (see :func:`deploy_or_roll_out`)."""

SERVING_PARAM_KNOBS: dict[str, str] = {
    "instance_count": "Triton model instances",
    "max_batch_size": "largest batch Triton forms",
    "dynamic_batching": "batch concurrent requests",
    "max_queue_delay_us": "how long a request may wait to be batched, microseconds",
    "intra_op_threads": "ONNX Runtime threads per instance",
}
"""The serving knobs a pipeline run may set, each a param of the same name
(:func:`serving_params`)."""


def serving_params() -> dict[str, dict[str, Any]]:
    """The deploy's serving params (:data:`SERVING_PARAM_KNOBS`) as Airflow ``Param`` specs,
    their defaults the knobs a platform deploy uses without them: the benchmarked defaults
    (:func:`recsys.triton.repository.default_serving`) unless ``RECSYS_TRITON_*`` variables
    say otherwise where the DAG is parsed. Turn a run's values into ``deploy_or_roll_out``'s
    ``serving`` with :func:`serving_from_params` (which :func:`deploy_or_roll_out` does itself
    when it is given no ``serving``)."""
    from recsys.config import SERVING_ENV, serving_from_env

    fields = serving_from_env()
    defaults = {knob: fields[field] for field, knob in SERVING_ENV.values()}
    specs: dict[str, dict[str, Any]] = {}
    for knob, description in SERVING_PARAM_KNOBS.items():
        kind = "boolean" if isinstance(defaults[knob], bool) else "integer"
        specs[knob] = {
            "default": defaults[knob],
            "type": ["null", kind],
            "description": f"Serving: {description} (null: the platform default)",
        }
        if kind == "integer":
            specs[knob]["minimum"] = 0 if knob == "max_queue_delay_us" else 1
    return specs


def serving_from_params(values: dict[str, Any]) -> dict[str, Any] | None:
    """The ``serving`` dict of a run's params: the :data:`SERVING_PARAM_KNOBS` it has (a null
    value: the platform default), or ``None`` when it has none of them."""
    serving = {k: values[k] for k in SERVING_PARAM_KNOBS if values.get(k) is not None}
    return serving or None


def deploy_or_roll_out(
    settings: Settings,
    version: int,
    artifacts_dir: str,
    values: dict[str, Any],
    smoke_request: dict[str, Any] | None,
    reason: str,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The pipeline's deploy: all at once (:func:`recsys.deploy.deploy_model`), or the start of
    a canary or shadow rollout (:func:`recsys.delivery.rollout.start_rollout`) whose analysis
    the pipeline then hands to the model's rollout DAG with ``rollout_conf``.

    ``serving`` (``{"instance_count": 2, "max_batch_size": 32, ...}``, ``None`` values: not
    set) overrides the platform's serving knobs (:meth:`recsys.config.Settings.serving_knobs`)
    for the published version; without it they come from the run's params
    (:func:`serving_from_params` of ``values``), else the platform defaults."""
    if serving is None:
        serving = serving_from_params(values)
    mode = values.get("rollout") or "all_at_once"
    if mode == "all_at_once":
        from recsys.deploy import deploy_model

        return {**deploy_model(settings, version, artifacts_dir, smoke_request, serving,
                               reason=reason),
                "rollout_conf": None}  # fmt: skip
    from recsys.delivery.rollout import start_rollout, start_weight

    steps = [float(s) for s in values.get("canary_steps") or [5, 25, 50, 100]]
    started = start_rollout(
        settings,
        version,
        artifacts_dir,
        mode=mode,
        weight=start_weight(mode, steps),
        shadow_share=0.1 if mode == "shadow" else 0.0,
        smoke_request=smoke_request,
        serving=serving,
        reason=reason,
    )
    conf = {"version": version, "mode": mode, "smoke_request": smoke_request}
    if mode == "canary":
        conf["steps"] = steps
    return {**started, "version": version, "rollout_conf": conf}


def rollout_handoff(family: str, suffix: str, deployed: Any) -> Any:
    """Tasks after the deploy: when it started a rollout, trigger the model's rollout DAG
    (``rollout_<family><suffix>``) with its conf; skipped after an all-at-once deploy."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
    from airflow.sdk import task

    from recsys.families import rollout_dag_id
    from recsys.scheduling import SERVING_QUEUE

    @task.short_circuit(task_id="rolled_out" + suffix, queue=SERVING_QUEUE)
    def rolled_out(deployed: dict) -> bool:
        """Only a deploy that started a rollout hands it to the rollout DAG."""
        return deployed.get("rollout_conf") is not None

    trigger = TriggerDagRunOperator(
        task_id="start_rollout_analysis" + suffix,
        queue=SERVING_QUEUE,
        trigger_dag_id=rollout_dag_id(family, suffix),
        conf=deployed["rollout_conf"],
    )
    rolled_out(deployed) >> trigger
    return trigger


def pipeline_dag(family_name: str):
    """The Airflow DAG ``<family>_model_pipeline``: GX gate -> split -> train -> evaluate with
    baselines -> export -> champion gate -> register -> deploy, for ``family_name``."""
    from datetime import datetime, timedelta

    from airflow.sdk import Param, dag, get_current_context, task

    from recsys.alerts import FailureAlert
    from recsys.config import pipeline_schedule
    from recsys.families import get_family
    from recsys.scheduling import (
        SERVING_QUEUE,
        TRAINING_POOL,
        TRAINING_PRIORITY,
        TRAINING_QUEUE,
        WEIGHT_RULE,
    )

    family = get_family(family_name)
    params = {**PIPELINE_PARAMS, **ROLLOUT_PARAMS, **serving_params(), **family.pipeline_params()}
    doc = f"""
### {family_name} model pipeline
The generic pipeline of the `{family_name}` family (`recsys.model_pipeline`): the family's Great
Expectations suite gates the data (bad rows quarantined, a critical failure stops the run),
the family splits, trains and evaluates its model next to its baselines on the same held-out
cases (the table is an artifact of the MLflow run), exports the version folder Triton serves,
and the champion gate re-scores the serving champion's published folder on the same cases:
only a challenger that beats it on `{family.gate_metric}` by more than `min_gain` is deployed.
Every challenger is registered with lineage (data hash, GX result, params, metrics, git sha,
the gate's decision); a deploy publishes a new numbered version atomically, loads it through
the model-control API, smoke-tests it over gRPC and only then moves `champion` / `previous`.

Trigger with params to point it at another export (`data_path`). `fault_injection` with
`force_deploy` deploys a deliberately faulty version to rehearse rollbacks. Tasks run in the
`training` pool at the lowest priority, like every training pipeline.
"""

    def context_parts() -> tuple[Settings, Path, dict[str, Any]]:
        from recsys.scheduling import lower_cpu_priority

        lower_cpu_priority()
        settings = family_settings(family_name)
        context = get_current_context()
        return settings, run_dir_for(settings, context["run_id"]), dict(context["params"])

    @dag(
        dag_id=f"{family_name}_model_pipeline",
        schedule=pipeline_schedule(family_name),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=[family_name, "training", "deployment"],
        doc_md=doc,
        default_args={
            "retries": 1,
            "retry_delay": timedelta(minutes=1),
            "pool": TRAINING_POOL,
            "priority_weight": TRAINING_PRIORITY,
            "weight_rule": WEIGHT_RULE,
            "queue": TRAINING_QUEUE,
            "on_failure_callback": FailureAlert("", family_name),
        },
        params={name: Param(**spec) for name, spec in params.items()},
    )
    def model_pipeline():
        @task
        def validate_data() -> dict:
            from airflow.sdk.exceptions import AirflowFailException

            from recsys.data import DataFormatError
            from recsys.quality import DataQualityError

            _, run_dir, values = context_parts()
            try:
                return family.validate(values["data_path"], run_dir, values)
            except (DataQualityError, DataFormatError, FileNotFoundError) as exc:
                raise AirflowFailException(str(exc)) from exc  # bad data: a retry cannot help

        @task
        def split_data(validated: dict) -> dict:
            _, run_dir, values = context_parts()
            return family.split(validated, run_dir, values)

        @task
        def train(validated: dict, split: dict) -> dict:
            settings, run_dir, values = context_parts()
            run_name = get_current_context()["run_id"]
            lineage = data_lineage(validated)
            return train_in_run(settings, family, split, run_dir, values, run_name, lineage)

        @task
        def evaluate(split: dict, trained: dict) -> dict:
            settings, run_dir, values = context_parts()
            return evaluate_in_run(settings, family, split, trained, run_dir, values)

        @task
        def export(split: dict, trained: dict) -> dict:
            settings, run_dir, values = context_parts()
            return family.export(split, trained, run_dir, settings.model_name, values)

        @task
        def gate(split: dict, trained: dict, exported: dict) -> dict:
            settings, run_dir, values = context_parts()
            return champion_gate(
                settings, family, split, exported, values, run_dir=run_dir, run_id=trained["run_id"]
            )

        @task(queue=SERVING_QUEUE)
        def register(
            validated: dict, trained: dict, evaluation: dict, exported: dict, decision: dict
        ) -> dict:
            from recsys.deploy import register_model

            settings, _, values = context_parts()
            run_id = get_current_context()["run_id"]
            lineage = {
                **version_lineage(validated, values, evaluation["metrics"], decision, run_id),
                "baselines": evaluation["systems"],
                "served_metrics": exported.get("metrics"),
                "fault_injection": values.get("fault_injection"),
            }
            return register_model(settings, trained["run_id"], exported["artifacts_dir"], lineage)

        @task.short_circuit(ignore_downstream_trigger_rules=False, queue=SERVING_QUEUE)
        def promoted(decision: dict) -> bool:
            """Deploy only a challenger that beat the champion, or one forced for a rehearsal."""
            return bool(decision["promote"] or get_current_context()["params"]["force_deploy"])

        @task(queue=SERVING_QUEUE)
        def deploy(registered: dict, exported: dict, decision: dict) -> dict:
            settings, _, values = context_parts()
            forced = values["force_deploy"] and not decision["promote"]
            return deploy_or_roll_out(
                settings,
                registered["version"],
                exported["artifacts_dir"],
                values,
                values.get("smoke_request"),
                reason=("forced (force_deploy): " if forced else "") + decision["reason"],
            )

        validated = validate_data()
        split = split_data(validated)
        trained = train(validated, split)
        evaluation = evaluate(split, trained)
        exported = export(split, trained)
        decision = gate(split, trained, exported)
        registered = register(validated, trained, evaluation, exported, decision)
        deployed = deploy(registered, exported, decision)
        promoted(decision) >> deployed
        rollout_handoff(family_name, "", deployed)

    return model_pipeline()
