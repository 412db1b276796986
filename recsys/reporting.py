"""Record Triton's serving metrics over time and draw them as a PNG a user can look at.

The compose deployment has Prometheus and Grafana; the single-machine stack has neither, yet a
demo of "deploy a broken model, watch it roll back" is only convincing if one can *see* the
error rate rise and fall. :class:`MetricsRecorder` scrapes Triton's ``/metrics`` in a
background thread (through the platform's own :func:`~recsys.monitoring.metrics.scrape` and
:func:`~recsys.monitoring.window.compute_window`, so the plot shows exactly what the rollback
policy sees), and :func:`render_dashboard_png` draws the panels of the Grafana dashboard
(``deploy/grafana/dashboards/recsys-serving.json``) with the deploys and rollbacks of the audit
log as vertical markers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys.monitoring.metrics import MetricsSnapshot, MetricsUnavailableError, scrape
from recsys.monitoring.window import aggregate_model, compute_window

log = logging.getLogger(__name__)

EVENT_STYLES: dict[str, tuple[str, str]] = {
    "deploy": ("tab:blue", "--"),
    "rollback": ("tab:red", "-"),
    "deploy_failed": ("tab:orange", ":"),
    "rollback_failed": ("black", ":"),
}
"""Audit actions drawn as markers -> (colour, line style); other actions (alerts) are left out
because they duplicate the rollback they announce."""

FOCUS_MARGIN_S = 30.0
"""Seconds of context drawn before the faulty deploy and after the rollback (see
:func:`fault_window`)."""


@dataclass(frozen=True)
class Sample:
    """What one model did between two scrapes, ending at ``ts`` (unix seconds).

    ``versions`` are the versions that answered (or failed) requests in the window, i.e. what
    the Grafana "Current model version" panel shows; empty when there was no traffic.
    Latencies are ``None`` without a successful request, as Triton only times successes.
    """

    ts: float
    seconds: float
    requests: float
    failures: float
    request_rate: float
    error_rate: float
    mean_latency_ms: float | None
    p99_latency_ms: float | None
    mean_queue_ms: float | None
    versions: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_between(previous: MetricsSnapshot, current: MetricsSnapshot, model: str) -> Sample:
    """The :class:`Sample` of ``model`` for the window between two snapshots."""
    stats = compute_window(previous, current)
    seconds = max(current.taken_at - previous.taken_at, 0.0)
    combined = aggregate_model(stats, model)
    served = tuple(
        sorted(
            (s.version for (name, _), s in stats.items() if name == model and s.requests > 0),
            key=lambda v: (0, int(v)) if v.isdigit() else (1, 0),
        )
    )
    if combined is None:
        return Sample(current.taken_at, seconds, 0.0, 0.0, 0.0, 0.0, None, None, None, served)
    return Sample(
        ts=current.taken_at,
        seconds=seconds,
        requests=combined.requests,
        failures=combined.failures,
        request_rate=combined.requests / seconds if seconds > 0 else 0.0,
        error_rate=combined.error_rate,
        mean_latency_ms=combined.mean_latency_ms,
        p99_latency_ms=combined.p99_latency_ms,
        mean_queue_ms=combined.mean_queue_ms,
        versions=served,
    )


class MetricsRecorder:
    """Scrape ``metrics_url`` every ``interval_s`` seconds in a daemon thread and keep one
    :class:`Sample` of ``model`` per scrape.

    A failed scrape (Triton restarting, a slow answer) is logged and counted in
    :attr:`scrape_errors`, and the next good scrape covers the gap: a recorder that died with
    the first hiccup would lose exactly the moments worth plotting. Use as a context manager
    or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, metrics_url: str, model: str, interval_s: float = 2.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.metrics_url = metrics_url
        self.model = model
        self.interval_s = interval_s
        self.scrape_errors = 0
        self._samples: list[Sample] = []
        self._previous: MetricsSnapshot | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def samples(self) -> list[Sample]:
        """A copy of the samples so far, oldest first (safe to read while recording)."""
        with self._lock:
            return list(self._samples)

    def _scrape_once(self) -> None:
        try:
            current = scrape(self.metrics_url, timeout_s=max(self.interval_s, 2.0))
        except MetricsUnavailableError as exc:
            self.scrape_errors += 1
            log.warning("metrics recorder: %s", exc)
            return
        with self._lock:
            if self._previous is not None:
                self._samples.append(sample_between(self._previous, current, self.model))
            self._previous = current

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._scrape_once()

    def start(self) -> MetricsRecorder:
        """Take the baseline scrape now (so traffic right after ``start`` is counted) and begin
        recording in the background."""
        if self._thread is not None:
            raise RuntimeError("recorder already started")
        self._scrape_once()
        self._thread = threading.Thread(target=self._run, name="metrics-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop the thread, take a final scrape (so the last requests are not lost to the
        interval) and return all samples."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=self.interval_s + 10.0)
            self._thread = None
            self._scrape_once()
        return self.samples

    def __enter__(self) -> MetricsRecorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _event_time(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["ts"])).astimezone()
    except (KeyError, ValueError):
        return None


