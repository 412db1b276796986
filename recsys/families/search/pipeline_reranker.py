"""The reranker branch of the pipeline: one function per Airflow task, like ``.pipeline``.

The cross-encoder is a second served model (``<model>_reranker``): its version folders hold the
fine-tuned bi-encoder (retrieval over the whole catalogue) plus the cross-encoder that reorders
the bi-encoder's top candidates. It gets its own MLflow run, its own registry versions and
aliases, and goes through the same champion gate, publish, load and smoke test as the
bi-encoder (``.pipeline.compare_with_champion`` / ``register_model`` / ``deploy_model``
with :func:`reranker_settings`), so a bad reranker can be rolled back on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from recsys.config import SERVED_MODEL_SUFFIXES, Settings, served_model_settings
from recsys.families.search.pipeline import read_split_frame, train_in_mlflow_run

log = logging.getLogger(__name__)

RERANKER_SUFFIX = SERVED_MODEL_SUFFIXES["reranker"]


def reranker_settings(settings: Settings) -> Settings:
    """The same platform, pointed at the reranker's model name in the registry and Triton."""
    return served_model_settings(settings, RERANKER_SUFFIX)


SHARED_PARAMS = ("positive_threshold", "seed")
"""DAG params both models of a run share; every other :class:`.reranker.RerankerParams` field
is the DAG param ``reranker_<field>`` (``candidates``: ``rerank_candidates``)."""


def reranker_params(params: dict[str, Any]) -> dict[str, Any]:
    """:class:`.reranker.RerankerParams` fields from a run's DAG params."""
    import dataclasses

    from recsys.families.search.reranker import RerankerParams

    def key(name: str) -> str:
        if name in SHARED_PARAMS:
            return name
        return "rerank_candidates" if name == "candidates" else f"reranker_{name}"

    return {f.name: params[key(f.name)] for f in dataclasses.fields(RerankerParams)}


