"""Rollback: put the last known-good version back into service and make the registry say so.

Order matters. Triton is switched first, because every second a broken version serves costs
failed requests; the registry and audit trail follow. The lock shared with deploys keeps a
rollback from interleaving with a deploy of the same model.

The serving switch deliberately does not depend on MLflow. When the registry cannot be reached,
the versions are worked out from what Triton serves and from the local audit log (which records
every deploy and rollback), Triton is switched anyway, and the registry update is recorded as
*pending* in the audit log: :class:`RollbackRegistryPendingError` says so, and
:func:`complete_pending_rollback` replays the update once MLflow is back. An outage of the
bookkeeping system must not keep a broken model serving, and must not be silently forgotten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from recsys.config import Settings
from recsys.registry import RegistryUnavailableError

log = logging.getLogger(__name__)

ROLLBACK = "rollback"
ROLLBACK_FAILED = "rollback_failed"
ROLLBACK_PENDING = "rollback_registry_pending"
ROLLBACK_COMPLETED = "rollback_registry_completed"


class RollbackError(RuntimeError):
    """No rollback was possible; the message says why and what still serves."""


class RollbackRegistryPendingError(RollbackError, RegistryUnavailableError):
    """Triton already serves the good version, but MLflow could not be updated.

    A :class:`RegistryUnavailableError` too, so callers that treat "MLflow is down" alike keep
    working; ``record`` is the audit record of the pending update."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class _Plan:
    bad: int
    good: int
    source: str
    """``"registry"`` or ``"audit log"``: where the versions came from."""


def _plan_from_registry(settings: Settings, reason: str, to_version: int | None) -> _Plan:
    from recsys import registry

    uri, model = settings.mlflow_tracking_uri, settings.model_name
    bad = registry.alias_version(uri, model, registry.CHAMPION)
    if bad is None:
        raise RollbackError(f"{model} has no champion in the registry; nothing to roll back from")
    good = to_version or registry.alias_version(uri, model, registry.PREVIOUS)
    if good is None or good == bad:
        good = registry.last_good_version_before(uri, model, bad)
    if good is None:
        raise RollbackError(
            f"{model} v{bad} breached ({reason}) but no earlier known-good version exists; "
            f"v{bad} keeps serving"
        )
    return _Plan(bad=bad, good=good, source="registry")


def _plan_from_local_state(
    settings: Settings, reason: str, to_version: int | None, served: list[int]
) -> _Plan:
    """Versions from Triton (what serves is what is bad) and the audit log (the newest version
    that deployed successfully and was never rolled back away from)."""
    from recsys import audit

    model = settings.model_name
    if not served:
        raise RollbackError(f"{model}: Triton serves no version, so there is nothing to roll back")
    bad = served[-1]
    records = audit.read_records(settings.audit_log, model)
    pulled = {
        int(r["from_version"])
        for r in records
        if r.get("action") in (ROLLBACK, ROLLBACK_PENDING) and r.get("from_version") is not None
    }
    deployed = {
        int(r["version"]) for r in records if r.get("action") == "deploy" and r.get("version")
    }
    candidates = sorted(v for v in deployed - pulled if v < bad)
    good = to_version or (candidates[-1] if candidates else None)
    if good is None or good == bad:
        raise RollbackError(
            f"{model} v{bad} breached ({reason}), the registry is unreachable and the audit log "
            f"names no earlier known-good version; v{bad} keeps serving"
        )
    return _Plan(bad=bad, good=good, source="audit log")


