"""The metrics watch: a long-running deferrable check that lives in Airflow's triggerer.

Why a watch and not a DAG run per minute. Detection then waits for nothing but the check
interval: no scheduler cadence, no worker slot, no task start. Every few seconds
(``check_interval_s``) :class:`MetricsWatchTrigger` scrapes Triton and judges the window with
:func:`recsys.monitoring.policy.check_once`. It does that in a thread, because the check does
blocking HTTP and a file lock that must not stall the triggerer's event loop. The watch ends only
when a rollback is due or after ``watch_minutes``; the DAG then starts the next watch.

Why the watch ends in the triggerer. A deferred task that resumes on a worker seconds after it
deferred races Airflow 3.3's scheduler: the worker's exit on ``defer()`` leaves a stale SUCCESS
event, and when the scheduler drains it after the resumed attempt is already queued or running,
it marks that attempt failed ("state mismatch"). The resumed worker is then refused with
``invalid_state``, the run fails and the failure alerts. That is apache/airflow#72716 and
#71580, and a scheduler starved by training hits it easily. So the watch never resumes on a
worker: it yields :class:`~airflow.triggers.base.TaskSuccessEvent`, with the verdict as the
task's XCom, and the triggerer marks the task done. The ``rollback`` task downstream is an
ordinary task that never deferred.

What the watch does with the other outcomes:

* Metrics it cannot read are not judged and never roll back. When they stay unreadable for
  ``metrics_grace_s``, the watch sends one alert and writes an audit record for the outage,
  which the monitor state remembers across checks and watch runs. The next successful check
  closes it: a ``monitor_metrics_restored`` audit record, no second alert.
* With several Triton replicas (``replicas``: the ``RECSYS_TRITON_REPLICAS`` text, resolved
  again at every check so that ``dns+`` names follow a scale-out), every replica is judged and
  the whole too (:func:`recsys.monitoring.policy.check_replicas`). A single bad replica is
  named in one alert and one audit record (``replica_unhealthy``) and never rolls the version
  back; a replica whose metrics stay unreadable is alerted once (``replica_blind``).
* When the newest audit record of the model is a failed rollback, a breach does not end the
  watch again for :data:`FAILED_ROLLBACK_QUIET_S`. That failure has already alerted and needs a
  person; rolling back again every few seconds would alert every few seconds.

When the triggerer restarts, the trigger is rebuilt from :meth:`MetricsWatchTrigger.serialize`.
The watch's end time is absolute, and the state file holds the baseline, so the watch picks up
where it was.
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

from recsys.monitoring.metrics import MetricsUnavailableError

log = logging.getLogger(__name__)

MONITOR_BLIND = "monitor_metrics_unavailable"
MONITOR_RESTORED = "monitor_metrics_restored"
REPLICA_EVENTS_ALERTED = {"replica_unhealthy", "replica_blind"}
"""Replica events that page a person (once per episode); the others are only audited."""
ROLLBACK_FAILED = "rollback_failed"
FAILED_ROLLBACK_QUIET_S = 15 * 60.0
"""After a rollback of a model failed (alerted, with the reason), a still-breaching model does
not trigger another attempt for this long: a person is on it, and a retry loop would only page
again. A deploy or a successful rollback in between ends the quiet period at once."""
TRIGGER_TIMEOUT_MARGIN = timedelta(minutes=5)
"""How long past its planned end a watch may take before Airflow fails it (a dead or starved
triggerer): that failure alerts, because nothing is watching."""
_SWITCHING_ACTIONS = {"deploy", "rollback", "rollback_registry_pending", ROLLBACK_FAILED}


@dataclass
class WatchSummary:
    """What one watch did, returned with its last verdict (the XCom) and in its task log."""

    started_at: float
    checks: int = 0
    judged_windows: int = 0
    breaching_windows: int = 0
    unavailable_checks: int = 0
    suppressed_rollbacks: int = 0
    ended_because: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failed_rollback_pending(audit_log: Path, model: str, now: float) -> dict[str, Any] | None:
    """The model's newest deploy/rollback record when it is a failed rollback younger than
    :data:`FAILED_ROLLBACK_QUIET_S` (someone has been alerted and must act), else ``None``."""
    from datetime import datetime

    from recsys.audit import read_records

    switches = [r for r in read_records(audit_log, model) if r.get("action") in _SWITCHING_ACTIONS]
    if not switches or switches[-1].get("action") != ROLLBACK_FAILED:
        return None
    try:
        when = datetime.fromisoformat(str(switches[-1]["ts"])).timestamp()
    except (KeyError, ValueError):
        return switches[-1]  # a failed rollback of unknown age: still a person's job
    return switches[-1] if now - when < FAILED_ROLLBACK_QUIET_S else None


def watch_result(value: Any) -> dict[str, Any]:
    """The watch's XCom as a dict, as downstream tasks receive it.

    An XCom pushed from the triggerer (``TaskSuccessEvent(xcoms=...)``) is stored by Airflow
    3.3's core ``XComModel.set`` as JSON text, while the Task SDK reads XComs back with its serde
    deserializer, which returns that text as a plain ``str``. So the value may arrive as a
    dict (``dag.test()``) or as its JSON (the triggerer); anything else is an error, never "no
    rollback due"."""
    import json

    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping) or "should_rollback" not in value:
        raise TypeError(f"not a metrics-watch verdict: {str(value)[:200]!r}")
    return dict(value)


