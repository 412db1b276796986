"""The training-to-serving pipeline as plain functions, one per Airflow task.

Each function takes and returns JSON-serialisable values (paths, ids, metrics) so Airflow passes
only small XComs between tasks while the data itself stays in the run's working folder. The DAG
file does nothing but wire these together, and tests can call them directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.config import Settings

log = logging.getLogger(__name__)

QUALITY_SUITES = ("products", "queries", "relevance_labels")
EXPERIMENT = "product_search"


def run_dir_for(settings: Settings, run_id: str) -> Path:
    """The working folder of one pipeline run (safe for any Airflow run id)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    path = settings.runs_dir / safe
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    frame = pd.read_csv(clean_path, dtype={"product_title": str, "search_term": str})
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


def _read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"product_title": str, "search_term": str, "product_uid": str})


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
    from recsys import registry
    from recsys.encoder import resolve_base_model
    from recsys.training import TrainingParams, fine_tune

    training_params = TrainingParams(**params)
    base_dir = resolve_base_model(base_model)
    run_id = registry.start_training_run(
        settings.mlflow_tracking_uri,
        EXPERIMENT,
        run_name,
        {**training_params.to_dict(), "base_model": base_model},
        {k: str(v) for k, v in lineage.items()},
    )

    def on_epoch_end(epoch: int, loss: float) -> None:
        registry.log_metrics(settings.mlflow_tracking_uri, run_id, {"train_loss": loss}, step=epoch)

    result = fine_tune(
        _read(split["train_path"]),
        base_dir,
        run_dir / "checkpoint",
        training_params,
        on_epoch_end=on_epoch_end,
    )
    registry.log_metrics(
        settings.mlflow_tracking_uri,
        run_id,
        {"train_samples_per_second": result.samples_per_second, "train_steps": result.steps},
    )
    return {
        "checkpoint": str(result.checkpoint_dir),
        "run_id": run_id,
        "steps": result.steps,
        "device": result.device,
        "epoch_losses": result.epoch_losses,
    }


def evaluate_model(
    settings: Settings,
    split: dict[str, Any],
    checkpoint: str,
    run_id: str,
    positive_threshold: float,
) -> dict[str, Any]:
    """Score the fine-tuned model on held-out queries and log the metrics to its run."""
    from recsys import registry
    from recsys.evaluation import evaluate_encoder

    result = evaluate_encoder(
        Path(checkpoint),
        _read(split["test_path"]),
        _read(split["catalog_path"]),
        positive_threshold=positive_threshold,
    )
    registry.log_metrics(settings.mlflow_tracking_uri, run_id, result.metrics)
    return {"metrics": result.metrics, "queries": result.queries, "products": result.products}


def export_model(
    split: dict[str, Any], checkpoint: str, run_dir: Path, model_name: str, fault_injection: Any
) -> dict[str, Any]:
    """ONNX export plus product embeddings: the folder a Triton version is made of."""
    from recsys.export import build_serving_artifacts

    artifacts = build_serving_artifacts(
        Path(checkpoint),
        _read(split["catalog_path"]),
        run_dir / "serving",
        model_name=model_name,
        fault_injection=fault_injection,
    )
    return {"artifacts_dir": str(artifacts)}


def register_model(
    settings: Settings, run_id: str, artifacts_dir: str, lineage: dict[str, Any]
) -> dict[str, Any]:
    from recsys import registry

    version = registry.register_serving_model(
        settings.mlflow_tracking_uri, run_id, settings.model_name, Path(artifacts_dir), lineage
    )
    return {"version": version.version, "run_id": run_id}


def deploy_model(
    settings: Settings, version: int, artifacts_dir: str | None, smoke_query: str, top_k: int
) -> dict[str, Any]:
    """Publish ``version`` atomically into the Triton repository (skipped when
    ``artifacts_dir`` is None: the immutable version folder is already there), load it,
    smoke-test it, and only then make it ``champion``. A version that fails to load or answer
    is unloaded in favour of the champion that served before, and the task fails."""
    from recsys import audit, registry
    from recsys.locking import model_lock
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version

    model = settings.model_name
    control = TritonControl(settings.triton_grpc_url)
    with model_lock(settings.home / "locks", model):
        previous = registry.alias_version(settings.mlflow_tracking_uri, model, registry.CHAMPION)
        if artifacts_dir is not None:
            publish_version(settings.triton_repo, model, version, Path(artifacts_dir))
        try:
            control.load_version(model, version, settings.triton_repo)
            answer = control.smoke_test(model, smoke_query, top_k=top_k)
        except Exception as exc:
            # Audit first: the restore below may fail too (e.g. the server went away), and the
            # failed attempt must be on record either way.
            audit.append_record(
                settings.audit_log,
                "deploy_failed",
                model,
                version=version,
                restoring=previous,
                reason=str(exc),
            )
            if previous is not None and previous != version:
                log.error("version %d failed (%s); restoring version %d", version, exc, previous)
                control.load_version(model, previous, settings.triton_repo)
            elif previous is None:  # nothing served before: serve nothing rather than this
                log.error("version %d failed (%s); unloading it", version, exc)
                control.unload(model)
            raise
        old = registry.promote_to_champion(settings.mlflow_tracking_uri, model, version)
        audit.append_record(
            settings.audit_log,
            "deploy",
            model,
            version=version,
            replaced=old,
            smoke_query=smoke_query,
            smoke_top=answer[:3],
        )
    from recsys.monitoring.policy import reset_model

    reset_model(settings.monitor_state, model)
    log.info("version %d serves; smoke query %r -> %s", version, smoke_query, answer[:3])
    return {
        "version": version,
        "replaced": old,
        "smoke": [[pid, float(score)] for pid, score in answer],
    }
