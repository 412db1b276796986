"""Scrape Triton's Prometheus endpoint and keep the per-model-version counters monitoring needs.

Triton (2.51, ``--metrics-config=summary_latencies=true``) exposes cumulative counters per
``model`` / ``version`` label pair. Only the few that the rollback decision and its audit record
use are kept, so a snapshot is small enough to persist in the monitor's state file between
scrapes. Parsing goes through ``prometheus_client``'s parser rather than regexes: the text format
has escaping, comments, ``_total`` suffix rules and NaN spellings that a hand-rolled parser gets
subtly wrong.

Facts about the real server that shape this module (seen in ``tests/fixtures/triton_metrics_*``):

* ``nv_inference_request_failure`` carries a ``reason`` label (BACKEND, REJECTED, CANCELED,
  OTHER); the failures of a version are the sum over reasons.
* The duration counters and the latency summary only count *successful* requests, so a mean
  latency is duration / successes, not duration / (successes + failures).
* Unloading a version drops its success and duration counters, but its failure counters survive
  the unload and keep counting after a reload. Each counter therefore has to be treated on its
  own when looking for resets (see :mod:`recsys.monitoring.window`).
* Errors the model answers itself (an empty or oversized query, TOP_K out of range) are
  *successes* to Triton. The served model counts them in its own custom counter
  ``recsys_request_errors_total`` (labels ``model``, ``version``, ``instance``, ``reason``;
  every family's serving model counts them so, e.g. :mod:`recsys.families.search.serving_model`),
  kept here as ``rejected``: summed over instances and reasons, split by reason in
  ``rejected_by_reason``. Like the success counters it disappears
  when its version unloads and starts from zero on a reload.
* ``nv_cpu_utilization`` (0-1) and ``nv_cpu_memory_used_bytes`` / ``_total_bytes`` are gauges of
  the whole host, without model labels, sampled by Triton every metrics interval; until the
  first sample they read 0, including a total memory of 0, which is taken as "not measured yet".
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
INFERENCE_COUNT = "nv_inference_count"
REQUEST_DURATION = "nv_inference_request_duration_us"
QUEUE_DURATION = "nv_inference_queue_duration_us"
COMPUTE_INFER_DURATION = "nv_inference_compute_infer_duration_us"
PENDING = "nv_inference_pending_request_count"
REQUEST_SUMMARY = "nv_inference_request_summary_us"
MODEL_ERRORS = "recsys_request_errors_total"
"""The served model's own counter of the requests it refused (see the module docstring)."""
P99_QUANTILE = 0.99
CPU_UTILIZATION = "nv_cpu_utilization"
MEMORY_USED = "nv_cpu_memory_used_bytes"
MEMORY_TOTAL = "nv_cpu_memory_total_bytes"
_HOST_GAUGES = {
    CPU_UTILIZATION: "cpu_utilization",
    MEMORY_USED: "memory_used_bytes",
    MEMORY_TOTAL: "memory_total_bytes",
}

_COUNTER_FIELDS = {
    SUCCESS: "success",
    FAILURE: "failure",
    INFERENCE_COUNT: "inference_count",
    REQUEST_DURATION: "request_duration_us",
    QUEUE_DURATION: "queue_duration_us",
    COMPUTE_INFER_DURATION: "compute_infer_duration_us",
    PENDING: "pending",
    MODEL_ERRORS: "rejected",
    # prometheus_client names a counter family without its ``_total`` suffix
    MODEL_ERRORS.removesuffix("_total"): "rejected",
}
"""Metric family -> :class:`ModelVersionCounters` field; samples of a family are summed per
model version (which is what adds the ``reason`` variants of the failure counter together)."""

_BY_REASON_FIELDS = {"failure": "failure_by_reason", "rejected": "rejected_by_reason"}
"""Counter fields also kept split by their samples' ``reason`` label."""

_SNAPSHOT_FORMAT = 1