class MetricsWatchTrigger(BaseTrigger):
    """Watch one served model's Triton metrics until a rollback is due or ``watch_until`` (unix
    time) passes; ends the task from the triggerer with the verdict as its XCom."""

    def __init__(
        self,
        metrics_url: str,
        model: str,
        state_path: str,
        thresholds: dict[str, Any],
        *,
        watch_until: float,
        audit_log: str,
        alerts_log: str,
        check_interval_s: float = 5.0,
        metrics_grace_s: float = 60.0,
        timeout_s: float = 5.0,
        dag_id: str = "",
        run_id: str = "",
        task_id: str = "",
        triton_repo: str = "",
        replicas: str = "",
        unsyncable: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.replicas = replicas
        self.unsyncable = sorted(unsyncable or [])
        """Replicas the champion could not be loaded on when this watch started (alerted
        then): their serving nothing does not end the watch again."""
        """``RECSYS_TRITON_REPLICAS`` (empty: the single server at ``metrics_url``)."""
        self.triton_repo = triton_repo
        """Where the model's router keeps its routing: the candidate of a rollout under way is
        left out of the monitor's window (its analysis judges it)."""
        self.metrics_url = metrics_url
        self.model = model
        self.state_path = state_path
        self.thresholds = dict(thresholds)
        self.watch_until = float(watch_until)
        self.audit_log = audit_log
        self.alerts_log = alerts_log
        self.check_interval_s = float(check_interval_s)
        self.metrics_grace_s = float(metrics_grace_s)
        self.timeout_s = float(timeout_s)
        self.dag_id = dag_id
        self.run_id = run_id
        self.task_id = task_id
        self.summary = WatchSummary(started_at=time.time())
        self.last_verdict: dict[str, Any] | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "metrics_url": self.metrics_url,
                "model": self.model,
                "state_path": self.state_path,
                "thresholds": self.thresholds,
                "watch_until": self.watch_until,
                "audit_log": self.audit_log,
                "alerts_log": self.alerts_log,
                "check_interval_s": self.check_interval_s,
                "metrics_grace_s": self.metrics_grace_s,
                "timeout_s": self.timeout_s,
                "dag_id": self.dag_id,
                "run_id": self.run_id,
                "task_id": self.task_id,
                "triton_repo": self.triton_repo,
                "replicas": self.replicas,
                "unsyncable": self.unsyncable,
            },
        )

    # -- one check (blocking; run in a thread by run(), callable directly) ---------------------

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """One check. Returns the watch's result when it should end now (a rollback is due, or
        the watch is over), else ``None``."""
        from recsys.monitoring.policy import Thresholds, check_once

        now = time.time() if now is None else now
        self.summary.checks += 1
        try:
            verdict = check_once(
                self._targets(),
                self.model,
                self.state_path,
                Thresholds(**self.thresholds),
                timeout_s=self.timeout_s,
                exclude_versions=self._rollout_candidates(),
                replica_grace_s=self.metrics_grace_s,
            )
        except MetricsUnavailableError as exc:
            self.summary.unavailable_checks += 1
            self._note_unavailable(str(exc), now)
        else:
            self.last_verdict = verdict.to_dict()
            for event in verdict.replica_events:
                self._note_replica_event(event)
            empty = [r for r in verdict.empty_replicas if r not in self.unsyncable]
            if empty:
                return self._finish(
                    f"replica(s) {', '.join(empty)} serve no version of {self.model}: the next "
                    "watch loads the champion there"
                )
            if verdict.closed_outage is not None:
                self._note_restored(verdict.closed_outage)
            if verdict.judged:
                self.summary.judged_windows += 1
            if verdict.breached:
                self.summary.breaching_windows += 1
            if verdict.should_rollback:
                failed = failed_rollback_pending(Path(self.audit_log), self.model, now)
                if failed is None:
                    return self._finish("rollback due")
                self.summary.suppressed_rollbacks += 1
                note = (
                    f"rollback due, not attempted: the rollback of {self.model} at "
                    f"{failed.get('ts')} failed ({failed.get('error')}) and was alerted; "
                    "a person must act"
                )
                if note not in self.summary.notes:
                    self.summary.notes.append(note)
        if now >= self.watch_until:
            return self._finish("watch period over")
        return None

    def _targets(self) -> str | dict[str, str]:
        """The metrics URL, or every replica's by name (``dns+`` names resolved now; a name
        that resolves to nothing is an unreadable check, handled like any outage)."""
        if not self.replicas:
            return self.metrics_url
        from recsys.triton.replicas import ReplicaDiscoveryError, metrics_targets

        try:
            return metrics_targets(self.replicas)
        except ReplicaDiscoveryError as exc:
            raise MetricsUnavailableError(str(exc)) from exc

    def _note_replica_event(self, event: dict[str, Any]) -> None:
        """Audit every replica event; alert the ones a person must act on, naming the model
        and the replica (the policy raises each once per episode)."""
        from recsys import audit

        kind, replica = str(event["kind"]), str(event["replica"])
        audit.append_record(
            Path(self.audit_log), kind, self.model, actor=self.dag_id or "monitor",
            replica=replica, reason=event.get("reason"),
        )  # fmt: skip
        if kind not in REPLICA_EVENTS_ALERTED:
            return
        what = (
            "is unhealthy; the other replicas serve the same version well, so it was NOT "
            "rolled back: take the replica out of service and look at its host"
            if kind == "replica_unhealthy"
            else "cannot be monitored: its metrics are unreadable (the others are still judged)"
        )
        audit.send_alert(
            Path(self.alerts_log),
            f"{self.model}: Triton replica {replica} {what}",
            {**self._where(), **event, "kind": kind},
        )

    def _rollout_candidates(self) -> frozenset[str]:
        """The candidate version of a rollout under way (none without a router). An unreadable
        routing file excludes nothing: the monitor then judges every version, as before
        routers existed, rather than going blind."""
        if not self.triton_repo:
            return frozenset()
        from recsys.delivery.routing import RoutingError, read_routing

        try:
            routing = read_routing(Path(self.triton_repo), self.model)
        except RoutingError as exc:
            log.error("%s: %s; judging every version", self.model, exc)
            return frozenset()
        if routing is None or not routing.active or routing.candidate is None:
            return frozenset()
        return frozenset({str(routing.candidate)})

    def _finish(self, why: str) -> dict[str, Any]:
        """The task's XCom: the last verdict plus what the watch did; also kept in the monitor
        state, where ``execute_complete`` finds it when a test harness resumes the task."""
        from recsys.monitoring.policy import remember_result

        self.summary.ended_because = why
        verdict = self.last_verdict or {
            "model": self.model,
            "breached": False,
            "should_rollback": False,
            "reasons": ["no verdict: the metrics were never readable during this watch"],
            "stats": None,
            "consecutive": 0,
            "success_rate": None,
            "p99_latency_ms": None,
            "closed_outage": None,
            "judged": False,
        }
        result = {**verdict, "watch": self.summary.to_dict()}
        remember_result(self.state_path, self.model, result)
        return result

    def _where(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "run_id": self.run_id,
        }

    def _note_unavailable(self, error: str, now: float) -> None:
        from recsys import audit
        from recsys.monitoring.policy import note_unavailable

        outage = note_unavailable(self.state_path, self.model, error, self.metrics_grace_s, now=now)
        if outage is None:
            return
        since = float(outage["since"])
        details = {
            **self._where(),
            "kind": MONITOR_BLIND,
            "error": error,
            "unavailable_since": since,
            "unavailable_for_s": round(now - since, 1),
        }
        audit.append_record(
            Path(self.audit_log), MONITOR_BLIND, self.model, actor=self.dag_id or "monitor",
            reason=f"Triton metrics unreadable for {now - since:.0f}s: {error}",
        )  # fmt: skip
        audit.send_alert(
            Path(self.alerts_log),
            f"{self.model}: monitor cannot read Triton's metrics ({self.dag_id}); nothing is "
            "judged or rolled back until they are back",
            details,
        )

    def _note_restored(self, outage: dict[str, Any]) -> None:
        from recsys import audit

        if outage.get("alerted_at") is None:
            return  # a blip shorter than the grace period: never reported, nothing to close
        audit.append_record(
            Path(self.audit_log),
            MONITOR_RESTORED,
            self.model,
            actor=self.dag_id or "monitor",
            reason=f"Triton metrics readable again; unreadable since {outage.get('since')}",
        )

    # -- the loop in the triggerer -------------------------------------------------------------

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info(
            "watching %s at %s every %.1fs until %s",
            self.model,
            self.metrics_url,
            self.check_interval_s,
            time.strftime("%H:%M:%S", time.gmtime(self.watch_until)),
        )
        next_at = time.monotonic()
        last_report = time.monotonic()
        while True:
            result = await asyncio.to_thread(self.step)
            if result is not None:
                self.log.info(
                    "%s: %s; %s", self.model, result["watch"]["ended_because"], result["reasons"]
                )
                yield TaskSuccessEvent(xcoms={"return_value": result})
                return
            if time.monotonic() - last_report >= 60.0:
                last_report = time.monotonic()
                reasons = (self.last_verdict or {}).get("reasons") or ["no verdict yet"]
                self.log.info("%s: %s; %s", self.model, self.summary.to_dict(), reasons[-1])
            next_at += self.check_interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


