"""Airflow DAG: shop data -> GX gate -> fine-tune -> evaluate -> MLflow -> ONNX -> Triton.

Thin wiring only: every task calls one function of ``recsys.families.search.pipeline`` and
passes small XComs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from recsys.alerts import task_failure_alert
from recsys.config import SERVED_MODEL_SUFFIXES, pipeline_schedule
from recsys.families.search.hybrid import FUSION_METHODS, RETRIEVAL_MODES
from recsys.families.search.profiles import PROFILE_NAMES
from recsys.model_pipeline import ROLLOUT_PARAMS, data_lineage, rollout_handoff, serving_params
from recsys.model_pipeline import version_lineage as version_tags
from recsys.scheduling import (
    SERVING_QUEUE,
    TRAINING_POOL,
    TRAINING_PRIORITY,
    TRAINING_QUEUE,
    WEIGHT_RULE,
)

DOC = """
### Search model pipeline
Validates the relevance data with the Great Expectations suites in `expectations/` (bad rows are
quarantined, a critical failure stops the run), fine-tunes the bi-encoder with in-batch
negatives, evaluates NDCG@10 / Recall@K / MRR on held-out queries, registers the model in MLflow
with lineage, exports ONNX (fp32, and INT8 when `precision` allows and the NDCG cost stays
within `max_ndcg_drop`), scores BM25 and the off-the-shelf base model on the same held-out
queries, and re-scores the serving champion there too: only a challenger that beats the champion
(by more than `min_gain` NDCG@10) is deployed. Deploying publishes a new numbered version into the
Triton repository atomically, loads it through the model-control API, answers a smoke query over
gRPC, and only then moves the `champion` alias (the old champion becomes `previous`). Every
challenger is registered, deployed or not, with the decision among its tags; the comparison
tables and plots are artifacts of its MLflow run.

With `train_reranker` a cross-encoder is fine-tuned too and served as a second Triton model
(`<model>_reranker`: bi-encoder retrieval, cross-encoder reranking of the top
`rerank_candidates`), gated, registered and deployed the same way; with
`reranker_must_beat_bi_encoder` (default) it is only served when it also ranks better than the
bi-encoder alone.

Trigger with params to point it at other data (`data_path`), another base model or
hyperparameters. `fault_injection` (with `force_deploy`, which skips the champion gate) deploys a
deliberately faulty version to rehearse rollbacks.

