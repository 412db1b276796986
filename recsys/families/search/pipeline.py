"""The training-to-serving pipeline as plain functions, one per Airflow task.

Each function takes and returns JSON-serialisable values (paths, ids, metrics) so Airflow passes
only small XComs between tasks while the data itself stays in the run's working folder. The DAG
file does nothing but wire these together, and tests can call them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from recsys.config import Settings

if TYPE_CHECKING:
    from recsys.families.search.training import TrainingResult

log = logging.getLogger(__name__)

QUALITY_SUITES = ("products", "queries", "relevance_labels")
EXPERIMENT = "product_search"


def validate_data(data_path: str, run_dir: Path, max_rows: int = 0) -> dict[str, Any]:
    """Gate the raw data through the GX suites; quarantine bad rows; stop on critical failures."""
    from recsys.data import frame_fingerprint, read_relevance_csv
    from recsys.quality import validate_frame

    frame = read_relevance_csv(data_path)
    if max_rows:
        frame = frame.head(max_rows)
    report = validate_frame(frame, QUALITY_SUITES, run_dir / "quality")
    clean_path = run_dir / "clean.csv"
    report.clean.to_csv(clean_path, index=False)
    summary = report.to_summary()
    log.info(
        "data quality: %d rows in, %d clean, %d quarantined; report %s",
        len(frame),
        len(report.clean),
        len(report.quarantined),
        report.report_dir,
    )
    return {
        "clean_path": str(clean_path),
        "data_path": str(data_path),
        "data_hash": frame_fingerprint(frame),
        "rows": len(frame),
        "quality": summary,
    }


def split_data(clean_path: str, run_dir: Path, test_fraction: float, seed: int) -> dict[str, Any]:
    """Split by query and write train/test/catalogue files for the later stages."""
    from recsys.data import product_catalog, split_by_query

    frame = pd.read_csv(
        clean_path,
        dtype={"product_title": str, "search_term": str},
        keep_default_na=False,
        na_values=[""],
    )
    split = split_by_query(frame, test_fraction=test_fraction, seed=seed)
    paths = {name: run_dir / f"{name}.csv" for name in ("train", "test", "catalog")}
    split.train.to_csv(paths["train"], index=False)
    split.test.to_csv(paths["test"], index=False)
    product_catalog(frame).to_csv(paths["catalog"], index=False)
    return {
        **{f"{name}_path": str(path) for name, path in paths.items()},
        "train_queries": int(split.train["search_term"].nunique()),
        "test_queries": int(split.test["search_term"].nunique()),
    }


def read_split_frame(path: str) -> pd.DataFrame:
    """A train/test/catalogue file written by :func:`split_data`, with ids and text as str."""
    return pd.read_csv(
        path,
        dtype={"product_title": str, "search_term": str, "product_uid": str},
        keep_default_na=False,
        na_values=[""],
    )


def fine_tune_model(
    settings: Settings,
    split: dict[str, Any],
    run_dir: Path,
    base_model: str,
    params: dict[str, Any],
    run_name: str,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Fine-tune the bi-encoder; open the MLflow run and log params and per-epoch loss."""
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.training import TrainingParams, fine_tune

    training_params = TrainingParams(**params)
    run_id, result = train_in_mlflow_run(
        settings,
        run_name,
        {**training_params.to_dict(), "base_model": base_model},
        lineage,
        lambda on_epoch_end: fine_tune(
            read_split_frame(split["train_path"]),
            resolve_base_model(base_model),
            run_dir / "checkpoint",
            training_params,
            on_epoch_end=on_epoch_end,
        ),
    )
    return {
        "checkpoint": str(result.checkpoint_dir),
        "run_id": run_id,
        "steps": result.steps,
        "device": result.device,
        "epoch_losses": result.epoch_losses,
    }


