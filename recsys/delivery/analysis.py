"""Judge a rollout from Triton's per-version metrics and the shoppers' feedback, step by step.

The analysis watches one rollout (:mod:`recsys.delivery.rollout`) from Airflow's triggerer, like
the monitor's watch (:mod:`recsys.monitoring.trigger`, whose reasons for ending in the triggerer
apply here too): every ``check_interval_s`` it scrapes Triton and looks at the window since its
baseline, split by version. Triton labels every counter with the version, and the router pins
each request to one, so the candidate's error rate and latency are its own.

Rules, per check:

* **Breach.** As soon as the candidate has ``min_requests`` requests in the window, it breaches
  at once when its error rate is over ``max_error_rate``, or over the stable version's (same
  window) by more than ``max_error_rate_increase``, or its rejected rate is over
  ``max_rejected_rate``. Latency (mean over ``max_mean_latency_ms`` or over
  ``max_latency_ratio`` times the stable version's, p99 over ``max_p99_latency_ms``) breaches
  when ``latency_windows`` closed windows in a row are over: a freshly loaded model answers its
  first requests slowly while the runtime allocates for new input shapes, and one slow window
  of warm-up must not abort a good candidate (measured: a fresh MiniLM's first window averaged
  4x the warm stable version's). A breach ends the rollout: the analysis sets the candidate's
  weight to 0 itself, before anything else, so no further shopper reaches it; the ``finish``
  task then unloads it, tags it, writes the audit record and sends the one alert.
* **Windows.** A window closes once it is ``window_s`` old and holds ``min_requests`` candidate
  requests; without a breach it passes. With fewer requests it keeps growing: too little
  traffic is not evidence, so a quiet canary is judged over a longer window.
* **Canary.** ``steps`` (percent of routed traffic, e.g. 5, 25, 50, 100) are each held for
  ``windows_per_step`` passing windows. With ``require_not_worse``, a step also needs the online
  comparison not to find the candidate significantly worse (one-sided test on the feedback log's
  click-through, :mod:`recsys.delivery.stats`); with too few impressions the step waits. After the
  last step: promote.
* **Experiment.** A fixed split until ``duration_minutes`` or ``sample_size`` impressions; then
  the per-arm comparison decides: promote when ``promote_if_better`` and the candidate is
  significantly better, else end (the candidate leaves without an alert).
* **Shadow.** The candidate only sees mirrored requests; it is judged on its own errors and
  latency as above, and after ``duration_minutes`` the report adds the top-k overlap the router
  measured. It ends, or is promoted with ``promote_if_better`` when it stayed healthy.
* **Someone else ended it** (``recsys canary abort``, a rollback, a deploy): the analysis ends
  with ``superseded`` and changes nothing.
* **Metrics unreadable** for ``metrics_grace_s``: abort, since a candidate that cannot be judged
  must not keep its traffic. After ``max_minutes`` without a decision: abort as well.

The state (baselines, step, passed windows, the windows' verdicts) is a JSON file in
``$RECSYS_HOME/rollouts/<model>.json`` that ``recsys canary status`` reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from recsys.monitoring.metrics import MetricsSnapshot, MetricsUnavailableError
from recsys.monitoring.window import WindowStats

log = logging.getLogger(__name__)

PROMOTE = "promote"
ABORT = "abort"
END = "end"
SUPERSEDED = "superseded"
TRIGGER_TIMEOUT_MARGIN = timedelta(minutes=5)
_MAX_KEPT_WINDOWS = 50


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout is judged; defaults match the ``rollout`` DAGs' params."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    windows_per_step: int = 2
    window_s: float = 30.0
    min_requests: int = 10
    max_error_rate: float = 0.02
    max_error_rate_increase: float = 0.01
    max_rejected_rate: float = 0.5
    max_mean_latency_ms: float = 1000.0
    max_latency_ratio: float = 2.0
    max_p99_latency_ms: float | None = None
    latency_windows: int = 2
    require_not_worse: bool = False
    alpha: float = 0.05
    min_impressions: int = 200
    duration_minutes: float = 10.0
    sample_size: int = 0
    promote_if_better: bool = False
    max_minutes: float = 120.0
    metrics_grace_s: float = 30.0

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.steps)
        if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(steps):
            raise ValueError(f"steps must be ascending percentages in (0, 100], got {self.steps}")
        object.__setattr__(self, "steps", steps)
        for name in ("windows_per_step", "min_requests", "latency_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_error_rate", "max_error_rate_increase", "max_rejected_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("window_s", "max_mean_latency_ms", "max_latency_ratio", "max_minutes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be within (0, 0.5), got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "steps" in values:
            values["steps"] = tuple(values["steps"])
        return cls(**values)


def judge(
    stable: WindowStats | None, candidate: WindowStats | None, policy: RolloutPolicy
) -> tuple[bool | None, list[str], bool]:
    """``(breached, reasons, errors)`` for one window: ``breached`` is ``None`` when the
    candidate has fewer than ``min_requests`` requests (nothing to judge yet); ``errors`` says
    whether a breach is of failures or refusals (abort at once) rather than only of latency
    (which must last ``latency_windows`` closed windows: a freshly loaded model is slow for its
    first requests while the runtime allocates for new input shapes). Pure, so the rules are
    testable alone."""
    if candidate is None or candidate.requests < policy.min_requests:
        seen = 0 if candidate is None else candidate.requests
        text = f"candidate has {seen:g} requests (< {policy.min_requests}): not judged"
        return None, [text], False
    reasons = []
    if candidate.error_rate > policy.max_error_rate:
        reasons.append(
            f"candidate error rate {candidate.error_rate:.1%} ({candidate.failures:g} of "
            f"{candidate.requests:g}) > max {policy.max_error_rate:.1%}"
        )
    comparable = stable is not None and stable.requests >= policy.min_requests
    if comparable and candidate.error_rate > stable.error_rate + policy.max_error_rate_increase:
        reasons.append(
            f"candidate error rate {candidate.error_rate:.1%} > stable {stable.error_rate:.1%} "
            f"+ {policy.max_error_rate_increase:.1%}"
        )
    if candidate.rejected_rate > policy.max_rejected_rate:
        reasons.append(
            f"candidate rejected rate {candidate.rejected_rate:.1%} > max "
            f"{policy.max_rejected_rate:.1%}"
        )
    errors = bool(reasons)
    latency = candidate.mean_latency_ms
    if latency is not None and latency > policy.max_mean_latency_ms:
        reasons.append(
            f"candidate mean latency {latency:.1f} ms > max {policy.max_mean_latency_ms:g} ms"
        )
    if (
        comparable
        and latency is not None
        and stable.mean_latency_ms
        and latency > policy.max_latency_ratio * stable.mean_latency_ms
    ):
        reasons.append(
            f"candidate mean latency {latency:.1f} ms > {policy.max_latency_ratio:g} x stable "
            f"{stable.mean_latency_ms:.1f} ms"
        )
    p99 = candidate.p99_latency_ms
    if (
        policy.max_p99_latency_ms is not None
        and p99 is not None
        and p99 > policy.max_p99_latency_ms
    ):
        reasons.append(f"candidate p99 {p99:.1f} ms > max {policy.max_p99_latency_ms:g} ms")
    if reasons:
        return True, reasons, errors
    return (
        False,
        [
            f"healthy: candidate {candidate.requests:g} requests, error rate "
            f"{candidate.error_rate:.1%}, mean {latency or 0:.1f} ms; stable "
            + (
                f"{stable.requests:g} requests, error rate {stable.error_rate:.1%}, mean "
                f"{stable.mean_latency_ms or 0:.1f} ms"
                if stable is not None
                else "no traffic"
            )
        ],
        False,
    )


@dataclass
class AnalysisState:
    """What the analysis remembers between checks (and across triggerer restarts)."""

    rollout_id: str
    mode: str
    stable: int
    candidate: int
    started_at: float
    step_index: int = 0
    windows_passed: int = 0
    latency_breaches: int = 0
    """Closed windows in a row whose candidate breached a latency limit (and nothing else)."""
    baseline: dict[str, Any] | None = None
    rollout_baseline: dict[str, Any] | None = None
    shadow_baseline: dict[str, float] | None = None
    """The router's shadow counters at the analysis's first check: the report counts from it,
    like the per-version totals."""
    unavailable_since: float | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def state_path(home: Path, model: str) -> Path:
    return Path(home) / "rollouts" / f"{model}.json"


def read_state(home: Path, model: str) -> AnalysisState | None:
    """The analysis state of ``model``'s latest rollout; ``None`` when it never had one. A
    corrupt file raises ``ValueError`` (a status must not invent one)."""
    import json

    path = state_path(home, model)
    try:
        return AnalysisState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"rollout analysis state {path} is unreadable: {exc}") from exc


def _version_windows(
    previous: dict[str, Any], current: MetricsSnapshot, model: str, *versions: int
) -> list[WindowStats | None]:
    """The window from ``previous`` (a stored snapshot) to ``current`` of each of ``versions``
    (``None`` for a version without metrics), from one :func:`compute_window`."""
    from recsys.monitoring.window import compute_window

    stats = compute_window(MetricsSnapshot.from_dict(previous), current)
    return [stats.get((model, str(version))) for version in versions]


def router_shadow_counters(metrics_text: str, router: str) -> dict[str, float]:
    """The router's shadow counters (cumulative since it loaded) in a ``/metrics`` body:
    ``ok`` and ``error`` mirrored requests, and ``overlap_sum`` / ``compared`` for the mean
    top-k overlap (the parser names counter families without ``_total``). The analysis
    subtracts their values at its start, so only its own candidate's mirrors count; it reads
    them from the same scrape as the per-version snapshot so both count the same requests."""
    from prometheus_client.parser import text_string_to_metric_families

    keys = {"recsys_shadow_topk_overlap": "overlap_sum", "recsys_shadow_compared": "compared"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != router:
                continue
            if family.name == "recsys_shadow_requests":
                key = str(labels.get("outcome"))
            elif family.name in keys:
                key = keys[family.name]
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


class RolloutAnalysis:
    """One rollout's analysis: :meth:`step` is one check (blocking; run in a thread by the
    trigger, callable directly by tests and benchmarks)."""

    def __init__(
        self,
        *,
        metrics_url: str,
        repo: str,
        home: str,
        model: str,
        rollout_id: str,
        policy: dict[str, Any],
        timeout_s: float = 5.0,
    ) -> None:
        self.metrics_url = metrics_url
        self.repo = Path(repo)
        self.home = Path(home)
        self.model = model
        self.rollout_id = rollout_id
        self.policy = RolloutPolicy.from_dict(policy)
        self.timeout_s = timeout_s

    # -- state ----------------------------------------------------------------------------

    def _load(self, routing: Any, now: float) -> AnalysisState:
        state = read_state(self.home, self.model)
        if state is None or state.rollout_id != self.rollout_id:
            state = AnalysisState(
                rollout_id=self.rollout_id,
                mode=str(routing.mode),
                stable=int(routing.stable),
                candidate=int(routing.candidate),
                started_at=now,
            )
        return state

    def _save(self, state: AnalysisState) -> None:
        from recsys.statefile import write_json_atomically

        state.windows = state.windows[-_MAX_KEPT_WINDOWS:]
        write_json_atomically(state_path(self.home, self.model), state.to_dict())

    def _finish(
        self,
        state: AnalysisState,
        decision: str,
        reasons: list[str],
        now: float,
        snapshot: MetricsSnapshot | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Store and return the decision; with ``snapshot`` (the last scrape) it carries both
        versions' totals over the rollout."""
        if snapshot is not None:
            extra = {**self._totals(state, snapshot), **extra}
        if state.mode == "experiment" and "comparison" not in extra:
            # An experiment that ends early (a health breach, no decision in time) still
            # reports its arms so far: the evidence goes with the decision.
            comparison = self._comparison(state)
            extra = {**extra, "comparison": comparison.to_dict(),
                     "comparison_metrics": comparison.metrics()}  # fmt: skip
        result = {
            "decision": decision,
            "reasons": reasons,
            "model": self.model,
            "rollout_id": self.rollout_id,
            "mode": state.mode,
            "stable": state.stable,
            "candidate": state.candidate,
            "step": self._step_percent(state),
            "windows": state.windows[-10:],
            "seconds": round(now - state.started_at, 2),
            "decided_at": now,
            **extra,
        }
        state.result = result
        self._save(state)
        return result

    def _step_percent(self, state: AnalysisState) -> float | None:
        if state.mode != "canary":
            return None
        return self.policy.steps[min(state.step_index, len(self.policy.steps) - 1)]

    # -- one check ------------------------------------------------------------------------

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """One check; the result when the rollout is decided, else ``None``."""
        from recsys.delivery.routing import read_routing
        from recsys.monitoring.metrics import scrape_with_text

        now = time.time() if now is None else now
        routing = read_routing(self.repo, self.model)
        if routing is None or not routing.active or routing.rollout_id != self.rollout_id:
            state = read_state(self.home, self.model)
            if state is not None and state.rollout_id == self.rollout_id and state.result:
                return state.result  # decided before a triggerer restart
            now_serving = "no rollout" if routing is None or not routing.active else (
                f"rollout {routing.rollout_id}")  # fmt: skip
            stub = AnalysisState(self.rollout_id, "?", 0, 0, now) if state is None or (
                state.rollout_id != self.rollout_id) else state  # fmt: skip
            return self._finish(
                stub, SUPERSEDED, [f"{self.rollout_id} was ended elsewhere ({now_serving} now)"],
                now,
            )  # fmt: skip
        state = self._load(routing, now)
        if state.result is not None:
            return state.result
        try:
            snapshot, metrics_text = scrape_with_text(self.metrics_url, timeout_s=self.timeout_s)
            snapshot = snapshot.for_model(self.model)
        except MetricsUnavailableError as exc:
            state.unavailable_since = state.unavailable_since or now
            if now - state.unavailable_since >= self.policy.metrics_grace_s:
                self._cut_traffic(routing, "metrics unreadable")
                return self._finish(
                    state, ABORT, [f"metrics unreadable for {now - state.unavailable_since:.0f}s,"
                                   f" the candidate cannot be judged: {exc}"], now,
                )  # fmt: skip
            self._save(state)
            return None
        state.unavailable_since = None
        if state.baseline is None:
            state.baseline = snapshot.to_dict()
            if state.rollout_baseline is None:
                state.rollout_baseline = snapshot.to_dict()
                if state.mode == "shadow":
                    state.shadow_baseline = self._shadow_counters(metrics_text)
            self._save(state)
            return None
        stable, candidate = _version_windows(
            state.baseline, snapshot, self.model, state.stable, state.candidate
        )
        breached, reasons, errors = judge(stable, candidate, self.policy)
        age = snapshot.taken_at - float(state.baseline["taken_at"])
        if breached and errors:
            self._cut_traffic(routing, "breach")
            self._record(state, candidate, stable, "breach", reasons, now)
            return self._finish(state, ABORT, reasons, now, snapshot)
        if now - state.started_at >= self.policy.max_minutes * 60:
            self._cut_traffic(routing, "no decision in time")
            return self._finish(
                state, ABORT, [f"no decision within max_minutes {self.policy.max_minutes:g}"],
                now, snapshot,
            )  # fmt: skip
        if age < self.policy.window_s:
            self._save(state)
            return None
        if breached is None:
            # Too few candidate requests: the window keeps growing until it holds enough (a
            # quiet canary is judged over a longer window, never passed on no evidence);
            # an experiment or a shadow still ends on time.
            decided = None
            if state.mode != "canary":
                decided = self._advance(state, routing, snapshot, metrics_text, now)
            if decided is not None:
                return decided
            self._save(state)
            return None
        if breached:  # latency only: a closed window counts, a run of them aborts
            state.latency_breaches += 1
            self._record(state, candidate, stable, "latency breach", reasons, now)
            state.baseline = snapshot.to_dict()
            if state.latency_breaches >= self.policy.latency_windows:
                self._cut_traffic(routing, "latency breach")
                return self._finish(
                    state, ABORT,
                    [*reasons, f"{state.latency_breaches} window(s) in a row"],
                    now, snapshot,
                )  # fmt: skip
            self._save(state)
            return None
        state.latency_breaches = 0
        self._record(state, candidate, stable, "passed", reasons, now)
        state.baseline = snapshot.to_dict()
        state.windows_passed += 1
        decided = self._advance(state, routing, snapshot, metrics_text, now)
        if decided is not None:
            return decided
        self._save(state)
        return None

    def _record(
        self,
        state: AnalysisState,
        candidate: WindowStats | None,
        stable: WindowStats | None,
        outcome: str,
        reasons: list[str],
        now: float,
    ) -> None:
        state.windows.append(
            {
                "at": now,
                "step": self._step_percent(state),
                "outcome": outcome,
                "reasons": reasons,
                "candidate": None if candidate is None else candidate.to_dict(),
                "stable": None if stable is None else stable.to_dict(),
            }
        )

    def _cut_traffic(self, routing: Any, why: str) -> None:
        """Weight 0 (and no mirroring) at once: what stops the exposure, before the ``finish``
        task unloads the candidate."""
        from recsys.delivery.routing import update_routing

        update_routing(self.repo, self.model, f"analysis: {why}: candidate cut off",
                       candidate_weight=0.0, shadow_share=0.0)  # fmt: skip

    def _totals(self, state: AnalysisState, snapshot: MetricsSnapshot) -> dict[str, Any]:
        """Both versions' statistics over the whole rollout (for the report and the registry)."""
        if state.rollout_baseline is None:
            return {}
        stable, candidate = _version_windows(
            state.rollout_baseline, snapshot, self.model, state.stable, state.candidate
        )
        return {
            "totals": {
                arm: None if stats is None else stats.to_dict()
                for arm, stats in (("stable", stable), ("candidate", candidate))
            }
        }

    def _comparison(self, state: AnalysisState) -> Any:
        from recsys.delivery.feedback import FeedbackLog, feedback_log_path
        from recsys.delivery.stats import compare_arms

        log = FeedbackLog(feedback_log_path(self.home, self.model))
        summary = log.arm_outcomes(self.rollout_id)  # both arms, zero when one served nothing
        return compare_arms(
            summary.stable,
            summary.candidate,
            alpha=self.policy.alpha,
            min_impressions=self.policy.min_impressions,
        )

    def _shadow_counters(self, metrics_text: str) -> dict[str, float]:
        from recsys.delivery.routing import router_name

        return router_shadow_counters(metrics_text, router_name(self.model))

    def _advance(
        self,
        state: AnalysisState,
        routing: Any,
        snapshot: MetricsSnapshot,
        metrics_text: str,
        now: float,
    ) -> dict[str, Any] | None:
        """After a closed window: move the canary on, or end an experiment or a shadow
        (``metrics_text`` is the body ``snapshot`` came from, for the router's counters)."""
        from recsys.delivery.routing import update_routing

        policy = self.policy
        if state.mode == "canary":
            if state.windows_passed < policy.windows_per_step:
                return None
            if policy.require_not_worse:
                comparison = self._comparison(state)
                if comparison.decision == "candidate_worse":
                    self._cut_traffic(routing, "online quality worse")
                    return self._finish(
                        state, ABORT, [f"online quality: {comparison.summary}"], now, snapshot,
                        comparison=comparison.to_dict(),
                        comparison_metrics=comparison.metrics(),
                    )  # fmt: skip
                if not comparison.enough_data:
                    state.windows[-1]["reasons"].append(
                        f"waiting for feedback: {comparison.summary}"
                    )
                    return None
            state.step_index += 1
            state.windows_passed = 0
            if state.step_index >= len(policy.steps):
                return self._finish(
                    state, PROMOTE,
                    [f"every step passed ({', '.join(f'{s:g}%' for s in policy.steps)}, "
                     f"{policy.windows_per_step} window(s) of {policy.window_s:g}s each)"],
                    now, snapshot,
                )  # fmt: skip
            weight = policy.steps[state.step_index] / 100.0
            update_routing(self.repo, self.model, f"analysis: step {weight:.0%}",
                           candidate_weight=weight)  # fmt: skip
            state.baseline = None  # the next window starts with the new weight
            return None
        elapsed_min = (now - state.started_at) / 60.0
        comparison = self._comparison(state) if state.mode == "experiment" else None
        sample_done = (
            comparison is not None
            and policy.sample_size > 0
            and comparison.stable.impressions + comparison.candidate.impressions
            >= policy.sample_size
        )
        if elapsed_min < policy.duration_minutes and not sample_done:
            return None
        if state.mode == "experiment":
            better = comparison.decision == "candidate_better"
            decision = PROMOTE if policy.promote_if_better and better else END
            return self._finish(
                state, decision, [f"experiment over: {comparison.summary}"], now, snapshot,
                comparison=comparison.to_dict(),
                comparison_metrics=comparison.metrics(),
            )  # fmt: skip
        shadow = self._shadow_counters(metrics_text)
        before = state.shadow_baseline or {}
        shadow = {key: value - before.get(key, 0.0) for key, value in shadow.items()}
        count = shadow.get("compared", 0.0)
        overlap = shadow.get("overlap_sum", 0.0) / count if count else None
        summary = (
            f"shadow over: {shadow.get('ok', 0):g} mirrored answers, "
            f"{shadow.get('error', 0):g} errors, "
            + (f"top-k overlap with stable {overlap:.1%}" if overlap is not None else
               "no overlap measured")
        )  # fmt: skip
        decision = PROMOTE if policy.promote_if_better else END
        return self._finish(
            state, decision, [summary], now, snapshot, shadow={**shadow, "overlap": overlap}
        )