class MetricsWatchOperator(BaseOperator):
    """Watch the served model from the triggerer and hand the verdict to the ``rollback`` task.

    ``execute`` resolves the thresholds (config file + DAG params) and defers at once; the
    trigger ends the task itself (see the module docstring), so ``execute_complete`` only runs
    where that end event is not honoured."""

    def __init__(self, *, model_suffix: str = "", family: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_suffix = model_suffix
        self.family = family
        """Watch ``RECSYS_MODEL_NAME + model_suffix``, or with ``family`` that family's model
        name + ``model_suffix`` (:func:`recsys.config.served_model_settings`); the name is
        resolved when the task runs, so the DAG file needs no settings to parse."""

    def execute(self, context: Mapping[str, Any]) -> None:
        from recsys.config import load_settings, served_model_settings
        from recsys.monitoring.config import THRESHOLD_FIELDS, load_thresholds
        from recsys.triton.replicas import format_entries

        settings = served_model_settings(load_settings(), self.model_suffix, self.family)
        params = context["params"]
        thresholds = load_thresholds(
            settings.model_name, overrides={name: params.get(name) for name in THRESHOLD_FIELDS}
        )
        watch = timedelta(minutes=float(params["watch_minutes"]))
        ti = context["ti"]
        unsyncable = (
            self._sync_replicas(settings, params.get("smoke_request"), ti)
            if settings.has_replicas
            else []
        )
        self.defer(
            trigger=MetricsWatchTrigger(
                settings.triton_metrics_url,
                settings.model_name,
                str(settings.monitor_state),
                thresholds.to_dict(),
                watch_until=time.time() + watch.total_seconds(),
                audit_log=str(settings.audit_log),
                alerts_log=str(settings.alerts_log),
                check_interval_s=float(params["check_interval_s"]),
                metrics_grace_s=float(params["metrics_grace_s"]),
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                task_id=ti.task_id,
                triton_repo=str(settings.triton_repo),
                replicas=format_entries(settings.triton_replica_entries),
                unsyncable=unsyncable,
            ),
            method_name="execute_complete",
            timeout=watch + TRIGGER_TIMEOUT_MARGIN,
        )

    def _sync_replicas(self, settings: Any, smoke_request: Any, ti: Any) -> list[str]:
        """Bring every Triton replica to the champion before watching
        (:func:`recsys.deploy.sync_replicas`): a replica that joined or restarted since the last
        deploy serves nothing until then. A failure never stops the watch; it alerts once per
        repeat window (``RECSYS_ALERT_REPEAT_MINUTES``), since it recurs at every watch.
        Returns the replicas that could not be synced (all of them when it failed as a whole).
        """
        from recsys import audit
        from recsys.alerts import _fingerprint, _sent_recently, repeat_window_s
        from recsys.deploy import ReplicaSyncError, sync_replicas

        try:
            result = sync_replicas(settings, smoke_request=smoke_request)
        except Exception as exc:  # reported, then the watch goes on: watching matters more
            log.error("syncing the replicas of %s failed: %s", settings.model_name, exc)
            details = {
                "model": settings.model_name,
                "dag_id": ti.dag_id,
                "task_id": ti.task_id,
                "run_id": ti.run_id,
                "error_type": exc.__class__.__name__,
                "error": str(exc),
            }
            details["fingerprint"] = _fingerprint(details)
            if not _sent_recently(settings.alerts_log, details["fingerprint"], repeat_window_s()):
                audit.send_alert(
                    settings.alerts_log,
                    f"{settings.model_name}: Triton replicas could not be brought to the champion",
                    details,
                )
            if isinstance(exc, ReplicaSyncError):
                return sorted(exc.replicas)
            return [replica.name for replica in settings.triton_replicas()]
        synced = {n: s for n, s in result["replicas"].items() if s["state"] == "synced"}
        if synced:
            log.warning(
                "loaded %s v%s on replica(s) %s, which served %s",
                settings.model_name, result["champion"], ", ".join(synced),
                {n: s["was"] for n, s in synced.items()},
            )  # fmt: skip
        return []

    def execute_complete(self, context: Mapping[str, Any], event: Any = None) -> dict[str, Any]:
        """Only reached under ``dag.test()``, which resumes a deferred task with the event's
        payload instead of ending it as the triggerer does: the verdict is then read from the
        monitor state, where the trigger stored the same result it yields as XCom."""
        from recsys.config import load_settings, served_model_settings
        from recsys.monitoring.policy import MonitorState

        if isinstance(event, Mapping) and "should_rollback" in event:
            return dict(event)
        settings = served_model_settings(load_settings(), self.model_suffix, self.family)
        result = MonitorState.load(settings.monitor_state).last_verdicts.get(settings.model_name)
        if result is None or "watch" not in result:
            raise MetricsUnavailableError(
                f"the metrics watch of {settings.model_name} ended without a verdict "
                f"(event {event!r})"
            )
        return result