def train_in_mlflow_run(
    settings: Settings,
    run_name: str,
    logged_params: dict[str, Any],
    lineage: dict[str, Any],
    train: Callable[[Callable[[int, float], None]], TrainingResult],
) -> tuple[str, TrainingResult]:
    """Open an MLflow run (params, lineage tags), run ``train(on_epoch_end)`` logging each
    epoch's loss to it as it goes, then the run's training speed; return the run id and result.
    Both models train this way, so their runs read alike in the MLflow UI."""
    from recsys import registry

    uri = settings.mlflow_tracking_uri
    run_id = registry.start_training_run(
        uri, EXPERIMENT, run_name, logged_params, {k: str(v) for k, v in lineage.items()}
    )

    def on_epoch_end(epoch: int, loss: float) -> None:
        registry.log_metrics(uri, run_id, {"train_loss": loss}, step=epoch)

    result = train(on_epoch_end)
    registry.log_metrics(
        uri,
        run_id,
        {"train_samples_per_second": result.samples_per_second, "train_steps": result.steps},
    )
    return run_id, result


def evaluate_model(
    settings: Settings,
    split: dict[str, Any],
    checkpoint: str,
    run_id: str,
    positive_threshold: float,
) -> dict[str, Any]:
    """Score the fine-tuned model on held-out queries and log the metrics to its run (the
    precision/recall/F1 threshold chosen on training pairs, the majority class beside them)."""
    from recsys import registry
    from recsys.families.search.evaluation import calibration_sample, evaluate_encoder

    result = evaluate_encoder(
        Path(checkpoint),
        read_split_frame(split["test_path"]),
        read_split_frame(split["catalog_path"]),
        positive_threshold=positive_threshold,
        calibration_frame=calibration_sample(read_split_frame(split["train_path"])),
    )
    registry.log_metrics(settings.mlflow_tracking_uri, run_id, result.metrics)
    return {"metrics": result.metrics, "queries": result.queries, "products": result.products}


def export_model(
    split: dict[str, Any],
    checkpoint: str,
    run_dir: Path,
    model_name: str,
    fault_injection: Any,
    *,
    precision: str = "fp32",
    quantize: bool = True,
    max_ndcg_drop: float = 0.01,
    positive_threshold: float = 2.33,
    retrieval: str = "dense",
    lexical: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """ONNX export plus product embeddings: the folder a Triton version is made of.

    ``retrieval`` "hybrid" adds a BM25 index built with ``lexical`` (the settings
    :func:`tune_lexical` chose) and the ``fusion`` settings (:func:`.export.add_hybrid`), before
    anything is scored, so every metric below is the hybrid system's.

    With ``quantize`` (forced by ``precision`` "int8"/"auto") an INT8 encoder is written beside
    the fp32 one and both are scored on the held-out queries; ``precision`` picks what the
    manifest serves (see :func:`.quantization.choose_precision`: "int8" fails the task
    when the gate refuses INT8, "auto" falls back to fp32). Both NDCGs, the fp32/INT8 cosines
    and the decision are recorded in the manifest under ``quantization``.
    """
    from recsys.families.search import quantization
    from recsys.families.search.export import build_serving_artifacts
    from recsys.families.search.hybrid import RETRIEVAL_MODES
    from recsys.families.search.promotion import evaluate_serving_artifacts

    catalog = read_split_frame(split["catalog_path"])
    artifacts = build_serving_artifacts(
        Path(checkpoint),
        catalog,
        run_dir / "serving",
        model_name=model_name,
        fault_injection=fault_injection,
    )
    write_training_reference(artifacts, split)
    if retrieval not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {retrieval!r}")
    if retrieval == "hybrid":
        from recsys.families.search.export import add_hybrid

        fusion = dict(fusion or {})
        if fusion.get("method") == "weighted" and fusion.get("dense_weight") is None:
            fusion["dense_weight"] = tune_dense_weight(
                artifacts,
                read_split_frame(split["train_path"]),
                lexical,
                fusion,
                positive_threshold,
            )
        add_hybrid(artifacts, lexical, fusion)
    if precision not in quantization.PRECISIONS:
        raise ValueError(f"precision must be one of {quantization.PRECISIONS}, got {precision!r}")
    if not quantize and precision == "fp32":
        return {"artifacts_dir": str(artifacts), "precision": "fp32", "retrieval": retrieval}

    fp32_path = artifacts / quantization.FP32_ONNX_FILE
    int8_path = quantization.quantize_encoder(fp32_path)
    titles = catalog["product_title"].astype(str).tolist()
    test = read_split_frame(split["test_path"])
    probes = [*titles[:64], *test["search_term"].astype(str).unique()[:64].tolist()]
    agreement = quantization.embedding_agreement(
        fp32_path, int8_path, artifacts / "tokenizer.json", probes
    )
    metrics = {}
    for name in ("fp32", "int8"):
        quantization.set_served_encoder(artifacts, name, {})
        metrics[name] = evaluate_serving_artifacts(
            artifacts, test, catalog, positive_threshold=positive_threshold
        ).metrics
    scores = {name: values["ndcg_at_10"] for name, values in metrics.items()}
    served, reason = quantization.choose_precision(
        precision, scores["fp32"], scores["int8"], max_ndcg_drop
    )  # raises QuantizationRejectedError for a refused explicit "int8"
    record = {
        "fp32_ndcg_at_10": scores["fp32"],
        "int8_ndcg_at_10": scores["int8"],
        **agreement,
        "max_ndcg_drop": max_ndcg_drop,
        "requested": precision,
        "decision": reason,
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
    }
    quantization.set_served_encoder(artifacts, served, record)
    log.info("serving %s: %s", served, reason)
    return {
        "artifacts_dir": str(artifacts),
        "precision": served,
        "retrieval": retrieval,
        "quantization": record,
        # The served folder's held-out metrics, so the champion gate need not score it again.
        "metrics": metrics[served],
    }


DENSE_WEIGHT_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)


