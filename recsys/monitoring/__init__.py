"""Monitoring of the served model from Triton's own Prometheus metrics.

``metrics`` scrapes and parses ``/metrics`` into per-model-version counters, ``window`` turns two
snapshots into error rate, latency and throughput over the time between them, and ``policy``
decides, with hysteresis kept in a small JSON state file, whether a breach is sustained enough to
roll back. Nothing here talks to MLflow or loads models: the rollback itself is
:mod:`recsys.rollback`'s job, and it calls :func:`recsys.monitoring.policy.reset_model` after.
"""

from recsys.monitoring.metrics import (
    MetricsSnapshot,
    MetricsUnavailableError,
    ModelVersionCounters,
    parse_metrics,
    scrape,
)
from recsys.monitoring.policy import (
    MonitorState,
    Thresholds,
    Verdict,
    check_once,
    evaluate,
    rebaseline,
    reset_model,
)
from recsys.monitoring.window import WindowStats, aggregate_model, compute_window

__all__ = [
    "MetricsSnapshot",
    "MetricsUnavailableError",
    "ModelVersionCounters",
    "MonitorState",
    "Thresholds",
    "Verdict",
    "WindowStats",
    "aggregate_model",
    "check_once",
    "compute_window",
    "evaluate",
    "parse_metrics",
    "rebaseline",
    "reset_model",
    "scrape",
]