def _event_label(record: dict[str, Any]) -> str:
    action = str(record.get("action"))
    if action == "rollback":
        return f"rollback v{record.get('from_version')}→v{record.get('to_version')}"
    if action == "deploy":
        return f"deploy v{record.get('version')}"
    return action


def _recorded_events(
    samples: list[Sample], audit_records: list[dict[str, Any]]
) -> list[tuple[float, dict[str, Any]]]:
    """``(unix time, record)`` of the drawable audit records within the recording (plus one
    interval either side), oldest first."""
    pad = max((s.seconds for s in samples), default=0.0)
    start_ts, end_ts = samples[0].ts - samples[0].seconds - pad, samples[-1].ts + pad
    events = []
    for record in audit_records:
        when = _event_time(record)
        if (
            when is not None
            and record.get("action") in EVENT_STYLES
            and start_ts <= when.timestamp() <= end_ts
        ):
            events.append((when.timestamp(), record))
    return sorted(events, key=lambda event: event[0])


def fault_window(
    samples: list[Sample],
    audit_records: list[dict[str, Any]],
    margin_s: float = FOCUS_MARGIN_S,
) -> tuple[float, float]:
    """The part of a recording worth drawing, as unix ``(start, end)``.

    A demo records from before a pipeline run, so most of its samples are idle training
    minutes; drawn whole, the fault is a sliver at the right edge. The window runs from
    ``margin_s`` before the deploy that preceded the first failed request (or before that
    failure, when the deploy was not recorded) to ``margin_s`` after the first rollback that
    followed it (or after the last failure), clipped to the recording. Without failures it spans
    the recorded deploys and rollbacks, and without those the whole recording.
    """
    if not samples:
        raise ValueError("no samples to plot (was the recorder started and stopped?)")
    first_ts, last_ts = samples[0].ts - samples[0].seconds, samples[-1].ts
    events = _recorded_events(samples, audit_records)
    failing = [s for s in samples if s.failures > 0]
    if failing:
        fault_start = failing[0].ts - failing[0].seconds
        deploys = [ts for ts, r in events if r["action"] == "deploy" and ts <= failing[0].ts]
        start = deploys[-1] if deploys else fault_start
        rollbacks = [ts for ts, r in events if r["action"] == "rollback" and ts >= fault_start]
        end = rollbacks[0] if rollbacks else failing[-1].ts
    elif events:
        start, end = events[0][0], events[-1][0]
    else:
        return first_ts, last_ts
    return max(first_ts, start - margin_s), min(last_ts, end + margin_s)


