"""Airflow callbacks that turn task failures into alerts on the platform's webhook.

A failed monitor run is itself an incident (Triton's metrics are unreachable, or a rollback
could not switch versions), and a failed training run means the model in production is getting
stale; both must reach a person rather than sit red in the Airflow UI. The callbacks reuse
:func:`recsys.audit.send_alert`, so every alert is also kept in ``$RECSYS_HOME/alerts`` and goes
to ``RECSYS_ALERT_WEBHOOK`` when that is set. They never raise: a callback that fails would hide
the failure it was reporting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsys.config import Settings

log = logging.getLogger(__name__)


def _attr(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


ALERT_SENT_ATTR = "recsys_alert_sent"


def mark_alerted(exc: BaseException) -> BaseException:
    """Mark ``exc`` as already alerted by the code raising it (which knew more than a callback
    would, e.g. the versions of a rollback left pending): the task's failure callback then
    records it instead of paging a second time for the same incident. Returns ``exc``."""
    setattr(exc, ALERT_SENT_ATTR, True)
    return exc


REPEAT_ENV = "RECSYS_ALERT_REPEAT_MINUTES"
DEFAULT_REPEAT_MINUTES = 60.0
SUPPRESSED = "alert_suppressed"


def failure_details(
    context: Mapping[str, Any], model_suffix: str = "", family: str | None = None
) -> dict[str, Any]:
    """What an on-call person needs from an Airflow callback context: which model, DAG, task,
    run and try failed, with what error, and where to look (the task's log URL when Airflow has
    one). ``model_suffix`` names the served model the DAG is about (``_reranker`` for the
    reranker's monitor), so its alerts do not blame the bi-encoder; ``family`` a model family's
    served model (:func:`recsys.config.served_model_settings`)."""
    from recsys.config import load_settings, served_model_settings

    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    exception = context.get("exception")
    if exception is not None:
        error = str(exception)
    else:
        # Airflow failed the task itself (the scheduler, the triggerer or a heartbeat timeout),
        # so no exception reached the callback; say so rather than send ``error: null``.
        error = context.get("reason") or (
            "failed by Airflow without a task exception (timeout, lost heartbeat or an "
            "externally changed state); see the task log"
        )
    return {
        "model": served_model_settings(load_settings(), model_suffix, family).model_name,
        "dag_id": _attr(ti, "dag_id") or _attr(dag_run, "dag_id"),
        "task_id": _attr(ti, "task_id"),
        "run_id": _attr(ti, "run_id") or _attr(dag_run, "run_id"),
        "try_number": _attr(ti, "try_number"),
        "log_url": _attr(ti, "log_url"),
        "error_type": type(exception).__name__ if exception is not None else "AirflowFailure",
        "error": error,
    }


def repeat_window_s() -> float:
    """``RECSYS_ALERT_REPEAT_MINUTES`` (default 60) in seconds: an identical failure alert (same
    DAG, task, error type and first line of the error) within it is recorded, not sent again."""
    import os

    raw = os.environ.get(REPEAT_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_REPEAT_MINUTES
    except ValueError:
        log.error("%s=%r is not a number; using %g", REPEAT_ENV, raw, DEFAULT_REPEAT_MINUTES)
        minutes = DEFAULT_REPEAT_MINUTES
    return max(minutes, 0.0) * 60.0


def _fingerprint(details: Mapping[str, Any]) -> str:
    first_line = (str(details.get("error") or "").strip().splitlines() or [""])[0]
    return (
        "|".join(str(details.get(key) or "") for key in ("dag_id", "task_id", "error_type"))
        + f"|{first_line[:300]}"
    )


def _sent_recently(alerts_log: Any, fingerprint: str, window_s: float) -> dict[str, Any] | None:
    """The newest alert with ``fingerprint`` sent within ``window_s``, if any."""
    from datetime import UTC, datetime

    from recsys.audit import read_records

    if window_s <= 0:
        return None
    now = datetime.now(UTC)
    for record in reversed(read_records(alerts_log)):
        if record.get("action") != "alert":
            continue
        try:
            age = (now - datetime.fromisoformat(str(record["ts"]))).total_seconds()
        except (KeyError, ValueError):
            continue
        if age > window_s:
            return None
        if (record.get("details") or {}).get("fingerprint") == fingerprint:
            return record
    return None


class FailureAlert:
    """``on_failure_callback`` of every task: post the failure as one alert naming the served
    model (``RECSYS_MODEL_NAME + model_suffix``), the DAG, the task and the error.

    One failure, one alert: there is no DAG-level callback repeating each task failure; a
    failure the task already alerted itself (:func:`mark_alerted`) is not paged again; and an
    identical failure within :func:`repeat_window_s` (a monitor DAG failing the same way every
    minute) is recorded in the alert log as ``alert_suppressed``, not paged again. Never raises:
    a callback that fails would hide the failure it was reporting."""

    def __init__(self, model_suffix: str = "", family: str | None = None) -> None:
        from recsys.families import LEGACY_FAMILY

        self.model_suffix = model_suffix
        self.family = None if family == LEGACY_FAMILY else family
        self.__name__ = f"FailureAlert({model_suffix!r}, {family!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FailureAlert) and (other.model_suffix, other.family) == (
            self.model_suffix,
            self.family,
        )

    def __hash__(self) -> int:
        return hash(("FailureAlert", self.model_suffix, self.family))

    def __call__(self, context: Mapping[str, Any]) -> None:
        from recsys import audit
        from recsys.config import load_settings

        try:
            settings = load_settings()
            details = failure_details(context, self.model_suffix, self.family)
            details["fingerprint"] = _fingerprint(details)
            where = details["task_id"] or "run"
            title = (
                f"{details['dag_id']}.{where} failed ({details['model']}): {details['error_type']}"
            )
            exception = context.get("exception")
            earlier = _sent_recently(settings.alerts_log, details["fingerprint"], repeat_window_s())
            if exception is not None and getattr(exception, ALERT_SENT_ATTR, False):
                why = {"why": "the task alerted this failure itself"}
            elif earlier is not None:
                why = {"why": "the same failure was alerted", "repeat_of": earlier.get("ts")}
            else:
                audit.send_alert(settings.alerts_log, title, details)
                return
            model = details["model"]
            audit.append_record(
                settings.alerts_log, SUPPRESSED, model, title=title, details=details, **why
            )
            log.warning("not alerted again (%s): %s", why["why"], title)
        except Exception:  # a failing callback must not mask the task failure it reports
            log.exception("could not send the failure alert")


task_failure_alert = FailureAlert()
"""The callback of DAGs about the platform's model itself (pipeline, drift check)."""


def post_alert(settings: Settings, title: str, details: dict[str, Any]) -> None:
    """Post an alert that is not a task failure (e.g. query drift) the way failures are
    posted: kept in ``$RECSYS_HOME/alerts`` and sent to ``RECSYS_ALERT_WEBHOOK`` when set, so
    on-call sees every kind of alert in one place."""
    from recsys import audit

    audit.send_alert(settings.alerts_log, title, details)
