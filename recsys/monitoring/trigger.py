"""Deferrable metrics check: the scrape-and-judge step runs in Airflow's triggerer.

The monitor runs every minute, forever. As a plain task each run holds a worker slot while it
waits on Triton's metrics endpoint (up to the scrape timeout when Triton is slow or gone); as a
deferred task it gives the slot back at once and one triggerer process runs the checks of every
monitored model side by side in its event loop.

:class:`MetricsCheckOperator` resolves the thresholds (config file + DAG params) on the worker,
then defers to :class:`MetricsCheckTrigger`, which runs
:func:`recsys.monitoring.policy.check_once` in a thread (it does blocking HTTP and a file lock,
which must not stall the triggerer's event loop) and reports the verdict, or the failure, as its
event. The operator turns a failure event back into :class:`MetricsUnavailableError`, so the task
fails (and alerts) exactly as the non-deferred check did.

A trigger may run more than once if a triggerer dies mid-check; a second run only makes the
window shorter, since the state file is updated atomically under its lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from recsys.monitoring.metrics import MetricsUnavailableError


class MetricsCheckTrigger(BaseTrigger):
    """One :func:`check_once` in the triggerer; the event is ``{"status": "ok", "verdict": ...}``
    or ``{"status": "error", "error_type": ..., "message": ...}``."""

    def __init__(
        self,
        metrics_url: str,
        model: str,
        state_path: str,
        thresholds: dict[str, Any],
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.metrics_url = metrics_url
        self.model = model
        self.state_path = state_path
        self.thresholds = dict(thresholds)
        self.timeout_s = timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "metrics_url": self.metrics_url,
                "model": self.model,
                "state_path": self.state_path,
                "thresholds": self.thresholds,
                "timeout_s": self.timeout_s,
            },
        )

    def check(self) -> dict[str, Any]:
        """The blocking part, also callable directly (what :meth:`run` runs in a thread)."""
        from recsys.monitoring.policy import Thresholds, check_once

        try:
            verdict = check_once(
                self.metrics_url,
                self.model,
                self.state_path,
                Thresholds(**self.thresholds),
                timeout_s=self.timeout_s,
            )
        except MetricsUnavailableError as exc:
            return {"status": "error", "error_type": type(exc).__name__, "message": str(exc)}
        return {"status": "ok", "verdict": verdict.to_dict()}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await asyncio.to_thread(self.check))


class MetricsCheckOperator(BaseOperator):
    """Check the served model's metrics without holding a worker slot; returns the verdict dict
    (the same XCom the TaskFlow version returned)."""

    def __init__(
        self,
        *,
        model_suffix: str = "",
        trigger_timeout: timedelta = timedelta(minutes=2),
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.model_suffix = model_suffix
        """Watch ``RECSYS_MODEL_NAME + model_suffix`` (see ``recsys.config.SERVED_MODEL_SUFFIXES``);
        the name is resolved when the task runs, so the DAG file needs no settings to parse."""
        self.trigger_timeout = trigger_timeout

    def execute(self, context: Mapping[str, Any]) -> None:
        from recsys.config import load_settings, served_model_settings
        from recsys.monitoring.config import THRESHOLD_FIELDS, load_thresholds

        settings = served_model_settings(load_settings(), self.model_suffix)
        model = settings.model_name
        params = context["params"]
        thresholds = load_thresholds(
            model, overrides={name: params.get(name) for name in THRESHOLD_FIELDS}
        )
        self.defer(
            trigger=MetricsCheckTrigger(
                settings.triton_metrics_url,
                model,
                str(settings.monitor_state),
                thresholds.to_dict(),
            ),
            method_name="execute_complete",
            timeout=self.trigger_timeout,
        )

    def execute_complete(
        self, context: Mapping[str, Any], event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if not event or event.get("status") != "ok":
            message = (event or {}).get("message") or f"metrics check failed: {event!r}"
            raise MetricsUnavailableError(message)
        return event["verdict"]
