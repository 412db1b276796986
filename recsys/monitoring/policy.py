"""Turn a metrics window into a rollback decision, with hysteresis that survives between runs.

The monitor's watch (:mod:`recsys.monitoring.trigger`) checks every few seconds from Airflow's
triggerer, and a watch ends (a rollback, a new DAG run) while the service goes on, so everything
it must remember between checks and runs (the snapshot to diff against, how many windows in a
row have breached, the last verdict, an open metrics outage) lives in a small JSON file. Writes
are atomic (temp file + ``os.replace``) so a killed process never leaves a half-written file,
reads and writes are serialised with ``flock`` because a rollback or deploy resets the same file
from another process, and a file that is corrupt anyway is reported and replaced rather than
crashing the monitor forever.

Decision rules, in order:

* no baseline yet (first run, or first after :func:`reset_model`): store one, decide nothing;
* fewer than ``min_requests`` in the window and the window younger than ``max_window_s``: keep
  the baseline and let the window grow (checks every few seconds would otherwise never see
  enough requests of a quiet model); once the window is ``max_window_s`` old and still has fewer
  than ``min_requests``, decide nothing, because no traffic is neither an outage nor a recovery,
  and leave the consecutive-breach count as it was;
* otherwise the window breaches when its error rate, rejected rate (requests the model itself
  refused as bad or oversized, which Triton counts as successes), mean latency or (when a limit
  is set) p99 latency, host CPU utilisation or host memory utilisation is over the limit; a breach
  adds one to the count, a healthy window sets it to zero, and a rollback is due once the count
  reaches ``consecutive_windows``.

CPU and memory are Triton's host-wide gauges at the end of the window, not per-model figures:
their limits (off by default) suit a host that serves this model alone, where a version that
needs far more CPU or memory than the one before is the likely cause of a saturated machine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from recsys.monitoring.metrics import MetricsSnapshot, scrape
from recsys.monitoring.window import (
    WindowStats,
    aggregate_model,
    compute_window,
    with_host_usage,
)
from recsys.statefile import read_json_state, state_lock, write_json_atomically

log = logging.getLogger(__name__)

_STATE_FORMAT = 1
_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Thresholds:
    """Limits for one window; the defaults match the ``triton_monitor`` DAG's params."""

    max_error_rate: float = 0.05
    max_mean_latency_ms: float = 1000.0
    min_requests: int = 5
    consecutive_windows: int = 1
    max_p99_latency_ms: float | None = None
    """Triton's rolling p99 of successful requests; ``None`` disables the check. A mean hides a
    slow tail that a minority of users always hit, so a p99 limit catches what the mean misses."""
    max_cpu_utilization: float | None = None
    """Host CPU utilisation (0-1) at the end of the window; ``None`` disables the check."""
    max_memory_utilization: float | None = None
    """Share of host memory in use at the end of the window; ``None`` disables the check."""
    max_window_s: float = 60.0
    """A window is judged as soon as it holds ``min_requests`` requests, or once it is this old
    (then as too little traffic). Busy models are judged every check (seconds), quiet ones over
    at most this long."""
    max_rejected_rate: float | None = 0.5
    """Share of the window's requests the model answered with its own error (empty, malformed or
    oversized query, TOP_K out of range); ``None`` disables the check. Triton counts those as
    successes, so without this a version that refuses everything looks healthy. The default
    tolerates clients' occasional bad requests and catches a version refusing most traffic."""

    def __post_init__(self) -> None:
        # Fail at construction: a bad limit would otherwise surface as a silent non-decision
        # (or a division by zero) inside the monitor a minute later.
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be within [0, 1], got {self.max_error_rate}")
        if self.max_rejected_rate is not None and not 0.0 <= self.max_rejected_rate <= 1.0:
            raise ValueError(
                f"max_rejected_rate must be within [0, 1], got {self.max_rejected_rate}"
            )
        if not self.max_mean_latency_ms > 0:
            raise ValueError(f"max_mean_latency_ms must be > 0, got {self.max_mean_latency_ms}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if self.consecutive_windows < 1:
            raise ValueError(f"consecutive_windows must be >= 1, got {self.consecutive_windows}")
        if not self.max_window_s > 0:
            raise ValueError(f"max_window_s must be > 0, got {self.max_window_s}")
        if self.max_p99_latency_ms is not None and not self.max_p99_latency_ms > 0:
            raise ValueError(f"max_p99_latency_ms must be > 0, got {self.max_p99_latency_ms}")
        for name in ("max_cpu_utilization", "max_memory_utilization"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be within (0, 1], got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    """The outcome of one check: whether this window breached, whether that makes the breach
    sustained enough to roll back, and the human-readable reasons (they end up in the rollback
    record and the alert)."""

    model: str
    breached: bool
    should_rollback: bool
    reasons: list[str]
    stats: WindowStats | None
    consecutive: int
    closed_outage: dict[str, Any] | None = None
    """The metrics outage this check ended (``since``, ``error``, ``alerted_at``), if any."""
    judged: bool = False
    """Whether the window was compared with the thresholds at all (False: no baseline yet, a
    growing window, too little traffic, no metrics for the model)."""
    replicas: dict[str, dict[str, Any]] | None = None
    """With several Triton replicas: each replica's own judgement of its window (``requests``,
    ``error_rate``, ``breached``, ``reasons``, ``unreadable``); ``None`` with a single server."""
    bad_replica: str | None = None
    """The one replica that breached while the others served the same versions well: a
    replica's problem (its host, its process), not the version's, so no rollback is due."""
    empty_replicas: list[str] = field(default_factory=list)
    """Readable replicas that serve no version of the model while another replica does: they
    joined or restarted since the last deploy (Triton loads nothing by itself); the watch ends
    so that the next one loads the champion there (:func:`recsys.deploy.sync_replicas`)."""
    replica_events: list[dict[str, Any]] = field(default_factory=list)
    """What this check found that a person must hear about once (``kind``: ``replica_unhealthy``,
    ``replica_recovered``, ``replica_blind``, ``replica_readable``; ``replica``; ``reason``).
    The watch alerts and audits them; the state remembers what was already alerted."""

    @property
    def success_rate(self) -> float | None:
        """Share of the window's requests that succeeded; ``None`` without requests (no traffic
        has no success rate, and reporting 100% would read as "healthy")."""
        if self.stats is None or self.stats.requests <= 0:
            return None
        return self.stats.successes / self.stats.requests

    @property
    def p99_latency_ms(self) -> float | None:
        return None if self.stats is None else self.stats.p99_latency_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for Airflow's XCom; success rate and p99 are spelled out so
        the alert and the audit record carry them without re-deriving them from ``stats``."""
        return {
            "model": self.model,
            "breached": self.breached,
            "should_rollback": self.should_rollback,
            "reasons": list(self.reasons),
            "stats": None if self.stats is None else self.stats.to_dict(),
            "consecutive": self.consecutive,
            "success_rate": self.success_rate,
            "p99_latency_ms": self.p99_latency_ms,
            "closed_outage": self.closed_outage,
            "judged": self.judged,
            **(
                {
                    "replicas": self.replicas,
                    "bad_replica": self.bad_replica,
                    "empty_replicas": self.empty_replicas,
                    "replica_events": self.replica_events,
                }
                if self.replicas is not None
                else {}
            ),
        }


@dataclass
class MonitorState:
    """What the monitor remembers between runs: per model, the last snapshot of its versions and
    the number of consecutive breaching windows.

    Snapshots are kept per model so that monitoring several models with one state file never
    moves one model's baseline under another. ``recovered_from`` is not persisted: it tells the
    caller that :meth:`load` found a corrupt file and started over.
    """

    snapshots: dict[str, MetricsSnapshot] = field(default_factory=dict)
    consecutive: dict[str, int] = field(default_factory=dict)
    last_verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model, the latest verdict (``Verdict.to_dict()`` plus ``checked_at``): what the watch
    saw last, for the task that acts on it and for people asking what the monitor thinks."""
    outages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model, an open metrics outage (``since``, ``error``, ``alerted_at``): remembered so
    that one outage gives one alert, however many checks and watch runs it lasts. With several
    replicas, a replica whose metrics cannot be read has its own (``<model>@<replica>``)."""
    replica_breaches: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per ``<model>@<replica>``, an open breach of one replica (``since``, ``alerted_at``,
    ``reasons``): one bad replica, one alert, until it is judged healthy again."""
    recovered_from: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "snapshots": {model: snap.to_dict() for model, snap in sorted(self.snapshots.items())},
            "consecutive": dict(sorted(self.consecutive.items())),
            "last_verdicts": dict(sorted(self.last_verdicts.items())),
            "outages": dict(sorted(self.outages.items())),
            "replica_breaches": dict(sorted(self.replica_breaches.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorState:
        if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT:
            raise ValueError("not a monitor state record (missing or unknown 'format')")
        consecutive = {str(k): int(v) for k, v in data.get("consecutive", {}).items()}
        if any(v < 0 for v in consecutive.values()):
            raise ValueError("negative consecutive-breach count")
        last_verdicts = data.get("last_verdicts") or {}
        outages = data.get("outages") or {}
        breaches = data.get("replica_breaches") or {}  # absent from older state files
        if not all(isinstance(x, dict) for x in (last_verdicts, outages, breaches)):
            raise ValueError("'last_verdicts', 'outages' and 'replica_breaches' must be mappings")
        return cls(
            snapshots={
                str(model): MetricsSnapshot.from_dict(snap)
                for model, snap in data.get("snapshots", {}).items()
            },
            consecutive=consecutive,
            last_verdicts={str(k): dict(v) for k, v in last_verdicts.items()},
            outages={str(k): dict(v) for k, v in outages.items()},
            replica_breaches={str(k): dict(v) for k, v in breaches.items()},
        )

    @classmethod
    def load(cls, path: Path | str) -> MonitorState:
        """Read the state; a missing file is a fresh start, a corrupt one is logged as a warning
        and replaced by an empty state (the monitor then re-baselines instead of failing every
        minute until someone deletes the file). Unreadable files (permissions) still raise."""
        state, problem = read_json_state(Path(path), cls.from_dict, "monitor state")
        if state is not None:
            return state
        return cls(recovered_from=problem) if problem else cls()

    def save(self, path: Path | str) -> None:
        """Write atomically (see :func:`recsys.statefile.write_json_atomically`)."""
        write_json_atomically(Path(path), self.to_dict())


def _locked(state_path: Path, timeout_s: float = _LOCK_TIMEOUT_S):
    """Exclusive lock on ``<state>.lock`` for one read-modify-write of the state file, so a
    :func:`reset_model` from a rollback cannot be overwritten by a concurrent check."""
    return state_lock(state_path, timeout_s, "monitor state")


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _host_reasons(stats: WindowStats, thresholds: Thresholds) -> list[str]:
    """Breaches of the (optional) host CPU and memory limits; unknown values never breach."""
    reasons = []
    cpu, cpu_max = stats.cpu_utilization, thresholds.max_cpu_utilization
    if cpu is not None and cpu_max is not None and cpu > cpu_max:
        reasons.append(f"host CPU utilisation {cpu:.1%} > max {cpu_max:.1%}")
    memory, memory_max = stats.memory_utilization, thresholds.max_memory_utilization
    if memory is not None and memory_max is not None and memory > memory_max:
        used_mib = (stats.memory_used_bytes or 0) / 2**20
        reasons.append(
            f"host memory in use {memory:.1%} ({used_mib:.0f} MiB) > max {memory_max:.1%}"
        )
    return reasons


def evaluate(
    stats: WindowStats | None, thresholds: Thresholds, previous_consecutive: int
) -> Verdict:
    """Judge one window against ``thresholds``, continuing a run of ``previous_consecutive``
    breaching windows. Pure: no I/O, so the policy is testable on its own."""
    if stats is None:
        return Verdict(
            model="",
            breached=False,
            should_rollback=False,
            reasons=["no metrics for the model in this window (not loaded?); no decision"],
            stats=None,
            consecutive=previous_consecutive,
        )
    if stats.requests < thresholds.min_requests:
        return Verdict(
            model=stats.model,
            breached=False,
            should_rollback=False,
            reasons=[
                f"only {stats.requests:g} requests in {stats.seconds:.0f}s "
                f"(< min_requests {thresholds.min_requests}): too little traffic to judge, and "
                "no traffic is not an error; no decision"
            ],
            stats=stats,
            consecutive=previous_consecutive,
        )
    reasons = []
    if stats.error_rate > thresholds.max_error_rate:
        by_reason = ", ".join(f"{k} {v:g}" for k, v in stats.failures_by_reason.items())
        reasons.append(
            f"error rate {stats.error_rate:.1%} ({stats.failures:g} of {stats.requests:g} "
            f"requests failed in {stats.seconds:.0f}s{'; ' + by_reason if by_reason else ''}) "
            f"> max {thresholds.max_error_rate:.1%}"
        )
    if (
        thresholds.max_rejected_rate is not None
        and stats.rejected_rate > thresholds.max_rejected_rate
    ):
        by_reason = ", ".join(f"{k} {v:g}" for k, v in stats.rejected_by_reason.items())
        reasons.append(
            f"rejected rate {stats.rejected_rate:.1%} ({stats.rejected:g} of {stats.requests:g} "
            f"requests refused by the model in {stats.seconds:.0f}s"
            f"{'; ' + by_reason if by_reason else ''}; Triton counts them as successes) "
            f"> max {thresholds.max_rejected_rate:.1%}"
        )
    if stats.mean_latency_ms is not None and stats.mean_latency_ms > thresholds.max_mean_latency_ms:
        reasons.append(
            f"mean latency {_fmt_ms(stats.mean_latency_ms)} over {stats.successes:g} successful "
            f"requests > max {_fmt_ms(thresholds.max_mean_latency_ms)}"
        )
    if (
        thresholds.max_p99_latency_ms is not None
        and stats.p99_latency_ms is not None
        and stats.p99_latency_ms > thresholds.max_p99_latency_ms
    ):
        reasons.append(
            f"p99 latency {_fmt_ms(stats.p99_latency_ms)} > max "
            f"{_fmt_ms(thresholds.max_p99_latency_ms)}"
        )
    reasons.extend(_host_reasons(stats, thresholds))
    breached = bool(reasons)
    consecutive = previous_consecutive + 1 if breached else 0
    should_rollback = breached and consecutive >= thresholds.consecutive_windows
    if breached:
        reasons.append(
            f"breaching window {consecutive} of {thresholds.consecutive_windows} needed"
            + ("; rollback due" if should_rollback else "")
        )
    else:
        reasons.append(
            f"healthy: success rate {1 - stats.error_rate:.1%} (error rate "
            f"{stats.error_rate:.1%} <= {thresholds.max_error_rate:.1%}), "
            f"rejected rate {stats.rejected_rate:.1%}, "
            f"mean latency {_fmt_ms(stats.mean_latency_ms)} <= "
            f"{_fmt_ms(thresholds.max_mean_latency_ms)}, p99 {_fmt_ms(stats.p99_latency_ms)}"
            f" over {stats.requests:g} requests"
        )
    return Verdict(
        model=stats.model,
        breached=breached,
        should_rollback=should_rollback,
        reasons=reasons,
        stats=stats,
        consecutive=consecutive,
        judged=True,
    )


def check_once(
    metrics_url: str | Mapping[str, str],
    model: str,
    state_path: Path | str,
    thresholds: Thresholds | None = None,
    *,
    timeout_s: float = 5.0,
    exclude_versions: frozenset[str] = frozenset(),
    replica_grace_s: float = 60.0,
) -> Verdict:
    """One check: scrape, judge the window since the stored snapshot, persist the new snapshot,
    breach count and verdict, and return the verdict.

    The first check (or the first after :func:`reset_model`) only stores a baseline. A window
    with fewer than ``min_requests`` requests that is younger than ``max_window_s`` keeps its
    baseline and grows until the next check. If the scrape fails,
    :class:`~recsys.monitoring.metrics.MetricsUnavailableError` propagates and the state is left
    untouched: an unreachable Triton is an incident for a human (see :func:`note_unavailable`),
    not a reason to roll a model back. A successful scrape closes an open outage; the verdict's
    ``closed_outage`` then says since when the metrics had been unreadable.

    ``exclude_versions`` are left out of the model's window: the candidate of a rollout, which
    its own analysis judges against the stable version (:mod:`recsys.delivery.analysis`), so a
    faulty canary is aborted once, by the rollout, and not also rolled back by the monitor.

    ``metrics_url`` may map replica names to their metrics URLs (several Triton replicas):
    see :func:`check_replicas`, which judges each replica and the whole.
    """
    thresholds = thresholds or Thresholds()
    state_path = Path(state_path)
    if not isinstance(metrics_url, str):
        return check_replicas(
            dict(metrics_url),
            model,
            state_path,
            thresholds,
            timeout_s=timeout_s,
            exclude_versions=exclude_versions,
            grace_s=replica_grace_s,
        )
    with _locked(state_path):
        state = MonitorState.load(state_path)
        current = scrape(metrics_url, timeout_s=timeout_s).for_model(model)
        previous = state.snapshots.get(model)
        count = state.consecutive.get(model, 0)
        notes, closed_outage = _opening_notes(state, model, exclude_versions)
        keep_baseline = False
        if previous is None or current.taken_at <= previous.taken_at:
            why = "no baseline yet" if previous is None else "clock went backwards"
            verdict = _undecided(model, [*notes, f"{why}: stored a baseline snapshot"], count)
        else:
            stats = _model_window(previous, current, model, exclude_versions)
            age = current.taken_at - previous.taken_at
            if (
                stats is not None
                and stats.requests < thresholds.min_requests
                and age < thresholds.max_window_s
            ):
                keep_baseline = True
                verdict = _growing(model, notes, stats, "", age, thresholds, count)
            else:
                verdict = evaluate(stats, thresholds, count)
                verdict.model = model
                verdict.reasons = [*notes, *verdict.reasons]
        verdict.closed_outage = closed_outage
        if not keep_baseline:
            state.snapshots[model] = current
        state.consecutive[model] = verdict.consecutive
        state.last_verdicts[model] = {**verdict.to_dict(), "checked_at": current.taken_at}
        state.save(state_path)
    log.log(
        logging.WARNING if verdict.breached else logging.DEBUG,
        "monitor %s: breached=%s rollback=%s consecutive=%d; %s",
        model,
        verdict.breached,
        verdict.should_rollback,
        verdict.consecutive,
        "; ".join(verdict.reasons),
    )
    return verdict


def _undecided(model: str, reasons: list[str], consecutive: int) -> Verdict:
    """A verdict that decides nothing: a baseline was just stored, there is nothing to compare
    yet; the breach count stays as it was."""
    return Verdict(
        model=model,
        breached=False,
        should_rollback=False,
        reasons=[*reasons[:-1], f"{reasons[-1]}, nothing to compare yet"],
        stats=None,
        consecutive=consecutive,
    )


def _growing(
    model: str,
    notes: list[str],
    stats: WindowStats,
    where: str,
    age: float,
    thresholds: Thresholds,
    consecutive: int,
) -> Verdict:
    """No decision yet: the window has too few requests and is younger than ``max_window_s``,
    so it keeps its baseline and grows (``where``: e.g. " on 2 replicas")."""
    return Verdict(
        model=model,
        breached=False,
        should_rollback=False,
        reasons=[
            *notes,
            f"window growing: {stats.requests:g} requests{where} in {age:.0f}s (judged at "
            f"{thresholds.min_requests} requests or after {thresholds.max_window_s:g}s); "
            "no decision yet",
        ],
        stats=stats,
        consecutive=consecutive,
    )


def _opening_notes(
    state: MonitorState, model: str, exclude_versions: frozenset[str]
) -> tuple[list[str], dict[str, Any] | None]:
    """What every verdict starts with (a reset state, a left-out candidate, the end of a
    metrics outage, which this closes), and the outage it closed."""
    notes = []
    if state.recovered_from is not None:
        notes.append(f"monitor state was corrupt and has been reset ({state.recovered_from})")
    if exclude_versions:
        listed = ", ".join(f"v{v}" for v in sorted(exclude_versions))
        notes.append(f"{listed} left out: a rollout's candidate, judged by its analysis")
    closed_outage = state.outages.pop(model, None)
    if closed_outage is not None:
        notes.append(
            f"metrics readable again (unreadable since {_clock(closed_outage.get('since'))})"
        )
    return notes, closed_outage


def _model_window(
    previous: MetricsSnapshot,
    current: MetricsSnapshot,
    model: str,
    exclude_versions: frozenset[str],
) -> WindowStats | None:
    """``model``'s window between two snapshots of one server, its versions combined and a
    rollout's candidate left out, with the host's gauges at the window's end."""
    window = {
        key: value
        for key, value in compute_window(previous, current).items()
        if key[1] not in exclude_versions
    }
    return with_host_usage(aggregate_model(window, model), current)


def replica_key(model: str, replica: str) -> str:
    """The state file's key of one replica of ``model`` (its snapshot, outage, breach)."""
    return f"{model}@{replica}"


def _replica_summary(verdict: Verdict | None, stats: WindowStats | None) -> dict[str, Any]:
    return {
        "requests": None if stats is None else stats.requests,
        "error_rate": None if stats is None else stats.error_rate,
        "p99_latency_ms": None if stats is None else stats.p99_latency_ms,
        "versions": None if stats is None else stats.version,
        "judged": bool(verdict and verdict.judged),
        "breached": bool(verdict and verdict.breached),
        "reasons": [] if verdict is None else list(verdict.reasons),
    }


def check_replicas(
    targets: dict[str, str],
    model: str,
    state_path: Path,
    thresholds: Thresholds,
    *,
    timeout_s: float = 5.0,
    exclude_versions: frozenset[str] = frozenset(),
    grace_s: float = 60.0,
) -> Verdict:
    """:func:`check_once` for a model served by several Triton replicas (``targets``: replica
    name -> metrics URL): every replica is scraped and judged on its own window, and the whole
    (their windows added up, what clients behind the load balancer see) is judged as one model.

    * The whole decides rollbacks, with the same rules and hysteresis as one server.
    * Exactly one replica breaching while at least one other serves the same model well is
      that replica's problem (its host, its process), not the version's: the verdict names it
      (``bad_replica``), no rollback is due, and one ``replica_unhealthy`` event is raised per
      breach (again only after the replica has been healthy in between). Rolling a good version
      back because one machine is sick would not help anyone.
    * A replica whose metrics cannot be read is left out of the whole and, after ``grace_s``,
      raises one ``replica_blind`` event; when every replica is unreadable,
      :class:`~recsys.monitoring.metrics.MetricsUnavailableError` is raised as for one server.
    """
    from recsys.monitoring.metrics import MetricsUnavailableError
    from recsys.monitoring.window import combine

    if not targets:
        raise MetricsUnavailableError(f"no Triton replica to read {model}'s metrics from")
    with _locked(state_path):
        state = MonitorState.load(state_path)
        snapshots: dict[str, MetricsSnapshot] = {}
        unreadable: dict[str, str] = {}
        for name, url in sorted(targets.items()):
            try:
                snapshots[name] = scrape(url, timeout_s=timeout_s).for_model(model)
            except MetricsUnavailableError as exc:
                unreadable[name] = str(exc)
        if not snapshots:
            listed = "; ".join(f"{name}: {error}" for name, error in unreadable.items())
            raise MetricsUnavailableError(f"no replica's metrics are readable ({listed})")
        now = max(snapshot.taken_at for snapshot in snapshots.values())
        events: list[dict[str, Any]] = []
        notes, closed_outage = _opening_notes(state, model, exclude_versions)
        for name, error in unreadable.items():
            outage = state.outages.setdefault(replica_key(model, name), {"since": now})
            outage.update(error=error, last_failure_at=now)
            notes.append(f"replica {name}: metrics unreadable, left out of the whole ({error})")
            if outage.get("alerted_at") is None and now - float(outage["since"]) >= grace_s:
                outage["alerted_at"] = now
                events.append(
                    {"kind": "replica_blind", "replica": name, "since": outage["since"],
                     "reason": f"metrics of replica {name} unreadable since "
                     f"{_clock(outage['since'])}: {error}"}
                )  # fmt: skip
        for name in snapshots:
            outage = state.outages.pop(replica_key(model, name), None)
            if outage is not None and outage.get("alerted_at") is not None:
                events.append(
                    {"kind": "replica_readable", "replica": name, "since": outage.get("since"),
                     "reason": f"metrics of replica {name} readable again"}
                )  # fmt: skip

        windows: dict[str, WindowStats] = {}
        baselined = []
        age = 0.0
        for name, current in snapshots.items():
            previous = state.snapshots.get(replica_key(model, name))
            if previous is None or current.taken_at <= previous.taken_at:
                baselined.append(name)
                continue
            stats = _model_window(previous, current, model, exclude_versions)
            if stats is not None:
                windows[name] = stats
            age = max(age, current.taken_at - previous.taken_at)
        count = state.consecutive.get(model, 0)
        whole = combine(list(windows.values()), model) if windows else None
        keep_baseline = False
        per_replica: dict[str, Verdict] = {}
        bad_replica = None
        if whole is None:
            why = (
                f"no baseline yet for replica(s) {', '.join(baselined)}"
                if baselined
                else "no metrics for the model on any replica"
            )
            verdict = _undecided(model, [*notes, f"{why}: stored baseline snapshots"], count)
        elif whole.requests < thresholds.min_requests and age < thresholds.max_window_s:
            keep_baseline = True
            where = f" on {len(windows)} replicas"
            verdict = _growing(model, notes, whole, where, age, thresholds, count)
        else:
            for name, stats in windows.items():
                judged = evaluate(
                    stats, thresholds, state.consecutive.get(replica_key(model, name), 0)
                )
                per_replica[name] = judged
                state.consecutive[replica_key(model, name)] = judged.consecutive
            breaching = sorted(n for n, v in per_replica.items() if v.breached)
            healthy = sorted(n for n, v in per_replica.items() if v.judged and not v.breached)
            verdict = evaluate(whole, thresholds, count)
            verdict.model = model
            if len(breaching) == 1 and healthy:
                bad_replica = breaching[0]
                bad = per_replica[bad_replica]
                verdict = replace(
                    verdict,
                    breached=False,
                    should_rollback=False,
                    consecutive=0,
                    reasons=[
                        f"replica {bad_replica} breaches on its own: "
                        + "; ".join(bad.reasons[:-1] or bad.reasons),
                        f"replica(s) {', '.join(healthy)} serve the same versions well, so "
                        "this is the replica's problem (its host or process), not the "
                        "version's: no rollback",
                    ],
                )
                key = replica_key(model, bad_replica)
                breach = state.replica_breaches.setdefault(key, {"since": now})
                breach["reasons"] = bad.reasons
                if (
                    breach.get("alerted_at") is None
                    and bad.consecutive >= thresholds.consecutive_windows
                ):
                    breach["alerted_at"] = now
                    events.append(
                        {"kind": "replica_unhealthy", "replica": bad_replica,
                         "since": breach["since"], "reason": "; ".join(verdict.reasons),
                         "stats": None if bad.stats is None else bad.stats.to_dict()}
                    )  # fmt: skip
            elif breaching:
                verdict.reasons = [
                    *verdict.reasons,
                    "breaching replicas: " + ", ".join(breaching)
                    + (f" (healthy: {', '.join(healthy)})" if healthy else ""),
                ]  # fmt: skip
            for name in healthy:
                breach = state.replica_breaches.pop(replica_key(model, name), None)
                if breach is not None and breach.get("alerted_at") is not None:
                    events.append(
                        {"kind": "replica_recovered", "replica": name, "since": breach["since"],
                         "reason": f"replica {name} is healthy again"}
                    )  # fmt: skip
            verdict.reasons = [*notes, *verdict.reasons]
        verdict.closed_outage = closed_outage
        verdict.bad_replica = bad_replica
        verdict.replica_events = events
        if any(snapshot.models for snapshot in snapshots.values()):
            verdict.empty_replicas = sorted(n for n, s in snapshots.items() if not s.models)
        verdict.replicas = {
            name: {
                **_replica_summary(per_replica.get(name), windows.get(name)),
                "unreadable": unreadable.get(name),
            }
            for name in sorted(targets)
        }
        if not keep_baseline:
            for name, snapshot in snapshots.items():
                state.snapshots[replica_key(model, name)] = snapshot
        state.consecutive[model] = verdict.consecutive
        state.last_verdicts[model] = {**verdict.to_dict(), "checked_at": now}
        state.save(state_path)
    log.log(
        logging.WARNING if verdict.breached or bad_replica else logging.DEBUG,
        "monitor %s on %d replicas: breached=%s rollback=%s bad_replica=%s; %s",
        model,
        len(targets),
        verdict.breached,
        verdict.should_rollback,
        bad_replica,
        "; ".join(verdict.reasons),
    )
    return verdict


def metrics_targets(settings: Any) -> str | dict[str, str]:
    """Where the monitor reads ``settings``' metrics: the single server's URL, or with a replica
    list (``RECSYS_TRITON_REPLICAS``) every replica's, by name."""
    if not settings.has_replicas:
        return str(settings.triton_metrics_url)
    return {replica.name: replica.metrics_url for replica in settings.triton_replicas()}


def _clock(timestamp: Any) -> str:
    """A unix time as ``HH:MM:SS`` UTC for messages (``?`` when unknown)."""
    import datetime as _dt

    try:
        moment = _dt.datetime.fromtimestamp(float(timestamp), tz=_dt.UTC)
    except (TypeError, ValueError, OverflowError):
        return "?"
    return moment.strftime("%H:%M:%S UTC")


def note_unavailable(
    state_path: Path | str,
    model: str,
    error: str,
    grace_s: float,
    *,
    now: float | None = None,
) -> dict[str, Any] | None:
    """Remember that ``model``'s metrics could not be read; return the outage record once, when
    it has lasted ``grace_s`` and has not been alerted yet (the caller alerts), else ``None``.

    One outage, one alert: the record stays open across checks and watch runs until a
    successful :func:`check_once` closes it, so a Triton that is down for an hour is reported
    once, not every few seconds. A single failed scrape (a restart, a slow answer under load)
    shorter than the grace period is never reported."""
    import time as _time

    now = _time.time() if now is None else now
    state_path = Path(state_path)
    with _locked(state_path):
        state = MonitorState.load(state_path)
        outage = state.outages.setdefault(model, {"since": now})
        outage["error"] = error
        outage["last_failure_at"] = now
        due = outage.get("alerted_at") is None and now - float(outage["since"]) >= grace_s
        if due:
            outage["alerted_at"] = now
        state.save(state_path)
    return dict(outage) if due else None


def remember_result(state_path: Path | str, model: str, result: dict[str, Any]) -> None:
    """Store ``result`` (a verdict dict, e.g. a finished watch's) as ``model``'s last verdict."""
    import time as _time

    state_path = Path(state_path)
    with _locked(state_path):
        state = MonitorState.load(state_path)
        state.last_verdicts[model] = {**result, "checked_at": _time.time()}
        state.save(state_path)


def reset_model(state_path: Path | str, model: str) -> None:
    """Forget ``model``'s baseline and breach count after a rollback or deploy.

    Both go: a stale count would let one more bad window trigger a second rollback, and a stale
    baseline would make the next window include the failures that caused the first one. The next
    :func:`check_once` therefore re-baselines and decides nothing.
    """
    state_path = Path(state_path)
    with _locked(state_path):
        state = MonitorState.load(state_path)
        state.snapshots.pop(model, None)
        state.consecutive.pop(model, None)
        _forget_replicas(state, model)
        state.save(state_path)


def rebaseline(
    state_path: Path | str,
    model: str,
    metrics_url: str | Mapping[str, str],
    *,
    timeout_s: float = 5.0,
) -> bool:
    """Like :func:`reset_model`, but store a fresh snapshot as the new baseline right away, so
    the next :func:`check_once` already judges the window since this moment instead of spending
    a whole interval re-baselining (one scrape interval less before a bad version is caught).
    ``metrics_url`` may map replica names to their URLs: each replica gets its baseline, and
    their breach counts and open breaches are forgotten with the model's.

    Returns whether a baseline was stored; when the metrics cannot be read the model is simply
    reset (the next check re-baselines), since a switch that already happened must not fail on
    a monitoring hiccup.
    """
    from recsys.monitoring.metrics import MetricsUnavailableError

    targets = {"": metrics_url} if isinstance(metrics_url, str) else dict(metrics_url)
    snapshots: dict[str, MetricsSnapshot] = {}
    try:
        for name, url in targets.items():
            snapshots[name] = scrape(url, timeout_s=timeout_s).for_model(model)
    except MetricsUnavailableError as exc:
        log.warning("could not re-baseline %s (%s); the next check will", model, exc)
        reset_model(state_path, model)
        return False
    state_path = Path(state_path)
    with _locked(state_path):
        state = MonitorState.load(state_path)
        _forget_replicas(state, model)
        for name, snapshot in snapshots.items():
            state.snapshots[replica_key(model, name) if name else model] = snapshot
        state.consecutive.pop(model, None)
        state.save(state_path)
    return True


def _forget_replicas(state: MonitorState, model: str) -> None:
    """Drop every per-replica baseline, breach count and open breach of ``model``."""
    prefix = replica_key(model, "")
    for table in (state.snapshots, state.consecutive, state.replica_breaches):
        for key in [k for k in table if k.startswith(prefix)]:
            table.pop(key)