class MetricsUnavailableError(RuntimeError):
    """The metrics endpoint could not be read or did not return Triton metrics.

    Raised instead of returning an empty snapshot: "Triton is down" must never look like "no
    traffic", or a dead server would be judged healthy by the rollback policy.
    """


@dataclass(frozen=True)
class ModelVersionCounters:
    """Cumulative counters of one model version at one scrape (values as Triton reports them).

    ``pending`` is a gauge (requests waiting right now); ``p99_request_us`` is Triton's own
    rolling p99 of successful request latency, ``None`` when the summary is disabled or has no
    observations yet.
    """

    model: str
    version: str
    success: float = 0.0
    failure: float = 0.0
    inference_count: float = 0.0
    request_duration_us: float = 0.0
    queue_duration_us: float = 0.0
    compute_infer_duration_us: float = 0.0
    pending: float = 0.0
    p99_request_us: float | None = None
    failure_by_reason: dict[str, float] = field(default_factory=dict)
    """``failure`` split by Triton's ``reason`` label (BACKEND, REJECTED, CANCELED, OTHER):
    a model raising is BACKEND, an overloaded queue REJECTED; the alert says which."""
    rejected: float = 0.0
    """Requests the model answered with an error of its own (``recsys_request_errors_total``,
    all reasons and instances); Triton counts them in ``success``."""
    rejected_by_reason: dict[str, float] = field(default_factory=dict)
    """``rejected`` by the model's ``reason`` label (``invalid_argument``, ``oversized``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelVersionCounters:
        p99 = data.get("p99_request_us")
        return cls(
            model=str(data["model"]),
            version=str(data["version"]),
            success=float(data.get("success", 0.0)),
            failure=float(data.get("failure", 0.0)),
            inference_count=float(data.get("inference_count", 0.0)),
            request_duration_us=float(data.get("request_duration_us", 0.0)),
            queue_duration_us=float(data.get("queue_duration_us", 0.0)),
            compute_infer_duration_us=float(data.get("compute_infer_duration_us", 0.0)),
            pending=float(data.get("pending", 0.0)),
            p99_request_us=None if p99 is None else float(p99),
            failure_by_reason={
                str(k): float(v) for k, v in (data.get("failure_by_reason") or {}).items()
            },
            rejected=float(data.get("rejected", 0.0)),  # absent from older state files
            rejected_by_reason={
                str(k): float(v) for k, v in (data.get("rejected_by_reason") or {}).items()
            },
        )


@dataclass(frozen=True)
class MetricsSnapshot:
    """All model versions' counters at one moment (``taken_at``: unix seconds), and the host's
    CPU and memory gauges (``None`` when Triton has not measured them, or does not export
    them)."""

    taken_at: float
    models: dict[tuple[str, str], ModelVersionCounters] = field(default_factory=dict)
    cpu_utilization: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None

    def for_model(self, model: str) -> MetricsSnapshot:
        """The same snapshot restricted to the versions of ``model`` (what the state file keeps
        per monitored model, so monitoring one model never disturbs another's baseline)."""
        return replace(
            self, models={key: value for key, value in self.models.items() if key[0] == model}
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: tuple keys become a list of counter records."""
        return {
            "format": _SNAPSHOT_FORMAT,
            "taken_at": self.taken_at,
            "models": [self.models[key].to_dict() for key in sorted(self.models)],
            **{name: getattr(self, name) for name in _HOST_GAUGES.values()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsSnapshot:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` / ``KeyError`` / ``TypeError`` on a
        malformed record so the state loader can treat it as corrupt."""
        if data.get("format", _SNAPSHOT_FORMAT) != _SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {data.get('format')!r}")
        counters = [ModelVersionCounters.from_dict(item) for item in data["models"]]
        gauges = {name: data.get(name) for name in _HOST_GAUGES.values()}  # absent: older state
        return cls(
            taken_at=float(data["taken_at"]),
            models={(c.model, c.version): c for c in counters},
            **{name: None if value is None else float(value) for name, value in gauges.items()},
        )


def parse_metrics(text: str, taken_at: float) -> MetricsSnapshot:
    """Parse Prometheus exposition text from Triton into a :class:`MetricsSnapshot`.

    Text that does not parse, or parses to nothing that looks like Triton (no ``nv_`` metric at
    all, e.g. an HTML error page or another exporter's endpoint), raises
    :class:`MetricsUnavailableError`. A Triton with no model loaded is valid and yields an empty
    ``models`` mapping.
    """
    values: dict[tuple[str, str], dict[str, Any]] = {}
    host: dict[str, float] = {}
    saw_triton = False
    try:
        for family in text_string_to_metric_families(text):
            if family.name.startswith("nv_"):
                saw_triton = True
            gauge = _HOST_GAUGES.get(family.name)
            if gauge is not None:
                for sample in family.samples:  # one unlabelled sample per host gauge
                    if not math.isnan(sample.value):
                        host[gauge] = sample.value
                continue
            counter_field = _COUNTER_FIELDS.get(family.name)
            is_summary = family.name == REQUEST_SUMMARY
            if counter_field is None and not is_summary:
                continue
            for sample in family.samples:
                model, version = sample.labels.get("model"), sample.labels.get("version")
                if model is None or version is None:
                    continue
                record = values.setdefault((model, version), {})
                if counter_field is not None:
                    if not math.isnan(sample.value):
                        record[counter_field] = record.get(counter_field, 0.0) + sample.value
                        reason = sample.labels.get("reason")
                        split_field = _BY_REASON_FIELDS.get(counter_field)
                        if split_field and reason:
                            by_reason = record.setdefault(split_field, {})
                            by_reason[reason] = by_reason.get(reason, 0.0) + sample.value
                elif (
                    sample.name == REQUEST_SUMMARY
                    and _quantile(sample.labels.get("quantile")) == P99_QUANTILE
                    and not math.isnan(sample.value)
                ):
                    record["p99_request_us"] = float(sample.value)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise MetricsUnavailableError(f"unparseable Prometheus metrics text: {exc}") from exc
    if not saw_triton:
        snippet = text.strip()[:120] or "(empty)"
        raise MetricsUnavailableError(
            f"no Triton (nv_*) metrics in the text; is this Triton's metrics endpoint? "
            f"Got: {snippet!r}"
        )
    if not host.get("memory_total_bytes"):  # Triton has not sampled the host yet
        host = {}
    return MetricsSnapshot(
        taken_at=float(taken_at),
        models={
            key: ModelVersionCounters(model=key[0], version=key[1], **fields)
            for key, fields in values.items()
        },
        **{name: float(value) for name, value in host.items()},
    )


def _quantile(label: str | None) -> float | None:
    """Quantile labels are strings ("0.99"); compare them as numbers so "0.990" also matches."""
    try:
        return float(label) if label is not None else None
    except ValueError:
        return None


def scrape(url: str, timeout_s: float = 5.0) -> MetricsSnapshot:
    """GET ``url`` (Triton's ``/metrics``) and parse it; every failure to get usable metrics
    (refused connection, timeout, HTTP error status, garbage body) raises
    :class:`MetricsUnavailableError` naming the URL."""
    return scrape_with_text(url, timeout_s)[0]


def scrape_with_text(url: str, timeout_s: float = 5.0) -> tuple[MetricsSnapshot, str]:
    """:func:`scrape`, also returning the body it parsed: a caller that reads other metric
    families too (a router's counters) takes them from the same instant as the snapshot."""
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise MetricsUnavailableError(
            f"Triton metrics endpoint {url} is unreachable ({type(exc).__name__}: {exc})"
        ) from exc
    taken_at = time.time()
    if response.status_code != 200:
        raise MetricsUnavailableError(
            f"Triton metrics endpoint {url} answered HTTP {response.status_code}: "
            f"{response.text.strip()[:200]!r}"
        )
    try:
        return parse_metrics(response.text, taken_at), response.text
    except MetricsUnavailableError as exc:
        raise MetricsUnavailableError(f"Triton metrics endpoint {url}: {exc}") from exc