def rollback(
    settings: Settings,
    reason: str,
    metrics: dict[str, Any] | None = None,
    *,
    smoke_query: str = "cordless drill",
    to_version: int | None = None,
) -> dict[str, Any]:
    """Load the known-good version (``to_version``, else the ``previous`` alias, else the newest
    older version deployed and never rolled back), verify it answers, and move the aliases.

    Raises :class:`RollbackError` when nothing was switched (the bad version keeps serving and
    the audit log has a ``rollback_failed`` record when a load was attempted), and
    :class:`RollbackRegistryPendingError` when Triton was switched but MLflow was not updated.
    """
    from recsys import audit, registry
    from recsys.locking import model_lock
    from recsys.monitoring.policy import rebaseline
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import version_serving_config

    model = settings.model_name
    metrics = metrics or {}
    control = TritonControl(settings.triton_grpc_url)
    registry_error: RegistryUnavailableError | None = None
    with model_lock(settings.home / "locks", model):
        try:
            plan = _plan_from_registry(settings, reason, to_version)
        except RegistryUnavailableError as exc:
            log.error("registry unreachable (%s); planning the rollback from local state", exc)
            registry_error = exc
            plan = _plan_from_local_state(
                settings, reason, to_version, control.loaded_versions(model)
            )
        bad, good = plan.bad, plan.good
        try:
            # The version comes back with the batching/instances/cache it was published with.
            config = version_serving_config(settings.triton_repo, model, good)
            control.load_version(model, good, settings.triton_repo, config=config)
            answer = control.smoke_test(model, smoke_query, top_k=3)
        except Exception as exc:
            audit.append_record(
                settings.audit_log,
                ROLLBACK_FAILED,
                model,
                from_version=bad,
                to_version=good,
                reason=reason,
                error=str(exc),
                metrics=metrics,
            )
            raise RollbackError(
                f"rollback of {model} from v{bad} to v{good} failed: {exc}; v{bad} keeps serving"
            ) from exc
        fields = {
            "from_version": bad,
            "to_version": good,
            "reason": reason,
            "metrics": metrics,
            "smoke_top": answer[:3],
            "planned_from": plan.source,
            "serving_switched": True,
        }
        if registry_error is None:
            try:
                registry.record_rollback(
                    settings.mlflow_tracking_uri, model, bad, good, reason, metrics
                )
            except Exception as exc:  # any failure here leaves the registry update pending
                registry_error = (
                    exc
                    if isinstance(exc, RegistryUnavailableError)
                    else RegistryUnavailableError(f"registry update failed: {exc}")
                )
        if registry_error is None:
            record = audit.append_record(
                settings.audit_log, ROLLBACK, model, **fields, registry_updated=True
            )
        else:
            record = audit.append_record(
                settings.audit_log,
                ROLLBACK_PENDING,
                model,
                **fields,
                registry_updated=False,
                registry_error=str(registry_error),
            )
    # The served version changed either way, so the old baseline and breach count are stale;
    # a fresh baseline lets the next check judge the restored version at once.
    rebaseline(settings.monitor_state, model, settings.triton_metrics_url)
    details = {
        "model": model,
        "from_version": bad,
        "to_version": good,
        "reason": reason,
        "metrics": metrics,
        "registry_updated": registry_error is None,
    }
    if registry_error is not None:
        message = (
            f"{model}: Triton now serves v{good} (rolled back from v{bad}), but the registry "
            f"update is PENDING because MLflow is unreachable ({registry_error}); run "
            "complete_pending_rollback (or `recsys rollback --to "
            f"{good}`) once MLflow is back"
        )
        audit.send_alert(settings.alerts_log, message, details)
        log.error(message)
        raise RollbackRegistryPendingError(message, record) from registry_error
    audit.send_alert(
        settings.alerts_log,
        f"{model} rolled back from v{bad} to v{good}",
        details,
    )
    log.warning("rolled back %s from v%d to v%d: %s", model, bad, good, reason)
    return record


def pending_rollbacks(settings: Settings) -> list[dict[str, Any]]:
    """Rollbacks of the model whose registry update is still pending, oldest first."""
    from recsys import audit

    records = audit.read_records(settings.audit_log, settings.model_name)
    done = {
        (r.get("from_version"), r.get("to_version"))
        for r in records
        if r.get("action") == ROLLBACK_COMPLETED
    }
    return [
        r
        for r in records
        if r.get("action") == ROLLBACK_PENDING
        and (r.get("from_version"), r.get("to_version")) not in done
    ]


def complete_pending_rollback(settings: Settings) -> list[dict[str, Any]]:
    """Replay the registry updates of pending rollbacks (MLflow must be reachable again) and
    record each as completed; returns the completion records. Raises
    :class:`RegistryUnavailableError` if MLflow is still down, leaving them pending."""
    from recsys import audit, registry

    completed = []
    for pending in pending_rollbacks(settings):
        registry.record_rollback(
            settings.mlflow_tracking_uri,
            settings.model_name,
            int(pending["from_version"]),
            int(pending["to_version"]),
            str(pending.get("reason", "")),
            pending.get("metrics") or {},
        )
        completed.append(
            audit.append_record(
                settings.audit_log,
                ROLLBACK_COMPLETED,
                settings.model_name,
                from_version=pending["from_version"],
                to_version=pending["to_version"],
                pending_since=pending["ts"],
            )
        )
    return completed