Every task runs in the `training` pool at the lowest priority and lowers its own CPU priority
(`RECSYS_TRAINING_NICE`): training can never take the executor slots or the CPU that the
monitor and its rollback need. The schedule is manual and drift-triggered unless
`RECSYS_PIPELINE_SCHEDULE` names a cron.
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
        "pool": TRAINING_POOL,
        "priority_weight": TRAINING_PRIORITY,
        "weight_rule": WEIGHT_RULE,
        "queue": TRAINING_QUEUE,
        "on_failure_callback": task_failure_alert,
    },
    params={
        "data_path": Param(
            "", type="string", description="Relevance CSV; empty = RECSYS_DATA_PATH"
        ),
        "max_rows": Param(
            0, type="integer", minimum=0, description="Use only the first N rows (0 = all)"
        ),
        "base_model": Param("minilm", type="string", description="'minilm' or a local HF folder"),
        "epochs": Param(
            1, type="integer", minimum=1, description="Bi-encoder: passes over the data"
        ),
        "batch_size": Param(
            32,
            type="integer",
            minimum=2,
            description="Bi-encoder: pairs per step (each pair's title is a negative for the rest)",
        ),
        "learning_rate": Param(
            5e-5, type="number", exclusiveMinimum=0, description="Bi-encoder: peak AdamW rate"
        ),
        "max_steps": Param(0, type="integer", minimum=0, description="0 = all epochs"),
        "max_length": Param(
            64,
            type="integer",
            minimum=8,
            maximum=512,
            description="Bi-encoder: tokens kept of a query or title",
        ),
        "scale": Param(
            20.0, type="number", exclusiveMinimum=0, description="In-batch softmax temperature"
        ),
        "warmup_fraction": Param(
            0.1,
            type="number",
            minimum=0,
            maximum=1,
            description="Share of steps the learning rate warms up over",
        ),
        "positive_threshold": Param(
            2.33,
            type="number",
            minimum=1,
            maximum=3,
            description="Relevance (1-3) from which a judged pair counts as relevant",
        ),
        "test_fraction": Param(
            0.2,
            type="number",
            exclusiveMinimum=0,
            exclusiveMaximum=1,
            description="Share of queries held out for evaluation (split by query)",
        ),
        "seed": Param(13, type="integer", description="Split, shuffling and sampling seed"),
        "precision": Param(
            "auto",
            type="string",
            enum=["auto", "fp32", "int8"],
            description="auto: INT8 when its NDCG@10 drop is within max_ndcg_drop, else fp32",
        ),
        "max_ndcg_drop": Param(
            0.01,
            type="number",
            minimum=0,
            maximum=1,
            description="Largest NDCG@10 loss INT8 may cost and still be served",
        ),
        "min_gain": Param(
            0.0, type="number", minimum=0, description="NDCG@10 gain needed over the champion"
        ),
        "force_deploy": Param(
            False, type="boolean", description="Skip the champion gate (rehearsals only)"
        ),
        **{name: Param(**schema) for name, schema in ROLLOUT_PARAMS.items()},
        # Serving knobs (instances, dynamic batching...): defaults = the benchmarked ones.
        **{name: Param(**schema) for name, schema in serving_params().items()},
        "profile": Param(
            "custom",
            type="string",
            enum=list(PROFILE_NAMES),
            description=(
                "Named param set for the hardware: 'cpu' (about an hour on 2 cores) or 'gpu' "
                "(full epochs, large batches). Its values replace the defaults below; a param "
                "you change yourself still wins. 'custom' = exactly the params below."
            ),
        ),
        "retrieval": Param(
            "dense",
            type="string",
            enum=list(RETRIEVAL_MODES),
            description="'hybrid' serves BM25 over titles fused with the bi-encoder",
        ),
        "fusion": Param(
            "rrf",
            type="string",
            enum=list(FUSION_METHODS),
            description="How hybrid retrieval fuses: reciprocal rank, or a weighted score sum",
        ),
        "fusion_dense_weight": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description=(
                "'weighted' fusion only: the dense score's weight; empty = tuned on the "
                "training queries"
            ),
        ),
        "fusion_depth": Param(
            100,
            type="integer",
            minimum=1,
            maximum=1000,
            description="Products taken from each list before fusing",
        ),
        "tune_bm25": Param(
            True,
            type="boolean",
            description="Tune BM25 stemming/k1/b on the training queries (baseline and index)",
        ),
        "compile": Param(
            False,
            type="boolean",
            description="Bi-encoder: torch.compile the model (long GPU runs; slow to start)",
        ),
        "train_reranker": Param(
            True, type="boolean", description="Also train and serve the cross-encoder reranker"
        ),
        "reranker_epochs": Param(
            1, type="integer", minimum=1, description="Cross-encoder: passes over the pairs"
        ),
        "reranker_batch_size": Param(
            16, type="integer", minimum=2, description="Cross-encoder: judged pairs per step"
        ),
        "reranker_learning_rate": Param(
            3e-5, type="number", exclusiveMinimum=0, description="Cross-encoder: peak AdamW rate"
        ),
        "reranker_max_steps": Param(0, type="integer", minimum=0, description="0 = all epochs"),
        "reranker_max_length": Param(
            96,
            type="integer",
            minimum=16,
            maximum=512,
            description="Cross-encoder: tokens of a query + title pair",
        ),
        "reranker_in_batch_negatives": Param(
            True, type="boolean", description="Also train on another query's title (target 0)"
        ),
        "rerank_candidates": Param(
            20,
            type="integer",
            minimum=2,
            maximum=100,
            description="Products of the (dense or hybrid) retrieval the cross-encoder reranks",
        ),
        "hard_negatives_per_query": Param(
            0,
            type="integer",
            minimum=0,
            maximum=50,
            description=(
                "Reranker hard negatives per training query, mined with this run's bi-encoder "
                "(unjudged products at ranks min..max); 0 = none"
            ),
        ),
        "reranker_compile": Param(
            False, type="boolean", description="Cross-encoder: torch.compile the model"
        ),
        "hard_negatives_min_rank": Param(
            4,
            type="integer",
            minimum=1,
            description="First bi-encoder rank mined (the very top may be unlabelled matches)",
        ),
        "hard_negatives_max_rank": Param(
            30, type="integer", minimum=1, description="Last bi-encoder rank mined"
        ),
        "reranker_must_beat_bi_encoder": Param(
            True, type="boolean", description="Serve the reranker only if it beats the bi-encoder"
        ),
        "smoke_query": Param(
            "angle bracket",
            type="string",
            minLength=1,
            description="Query a new version must answer over gRPC before it serves",
        ),
        "top_k": Param(
            10, type="integer", minimum=1, maximum=100, description="Results of the smoke query"
        ),
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
        from recsys.families.search.profiles import apply_profile
        from recsys.model_pipeline import run_dir_for
        from recsys.scheduling import lower_cpu_priority

        lower_cpu_priority()  # batch work: serving, monitoring and rollback get the CPU first
        settings = load_settings()
        context = get_current_context()
        declared = context["dag"].params
        params = apply_profile(context["params"], {key: declared[key] for key in declared})
        return settings, run_dir_for(settings, context["run_id"]), params

    def version_lineage(validated: dict, evaluation: dict, decision: dict) -> dict:
        """Registry tags every version carries (:func:`recsys.model_pipeline.version_lineage`)."""
        context = get_current_context()
        metrics = evaluation["metrics"]
        return version_tags(validated, context["params"], metrics, decision, context["run_id"])

    @task
    def validate_data() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from recsys.data import DataFormatError
        from recsys.families.search.pipeline import validate_data as run
        from recsys.quality import DataQualityError

        settings, run_dir, params = settings_and_dir()
        try:
            return run(params["data_path"] or str(settings.data_path), run_dir, params["max_rows"])
        except (DataQualityError, DataFormatError) as exc:
            raise AirflowFailException(str(exc)) from exc  # bad data: retrying cannot help

    @task
    def split_data(validated: dict) -> dict:
        from recsys.families.search.pipeline import split_data as run

        _, run_dir, params = settings_and_dir()
        return run(validated["clean_path"], run_dir, params["test_fraction"], params["seed"])

    @task
    def fine_tune(validated: dict, split: dict) -> dict:
        from recsys.families.search.pipeline import fine_tune_model
        from recsys.families.search.training import TrainingParams

        settings, run_dir, params = settings_and_dir()
        keys = TrainingParams.__dataclass_fields__
        return fine_tune_model(
            settings,
            split,
            run_dir,
            params["base_model"],
            {k: params[k] for k in keys},
            get_current_context()["run_id"],
            data_lineage(validated),
        )

    @task
    def evaluate(split: dict, trained: dict) -> dict:
        from recsys.families.search.pipeline import evaluate_model

        settings, _, params = settings_and_dir()
        return evaluate_model(
            settings, split, trained["checkpoint"], trained["run_id"], params["positive_threshold"]
        )

    @task
    def tune_lexical(split: dict, trained: dict) -> dict:
        """BM25 settings tuned on the training queries (baseline row and hybrid index)."""
        from recsys.families.search.pipeline import tune_lexical as run

        settings, _, params = settings_and_dir()
        return run(
            settings,
            split,
            tune=params["tune_bm25"],
            run_id=trained["run_id"],
            positive_threshold=params["positive_threshold"],
        )

    @task
    def evaluate_baselines(split: dict, trained: dict, evaluation: dict, lexical: dict) -> dict:
        from recsys.families.search.pipeline import evaluate_baselines as run

        settings, run_dir, params = settings_and_dir()
        return run(
            settings,
            split,
            run_dir,
            params["base_model"],
            challenger_metrics=evaluation["metrics"],
            run_id=trained["run_id"],
            positive_threshold=params["positive_threshold"],
            lexical=lexical["lexical"],
        )

    @task
    def export_onnx(split: dict, trained: dict, lexical: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from recsys.families.search.pipeline import export_model, fusion_settings
        from recsys.families.search.quantization import QuantizationRejectedError

        settings, run_dir, params = settings_and_dir()
        try:
            return export_model(
                split,
                trained["checkpoint"],
                run_dir,
                settings.model_name,
                params["fault_injection"],
                precision=params["precision"],
                max_ndcg_drop=params["max_ndcg_drop"],
                positive_threshold=params["positive_threshold"],
                retrieval=params["retrieval"],
                lexical=lexical["lexical"],
                fusion=fusion_settings(params),
            )
        except QuantizationRejectedError as exc:
            raise AirflowFailException(str(exc)) from exc  # the same model fails again

    @task
    def champion_gate(split: dict, trained: dict, exported: dict) -> dict:
        from recsys.families.search.pipeline import compare_with_champion

        settings, run_dir, params = settings_and_dir()
        return compare_with_champion(
            settings,
            split,
            exported["artifacts_dir"],
            run_dir=run_dir,
            min_gain=params["min_gain"],
            positive_threshold=params["positive_threshold"],
            run_id=trained["run_id"],
            challenger_metrics=exported.get("metrics"),
        )

    @task(queue=SERVING_QUEUE)
    def register(
        validated: dict, trained: dict, evaluation: dict, exported: dict, decision: dict
    ) -> dict:
        from recsys.deploy import register_model

        settings, _, params = settings_and_dir()
        lineage = {
            **version_lineage(validated, evaluation, decision),
            "precision": exported["precision"],
            "quantization": exported.get("quantization"),
            "fault_injection": params["fault_injection"],
        }
        return register_model(settings, trained["run_id"], exported["artifacts_dir"], lineage)

    @task.short_circuit(ignore_downstream_trigger_rules=False, queue=SERVING_QUEUE)
    def promoted(decision: dict) -> bool:
        """Deploy only a challenger that beat the champion, or one forced for a rehearsal."""
        params = get_current_context()["params"]
        return bool(decision["promote"] or params["force_deploy"])

    @task(queue=SERVING_QUEUE)
    def deploy(registered: dict, exported: dict, decision: dict, model_suffix: str = "") -> dict:
        """Serve the registered version of the bi-encoder (or, with ``model_suffix``, of
        another served model of this run), saying in the audit record why."""
        from recsys.config import served_model_settings
        from recsys.model_pipeline import deploy_or_roll_out

        settings, _, params = settings_and_dir()
        forced = params["force_deploy"] and not decision["promote"]
        # The reranker model is always deployed all at once (its rollout DAG can still be
        # triggered by hand with `recsys deploy --canary --model <model>_reranker`).
        values = params if not model_suffix else {**params, "rollout": "all_at_once"}
        return deploy_or_roll_out(
            served_model_settings(settings, model_suffix),
            registered["version"],
            exported["artifacts_dir"],
            values,
            {"query": params["smoke_query"], "top_k": params["top_k"]},
            reason=("forced (force_deploy): " if forced else "") + decision["reason"],
        )

    validated = validate_data()
    split = split_data(validated)
    trained = fine_tune(validated, split)
    evaluation = evaluate(split, trained)
    lexical = tune_lexical(split, trained)
    evaluate_baselines(split, trained, evaluation, lexical)
    exported = export_onnx(split, trained, lexical)
    decision = champion_gate(split, trained, exported)
    registered = register(validated, trained, evaluation, exported, decision)
    deployed = deploy(registered, exported, decision)
    promoted(decision) >> deployed
    rollout_handoff("search", "", deployed)

    # The reranker: a second served model over the same split and bi-encoder.
    @task.short_circuit
    def reranker_enabled() -> bool:
        return bool(get_current_context()["params"]["train_reranker"])

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def hard_negatives_wanted() -> bool:
        """Mining needs this run's bi-encoder, so the reranker then trains after it; without
        hard negatives the reranker trains beside the bi-encoder (both training slots)."""
        _, _, params = settings_and_dir()
        return params["hard_negatives_per_query"] > 0

    @task
    def mine_hard_negatives(split: dict, trained: dict) -> dict:
        """The reranker's hard negatives, from this run's bi-encoder on the training queries."""
        from recsys.families.search.pipeline import mine_negatives, mining_settings

        _, run_dir, params = settings_and_dir()
        return mine_negatives(
            split,
            trained["checkpoint"],
            run_dir,
            mining_settings(params),
        )

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def fine_tune_reranker(validated: dict, split: dict) -> dict:
        """Runs once the mining is done, or at once when it is skipped (no hard negatives)."""
        from recsys.families.search.pipeline_reranker import (
            fine_tune_reranker_model,
            reranker_params,
        )

        settings, run_dir, params = settings_and_dir()
        return fine_tune_reranker_model(
            settings,
            split,
            run_dir,
            params["base_model"],
            reranker_params(params),
            get_current_context()["run_id"],
            data_lineage(validated),
            # None when mining was skipped: the reranker trains on judged pairs only.
            negatives=get_current_context()["ti"].xcom_pull(task_ids="mine_hard_negatives"),
        )

    @task
    def evaluate_reranker(split: dict, trained: dict, reranker: dict, lexical: dict) -> dict:
        from recsys.families.search.pipeline import fusion_settings
        from recsys.families.search.pipeline_reranker import evaluate_reranker_model

        settings, _, params = settings_and_dir()
        return evaluate_reranker_model(
            settings,
            split,
            trained["checkpoint"],
            reranker,
            params["rerank_candidates"],
            params["positive_threshold"],
            hybrid=(
                {"lexical": lexical["lexical"], "fusion": fusion_settings(params)}
                if params["retrieval"] == "hybrid"
                else None
            ),
        )

    @task
    def export_reranker(split: dict, exported: dict, reranker: dict) -> dict:
        from recsys.families.search.pipeline_reranker import export_reranked_model

        settings, run_dir, params = settings_and_dir()
        return export_reranked_model(
            settings,
            split,
            exported["artifacts_dir"],
            reranker,
            run_dir,
            params["rerank_candidates"],
            params["reranker_max_length"],
        )

    @task
    def reranker_gate(split: dict, reranker: dict, exported: dict, bi_decision: dict) -> dict:
        from recsys.families.search.pipeline_reranker import gate_reranker

        settings, run_dir, params = settings_and_dir()
        return gate_reranker(
            settings,
            split,
            exported["artifacts_dir"],
            bi_decision,
            run_dir=run_dir,
            require_gain_over_bi_encoder=params["reranker_must_beat_bi_encoder"],
            min_gain=params["min_gain"],
            positive_threshold=params["positive_threshold"],
            run_id=reranker["run_id"],
        )

    @task(queue=SERVING_QUEUE)
    def register_reranker(
        validated: dict, reranker: dict, evaluation: dict, exported: dict, decision: dict
    ) -> dict:
        from recsys.deploy import register_model
        from recsys.families.search.pipeline_reranker import reranker_settings

        settings, _, _ = settings_and_dir()
        lineage = version_lineage(validated, evaluation, decision)
        return register_model(
            reranker_settings(settings), reranker["run_id"], exported["artifacts_dir"], lineage
        )

    enabled = reranker_enabled()
    negatives = mine_hard_negatives(split, trained)
    enabled >> hard_negatives_wanted() >> negatives
    reranker = fine_tune_reranker(validated, split)
    enabled >> reranker
    negatives >> reranker
    reranker_evaluation = evaluate_reranker(split, trained, reranker, lexical)
    reranker_exported = export_reranker(split, exported, reranker)
    reranker_decision = reranker_gate(split, reranker, reranker_exported, decision)
    reranker_registered = register_reranker(
        validated, reranker, reranker_evaluation, reranker_exported, reranker_decision
    )
    promoted.override(task_id="reranker_promoted")(reranker_decision) >> deploy.override(
        task_id="deploy_reranker"
    )(
        reranker_registered,
        reranker_exported,
        reranker_decision,
        model_suffix=SERVED_MODEL_SUFFIXES["reranker"],
    )


search_model_pipeline()