def fine_tune_reranker_model(
    settings: Settings,
    split: dict[str, Any],
    run_dir: Path,
    base_model: str,
    params: dict[str, Any],
    run_name: str,
    lineage: dict[str, Any],
    negatives: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the cross-encoder on the graded training pairs in its own MLflow run, plus
    the hard negatives ``negatives`` names (:func:`.pipeline.mine_negatives`) as target 0."""
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.hard_negatives import read_negatives
    from recsys.families.search.reranker import RerankerParams, fine_tune_reranker

    reranker_params = RerankerParams(**params)
    extra = read_negatives(Path(negatives["path"])) if negatives and negatives["count"] else []
    mining = {
        f"hard_negatives_{key}": value
        for key, value in (negatives or {"count": 0}).items()
        if key != "path"
    }
    run_id, result = train_in_mlflow_run(
        settings,
        run_name + RERANKER_SUFFIX,
        {
            **reranker_params.to_dict(),
            **mining,
            "base_model": base_model,
            "kind": "cross-encoder",
        },
        lineage,
        lambda on_epoch_end: fine_tune_reranker(
            read_split_frame(split["train_path"]),
            resolve_base_model(base_model),
            run_dir / "reranker_checkpoint",
            reranker_params,
            on_epoch_end=on_epoch_end,
            extra_negatives=extra,
        ),
    )
    return {"checkpoint": str(result.checkpoint_dir), "run_id": run_id, "steps": result.steps}


def evaluate_reranker_model(
    settings: Settings,
    split: dict[str, Any],
    bi_encoder_checkpoint: str,
    reranker: dict[str, Any],
    candidates: int,
    positive_threshold: float,
    hybrid: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bi-encoder (or, with ``hybrid`` = ``{"lexical": ..., "fusion": ...}``, hybrid)
    retrieval + cross-encoder reranking on the held-out queries, logged to the reranker's run
    (the same metric keys as the bi-encoder's, so the rows compare)."""
    from recsys import registry
    from recsys.families.search.evaluation import (
        calibration_sample,
        catalog_hybrid_retriever,
        torch_embedder,
    )
    from recsys.families.search.reranker import evaluate_reranked, torch_pair_scorer

    catalog = read_split_frame(split["catalog_path"])
    retrieve = None
    if hybrid is not None:
        retrieve = catalog_hybrid_retriever(
            catalog["product_title"].astype(str).tolist(),
            hybrid.get("lexical"),
            hybrid.get("fusion"),
        )
    result = evaluate_reranked(
        torch_embedder(Path(bi_encoder_checkpoint)),
        torch_pair_scorer(Path(reranker["checkpoint"])),
        read_split_frame(split["test_path"]),
        catalog,
        candidates=candidates,
        positive_threshold=positive_threshold,
        retrieve=retrieve,
        calibration_frame=calibration_sample(read_split_frame(split["train_path"])),
    )
    registry.log_metrics(settings.mlflow_tracking_uri, reranker["run_id"], result.metrics)
    return {"metrics": result.metrics, "queries": result.queries, "products": result.products}


def export_reranked_model(
    settings: Settings,
    split: dict[str, Any],
    bi_encoder_artifacts: str,
    reranker: dict[str, Any],
    run_dir: Path,
    candidates: int,
    max_length: int = 96,
    precision: str = "int8",
) -> dict[str, Any]:
    """The reranker model's serving folder: the bi-encoder's fp32 export of this run (ONNX
    encoder, catalogue embeddings, drift reference; exported once, by ``export_onnx``) plus the
    ONNX cross-encoder, served INT8 by default (``precision``; the cross-encoder's
    ``candidates`` pairs per query are most of a reranked query's cost, INT8 halves them; the
    fp32 graph stays in the folder and the gate scores the INT8 one that serves)."""
    from recsys.families.search.export import add_reranker, copy_fp32_artifacts

    artifacts = copy_fp32_artifacts(
        Path(bi_encoder_artifacts),
        run_dir / "serving_reranker",
        model_name=reranker_settings(settings).model_name,
    )
    add_reranker(
        artifacts,
        Path(reranker["checkpoint"]),
        read_split_frame(split["catalog_path"]),
        candidates=candidates,
        max_length=max_length,
        precision=precision,
    )
    return {"artifacts_dir": str(artifacts), "precision": precision}


def gate_reranker(
    settings: Settings,
    split: dict[str, Any],
    artifacts_dir: str,
    bi_encoder_decision: dict[str, Any],
    *,
    run_dir: Path,
    require_gain_over_bi_encoder: bool = True,
    min_gain: float = 0.0,
    positive_threshold: float = 2.33,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The reranker model's champion gate, plus one more condition: a reranker is only worth
    its latency when it ranks better than the bi-encoder it reorders. Both are scored as they
    serve on the same held-out queries (the bi-encoder's row comes from its own gate's table)."""
    from recsys.families.search.pipeline import compare_with_champion

    metric = "ndcg_at_10"
    decision = compare_with_champion(
        reranker_settings(settings),
        split,
        artifacts_dir,
        run_dir=run_dir,
        metric=metric,
        min_gain=min_gain,
        positive_threshold=positive_threshold,
        run_id=run_id,
    )
    if require_gain_over_bi_encoder:
        decision = require_gain_over_retriever(decision, bi_encoder_decision, metric)
    log.info("reranker gate: %s", decision["reason"])
    return decision


def require_gain_over_retriever(
    decision: dict[str, Any], bi_encoder_decision: dict[str, Any], metric: str = "ndcg_at_10"
) -> dict[str, Any]:
    """``decision`` (the reranker's champion gate) turned into "keep out" when its challenger
    does not beat the bi-encoder challenger's ``metric`` (both gates' tables score the served
    artifacts on the same held-out queries). The comparison is recorded either way."""
    reranked = _challenger(decision)[metric]
    retriever = _challenger(bi_encoder_decision)[metric]
    decision = {**decision, f"bi_encoder_{metric}": retriever}
    if not reranked > retriever:
        decision["promote"] = False
        decision["reason"] = (
            f"reranked {metric}={reranked:.4f} does not beat the bi-encoder alone "
            f"({retriever:.4f}) on the same queries; not serving it. Champion gate: "
            + decision["reason"]
        )
    return decision


def _challenger(decision: dict[str, Any]) -> dict[str, Any]:
    rows = {row["system"]: row for row in decision["table"]}
    if "challenger" not in rows:
        raise KeyError(f"gate table has no challenger row: {sorted(rows)}")
    return rows["challenger"]
