"""Register and deploy a model version, whatever its family: the platform's serving path.

:func:`register_model` logs a run's serving folder to MLflow and registers it with lineage;
:func:`deploy_model` publishes a registered version into the Triton repository, loads it,
smoke-tests it through its family and only then moves the aliases. Neither knows which family
it handles: the folder's manifest says, and :mod:`recsys.families` answers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from recsys.config import Settings

log = logging.getLogger(__name__)


def _not_retired_fields(errors: dict[str, Any], named: bool) -> dict[str, Any]:
    """What the audit record says is still loaded: per replica when replicas are named."""
    per_replica = {
        replica: {str(v): s for v, s in error.still_loaded.items()}
        for replica, error in errors.items()
    }
    return per_replica if named else next(iter(per_replica.values()))


def register_model(
    settings: Settings, run_id: str, artifacts_dir: str, lineage: dict[str, Any]
) -> dict[str, Any]:
    from recsys import registry

    version = registry.register_serving_model(
        settings.mlflow_tracking_uri, run_id, settings.model_name, Path(artifacts_dir), lineage
    )
    return {"version": version.version, "run_id": run_id}


def deploy_model(
    settings: Settings,
    version: int,
    artifacts_dir: str | None,
    smoke_request: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Publish ``version`` atomically into the Triton repository (skipped when
    ``artifacts_dir`` is None: the immutable version folder is already there), load it,
    smoke-test it (pinned to ``version``: the version it replaces may still answer while it
    drains), and only then make it ``champion``. The smoke test is the version's family's
    (:meth:`recsys.families.base.ModelFamily.smoke_test`): ``smoke_request`` overrides the
    question the export recorded (search: ``{"query": ..., "top_k": ...}``; recommend:
    ``{"user": ...}`` or ``{"history": [...]}``).

    A version that fails to load or answer is replaced by what Triton served before the
    attempt (read from Triton, not the registry): that version is loaded again, or, when it is
    ``version`` itself (a retried task, ``recsys deploy --version <champion>``), the last
    known-good version before it; with nothing served before, ``version`` is unloaded. The
    audit log records the failure and what was restored, and the task fails with
    :class:`~recsys.rollback.DeployFailedError` saying what serves now (Triton being down or
    refusing the admin key re-raises that error as is). A registry that cannot be read fails
    the deploy before Triton is touched. When the older version is still loaded after Triton's
    retire timeout, the deploy is completed (promoted, audited, alerted) and then raises
    :class:`~recsys.triton.control.VersionsNotRetiredError`.

    ``serving`` (``instance_count``, ``max_batch_size``, ``dynamic_batching``,
    ``max_queue_delay_us``, ``intra_op_threads``, ``response_cache``, ...; ``None`` values mean
    "not set") overrides the platform's serving knobs (:meth:`Settings.serving_knobs`: the
    defaults the serving benchmark measures, :func:`~recsys.triton.repository.default_serving`,
    unless ``RECSYS_TRITON_*`` variables say otherwise); every knob is pinned into the
    published version, and every load of a version (deploy, rollback) uses the knobs it was
    published with. A version already published with other values of the knobs ``serving``
    names is refused before Triton is touched
    (:class:`~recsys.triton.repository.ServingKnobsConflictError`, a ``ValueError``): published
    versions are immutable. The audit record and the result carry the knobs the version is
    served with (``serving``). ``reason`` (the promotion decision, or why it was forced) goes
    into the audit record.

    A deploy is refused (:class:`~recsys.delivery.rollout.RolloutError`) while a rollout of
    the model is under way; afterwards the model's router, if it has one, routes to ``version``.

    With several Triton replicas (``RECSYS_TRITON_REPLICAS``, :mod:`recsys.triton.replicas`)
    the version is published once into the shared repository, every replica is asked what it
    serves before any is touched, and then each loads ``version`` and answers its smoke query
    in turn. Only when all did does the alias move. When one fails, that replica is restored
    as above and the replicas that had already switched go back to what each served before
    (:func:`~recsys.rollback.revert_replicas`); the audit log names the failing replica and
    every reverted one, and :class:`~recsys.rollback.DeployFailedError` says what each serves.
    Clients never see two champions: the registry is untouched until every replica serves."""
    from recsys import audit, registry
    from recsys.alerts import mark_alerted
    from recsys.delivery.rollout import RolloutError, active_rollout
    from recsys.locking import model_lock
    from recsys.monitoring.policy import metrics_targets
    from recsys.rollback import (
        DeployFailedError,
        restore_after_failed_deploy,
        revert_replicas,
        router_follows,
    )
    from recsys.triton.control import (
        TritonAuthError,
        TritonControl,
        TritonUnavailableError,
        VersionsNotRetiredError,
    )
    from recsys.triton.replicas import TritonReplica
    from recsys.triton.repository import (
        check_requested_knobs,
        publish_version,
        smoke_test_version,
        version_serving_config,
        version_serving_knobs,
    )

    model = settings.model_name
    knobs = settings.serving_knobs(serving)  # a bad knob is bad input before anything is done
    requested = {k: v for k, v in (serving or {}).items() if v is not None}
    replicas = settings.triton_replicas()
    controls = {replica.name: TritonControl(replica.grpc_url) for replica in replicas}
    named = settings.has_replicas  # records and messages name the replica
    not_retired: dict[str, VersionsNotRetiredError] = {}
    with model_lock(settings.home / "locks", model):
        # Fails (RegistryUnavailableError) before Triton is touched when the registry cannot be
        # read: a version that could not be promoted must not be loaded.
        registry.alias_version(settings.mlflow_tracking_uri, model, registry.CHAMPION)
        rollout = active_rollout(settings)
        if rollout is not None:
            raise RolloutError(
                f"a {rollout.mode} of {model} v{rollout.candidate} is under way "
                f"({rollout.rollout_id}); promote or abort it before deploying v{version} "
                f"(`recsys canary promote|abort --model {model}`)"
            )
        if artifacts_dir is not None:
            publish_version(
                settings.triton_repo, model, version, Path(artifacts_dir), serving=knobs
            )
        repo = settings.triton_repo
        if requested:  # explicit knobs must be what the (immutable) version is served with
            check_requested_knobs(repo, model, version, requested)
        # What a failure restores is what each replica served, whatever the registry says;
        # every replica is asked before any is touched, so one that cannot be reached fails
        # the deploy while nothing has changed.
        served_before: dict[str, list[int] | None] = {r.name: None for r in replicas}
        switched: list[TritonReplica] = []
        answers: dict[str, list[Any]] = {}
        current = replicas[0]
        try:
            for current in replicas:
                served_before[current.name] = controls[current.name].loaded_versions(model)
            config = version_serving_config(repo, model, version)
            served_with = version_serving_knobs(repo, model, version)
            for current in replicas:
                control = controls[current.name]
                try:
                    control.load_version(model, version, repo, config=config)
                except VersionsNotRetiredError as exc:
                    not_retired[current.name] = exc  # READY and pinned; reported at the end
                answers[current.name] = smoke_test_version(
                    control, repo, model, version, smoke_request
                )
                switched.append(current)
        except Exception as exc:
            failure = restore_after_failed_deploy(
                settings,
                controls[current.name],
                version,
                served_before[current.name],
                exc,
                smoke_request=smoke_request,
                replica=current.name if named else None,
            )
            if switched:
                reverted = revert_replicas(
                    settings,
                    switched,
                    controls,
                    served_before,
                    f"deploy of v{version} failed on replica {current.name}",
                    smoke_request=smoke_request,
                )
                failure = DeployFailedError(f"{failure}; {reverted}", failure.serving)
            if isinstance(exc, TritonUnavailableError | TritonAuthError):
                exc.add_note(str(failure))  # keep the type: the CLI maps it to its exit code
                raise
            raise failure from exc
        answer = answers[replicas[0].name]
        old = registry.promote_to_champion(settings.mlflow_tracking_uri, model, version)
        extra = router_follows(settings, version, f"deploy of v{version}")
        if named:
            extra["replicas"] = [replica.name for replica in replicas]
        if not_retired:
            extra["not_retired"] = _not_retired_fields(not_retired, named)
        audit.append_record(
            settings.audit_log,
            "deploy",
            model,
            version=version,
            replaced=old,
            reason=reason,
            smoke_request=smoke_request,
            smoke_top=answer[:3],
            serving=served_with,
            **extra,
        )
    from recsys.monitoring.policy import rebaseline

    # The monitor judges the new version from this moment on, not from a window that mixes in
    # the version it replaced.
    rebaseline(settings.monitor_state, model, metrics_targets(settings))
    log.info(
        "version %d serves%s; smoke test -> %s",
        version,
        f" on {len(replicas)} replicas" if named else "",
        answer[:3],
    )
    if not_retired:
        done = "deployed: it passed its smoke query and is champion" + (
            f", replacing v{old}" if old is not None and old != version else ""
        )
        first = next(iter(not_retired.values()))
        error = first.with_done(done)
        audit.send_alert(
            settings.alerts_log,
            f"{model} v{version} deployed, but older versions are still loaded",
            {"model": model, "version": version, "replaced": old, **extra, "error": str(error)},
        )
        raise mark_alerted(error) from first
    result: dict[str, Any] = {
        "version": version,
        "replaced": old,
        "smoke": answer,
        "serving": served_with,
    }
    if named:
        result["replicas"] = extra["replicas"]
    return result