def render_dashboard_png(
    samples: list[Sample],
    audit_records: list[dict[str, Any]],
    path: Path | str,
    title: str = "recsys serving",
    margin_s: float | None = FOCUS_MARGIN_S,
) -> Path:
    """Draw ``samples`` as the Grafana dashboard's panels over time and save a PNG at ``path``.

    Panels: request rate (with failures), error rate, mean and p99 latency, queue time, served
    version. Audit records whose action is in :data:`EVENT_STYLES` and whose time falls within
    the drawn window become labelled vertical markers on every panel, so a reader sees the
    error rate climb after the deploy and drop after the rollback.

    Only :func:`fault_window` is drawn (``margin_s`` of context either side); ``margin_s=None``
    draws the whole recording. The window is also written into the PNG's text metadata
    (``Window``: ISO start/end), so a reader or a test can tell what the picture covers.
    Raises ``ValueError`` without samples: an empty chart would look like "no traffic".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("no samples to plot (was the recorder started and stopped?)")
    path = Path(path)
    if margin_s is None:
        window = (samples[0].ts - samples[0].seconds, samples[-1].ts)
    else:
        window = fault_window(samples, audit_records, margin_s)
    # A sample covers (ts - seconds, ts]: keep every one that overlaps the window.
    samples = [s for s in samples if s.ts >= window[0] and s.ts - s.seconds <= window[1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    times = [datetime.fromtimestamp(s.ts).astimezone() for s in samples]
    events = [
        (datetime.fromtimestamp(ts).astimezone(), record)
        for ts, record in _recorded_events(samples, audit_records)
    ]

    def series(name: str) -> list[float]:
        return [float("nan") if getattr(s, name) is None else getattr(s, name) for s in samples]

    fig, axes = plt.subplots(3, 2, figsize=(14, 10), sharex=True, constrained_layout=True)
    ax_rate, ax_err, ax_lat, ax_queue, ax_ver, ax_count = axes.flat
    ax_rate.plot(times, series("request_rate"), marker=".", label="requests/s")
    ax_rate.plot(
        times,
        [s.failures / s.seconds if s.seconds > 0 else 0.0 for s in samples],
        marker=".",
        color="tab:red",
        label="failures/s",
    )
    ax_rate.set_title("Request rate")
    ax_rate.set_ylabel("req/s")
    # No requests is "no data", not 0 % errors: leave a gap like Grafana does.
    ax_err.plot(
        times,
        [100.0 * s.error_rate if s.requests > 0 else float("nan") for s in samples],
        marker=".",
        color="tab:red",
    )
    ax_err.set_title("Error rate")
    ax_err.set_ylabel("% of requests")
    ax_err.set_ylim(-2, 102)
    ax_lat.plot(times, series("mean_latency_ms"), marker=".", label="mean")
    ax_lat.plot(times, series("p99_latency_ms"), marker=".", label="p99 (Triton summary)")
    ax_lat.set_title("Latency of successful requests")
    ax_lat.set_ylabel("ms")
    ax_queue.plot(times, series("mean_queue_ms"), marker=".", color="tab:purple")
    ax_queue.set_title("Queue time (mean)")
    ax_queue.set_ylabel("ms")
    versions = sorted(
        {v for s in samples for v in s.versions},
        key=lambda v: (0, int(v)) if v.isdigit() else (1, 0),
    )
    for index, version in enumerate(versions):
        served_at = [t for t, s in zip(times, samples, strict=True) if version in s.versions]
        ax_ver.scatter(served_at, [index] * len(served_at), s=40, label=f"v{version}")
    ax_ver.set_yticks(range(len(versions)), [f"v{v}" for v in versions])
    ax_ver.set_ylim(-0.5, max(len(versions) - 0.5, 0.5))
    ax_ver.set_title("Served version (versions with traffic)")
    ax_count.plot(times, [s.requests for s in samples], marker=".", label="requests")
    ax_count.plot(times, [s.failures for s in samples], marker=".", color="tab:red", label="failed")
    ax_count.set_title("Requests per scrape")

    labelled: set[str] = set()
    for when, record in events:
        colour, style = EVENT_STYLES[str(record["action"])]
        for ax in axes.flat:
            ax.axvline(when, color=colour, linestyle=style, linewidth=1.5)
        ax_err.annotate(
            _event_label(record),
            xy=(mdates.date2num(when), 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
            color=colour,
        )
        if record["action"] not in labelled:
            labelled.add(str(record["action"]))
            ax_rate.plot([], [], color=colour, linestyle=style, label=str(record["action"]))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    for ax in axes[-1]:
        ax.set_xlabel("time (local)")
        ax.tick_params(axis="x", labelrotation=30)
    total = sum(s.requests for s in samples)
    failed = sum(s.failures for s in samples)
    fig.suptitle(
        f"{title}: {total:.0f} requests, {failed:.0f} failed, {len(events)} deploy/rollback "
        f"events ({times[0]:%Y-%m-%d %H:%M:%S} - {times[-1]:%H:%M:%S})"
    )
    start, end = (datetime.fromtimestamp(ts).astimezone() for ts in window)
    if end > start:  # a zero-width window (one instant) keeps matplotlib's own limits
        for ax in axes.flat:
            ax.set_xlim(start, end)
    fig.savefig(path, dpi=100, metadata={"Window": f"{start.isoformat()}/{end.isoformat()}"})
    plt.close(fig)
    return path
