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
The same holds when MLflow answers but fails or refuses (a locked database, a login without
permission): the message and the audit record say which, with MLflow's error.

When the good version is READY but the bad one is still loaded after Triton's retire timeout
(requests still running on it), the rollback is done as far as serving goes (the good version
is the only one in Triton's version policy): it is smoke-tested, the registry and audit log are
updated, the alert says what is still loaded, and
:class:`~recsys.triton.control.VersionsNotRetiredError` is raised at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from recsys.alerts import mark_alerted
from recsys.config import Settings, check_model_name
from recsys.registry import RegistryUnavailableError
from recsys.triton.control import ModelLoadError

log = logging.getLogger(__name__)

ROLLBACK = "rollback"
ROLLBACK_FAILED = "rollback_failed"
ROLLBACK_PENDING = "rollback_registry_pending"
ROLLBACK_COMPLETED = "rollback_registry_completed"
DEPLOY_FAILED = "deploy_failed"
DEPLOY_RESTORED = "deploy_restored"
DEPLOY_RESTORE_FAILED = "deploy_restore_failed"
REPLICA_REVERTED = "replica_reverted"
REPLICA_REVERT_FAILED = "replica_revert_failed"


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


def check_to_version(to_version: int | None) -> None:
    """``to_version`` is None or a version number (an int >= 1); a ValueError names anything
    else before a rollback asks any service (``0`` would otherwise read as "not given")."""
    if to_version is None:
        return
    if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
        raise ValueError(f"to_version must be a version number >= 1, got {to_version!r}")


def _registry_known_good_before(settings: Settings, version: int) -> int | None:
    """The registry's ``previous`` alias (unless it is ``version`` itself), else the newest
    version older than ``version`` that was deployed and never rolled back."""
    from recsys import registry

    uri, model = settings.mlflow_tracking_uri, settings.model_name
    previous = registry.alias_version(uri, model, registry.PREVIOUS)
    if previous is not None and previous != version:
        return previous
    return registry.last_good_version_before(uri, model, version)


def _audit_known_good_before(settings: Settings, version: int) -> int | None:
    """The newest version older than ``version`` that the audit log shows deployed and never
    rolled back away from."""
    from recsys import audit

    records = audit.read_records(settings.audit_log, settings.model_name)
    # Rolled back away from, or fallen back from after its re-deploy failed.
    pulled = {
        int(r["from_version"])
        for r in records
        if r.get("action") in (ROLLBACK, ROLLBACK_PENDING, DEPLOY_RESTORED)
        and r.get("from_version") is not None
    }
    deployed = {
        int(r["version"]) for r in records if r.get("action") == "deploy" and r.get("version")
    }
    candidates = sorted(v for v in deployed - pulled if v < version)
    return candidates[-1] if candidates else None


def known_good_before(settings: Settings, version: int) -> tuple[int | None, str, str | None]:
    """The version to fall back to from ``version``, as a rollback plans it: from the registry
    (:func:`_registry_known_good_before`) or, when the registry cannot be used, from the audit
    log. Returns ``(version or None, "registry" | "audit log", the registry's error or None)``.
    """
    try:
        return _registry_known_good_before(settings, version), "registry", None
    except RegistryUnavailableError as exc:
        log.error("registry unusable (%s); looking for a known-good version in the audit log", exc)
        return _audit_known_good_before(settings, version), "audit log", str(exc)


def _plan_from_registry(settings: Settings, reason: str, to_version: int | None) -> _Plan:
    from recsys import registry

    uri, model = settings.mlflow_tracking_uri, settings.model_name
    bad = registry.alias_version(uri, model, registry.CHAMPION)
    if bad is None:
        raise RollbackError(f"{model} has no champion in the registry; nothing to roll back from")
    if to_version == bad:
        raise RollbackError(
            f"{model}: cannot roll back to v{to_version}: it is the champion already "
            f"({reason}); nothing was changed"
        )
    good = to_version or _registry_known_good_before(settings, bad)
    if good is None:
        raise RollbackError(
            f"{model}: cannot roll back from v{bad} ({reason}): no earlier known-good version "
            f"exists; nothing was changed, v{bad} keeps serving"
        )
    return _Plan(bad=bad, good=good, source="registry")


def _plan_from_local_state(
    settings: Settings, reason: str, to_version: int | None, served: list[int]
) -> _Plan:
    """Versions from Triton (what serves is what is bad) and the audit log (the newest version
    that deployed successfully and was never rolled back away from)."""
    model = settings.model_name
    if not served:
        raise RollbackError(f"{model}: Triton serves no version, so there is nothing to roll back")
    bad = served[-1]
    if to_version == bad:
        raise RollbackError(
            f"{model}: cannot roll back to v{to_version}: Triton serves it already ({reason}); "
            "nothing was changed"
        )
    good = to_version or _audit_known_good_before(settings, bad)
    if good is None:
        raise RollbackError(
            f"{model}: cannot roll back from v{bad} ({reason}): the registry cannot be used and "
            f"the audit log names no earlier known-good version; nothing was changed, v{bad} "
            "keeps serving"
        )
    return _Plan(bad=bad, good=good, source="audit log")


def serving_now(control: Any, model: str) -> tuple[list[int] | None, str | None]:
    """What Triton serves right now, read after a failure: ``(versions, None)``, or ``(None,
    why)`` when Triton cannot say (a report must not guess)."""
    try:
        return control.loaded_versions(model), None
    except Exception as exc:  # reported as "unknown" with the reason, never as a version
        return None, f"{exc.__class__.__name__}: {exc}"


def describe_serving(model: str, versions: list[int] | None, error: str | None) -> str:
    """One clause saying what serves, from :func:`serving_now`."""
    if versions is None:
        return f"what Triton serves of {model} now is unknown ({error})"
    if not versions:
        return f"Triton serves no version of {model} now"
    return f"Triton serves {', '.join(f'v{v}' for v in versions)} of {model} now"


def _registry_failure(plan_error: BaseException | None, update_error: BaseException | None) -> str:
    """What went wrong with the registry, in words: unreachable, refused, or failed; during
    the planning (so the update was never tried) or during the update itself."""
    from recsys.registry import RegistryAuthError, RegistryRequestError

    if plan_error is not None:
        if isinstance(plan_error, RegistryAuthError):
            what = f"MLflow refused to read the registry ({plan_error})"
        elif isinstance(plan_error, RegistryRequestError):
            what = f"MLflow failed reading the registry ({plan_error})"
        else:
            what = f"MLflow is unreachable ({plan_error})"
        return f"{what}, so the versions came from Triton and the audit log and no update was sent"
    if isinstance(update_error, RegistryAuthError):
        return f"MLflow refused the registry update ({update_error})"
    if isinstance(update_error, RegistryRequestError):
        return f"MLflow failed the registry update ({update_error})"
    if isinstance(update_error, RegistryUnavailableError):
        return f"MLflow is unreachable ({update_error})"
    return f"the registry update raised {update_error.__class__.__name__}: {update_error}"


def router_follows(settings: Settings, version: int, why: str) -> dict[str, Any]:
    """Point the model's router (if it has one) at ``version``, the only version now served,
    ending any rollout under way; returns what to add to the audit record. Triton has already
    switched, so a routing file that cannot be updated is recorded, not raised: the router
    falls back to the served version by itself (:mod:`recsys.delivery.router_model`)."""
    from recsys.delivery.routing import RoutingError, follow_switch, read_routing

    try:
        before = read_routing(settings.triton_repo, settings.model_name)
        follow_switch(settings.triton_repo, settings.model_name, version, why)
    except (RoutingError, OSError) as exc:
        log.error("could not update the router of %s: %s", settings.model_name, exc)
        return {"router_error": str(exc)}
    if before is not None and before.active:
        return {"ended_rollout": before.rollout_id, "ended_candidate": before.candidate}
    return {}


def rollback(
    settings: Settings,
    reason: str,
    metrics: dict[str, Any] | None = None,
    *,
    smoke_request: dict[str, Any] | None = None,
    to_version: int | None = None,
) -> dict[str, Any]:
    """Load the known-good version (``to_version``, else the ``previous`` alias, else the newest
    older version deployed and never rolled back), verify it answers, and move the aliases.

    ``to_version`` must be None or an int >= 1 (ValueError otherwise, before anything is
    asked). Raises :class:`RollbackError` when the switch did not happen or the restored version
    failed its smoke query (the message and the ``rollback_failed`` record say what Triton
    serves then), :class:`RollbackRegistryPendingError` when Triton was switched but the
    registry could not be updated (unreachable, refused or failed: the message says which), and
    :class:`~recsys.triton.control.VersionsNotRetiredError` when everything was done but the
    bad version is still loaded after Triton's retire timeout.
    """
    from recsys import audit, registry
    from recsys.locking import model_lock
    from recsys.monitoring.policy import metrics_targets, rebaseline
    from recsys.triton.control import TritonControl, VersionsNotRetiredError
    from recsys.triton.repository import smoke_test_version, version_serving_config

    check_to_version(to_version)
    model = check_model_name(settings.model_name)
    metrics = metrics or {}
    replicas = settings.triton_replicas()
    controls = {replica.name: TritonControl(replica.grpc_url) for replica in replicas}
    control = controls[replicas[0].name]
    named = settings.has_replicas
    plan_error: RegistryUnavailableError | None = None
    update_error: BaseException | None = None
    not_retired: dict[str, VersionsNotRetiredError] = {}
    with model_lock(settings.home / "locks", model):
        try:
            plan = _plan_from_registry(settings, reason, to_version)
        except RegistryUnavailableError as exc:
            log.error("registry unusable (%s); planning the rollback from local state", exc)
            plan_error = exc
            plan = _plan_from_local_state(
                settings, reason, to_version, control.loaded_versions(model)
            )
        bad, good = plan.bad, plan.good
        served_before: dict[str, list[int] | None] = {r.name: None for r in replicas}
        switched: list[Any] = []
        current = replicas[0]
        try:
            if named:  # every replica is asked before any is switched
                for current in replicas:
                    served_before[current.name] = controls[current.name].loaded_versions(model)
            # The version comes back with the batching/instances/cache it was published with.
            config = version_serving_config(settings.triton_repo, model, good)
            for current in replicas:
                control = controls[current.name]
                try:
                    control.load_version(model, good, settings.triton_repo, config=config)
                except VersionsNotRetiredError as exc:
                    not_retired[current.name] = exc  # good is READY and pinned; reported later
                # Pinned: while the bad version drains, it must not be the one that answers.
                answer = smoke_test_version(
                    control, settings.triton_repo, model, good, smoke_request
                )
                switched.append(current)
        except Exception as exc:
            control = controls[current.name]
            versions, unknown = serving_now(control, model)
            if versions == [bad]:
                serving = f"v{bad} keeps serving"
            elif versions == [good]:
                serving = f"v{good} serves (it loaded, then failed the check)"
            else:
                serving = describe_serving(model, versions, unknown)
            reverted = ""
            if named:
                serving = f"on replica {current.name}, {serving}"
                # The replicas that switched (and this one, if its load went through) go back:
                # the fleet and the registry must say the same thing.
                reverted = revert_replicas(
                    settings,
                    [*switched, current],
                    controls,
                    served_before,
                    f"rollback to v{good} failed on replica {current.name}",
                    smoke_request=smoke_request,
                )
            audit.append_record(
                settings.audit_log,
                ROLLBACK_FAILED,
                model,
                from_version=bad,
                to_version=good,
                reason=reason,
                error=str(exc),
                metrics=metrics,
                serving_now=versions,
                **(
                    {
                        "failed_replica": current.name,
                        "reverted_replicas": [r.name for r in switched],
                        "replicas": [r.name for r in replicas],
                    }
                    if named
                    else {}
                ),
            )
            where = f" on replica {current.name}" if named else ""
            raise RollbackError(
                f"rollback of {model} from v{bad} to v{good} failed{where}: {exc}; {serving}"
                + (f"; {reverted}" if reverted else "")
            ) from exc
        fields = {
            **router_follows(settings, good, f"rollback to v{good}"),
            "from_version": bad,
            "to_version": good,
            "reason": reason,
            "metrics": metrics,
            "smoke_top": answer[:3],
            "planned_from": plan.source,
            "serving_switched": True,
        }
        if named:
            fields["replicas"] = [replica.name for replica in replicas]
        if not_retired:
            per_replica = {
                name: {str(v): s for v, s in error.still_loaded.items()}
                for name, error in not_retired.items()
            }
            fields["not_retired"] = per_replica if named else next(iter(per_replica.values()))
        if plan_error is None:
            try:
                registry.record_rollback(
                    settings.mlflow_tracking_uri, model, bad, good, reason, metrics
                )
            except Exception as exc:  # Triton was switched: whatever failed, the update is pending
                update_error = exc
        if plan_error is None and update_error is None:
            failure = None
            record = audit.append_record(
                settings.audit_log, ROLLBACK, model, **fields, registry_updated=True
            )
        else:
            failure = _registry_failure(plan_error, update_error)
            record = audit.append_record(
                settings.audit_log,
                ROLLBACK_PENDING,
                model,
                **fields,
                registry_updated=False,
                registry_error=str(plan_error or update_error),
                registry_failure=failure,
            )
    # The served version changed either way, so the old baseline and breach count are stale;
    # a fresh baseline lets the next check judge the restored version at once.
    rebaseline(settings.monitor_state, model, metrics_targets(settings))
    details = {
        "model": model,
        "from_version": bad,
        "to_version": good,
        "reason": reason,
        "metrics": metrics,
        "registry_updated": failure is None,
    }
    leftover = ""
    first_not_retired = next(iter(not_retired.values()), None)
    if first_not_retired is not None:
        details["not_retired"] = fields["not_retired"]
        leftover = "; still loaded: " + ", ".join(
            f"v{v} ({s})" for v, s in sorted(first_not_retired.still_loaded.items())
        )
    if failure is not None:
        message = (
            f"{model}: Triton now serves v{good} (rolled back from v{bad}), but the registry "
            f"update is PENDING: {failure}; replay it with `recsys rollback --complete-pending` "
            f"(complete_pending_rollback) once MLflow accepts it{leftover}"
        )
        audit.send_alert(settings.alerts_log, message, details)
        log.error(message)
        raise mark_alerted(RollbackRegistryPendingError(message, record)) from (
            plan_error or update_error
        )
    audit.send_alert(
        settings.alerts_log, f"{model} rolled back from v{bad} to v{good}{leftover}", details
    )
    log.warning("rolled back %s from v%d to v%d: %s", model, bad, good, reason)
    if first_not_retired is not None:
        raise mark_alerted(
            first_not_retired.with_done(
                f"rolled back from v{bad}: v{good} passed its smoke query and is champion in "
                "the registry"
            )
        ) from first_not_retired
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

    check_model_name(settings.model_name)
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


# -- failed deploys ---------------------------------------------------------------------------


class DeployFailedError(ModelLoadError):
    """A deploy failed; the message says why, what was restored and what serves now.

    A :class:`ModelLoadError`, as a failed load or smoke test always was; the original error is
    its ``__cause__``. ``serving`` is what Triton served after the restore (None: unknown)."""

    def __init__(self, message: str, serving: list[int] | None) -> None:
        super().__init__(message)
        self.serving = serving


def _restore_plan(
    settings: Settings, version: int, served_before: list[int] | None
) -> tuple[str, int | None, bool, str]:
    """``(action, target, fell_back, why)``: action "load" (target), "unload" or "none"."""
    if served_before is None:
        return "none", None, False, "Triton could not be asked what served before the attempt"
    if not served_before:
        return "unload", None, False, "nothing served before the attempt"
    before = served_before[-1]
    if before != version:
        return "load", before, False, f"v{before} served before the attempt"
    good, source, registry_error = known_good_before(settings, version)
    why = f"v{version} itself served before the attempt, and failed it"
    source += f" (registry: {registry_error})" if registry_error else ""
    if good is None:
        return "none", None, False, f"{why}; no earlier known-good version exists ({source})"
    return "load", good, True, f"{why}; v{good} is the last known-good version before it ({source})"


def restore_after_failed_deploy(
    settings: Settings,
    control: Any,
    version: int,
    served_before: list[int] | None,
    error: BaseException,
    *,
    smoke_request: dict[str, Any] | None = None,
    replica: str | None = None,
) -> DeployFailedError:
    """Put back what Triton served before a deploy of ``version`` failed with ``error``, record
    it, and return the error the deploy raises (the caller holds the model lock).
    ``replica`` names the Triton replica ``control`` talks to (records and the message say
    it; ``None`` with a single server).

    ``served_before`` is what Triton served when the deploy started (None if it could not be
    read: then nothing was sent to Triton and nothing is restored). That version is loaded
    again and smoke-tested (pinned); when it is ``version`` itself (a re-deploy of what
    serves, e.g. a retried task) the last known-good version before it is loaded instead,
    found as a rollback finds it (registry, or the audit log when MLflow cannot be used); when
    nothing served before, ``version`` is unloaded. The ``deploy_failed`` record is written
    first (the restore may fail too); a ``deploy_restored`` or ``deploy_restore_failed``
    record follows whenever Triton was asked to change anything. The registry is not touched:
    after a fall-back the message says how to make it agree.
    """
    from recsys import audit
    from recsys.triton.control import VersionsNotRetiredError
    from recsys.triton.repository import smoke_test_version, version_serving_config

    model, repo = settings.model_name, settings.triton_repo
    try:
        action, target, fell_back, why = _restore_plan(settings, version, served_before)
    except Exception as exc:  # reported in the record and the error, never dropped
        action, target, fell_back = "none", None, False
        why = f"could not work out what to restore: {exc.__class__.__name__}: {exc}"
    where = {"replica": replica} if replica else {}
    on = f" on replica {replica}" if replica else ""
    current, unknown = serving_now(control, model)
    if action == "load" and current == [target]:
        action, why = "none", f"{why}; Triton still serves it (the attempt did not replace it)"
    elif action == "unload" and current == []:
        action, why = "none", f"{why}; nothing serves now either"
    audit.append_record(
        settings.audit_log,
        DEPLOY_FAILED,
        model,
        **where,
        version=version,
        reason=str(error),
        served_before=served_before,
        restoring=target if action == "load" else None,
        restore_plan=why,
    )
    leftover = ""
    if action == "none":
        outcome = f"nothing was restored: {why}"
    else:
        log.error("v%d failed (%s); %s", version, error, why)
        try:
            if action == "load":
                assert target is not None
                config = version_serving_config(repo, model, target)
                try:
                    control.load_version(model, target, repo, config=config)
                except VersionsNotRetiredError as exc:  # target serves; say what lingers
                    leftover = f" ({exc})"
                smoke_test_version(control, repo, model, target, smoke_request)
            else:
                control.unload(model)
        except Exception as exc:
            current, unknown = serving_now(control, model)
            audit.append_record(
                settings.audit_log,
                DEPLOY_RESTORE_FAILED,
                model,
                **where,
                version=version,
                restoring=target,
                error=str(exc),
                serving_now=current,
            )
            doing = f"restoring v{target}" if target is not None else f"unloading v{version}"
            outcome = f"{doing} failed ({why}): {exc}"
        else:
            current, unknown = serving_now(control, model)
            audit.append_record(
                settings.audit_log,
                DEPLOY_RESTORED,
                model,
                **where,
                version=version,
                restored=target,
                from_version=version if fell_back else None,
                plan=why,
                serving_now=current,
            )
            outcome = (
                f"restored v{target} ({why}){leftover}"
                if target is not None
                else f"unloaded v{version} ({why})"
            )
            if fell_back:
                outcome += (
                    f"; the registry is unchanged: record the switch there with "
                    f"`recsys rollback --to {target}`"
                )
    serving = describe_serving(model, current, unknown)
    if replica:
        serving = serving.replace("Triton serves", f"replica {replica} serves", 1)
    message = f"deploy of {model} v{version} failed{on}: {error}; {outcome}; {serving}"
    log.error(message)
    return DeployFailedError(message, current)


def revert_replicas(
    settings: Settings,
    replicas: list[Any],
    controls: dict[str, Any],
    served_before: dict[str, list[int] | None],
    why: str,
    *,
    smoke_request: dict[str, Any] | None = None,
) -> str:
    """Put each of ``replicas`` (:class:`~recsys.triton.replicas.TritonReplica`, newest switch
    first) back to the versions it served before a deploy or rollback that failed on another
    replica (``why``), so that the replicas agree with each other and with the registry. Each
    restored version is loaded with the knobs it was published with and smoke-tested pinned; a
    replica that served nothing before is unloaded. Every replica gets a ``replica_reverted``
    or ``replica_revert_failed`` record; returns one clause per replica for the error message
    (a replica that cannot be reverted is reported, never skipped silently)."""
    from recsys import audit
    from recsys.triton.control import VersionsNotRetiredError
    from recsys.triton.repository import smoke_test_version, version_serving_config

    model, repo = settings.model_name, settings.triton_repo
    clauses = []
    for replica in reversed(replicas):
        control = controls[replica.name]
        before = served_before.get(replica.name)
        leftover = ""
        try:
            if before is None:
                raise RuntimeError("what it served before the attempt is unknown")
            now = control.loaded_versions(model)
            if now == before:
                done = "still serves " + (", ".join(f"v{v}" for v in before) or "nothing")
            elif not before:
                control.unload(model)
                done = "unloaded (it served nothing before)"
            else:
                config = version_serving_config(repo, model, before[-1])
                try:
                    control.load_versions(model, before, repo, config=config)
                except VersionsNotRetiredError as exc:  # restored; say what lingers
                    leftover = f" (still loaded: {exc.still_loaded})"
                for version in before:
                    smoke_test_version(control, repo, model, version, smoke_request)
                done = "back on " + ", ".join(f"v{v}" for v in before) + leftover
        except Exception as exc:
            current, unknown = serving_now(control, model)
            audit.append_record(
                settings.audit_log,
                REPLICA_REVERT_FAILED,
                model,
                replica=replica.name,
                restoring=before,
                reason=why,
                error=f"{exc.__class__.__name__}: {exc}",
                serving_now=current,
            )
            log.error("replica %s of %s could not be reverted: %s", replica.name, model, exc)
            state = describe_serving(model, current, unknown).replace("Triton serves", "serves")
            clauses.append(f"replica {replica.name} could NOT be reverted ({exc}); it {state}")
            continue
        audit.append_record(
            settings.audit_log,
            REPLICA_REVERTED,
            model,
            replica=replica.name,
            restored=before,
            reason=why,
            serving_now=serving_now(control, model)[0],
        )
        clauses.append(f"replica {replica.name} {done}")
    return "; ".join(clauses)