class RolloutTrigger(BaseTrigger):
    """Run :class:`RolloutAnalysis` every ``check_interval_s`` in the triggerer until it
    decides; ends the task from the triggerer with the decision as its XCom."""

    def __init__(
        self, analysis: dict[str, Any], *, check_interval_s: float = 2.0, task: str = ""
    ) -> None:
        super().__init__()
        self.analysis = dict(analysis)
        self.check_interval_s = float(check_interval_s)
        self.task_name = task

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"analysis": self.analysis, "check_interval_s": self.check_interval_s,
             "task": self.task_name},
        )  # fmt: skip

    async def run(self) -> AsyncIterator[TriggerEvent]:
        analysis = RolloutAnalysis(**self.analysis)
        self.log.info("analysing %s (%s)", analysis.rollout_id, analysis.policy.to_dict())
        next_at = time.monotonic()
        while True:
            result = await asyncio.to_thread(analysis.step)
            if result is not None:
                self.log.info("%s: %s; %s", analysis.rollout_id, result["decision"],
                              result["reasons"])  # fmt: skip
                yield TaskSuccessEvent(xcoms={"return_value": result})
                return
            next_at += self.check_interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def analysis_result(value: Any) -> dict[str, Any]:
    """The analysis's XCom as a dict (JSON text when pushed from the triggerer, see
    :func:`recsys.monitoring.trigger.watch_result`)."""
    import json

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping) or "decision" not in value:
        raise TypeError(f"not a rollout decision: {str(value)[:200]!r}")
    return dict(value)


