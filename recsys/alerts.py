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


def failure_details(context: Mapping[str, Any]) -> dict[str, Any]:
    """What an on-call person needs from an Airflow callback context: which DAG, task, run and
    try failed, with what error, and where to look (the task's log URL when Airflow has one)."""
    from recsys.config import load_settings

    ti = context.get("task_instance") or context.get("ti")
    dag_run = context.get("dag_run")
    exception = context.get("exception")
    return {
        "model": load_settings().model_name,
        "dag_id": _attr(ti, "dag_id") or _attr(dag_run, "dag_id"),
        "task_id": _attr(ti, "task_id"),
        "run_id": _attr(ti, "run_id") or _attr(dag_run, "run_id"),
        "try_number": _attr(ti, "try_number"),
        "log_url": _attr(ti, "log_url"),
        "error_type": type(exception).__name__ if exception is not None else None,
        "error": str(exception) if exception is not None else context.get("reason"),
    }


def task_failure_alert(context: Mapping[str, Any]) -> None:
    """``on_failure_callback`` for tasks and DAG runs: post the failure as an alert."""
    from recsys import audit
    from recsys.config import load_settings

    try:
        details = failure_details(context)
        where = details["task_id"] or "run"
        title = f"{details['dag_id']}.{where} failed: {details['error_type'] or 'failure'}"
        audit.send_alert(load_settings().alerts_log, title, details)
    except Exception:  # a failing callback must not mask the task failure it reports
        log.exception("could not send the failure alert")


def post_alert(settings: Settings, title: str, details: dict[str, Any]) -> None:
    """Post an alert that is not a task failure (e.g. query drift) the way failures are
    posted: kept in ``$RECSYS_HOME/alerts`` and sent to ``RECSYS_ALERT_WEBHOOK`` when set, so
    on-call sees every kind of alert in one place."""
    from recsys import audit

    audit.send_alert(settings.alerts_log, title, details)