def tune_dense_weight(
    artifacts_dir: Path,
    train_frame: pd.DataFrame,
    lexical: dict[str, Any] | None,
    fusion: dict[str, Any],
    positive_threshold: float = 2.33,
    max_queries: int = 1000,
) -> float:
    """The weighted fusion's dense weight with the best NDCG@10 on (a seeded sample of) the
    TRAINING queries, over the exported folder's own catalogue embeddings and encoder: the
    weight a "tuned weighted sum" serves, chosen without looking at the held-out queries."""
    import json

    import numpy as np

    from recsys.families.search.baselines import sample_queries
    from recsys.families.search.evaluation import (
        hybrid_retriever,
        judged_queries,
        onnx_embedder,
        ranking_metrics,
        relevance_grade,
    )
    from recsys.families.search.hybrid import FusionConfig, LexicalConfig, LexicalIndex

    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    with np.load(artifacts_dir / "products.npz", allow_pickle=False) as stored:
        product_ids = [str(i) for i in stored["ids"]]
        product_emb = stored["embeddings"]
        titles = [str(t) for t in stored["titles"]]
    sample = sample_queries(train_frame, max_queries)
    sample = sample[sample["product_uid"].astype(str).isin(set(product_ids))]
    queries = judged_queries(sample)
    embed = onnx_embedder(
        artifacts_dir / "encoder.onnx",
        artifacts_dir / "tokenizer.json",
        int(manifest.get("max_query_tokens", 64)),
    )
    query_emb = embed(queries)
    index = LexicalIndex.build(titles, LexicalConfig.from_dict(lexical or {}))
    grade = relevance_grade(positive_threshold)
    scores = {}
    for weight in DENSE_WEIGHT_GRID:
        config = FusionConfig.from_dict({**fusion, "dense_weight": weight})
        run = hybrid_retriever(index, config)(queries, query_emb, product_ids, product_emb, 10)
        scores[weight] = ranking_metrics(sample, run, grade, (10,))["ndcg_at_10"]
        log.info(
            "weighted fusion, dense weight %.2f: training NDCG@10 %.4f", weight, scores[weight]
        )
    best = max(DENSE_WEIGHT_GRID, key=lambda w: (scores[w], -abs(w - 0.5)))
    log.info("weighted fusion: dense weight %.2f chosen on %d training queries", best, len(queries))
    return best


def write_training_reference(artifacts_dir: Path, split: dict[str, Any]) -> Path:
    """The training queries' profile (lengths, vocabulary, embedding centroid) in the version
    folder, which the ``query_drift`` DAG compares served queries with."""
    from recsys.families.search.drift_reference import write_query_reference

    train = read_split_frame(split["train_path"])
    return write_query_reference(artifacts_dir, train["search_term"].astype(str).tolist())


