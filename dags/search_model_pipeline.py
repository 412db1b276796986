"""Airflow DAG: shop data -> GX gate -> fine-tune -> evaluate -> MLflow -> ONNX -> Triton.

Thin wiring only: every task calls one function of ``recsys.pipeline`` and passes small XComs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from recsys.alerts import task_failure_alert
from recsys.config import pipeline_schedule

DOC = """
### Search model pipeline
Validates the relevance data with the Great Expectations suites in `expectations/` (bad rows are
quarantined, a critical failure stops the run), fine-tunes the bi-encoder with in-batch
negatives, evaluates NDCG@10 / Recall@K / MRR on held-out queries, registers the model in MLflow
with lineage, exports ONNX, publishes a new numbered version into the Triton repository
atomically, loads it through the model-control API, answers a smoke query over gRPC, and only
then moves the `champion` alias (the old champion becomes `previous`).

Trigger with params to point it at other data (`data_path`), another base model or
hyperparameters. `fault_injection` deploys a deliberately faulty version to rehearse rollbacks.
"""


@dag(
    dag_id="search_model_pipeline",
    schedule=pipeline_schedule(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["search", "training", "deployment"],
    doc_md=DOC,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(minutes=1),
        "on_failure_callback": task_failure_alert,
    },
    on_failure_callback=task_failure_alert,
    params={
        "data_path": Param(
            "", type="string", description="Relevance CSV; empty = RECSYS_DATA_PATH"
        ),
        "max_rows": Param(
            0, type="integer", minimum=0, description="Use only the first N rows (0 = all)"
        ),
        "base_model": Param("minilm", type="string", description="'minilm' or a local HF folder"),
        "epochs": Param(1, type="integer", minimum=1),
        "batch_size": Param(32, type="integer", minimum=2),
        "learning_rate": Param(5e-5, type="number", exclusiveMinimum=0),
        "max_steps": Param(0, type="integer", minimum=0, description="0 = all epochs"),
        "max_length": Param(64, type="integer", minimum=8, maximum=512),
        "positive_threshold": Param(2.33, type="number", minimum=1, maximum=3),
        "test_fraction": Param(0.2, type="number", exclusiveMinimum=0, exclusiveMaximum=1),
        "seed": Param(13, type="integer"),
        "smoke_query": Param("angle bracket", type="string", minLength=1),
        "top_k": Param(10, type="integer", minimum=1, maximum=100),
        "fault_injection": Param(
            None,
            type=["null", "object"],
            description=(
                'Rehearsal only: {"mode": "raise", "after_requests": 5} '
                'or {"mode": "sleep", "sleep_ms": 500}'
            ),
        ),
    },
)
def search_model_pipeline():
    def settings_and_dir():
        from recsys.config import load_settings
        from recsys.pipeline import run_dir_for

        settings = load_settings()
        context = get_current_context()
        return settings, run_dir_for(settings, context["run_id"]), context["params"]

    @task
    def validate_data() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from recsys.data import DataFormatError
        from recsys.pipeline import validate_data as run
        from recsys.quality import DataQualityError

        settings, run_dir, params = settings_and_dir()
        try:
            return run(params["data_path"] or str(settings.data_path), run_dir, params["max_rows"])
        except (DataQualityError, DataFormatError) as exc:
            raise AirflowFailException(str(exc)) from exc  # bad data: retrying cannot help

    @task
    def split_data(validated: dict) -> dict:
        from recsys.pipeline import split_data as run

        _, run_dir, params = settings_and_dir()
        return run(validated["clean_path"], run_dir, params["test_fraction"], params["seed"])

    @task
    def fine_tune(validated: dict, split: dict) -> dict:
        from recsys.pipeline import fine_tune_model
        from recsys.registry import git_sha

        settings, run_dir, params = settings_and_dir()
        keys = (
            "epochs",
            "batch_size",
            "learning_rate",
            "max_steps",
            "max_length",
            "positive_threshold",
            "seed",
        )
        lineage = {
            "data_hash": validated["data_hash"],
            "data_path": validated["data_path"],
            "git_sha": git_sha(),
        }
        run_name = get_current_context()["run_id"]
        return fine_tune_model(
            settings,
            split,
            run_dir,
            params["base_model"],
            {k: params[k] for k in keys},
            run_name,
            lineage,
        )

    @task
    def evaluate(split: dict, trained: dict) -> dict:
        from recsys.pipeline import evaluate_model

        settings, _, params = settings_and_dir()
        return evaluate_model(
            settings, split, trained["checkpoint"], trained["run_id"], params["positive_threshold"]
        )

    @task
    def export_onnx(split: dict, trained: dict) -> dict:
        from recsys.pipeline import export_model

        settings, run_dir, params = settings_and_dir()
        return export_model(
            split, trained["checkpoint"], run_dir, settings.model_name, params["fault_injection"]
        )

    @task
    def register(validated: dict, trained: dict, evaluation: dict, exported: dict) -> dict:
        from recsys.pipeline import register_model
        from recsys.registry import git_sha

        settings, _, params = settings_and_dir()
        context = get_current_context()
        lineage = {
            "data_hash": validated["data_hash"],
            "data_path": validated["data_path"],
            "gx_success": str(validated["quality"]["success"]),
            "gx_result": validated["quality"],
            "params": {k: v for k, v in params.items()},
            "metrics": evaluation["metrics"],
            "git_sha": git_sha(),
            "airflow_run_id": context["run_id"],
            "fault_injection": params["fault_injection"],
        }
        return register_model(settings, trained["run_id"], exported["artifacts_dir"], lineage)

    @task
    def deploy(registered: dict, exported: dict) -> dict:
        from recsys.pipeline import deploy_model

        settings, _, params = settings_and_dir()
        return deploy_model(
            settings,
            registered["version"],
            exported["artifacts_dir"],
            params["smoke_query"],
            params["top_k"],
        )

    validated = validate_data()
    split = split_data(validated)
    trained = fine_tune(validated, split)
    evaluation = evaluate(split, trained)
    exported = export_onnx(split, trained)
    registered = register(validated, trained, evaluation, exported)
    deploy(registered, exported)


search_model_pipeline()
