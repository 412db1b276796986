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

from recsys.triton.replicas import (
    REPLICAS_ENV,
    ReplicaEntry,
    TritonReplica,
    parse_replicas,
    resolve_entries,
)
from recsys.triton.repository import (
    InvalidModelNameError,
    check_serving_knobs,
    default_serving,
    validate_model_name,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "product_search"
MAX_MODEL_NAME_LENGTH = 128
"""Longest model name accepted: it becomes a folder, a ``<name>.lock`` file and, with a suffix
such as ``_reranker``, another model's name, all of which must fit a 255-byte file name."""


def check_model_name(name: Any) -> str:
    """``name`` if it is a model name the platform may turn into paths, else
    :class:`~recsys.triton.repository.InvalidModelNameError` (a ``ValueError``) naming it.

    One rule at every boundary (CLI arguments, ``RECSYS_MODEL_NAME``, the functions that build
    lock, state, sample and repository paths from a name): letters, digits, ``_`` and ``-``
    only (:func:`recsys.triton.repository.validate_model_name`, so no ``/``, ``..``, NUL or
    newline can make a path leave its folder), at most :data:`MAX_MODEL_NAME_LENGTH` long.
    """
    if isinstance(name, str) and len(name) > MAX_MODEL_NAME_LENGTH:
        raise InvalidModelNameError(
            f"invalid model name {name[:32]!r}... ({len(name)} characters): "
            f"at most {MAX_MODEL_NAME_LENGTH} allowed"
        )
    return validate_model_name(name)


def check_version_number(version: Any, what: str = "model version") -> int:
    """``version`` if it is a registry version number (an int >= 1; MLflow numbers from 1),
    else a ``ValueError`` naming it: a version becomes a folder name too."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{what} must be a version number >= 1, got {version!r}")
    return version


_DEFAULT_SERVING = default_serving()


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
    triton_instances: int = _DEFAULT_SERVING["instance_count"]
    """Model instances a platform deploy publishes a version with (``RECSYS_TRITON_INSTANCES``;
    default the host's CPU count, at most 4). More than one keeps a slow or oversized request
    on one instance from holding up every query queued behind it, and lets ONNX Runtime (one
    thread per instance) use every core."""
    triton_max_batch_size: int = _DEFAULT_SERVING["max_batch_size"]
    """Largest batch Triton forms for a version (``RECSYS_TRITON_MAX_BATCH_SIZE``, 32)."""
    triton_dynamic_batching: bool = _DEFAULT_SERVING["dynamic_batching"]
    """Whether Triton batches concurrent requests (``RECSYS_TRITON_DYNAMIC_BATCHING``, on)."""
    triton_max_queue_delay_us: int = _DEFAULT_SERVING["max_queue_delay_us"]
    """How long a request may wait for others to batch with (``RECSYS_TRITON_MAX_QUEUE_DELAY_US``,
    2000 microseconds)."""
    triton_intra_op_threads: int = _DEFAULT_SERVING["intra_op_threads"]
    """ONNX Runtime threads per model instance (``RECSYS_TRITON_INTRA_OP_THREADS``, 1)."""
    triton_replica_entries: tuple[ReplicaEntry, ...] = ()
    """The Triton replicas deploys, rollbacks and the monitor talk to
    (``RECSYS_TRITON_REPLICAS``, :mod:`recsys.triton.replicas`); empty: the one server at
    ``triton_host``. Clients keep calling ``triton_host`` (a load balancer in front of the
    replicas)."""

    def triton_replicas(self) -> list[TritonReplica]:
        """Every Triton replica now (``dns+`` entries are looked up on each call, so replicas
        that a scale-out added are found): the ``RECSYS_TRITON_REPLICAS`` list, or the single
        server at ``triton_host`` with its gRPC and metrics ports. Raises
        :class:`~recsys.triton.replicas.ReplicaDiscoveryError` when a DNS name resolves to
        nothing."""
        if not self.triton_replica_entries:
            return [
                TritonReplica(
                    self.triton_host, self.triton_host, self.triton_grpc_port,
                    self.triton_metrics_port,
                )
            ]  # fmt: skip
        return resolve_entries(self.triton_replica_entries)

    @property
    def has_replicas(self) -> bool:
        """Whether a replica list is configured (even one of one entry): deploys, rollbacks and
        the monitor then name the replica in what they record."""
        return bool(self.triton_replica_entries)

    def serving_knobs(self, serving: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every serving knob a platform deploy publishes a version with: these settings (the
        defaults of :func:`~recsys.triton.repository.default_serving`, which the serving
        benchmark measures, unless ``RECSYS_TRITON_*`` variables say otherwise) overridden by
        ``serving`` (CLI flags, pipeline params; a ``None`` value means "not set"). Checked by
        :func:`~recsys.triton.repository.check_serving_knobs` (a ``ValueError`` names a bad
        one)."""
        knobs = {knob: getattr(self, field) for field, knob in SERVING_ENV.values()}
        knobs["response_cache"] = _DEFAULT_SERVING["response_cache"]
        given = {k: v for k, v in dict(serving or {}).items() if v is not None}
        return check_serving_knobs({**knobs, **given})

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


def _model_name_from_env() -> str:
    """``RECSYS_MODEL_NAME`` (default when unset or empty), checked by :func:`check_model_name`:
    every process builds paths from it, so a bad value stops them all with the same error."""
    value = os.environ.get("RECSYS_MODEL_NAME") or DEFAULT_MODEL_NAME
    try:
        return check_model_name(value)
    except InvalidModelNameError as exc:
        raise InvalidModelNameError(f"RECSYS_MODEL_NAME: {exc}") from None


def load_settings() -> Settings:
    """Build :class:`Settings` from ``RECSYS_*`` / ``MLFLOW_TRACKING_URI`` variables.

    Raises ``ValueError`` (:class:`~recsys.triton.repository.InvalidModelNameError`) when
    ``RECSYS_MODEL_NAME`` is not a valid model name (see :func:`check_model_name`)."""
    home = _env_path("RECSYS_HOME", PROJECT_ROOT / ".recsys")
    mlflow_port = int(os.environ.get("RECSYS_MLFLOW_PORT", "5000"))
    return Settings(
        home=home,
        triton_repo=_env_path("RECSYS_TRITON_REPO", PROJECT_ROOT / "triton_repo"),
        data_path=_env_path(
            "RECSYS_DATA_PATH", PROJECT_ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
        ),
        model_name=_model_name_from_env(),
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
        triton_replica_entries=parse_replicas(os.environ.get(REPLICAS_ENV, "")),
        **serving_from_env(),
    )


SERVING_ENV: dict[str, tuple[str, str]] = {
    "RECSYS_TRITON_INSTANCES": ("triton_instances", "instance_count"),
    "RECSYS_TRITON_MAX_BATCH_SIZE": ("triton_max_batch_size", "max_batch_size"),
    "RECSYS_TRITON_DYNAMIC_BATCHING": ("triton_dynamic_batching", "dynamic_batching"),
    "RECSYS_TRITON_MAX_QUEUE_DELAY_US": ("triton_max_queue_delay_us", "max_queue_delay_us"),
    "RECSYS_TRITON_INTRA_OP_THREADS": ("triton_intra_op_threads", "intra_op_threads"),
}
"""The variables that override the default serving knobs: variable -> (``Settings`` field,
serving knob)."""

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def serving_from_env() -> dict[str, Any]:
    """The serving ``Settings`` fields from ``RECSYS_TRITON_*`` (:data:`SERVING_ENV`), each the
    default of :func:`~recsys.triton.repository.default_serving` when unset or empty; a value
    out of range is a ``ValueError`` naming its variable."""
    defaults = default_serving()
    fields: dict[str, Any] = {}
    for variable, (field, knob) in SERVING_ENV.items():
        raw = os.environ.get(variable, "").strip()
        if not raw:
            fields[field] = defaults[knob]
            continue
        if isinstance(defaults[knob], bool):
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{variable} must be true or false (1/0), got {raw!r}")
            fields[field] = raw.lower() in _TRUE
            continue
        try:
            value: Any = int(raw)
        except ValueError:
            value = raw
        fields[field] = check_serving_knobs({knob: value}, what=variable)[knob]
    return fields


def _sample_rate(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"RECSYS_QUERY_SAMPLE_RATE must be within [0, 1], got {value!r}")
    return rate


def pipeline_schedule(family: str | None = None) -> Any:
    """Schedule of the training pipeline DAG: retraining requests, and a cron only when asked.

    The pipeline always runs when the ``query_drift`` DAG emits the retraining-request Asset
    (:data:`recsys.assets.RETRAINING_REQUEST`), and on manual triggers. A time schedule is added
    only when ``RECSYS_PIPELINE_SCHEDULE`` names one (a cron expression or preset such as
    ``@weekly``), giving an ``AssetOrTimeSchedule``: whichever comes first. It is off by default
    because an unpaused pipeline with a cron starts its latest interval at once: starting the
    stack would then start an hour of full-data CPU training nobody asked for. (A drift alert
    that asks for retraining is never ignored; to stop drift from starting runs, set the drift
    DAG's ``retrain_on_drift`` param to false.)

    ``family`` names another model family's pipeline: it is scheduled on that family's
    retraining request (:func:`recsys.assets.retraining_request`) instead.

    The cron part is a ``CronTriggerTimetable`` in UTC, which is what Airflow 3 makes of a plain
    cron string. ``@once`` and ``@continuous`` cannot be combined with an Asset and are refused.
    """
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from recsys.assets import RETRAINING_REQUEST, retraining_request

    asset = RETRAINING_REQUEST if family is None else retraining_request(family)
    value = os.environ.get("RECSYS_PIPELINE_SCHEDULE", "").strip()
    if value.lower() in {"", "none", "manual"}:
        return asset
    if value in {"@once", "@continuous"}:
        raise ValueError(
            f"RECSYS_PIPELINE_SCHEDULE={value} cannot be combined with the retraining-request "
            "Asset; use a cron expression or preset, or 'none'"
        )
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(value, timezone="UTC"), assets=asset)


SERVED_MODEL_SUFFIXES: dict[str, str] = {"bi_encoder": "", "reranker": "_reranker"}
"""The Triton/registry models a pipeline run serves, as suffixes of ``RECSYS_MODEL_NAME``: the
bi-encoder itself and the bi-encoder + cross-encoder reranker (``<model>_reranker``). Each gets
its own monitor DAG, thresholds, aliases and rollbacks."""


def family_model_name(family: str) -> str:
    """The served model name of a model family: ``RECSYS_<FAMILY>_MODEL_NAME`` (e.g.
    ``RECSYS_RECOMMEND_MODEL_NAME``), else the family's default; the legacy family's is
    ``RECSYS_MODEL_NAME``. Checked like any other name (:func:`check_model_name`)."""
    from recsys.families import LEGACY_FAMILY, get_family

    if family == LEGACY_FAMILY:
        return _model_name_from_env()
    variable = f"RECSYS_{family.upper()}_MODEL_NAME"
    value = os.environ.get(variable) or get_family(family).default_model_name
    try:
        return check_model_name(value)
    except InvalidModelNameError as exc:
        raise InvalidModelNameError(f"{variable}: {exc}") from None


def served_model_settings(settings: Settings, suffix: str, family: str | None = None) -> Settings:
    """The same platform pointed at one served model: ``settings.model_name + suffix``, or with
    ``family`` that family's model name (:func:`family_model_name`) + ``suffix``. The name is
    checked like any other (:func:`check_model_name`)."""
    import dataclasses

    from recsys.families import LEGACY_FAMILY

    base = settings.model_name if family in (None, LEGACY_FAMILY) else family_model_name(family)
    return dataclasses.replace(settings, model_name=check_model_name(base + suffix))