def tune_lexical(
    settings: Settings,
    split: dict[str, Any],
    *,
    tune: bool = True,
    run_id: str | None = None,
    positive_threshold: float = 2.33,
) -> dict[str, Any]:
    """The BM25 settings (stemming, ``k1``, ``b``) for this run: tuned on the TRAINING queries
    (never the held-out ones, which judge the result) with ``tune``, else the defaults. Both the
    BM25 baseline row and a hybrid version's index use them, so the baseline is at its best and
    the served index is the one that was chosen. Logged to ``run_id`` as ``bm25_*`` params."""
    from recsys import registry
    from recsys.families.search.hybrid import LexicalConfig

    if not tune:
        return {"lexical": LexicalConfig().to_dict(), "tuned": False}
    from recsys.families.search.baselines import tune_bm25

    config, grid = tune_bm25(
        read_split_frame(split["train_path"]),
        read_split_frame(split["catalog_path"]),
        positive_threshold=positive_threshold,
    )
    if run_id is not None:
        registry.log_params(
            settings.mlflow_tracking_uri,
            run_id,
            {f"bm25_{key}": value for key, value in config.to_dict().items()},
        )
    log.info("BM25 settings tuned on the training queries: %s", config.to_dict())
    return {"lexical": config.to_dict(), "tuned": True, "grid": grid}


def fusion_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The :class:`.hybrid.FusionConfig` settings of a run's DAG params (``fusion*``)."""
    return {
        "method": params["fusion"],
        "depth": params["fusion_depth"],
        "dense_weight": params["fusion_dense_weight"],
    }


def mining_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The :class:`.hard_negatives.MiningParams` of a run's DAG params (``hard_negatives_*``)."""
    return {
        "per_query": params["hard_negatives_per_query"],
        "min_rank": params["hard_negatives_min_rank"],
        "max_rank": params["hard_negatives_max_rank"],
        "seed": params["seed"],
    }


def mine_negatives(
    split: dict[str, Any], checkpoint: str, run_dir: Path, params: dict[str, Any]
) -> dict[str, Any]:
    """Hard negatives for the reranker from this run's bi-encoder on the training queries
    (:mod:`.hard_negatives`), written to the run folder for the reranker's training task."""
    from recsys.families.search.evaluation import torch_embedder
    from recsys.families.search.hard_negatives import (
        MiningParams,
        mine_hard_negatives,
        write_negatives,
    )

    mining = MiningParams(**params)
    negatives = mine_hard_negatives(
        torch_embedder(Path(checkpoint)),
        read_split_frame(split["train_path"]),
        read_split_frame(split["catalog_path"]),
        mining,
    )
    path = write_negatives(negatives, run_dir / "hard_negatives.csv")
    return {"path": str(path), "count": len(negatives), **mining.to_dict()}