POLICY_PARAMS = tuple(RolloutPolicy.__dataclass_fields__)


class RolloutAnalysisOperator(BaseOperator):
    """Defer to :class:`RolloutTrigger` for the rollout under way of the DAG's served model."""

    def __init__(self, *, model_suffix: str = "", family: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_suffix = model_suffix
        self.family = family

    def execute(self, context: Mapping[str, Any]) -> None:
        from recsys.config import load_settings, served_model_settings
        from recsys.delivery.rollout import RolloutError, active_rollout

        settings = served_model_settings(load_settings(), self.model_suffix, self.family)
        params = context["params"]
        routing = active_rollout(settings)
        if routing is None:
            raise RolloutError(f"no rollout of {settings.model_name} is under way to analyse")
        policy = RolloutPolicy.from_dict({name: params.get(name) for name in POLICY_PARAMS})
        longest = timedelta(minutes=policy.max_minutes)
        self.defer(
            trigger=RolloutTrigger(
                {
                    "metrics_url": settings.triton_metrics_url,
                    "repo": str(settings.triton_repo),
                    "home": str(settings.home),
                    "model": settings.model_name,
                    "rollout_id": routing.rollout_id,
                    "policy": policy.to_dict(),
                },
                check_interval_s=float(params["check_interval_s"]),
                task=context["ti"].task_id,
            ),
            method_name="execute_complete",
            timeout=longest + TRIGGER_TIMEOUT_MARGIN,
        )

    def execute_complete(self, context: Mapping[str, Any], event: Any = None) -> dict[str, Any]:
        """Only reached under ``dag.test()`` (see the monitor's operator): the decision is
        read back from the analysis state, where the trigger stored it."""
        from recsys.config import load_settings, served_model_settings

        if isinstance(event, Mapping) and "decision" in event:
            return dict(event)
        settings = served_model_settings(load_settings(), self.model_suffix, self.family)
        state = read_state(settings.home, settings.model_name)
        if state is None or state.result is None:
            raise RuntimeError(f"the rollout analysis of {settings.model_name} ended undecided")
        return state.result