class ReplicaSyncError(RuntimeError):
    """A replica that lacked the champion could not be brought in line (the load or its smoke
    query failed); the message names each such replica (``replicas``) and the error."""

    def __init__(self, message: str, replicas: list[str]) -> None:
        super().__init__(message)
        self.replicas = list(replicas)


def replica_versions(settings: Settings) -> dict[str, list[int] | str]:
    """What every Triton replica serves of ``settings.model_name`` now: the READY versions, or
    the reason the replica could not be asked (it is reported, never guessed)."""
    from recsys.rollback import serving_now
    from recsys.triton.control import TritonControl

    answer: dict[str, list[int] | str] = {}
    for replica in settings.triton_replicas():
        with TritonControl(replica.grpc_url, timeout_s=10.0) as control:
            versions, why = serving_now(control, settings.model_name)
        answer[replica.name] = versions if versions is not None else f"unreachable: {why}"
    return answer


def sync_replicas(
    settings: Settings, smoke_request: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load the ``champion`` version onto every replica that does not serve exactly it.

    Triton runs with explicit model control, so a replica that joined after the last deploy (a
    scale-out, a restarted container or pod) starts with nothing loaded, and a replica that was
    down during a rollback still serves what it served before. The monitor DAG runs this at the
    start of every watch, and ``recsys replicas sync`` runs it by hand. Each replica brought in
    line is smoke-tested pinned to the champion and audited (``replica_synced``); a replica that
    cannot be reached is left to the monitor, which alerts on it once; a replica that fails to
    load or answer is audited (``replica_sync_failed``) and makes this raise
    :class:`ReplicaSyncError` after the others were handled. Nothing happens with a single
    server (no ``RECSYS_TRITON_REPLICAS``), with no champion yet, or during a rollout.

    Returns ``{"champion", "replicas": {name: {"state", ...}}}`` where state is ``in_sync``,
    ``synced`` (with ``was``), ``unreachable`` or ``failed`` (with ``error``)."""
    from recsys import registry
    from recsys.delivery.rollout import active_rollout
    from recsys.locking import model_lock
    from recsys.triton.control import TritonControl

    model = settings.model_name
    if not settings.has_replicas:
        return {"champion": None, "replicas": {}, "note": "a single Triton server"}
    with model_lock(settings.home / "locks", model):
        champion = registry.alias_version(settings.mlflow_tracking_uri, model, registry.CHAMPION)
        if champion is None:
            return {"champion": None, "replicas": {}, "note": "no champion to serve yet"}
        if active_rollout(settings) is not None:
            return {"champion": champion, "replicas": {}, "note": "a rollout is under way"}
        states: dict[str, dict[str, Any]] = {}
        for replica in settings.triton_replicas():
            with TritonControl(replica.grpc_url) as control:
                states[replica.name] = _sync_one(
                    settings, control, replica.name, champion, smoke_request
                )
    failed = {name: s for name, s in states.items() if s["state"] == "failed"}
    if failed:
        listed = "; ".join(f"replica {name}: {s['error']}" for name, s in failed.items())
        raise ReplicaSyncError(
            f"{model} v{champion} could not be loaded on every replica: {listed}", sorted(failed)
        )
    return {"champion": champion, "replicas": states}


def _sync_one(
    settings: Settings,
    control: Any,
    replica: str,
    champion: int,
    smoke_request: dict[str, Any] | None,
) -> dict[str, Any]:
    """Bring one replica to the champion (see :func:`sync_replicas`); returns its state."""
    import contextlib

    from recsys import audit
    from recsys.triton.control import TritonUnavailableError, VersionsNotRetiredError
    from recsys.triton.repository import smoke_test_version, version_serving_config

    model, repo = settings.model_name, settings.triton_repo
    try:
        was = control.loaded_versions(model)
    except TritonUnavailableError as exc:  # the monitor alerts on a replica it cannot read
        return {"state": "unreachable", "error": str(exc)}
    if was == [champion]:
        return {"state": "in_sync"}
    try:
        config = version_serving_config(repo, model, champion)
        with contextlib.suppress(VersionsNotRetiredError):  # READY and alone in the policy
            control.load_version(model, champion, repo, config=config)
        smoke_test_version(control, repo, model, champion, smoke_request)
    except Exception as exc:  # recorded here, raised by the caller after the other replicas
        error = f"{exc.__class__.__name__}: {exc}"
        audit.append_record(
            settings.audit_log, "replica_sync_failed", model,
            replica=replica, version=champion, was=was, error=error,
        )  # fmt: skip
        return {"state": "failed", "was": was, "error": error}
    audit.append_record(
        settings.audit_log, "replica_synced", model,
        replica=replica, version=champion, was=was,
        reason="the replica did not serve the champion (it joined or restarted since)",
    )  # fmt: skip
    log.warning("replica %s of %s served %s; now serves v%d", replica, model, was, champion)
    return {"state": "synced", "was": was}
