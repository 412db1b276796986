"""Statistics over the window between two metric snapshots.

Triton's counters are cumulative since the version was loaded, so "the error rate now" only
exists as a difference between two scrapes. Counters go *down* when a version is unloaded and
loaded again; such a counter is taken to have restarted from zero, so its current value is the
window's increase. That is decided per counter, not per version, because Triton resets the
success and duration counters on reload but keeps the failure counters (observed on 2.51; see
``tests/fixtures/triton_metrics_reloaded.txt``): resetting all of a version's counters together
would count old failures again and roll back a healthy reload.

Two limits follow from cumulative counters and are accepted: a counter that reset and then grew
past its previous value within one window is under-counted, and requests served by a version
that was unloaded before the scrape are not seen at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from recsys.monitoring.metrics import MetricsSnapshot, ModelVersionCounters


@dataclass(frozen=True)
class WindowStats:
    """What one model version (or, from :func:`aggregate_model`, one model) did in a window.

    ``requests`` counts successes and failures; ``error_rate`` is failures / requests (0 with no
    requests). ``rejected`` (the model's own error answers) is a part of the successes.
    Latencies are means over *successful* requests, as Triton only times those, and are ``None``
    when the window had no success. ``p99_latency_ms`` is Triton's rolling p99 at
    the end of the window (its summary is not windowed by us), ``None`` when unknown.
    """

    model: str
    version: str
    seconds: float
    requests: float
    failures: float
    error_rate: float
    mean_latency_ms: float | None
    mean_queue_ms: float | None
    throughput_rps: float
    p99_latency_ms: float | None
    cpu_utilization: float | None = None
    """Host CPU use (0-1) at the end of the window, as Triton last sampled it; ``None`` unknown."""
    memory_used_bytes: float | None = None
    """Host memory in use at the end of the window; ``None`` unknown."""
    memory_total_bytes: float | None = None
    mean_compute_ms: float | None = None
    """Mean model compute time of the window's successful requests (``None`` without one)."""
    pending: float = 0.0
    """Requests waiting in Triton at the end of the window (a gauge, summed over versions)."""
    failures_by_reason: dict[str, float] = field(default_factory=dict)
    """The window's failures by Triton's ``reason`` label; reasons without failures left out."""
    rejected: float = 0.0
    """Requests the model refused with an error of its own (bad or oversized input). Triton
    counts them as successes, so they are part of ``requests`` and not of ``failures``."""
    rejected_rate: float = 0.0
    """``rejected`` / ``requests`` (0 with no requests; capped at 1, since the model counts a
    refusal just before Triton counts the request)."""
    rejected_by_reason: dict[str, float] = field(default_factory=dict)
    """The window's ``rejected`` by the model's ``reason`` label; reasons without any left out."""

    @property
    def successes(self) -> float:
        return self.requests - self.failures

    @property
    def memory_utilization(self) -> float | None:
        """Share of the host's memory in use (``None`` when either number is unknown)."""
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_utilization": self.memory_utilization}


def _increase(current: float, previous: float) -> float:
    """Increase of a cumulative counter; a decrease means it restarted from zero."""
    return current - previous if current >= previous else current


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _rejected_rate(rejected: float, requests: float) -> float:
    return min(rejected / requests, 1.0) if requests > 0 else 0.0


def _increases(current: dict[str, float], previous: dict[str, float]) -> dict[str, float]:
    """Per-key increases of counters split by a label, keys without an increase left out."""
    return {
        key: increase
        for key, value in sorted(current.items())
        if (increase := _increase(value, previous.get(key, 0.0))) > 0
    }


def _version_window(
    previous: ModelVersionCounters | None, current: ModelVersionCounters, seconds: float
) -> WindowStats:
    base = previous or ModelVersionCounters(model=current.model, version=current.version)
    successes = _increase(current.success, base.success)
    failures = _increase(current.failure, base.failure)
    duration_us = _increase(current.request_duration_us, base.request_duration_us)
    queue_us = _increase(current.queue_duration_us, base.queue_duration_us)
    compute_us = _increase(current.compute_infer_duration_us, base.compute_infer_duration_us)
    by_reason = _increases(current.failure_by_reason, base.failure_by_reason)
    rejected = _increase(current.rejected, base.rejected)
    mean_compute_us = _ratio(compute_us, successes)
    requests = successes + failures
    mean_latency_us = _ratio(duration_us, successes)
    mean_queue_us = _ratio(queue_us, successes)
    p99_us = current.p99_request_us if successes > 0 else None
    return WindowStats(
        model=current.model,
        version=current.version,
        seconds=seconds,
        requests=requests,
        failures=failures,
        error_rate=failures / requests if requests > 0 else 0.0,
        mean_latency_ms=None if mean_latency_us is None else mean_latency_us / 1000.0,
        mean_queue_ms=None if mean_queue_us is None else mean_queue_us / 1000.0,
        throughput_rps=requests / seconds if seconds > 0 else 0.0,
        p99_latency_ms=None if p99_us is None else p99_us / 1000.0,
        mean_compute_ms=None if mean_compute_us is None else mean_compute_us / 1000.0,
        pending=current.pending,
        failures_by_reason=by_reason,
        rejected=rejected,
        rejected_rate=_rejected_rate(rejected, requests),
        rejected_by_reason=_increases(current.rejected_by_reason, base.rejected_by_reason),
    )


def compute_window(
    previous: MetricsSnapshot, current: MetricsSnapshot
) -> dict[tuple[str, str], WindowStats]:
    """Per ``(model, version)`` statistics for the window from ``previous`` to ``current``.

    Every version in ``current`` gets an entry (zero traffic included); a version absent from
    ``previous`` (newly loaded) counts from zero. Versions only in ``previous`` are gone and
    have nothing left to report.
    """
    seconds = max(current.taken_at - previous.taken_at, 0.0)
    return {
        key: _version_window(previous.models.get(key), counters, seconds)
        for key, counters in sorted(current.models.items())
    }


def _version_sort_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def _weighted_mean(pairs: list[tuple[float | None, float]]) -> float | None:
    """Mean of per-version means weighted by their successes (the requests they were over)."""
    known = [(value, weight) for value, weight in pairs if value is not None and weight > 0]
    total = sum(weight for _, weight in known)
    return sum(value * weight for value, weight in known) / total if total > 0 else None


def aggregate_model(stats: dict[tuple[str, str], WindowStats], model: str) -> WindowStats | None:
    """Combine the versions of ``model`` into one :class:`WindowStats` (``None`` when the model
    has no version in ``stats``), because a client sees the model, not a version.

    Means are re-weighted by each version's successes; the p99 is the worst version's, since
    quantiles cannot be merged exactly and the conservative choice is the one that protects
    users. ``version`` lists the versions combined, e.g. ``"1,2"``.
    """
    parts = [s for (name, _), s in stats.items() if name == model]
    if not parts:
        return None
    return combine(parts, model)


def combine(parts: list[WindowStats], model: str) -> WindowStats:
    """One :class:`WindowStats` of several windows of ``model``: its versions
    (:func:`aggregate_model`), or the same model on several Triton replicas (the whole a client
    behind the load balancer sees). Counts add up, means are re-weighted by successes, the p99
    is the worst part's, ``pending`` adds up, and the host gauges are the busiest part's (the
    host that saturates first is the one that hurts). ``version`` lists the distinct versions."""
    parts = sorted(parts, key=lambda s: _version_sort_key(s.version))
    versions: list[str] = []
    for part in parts:
        for version in part.version.split(","):
            if version not in versions:
                versions.append(version)
    requests = sum(s.requests for s in parts)
    failures = sum(s.failures for s in parts)
    rejected = sum(s.rejected for s in parts)
    seconds = max(s.seconds for s in parts)
    p99s = [s.p99_latency_ms for s in parts if s.p99_latency_ms is not None]
    cpu = [s.cpu_utilization for s in parts if s.cpu_utilization is not None]
    memory = [s for s in parts if s.memory_utilization is not None]
    busiest = max(memory, key=lambda s: s.memory_utilization or 0.0) if memory else None
    return WindowStats(
        model=model,
        version=",".join(versions),
        seconds=seconds,
        requests=requests,
        failures=failures,
        error_rate=failures / requests if requests > 0 else 0.0,
        mean_latency_ms=_weighted_mean([(s.mean_latency_ms, s.successes) for s in parts]),
        mean_queue_ms=_weighted_mean([(s.mean_queue_ms, s.successes) for s in parts]),
        throughput_rps=requests / seconds if seconds > 0 else 0.0,
        p99_latency_ms=max(p99s) if p99s else None,
        mean_compute_ms=_weighted_mean([(s.mean_compute_ms, s.successes) for s in parts]),
        pending=sum(s.pending for s in parts),
        failures_by_reason=_sum_by_reason(parts),
        rejected=rejected,
        rejected_rate=_rejected_rate(rejected, requests),
        rejected_by_reason=_sum_by_reason(parts, "rejected_by_reason"),
        cpu_utilization=max(cpu) if cpu else None,
        memory_used_bytes=busiest.memory_used_bytes if busiest else None,
        memory_total_bytes=busiest.memory_total_bytes if busiest else None,
    )


def _sum_by_reason(parts: list[WindowStats], name: str = "failures_by_reason") -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for reason, count in getattr(part, name).items():
            total[reason] = total.get(reason, 0.0) + count
    return dict(sorted(total.items()))


def with_host_usage(stats: WindowStats | None, snapshot: MetricsSnapshot) -> WindowStats | None:
    """``stats`` with the host CPU and memory gauges of ``snapshot`` (the window's end).

    They are gauges of the whole machine, not of a model version, so they are attached to the
    model's window as they are rather than differenced like the counters."""
    if stats is None:
        return None
    return replace(
        stats,
        cpu_utilization=snapshot.cpu_utilization,
        memory_used_bytes=snapshot.memory_used_bytes,
        memory_total_bytes=snapshot.memory_total_bytes,
    )
