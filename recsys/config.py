"""Runtime settings, read from the environment so that the CLI, Airflow tasks and tests agree.

Every process of the platform (the stack launcher, Airflow workers, the Triton python backend,
pytest) resolves its paths and endpoints through :func:`load_settings`, so a single set of
``RECSYS_*`` variables points the whole system at another data set, repository or port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "product_search"


@dataclass(frozen=True)
class Settings:
    """Where the platform keeps its state and how it reaches its services."""

    home: Path
    """State folder: MLflow DB and artifacts, Airflow home, logs, audit log, monitor state."""
    triton_repo: Path
    """Triton model repository; versions are written here atomically."""
    data_path: Path
    """Home Depot style relevance CSV (id, product_uid, product_title, search_term, relevance)."""
    model_name: str
    """Name of the model in both the MLflow registry and the Triton repository."""
    mlflow_tracking_uri: str
    triton_host: str
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    mlflow_port: int
    airflow_port: int
    query_sample_dir: Path
    """Where Triton's model writes its sample of served queries (``<dir>/<model>/<version>/``)
    for the online drift check; ``RECSYS_QUERY_SAMPLE_DIR``, ``<home>/query_samples`` by
    default."""
    query_sample_rate: float
    """Share of served queries sampled (``RECSYS_QUERY_SAMPLE_RATE``, 0.1 by default; 0 turns
    sampling, and with it the drift check, off)."""

    @property
    def triton_http_url(self) -> str:
        return f"{self.triton_host}:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.triton_host}:{self.triton_grpc_port}"

    @property
    def triton_metrics_url(self) -> str:
        return f"http://{self.triton_host}:{self.triton_metrics_port}/metrics"

    @property
    def audit_log(self) -> Path:
        return self.home / "audit" / "audit.jsonl"

    @property
    def alerts_log(self) -> Path:
        return self.home / "alerts" / "alerts.jsonl"

    @property
    def monitor_state(self) -> Path:
        return self.home / "monitor" / "state.json"

    @property
    def drift_state(self) -> Path:
        """The drift check's memory: how far it has read each sample file, when it last asked
        for retraining."""
        return self.home / "monitor" / "drift_state.json"

    @property
    def runs_dir(self) -> Path:
        """Per-run working folders (validated data, checkpoints, exports, reports)."""
        return self.home / "runs"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def load_settings() -> Settings:
    """Build :class:`Settings` from ``RECSYS_*`` / ``MLFLOW_TRACKING_URI`` variables."""
    home = _env_path("RECSYS_HOME", PROJECT_ROOT / ".recsys")
    mlflow_port = int(os.environ.get("RECSYS_MLFLOW_PORT", "5000"))
    return Settings(
        home=home,
        triton_repo=_env_path("RECSYS_TRITON_REPO", PROJECT_ROOT / "triton_repo"),
        data_path=_env_path(
            "RECSYS_DATA_PATH", PROJECT_ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
        ),
        model_name=os.environ.get("RECSYS_MODEL_NAME", DEFAULT_MODEL_NAME),
        mlflow_tracking_uri=os.environ.get(
            "MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}"
        ),
        triton_host=os.environ.get("RECSYS_TRITON_HOST", "127.0.0.1"),
        triton_http_port=int(os.environ.get("RECSYS_TRITON_HTTP_PORT", "8000")),
        triton_grpc_port=int(os.environ.get("RECSYS_TRITON_GRPC_PORT", "8001")),
        triton_metrics_port=int(os.environ.get("RECSYS_TRITON_METRICS_PORT", "8002")),
        mlflow_port=mlflow_port,
        airflow_port=int(os.environ.get("RECSYS_AIRFLOW_PORT", "8080")),
        query_sample_dir=_env_path("RECSYS_QUERY_SAMPLE_DIR", home / "query_samples"),
        query_sample_rate=_sample_rate(os.environ.get("RECSYS_QUERY_SAMPLE_RATE", "0.1")),
    )


def _sample_rate(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"RECSYS_QUERY_SAMPLE_RATE must be within [0, 1], got {value!r}")
    return rate


def pipeline_schedule() -> Any:
    """Schedule of the training pipeline DAG: retraining requests, and a cron only when asked.

    The pipeline always runs when the ``query_drift`` DAG emits the retraining-request Asset
    (:data:`recsys.assets.RETRAINING_REQUEST`), and on manual triggers. A time schedule is added
    only when ``RECSYS_PIPELINE_SCHEDULE`` names one (a cron expression or preset such as
    ``@weekly``), giving an ``AssetOrTimeSchedule``: whichever comes first. It is off by default
    because an unpaused pipeline with a cron starts its latest interval at once: starting the
    stack would then start an hour of full-data CPU training nobody asked for. (A drift alert
    that asks for retraining is never ignored; to stop drift from starting runs, set the drift
    DAG's ``retrain_on_drift`` param to false.)

    The cron part is a ``CronTriggerTimetable`` in UTC, which is what Airflow 3 makes of a plain
    cron string. ``@once`` and ``@continuous`` cannot be combined with an Asset and are refused.
    """
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from recsys.assets import RETRAINING_REQUEST

    value = os.environ.get("RECSYS_PIPELINE_SCHEDULE", "").strip()
    if value.lower() in {"", "none", "manual"}:
        return RETRAINING_REQUEST
    if value in {"@once", "@continuous"}:
        raise ValueError(
            f"RECSYS_PIPELINE_SCHEDULE={value} cannot be combined with the retraining-request "
            "Asset; use a cron expression or preset, or 'none'"
        )
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(value, timezone="UTC"), assets=RETRAINING_REQUEST
    )


SERVED_MODEL_SUFFIXES: dict[str, str] = {"bi_encoder": "", "reranker": "_reranker"}
"""The Triton/registry models a pipeline run serves, as suffixes of ``RECSYS_MODEL_NAME``: the
bi-encoder itself and the bi-encoder + cross-encoder reranker (``<model>_reranker``). Each gets
its own monitor DAG, thresholds, aliases and rollbacks."""


def served_model_settings(settings: Settings, suffix: str) -> Settings:
    """The same platform pointed at one served model (``settings.model_name + suffix``)."""
    import dataclasses

    return dataclasses.replace(settings, model_name=settings.model_name + suffix)
