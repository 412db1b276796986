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
    the model is under way; afterwards the model's router, if it has one, routes to ``version``."""
    from recsys import audit, registry
    from recsys.alerts import mark_alerted
    from recsys.delivery.rollout import RolloutError, active_rollout
    from recsys.locking import model_lock
    from recsys.rollback import restore_after_failed_deploy, router_follows
    from recsys.triton.control import (
        TritonAuthError,
        TritonControl,
        TritonUnavailableError,
        VersionsNotRetiredError,
    )
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
    control = TritonControl(settings.triton_grpc_url)
    not_retired: VersionsNotRetiredError | None = None
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
        served_before: list[int] | None = None
        try:
            # What a failure restores is what Triton served, whatever the registry says.
            served_before = control.loaded_versions(model)
            config = version_serving_config(repo, model, version)
            served_with = version_serving_knobs(repo, model, version)
            try:
                control.load_version(model, version, repo, config=config)
            except VersionsNotRetiredError as exc:
                not_retired = exc  # version is READY and pinned; reported once the rest is done
            answer = smoke_test_version(control, repo, model, version, smoke_request)
        except Exception as exc:
            failure = restore_after_failed_deploy(
                settings,
                control,
                version,
                served_before,
                exc,
                smoke_request=smoke_request,
            )
            if isinstance(exc, TritonUnavailableError | TritonAuthError):
                exc.add_note(str(failure))  # keep the type: the CLI maps it to its exit code
                raise
            raise failure from exc
        old = registry.promote_to_champion(settings.mlflow_tracking_uri, model, version)
        extra = router_follows(settings, version, f"deploy of v{version}")
        if not_retired is not None:
            extra["not_retired"] = {str(v): s for v, s in not_retired.still_loaded.items()}
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
    rebaseline(settings.monitor_state, model, settings.triton_metrics_url)
    log.info("version %d serves; smoke test -> %s", version, answer[:3])
    if not_retired is not None:
        done = "deployed: it passed its smoke query and is champion" + (
            f", replacing v{old}" if old is not None and old != version else ""
        )
        error = not_retired.with_done(done)
        audit.send_alert(
            settings.alerts_log,
            f"{model} v{version} deployed, but older versions are still loaded",
            {"model": model, "version": version, "replaced": old, **extra, "error": str(error)},
        )
        raise mark_alerted(error) from not_retired
    return {
        "version": version,
        "replaced": old,
        "smoke": answer,
        "serving": served_with,
    }
