"""Rollback: put the last known-good version back into service and make the registry say so.

Order matters. Triton is switched first, because every second a broken version serves costs
failed requests; the registry and audit trail follow. The lock shared with deploys keeps a
rollback from interleaving with a deploy of the same model.
"""

from __future__ import annotations

import logging
from typing import Any

from recsys.config import Settings

log = logging.getLogger(__name__)


class RollbackError(RuntimeError):
    """No rollback was possible; the message says why and what still serves."""


def rollback(
    settings: Settings,
    reason: str,
    metrics: dict[str, Any] | None = None,
    *,
    smoke_query: str = "cordless drill",
    to_version: int | None = None,
) -> dict[str, Any]:
    """Load the known-good version (``to_version``, else the ``previous`` alias, else the newest
    older version deployed and never rolled back), verify it answers, and move the aliases."""
    from recsys import audit, registry
    from recsys.locking import model_lock
    from recsys.monitoring.policy import reset_model
    from recsys.triton.control import TritonControl

    model = settings.model_name
    uri = settings.mlflow_tracking_uri
    metrics = metrics or {}
    control = TritonControl(settings.triton_grpc_url)
    with model_lock(settings.home / "locks", model):
        bad = registry.alias_version(uri, model, registry.CHAMPION)
        if bad is None:
            raise RollbackError(
                f"{model} has no champion in the registry; nothing to roll back from"
            )
        good = to_version or registry.alias_version(uri, model, registry.PREVIOUS)
        if good is None or good == bad:
            good = registry.last_good_version_before(uri, model, bad)
        if good is None:
            raise RollbackError(
                f"{model} v{bad} breached ({reason}) but no earlier known-good version exists; "
                f"v{bad} keeps serving"
            )
        try:
            control.load_version(model, good, settings.triton_repo)
            answer = control.smoke_test(model, smoke_query, top_k=3)
        except Exception as exc:
            audit.append_record(
                settings.audit_log,
                "rollback_failed",
                model,
                from_version=bad,
                to_version=good,
                reason=reason,
                error=str(exc),
                metrics=metrics,
            )
            raise RollbackError(
                f"rollback of {model} from v{bad} to v{good} failed: {exc}"
            ) from exc
        registry.record_rollback(uri, model, bad, good, reason, metrics)
        record = audit.append_record(
            settings.audit_log,
            "rollback",
            model,
            from_version=bad,
            to_version=good,
            reason=reason,
            metrics=metrics,
            smoke_top=answer[:3],
        )
    reset_model(settings.monitor_state, model)
    audit.send_alert(
        settings.home / "alerts" / "alerts.jsonl",
        f"{model} rolled back from v{bad} to v{good}",
        {
            "model": model,
            "from_version": bad,
            "to_version": good,
            "reason": reason,
            "metrics": metrics,
        },
    )
    log.warning("rolled back %s from v%d to v%d: %s", model, bad, good, reason)
    return record