def evaluate_baselines(
    settings: Settings,
    split: dict[str, Any],
    run_dir: Path,
    base_model: str,
    challenger_metrics: dict[str, float] | None = None,
    run_id: str | None = None,
    positive_threshold: float = 2.33,
    lexical: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """BM25 (with the ``lexical`` settings :func:`tune_lexical` chose) and the un-fine-tuned
    base model on the held-out queries, next to the fine-tuned model's metrics
    (``challenger_metrics``, from :func:`evaluate_model`). The table is written as JSON and CSV
    and, with ``run_id``, logged to that MLflow run under ``evaluation/``."""
    from recsys.families.search import baselines
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.hybrid import LexicalConfig

    test, catalog = read_split_frame(split["test_path"]), read_split_frame(split["catalog_path"])
    bm25_config = LexicalConfig.from_dict(lexical or {})
    results: dict[str, Any] = {
        "bm25": baselines.evaluate_bm25(
            test, catalog, positive_threshold=positive_threshold, config=bm25_config
        ),
        "base_model": baselines.evaluate_base_model(
            resolve_base_model(base_model), test, catalog, positive_threshold=positive_threshold
        ),
    }
    if challenger_metrics is not None:
        results["fine_tuned"] = challenger_metrics
    table = baselines.comparison_table(results)
    paths = write_evaluation_table(
        settings, table, run_dir / "evaluation" / "baselines", run_id, "fine-tuned vs baselines"
    )
    return {"table": table, "table_paths": [str(p) for p in paths]}


def write_evaluation_table(
    settings: Settings,
    table: list[dict[str, Any]],
    path_stem: Path,
    run_id: str | None,
    title: str,
    keys: tuple[str, ...] | None = None,
) -> list[Path]:
    """Write a comparison table as JSON, CSV and a bar-chart PNG and, with ``run_id``, log
    all three to that MLflow run under ``evaluation/`` (the registry UI links the run)."""
    from recsys import registry, tables
    from recsys.families.search import baselines

    paths = tables.write_table(table, path_stem)
    paths.append(
        tables.plot_table(
            table, Path(path_stem).with_suffix(".png"), keys or baselines.TABLE_KEYS, title
        )
    )
    if run_id is not None:
        mlflow_client = registry.client(settings.mlflow_tracking_uri)
        for path in paths:
            mlflow_client.log_artifact(run_id, str(path), "evaluation")
    return paths


def compare_with_champion(
    settings: Settings,
    split: dict[str, Any],
    artifacts_dir: str,
    *,
    run_dir: Path | None = None,
    champion_dir: str | None = None,
    metric: str = "ndcg_at_10",
    min_gain: float = 0.0,
    positive_threshold: float = 2.33,
    run_id: str | None = None,
    challenger_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Challenger (``artifacts_dir``) vs the serving champion on the SAME held-out queries.

    The champion is the registry's ``champion`` alias, scored from its published version
    folder in the Triton repository (``champion_dir`` overrides the lookup, e.g. for tests).
    No champion: promote. A registry that cannot be read raises
    :class:`~recsys.registry.RegistryUnavailableError`: "no champion" is an answer only when
    the registry says so, never a way to promote without a comparison during an outage. A
    champion whose folder is gone cannot be re-scored; then its recorded run metric is used and
    the reason says so. Returns ``{"promote", "reason", "table", "champion_version",
    "champion_source"}``; the table is logged with ``run_id``.
    ``challenger_metrics``: the challenger folder's metrics on this split, when its export
    already scored it as it serves (:func:`export_model` does so when it quantizes).
    """
    from recsys.families.search import baselines
    from recsys.families.search.promotion import evaluate_serving_artifacts
    from recsys.model_pipeline import find_champion, should_promote

    test, catalog = read_split_frame(split["test_path"]), read_split_frame(split["catalog_path"])
    challenger = challenger_metrics or (
        evaluate_serving_artifacts(
            Path(artifacts_dir), test, catalog, positive_threshold=positive_threshold
        ).metrics
    )
    champion_version, source, champion = None, "none", None
    if champion_dir is None:
        champion_version, champion_dir, champion = find_champion(settings, metric)
        source = "recorded" if champion is not None else source
    if champion_dir is not None:
        champion = evaluate_serving_artifacts(
            Path(champion_dir), test, catalog, positive_threshold=positive_threshold
        ).metrics
        source = "rescored"
    decision = should_promote(challenger, champion, metric=metric, min_gain=min_gain)
    reason = decision.reason
    results: dict[str, Any] = {"challenger": challenger}
    if source == "recorded":
        reason += " (champion's artifacts are gone: its recorded metric, a different held-out set)"
        table = baselines.comparison_table(
            {"challenger": challenger, "champion_recorded": champion}, keys=(metric,)
        )
    else:
        if champion is not None:
            results["champion"] = champion
        table = baselines.comparison_table(results)
    if run_dir is not None:
        keys = (metric,) if source == "recorded" else None
        stem = Path(run_dir) / "evaluation" / f"champion_challenger_{settings.model_name}"
        write_evaluation_table(settings, table, stem, run_id, "challenger vs champion", keys)
    log.info("champion/challenger: %s", reason)
    return {
        "promote": decision.promote,
        "reason": reason,
        "table": table,
        "champion_version": champion_version,
        "champion_source": source,
    }
