"""Start, shift, promote and abort a rollout: a candidate version served beside the stable one
behind the model's router, as a canary (growing weight), an A/B experiment (fixed split) or a
shadow (mirrored traffic, answers discarded).

Every action holds the model's deploy/rollback lock, so a rollout never interleaves with a deploy
or a rollback of the same model, and goes in an order that never sends a routed request to a
version that is not loaded:

* **start**: publish (when given artifacts), load ``[stable, candidate]`` together, smoke-test the
  candidate pinned to its version, then publish and load the router and only then give the
  candidate its weight. A candidate that fails to load or answer is unloaded again and the
  stable version never stopped serving.
* **promote**: weight 1 (every routed request to the candidate), then load ``[candidate]`` alone
  (the stable version retires), then the router's stable becomes the candidate, the registry's
  ``champion``/``previous`` aliases move, audit record.
* **abort**: weight 0 first (the analysis does this itself the moment it sees a breach, before
  this runs), then load ``[stable]`` alone (the candidate retires), registry tags on the
  candidate with the reason, audit record, one alert. An experiment or a shadow that simply ended
  goes the same way without the alert (:func:`end_rollout`).

What serves is always read from Triton, not assumed; the registry gets a ``candidate`` alias for
the version on trial and ``rollout_*`` tags with the outcome.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from recsys.config import Settings
from recsys.delivery.routing import (
    RoutingConfig,
    follow_switch,
    new_rollout_id,
    read_routing,
    update_routing,
)

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
ROLLOUT_START = "rollout_start"
ROLLOUT_START_FAILED = "rollout_start_failed"
ROLLOUT_WEIGHT = "rollout_weight"
ROLLOUT_PROMOTE = "rollout_promote"
ROLLOUT_ABORT = "rollout_abort"
ROLLOUT_END = "rollout_end"


def start_weight(mode: str, steps: list[float] | None = None, split: float | None = None) -> float:
    """The candidate's share of routed traffic when a rollout starts, as a fraction: a canary's
    first step, an experiment's split (both in percent), nothing for a shadow (it is only
    mirrored to). The CLI, the rollout DAG and the pipelines all start rollouts with it."""
    if mode == "canary":
        return float((steps or [5.0])[0]) / 100.0
    if mode == "experiment":
        return float(50.0 if split is None else split) / 100.0
    return 0.0


class RolloutError(RuntimeError):
    """A rollout action that cannot be done (none under way, one already under way, nothing
    serving to compare with); the message says what serves."""


def _family_of_version(settings: Settings, version: int) -> str:
    from recsys.triton.repository import manifest_family, verify_version_dir

    manifest = verify_version_dir(settings.triton_repo / settings.model_name / str(version))
    return manifest_family(manifest).name


def active_rollout(settings: Settings) -> RoutingConfig | None:
    """The rollout under way for ``settings.model_name``, ``None`` when there is none."""
    routing = read_routing(settings.triton_repo, settings.model_name)
    return routing if routing is not None and routing.active else None


def _tag_candidate(settings: Settings, version: int, tags: dict[str, Any]) -> None:
    from recsys import registry

    registry.set_version_tags(settings.mlflow_tracking_uri, settings.model_name, version, tags)


def _set_candidate_alias(settings: Settings, version: int | None) -> None:
    from recsys import registry

    client = registry.client(settings.mlflow_tracking_uri)
    uri = settings.mlflow_tracking_uri
    with registry.registry_request(uri, f"moving {CANDIDATE_ALIAS} of {settings.model_name}"):
        if version is not None:
            client.set_registered_model_alias(settings.model_name, CANDIDATE_ALIAS, str(version))
        elif registry.alias_version(uri, settings.model_name, CANDIDATE_ALIAS) is not None:
            client.delete_registered_model_alias(settings.model_name, CANDIDATE_ALIAS)


def start_rollout(
    settings: Settings,
    version: int,
    artifacts_dir: str | Path | None = None,
    *,
    mode: str = "canary",
    weight: float = 0.05,
    shadow_share: float = 0.0,
    smoke_request: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
    reason: str | None = None,
    salt: str | None = None,
) -> dict[str, Any]:
    """Serve ``version`` beside the version Triton serves now, behind the router, with
    ``weight`` of the routed traffic (``canary``/``experiment``) or ``shadow_share`` of it
    mirrored (``shadow``). Returns the rollout (ids, versions, routing). Raises
    :class:`RolloutError` when a rollout is already under way, nothing (or more than one
    version) serves, or ``version`` is what serves; a candidate that fails to load or answer
    raises :class:`~recsys.triton.control.ModelLoadError` after it was unloaded again.

    ``salt`` seeds the sticky split (default: the rollout id, so every rollout draws its own
    users; a fixed salt makes an experiment's assignment reproducible)."""
    from recsys import audit
    from recsys.delivery.routing import MODES, ensure_router
    from recsys.locking import model_lock
    from recsys.triton.control import ModelLoadError, TritonControl
    from recsys.triton.repository import (
        publish_version,
        smoke_test_version,
        version_serving_config,
    )

    if mode not in MODES:
        raise ValueError(f"rollout mode must be one of {MODES}, got {mode!r}")
    if mode == "shadow":
        weight = 0.0
    model, repo = settings.model_name, settings.triton_repo
    replicas = settings.triton_replicas()
    if len(replicas) > 1:
        # The router and its analysis run inside one Triton; across replicas each would split
        # and count on its own. Refused rather than half done.
        raise RolloutError(
            f"a {mode} of {model} needs a single Triton server, and {len(replicas)} replicas "
            "are configured (RECSYS_TRITON_REPLICAS); deploy v"
            f"{version} to every replica with `recsys deploy` instead"
        )
    control = TritonControl(settings.triton_grpc_url)
    with model_lock(settings.home / "locks", model):
        current = active_rollout(settings)
        if current is not None:
            raise RolloutError(
                f"a {current.mode} of {model} v{current.candidate} (against v{current.stable}) is "
                f"under way ({current.rollout_id}); promote or abort it first "
                f"(`recsys canary promote|abort --model {model}`)"
            )
        serving_now = control.loaded_versions(model)
        if len(serving_now) != 1:
            raise RolloutError(
                f"a rollout needs exactly one stable version of {model} serving; Triton serves "
                f"{serving_now or 'nothing'} (deploy one all at once first)"
            )
        stable = serving_now[0]
        if stable == version:
            raise RolloutError(f"{model} v{version} already serves; nothing to roll out")
        if artifacts_dir is not None:
            publish_version(
                repo,
                model,
                version,
                Path(artifacts_dir),
                serving=settings.serving_knobs(serving),
            )
        family = _family_of_version(settings, version)
        if _family_of_version(settings, stable) != family:
            raise RolloutError(f"{model} v{stable} and v{version} are of different families")
        try:
            control.load_versions(
                model, [stable, version], repo, config=version_serving_config(repo, model, version)
            )
            answer = smoke_test_version(control, repo, model, version, smoke_request)
        except Exception as exc:
            log.error("candidate %s v%d failed (%s); unloading it", model, version, exc)
            control.load_version(
                model, stable, repo, config=version_serving_config(repo, model, stable)
            )
            audit.append_record(
                settings.audit_log, ROLLOUT_START_FAILED, model, version=version, stable=stable,
                mode=mode, error=str(exc)[:2000], reason=reason,
            )  # fmt: skip
            raise ModelLoadError(
                f"{mode} of {model} v{version} did not start: {exc}; v{stable} serves alone"
            ) from exc
        router_version = ensure_router(control, repo, model, family, stable)
        rollout_id = new_rollout_id(model, version)
        routing = update_routing(
            repo,
            model,
            f"{mode} of v{version} started",
            stable=stable,
            candidate=version,
            mode=mode,
            candidate_weight=float(weight),
            shadow_share=float(shadow_share),
            salt=salt or rollout_id,
            rollout_id=rollout_id,
        )
        _set_candidate_alias(settings, version)
        _tag_candidate(settings, version, {"rollout": mode, "rollout_id": rollout_id})
        audit.append_record(
            settings.audit_log,
            ROLLOUT_START,
            model,
            version=version,
            stable=stable,
            mode=mode,
            rollout_id=rollout_id,
            weight=routing.candidate_weight,
            shadow_share=routing.shadow_share,
            router_version=router_version,
            reason=reason,
            smoke_top=answer[:3],
        )
    log.info("%s of %s v%d against v%d started (%s)", mode, model, version, stable, rollout_id)
    return {
        "model": model,
        "rollout_id": rollout_id,
        "mode": mode,
        "stable": stable,
        "candidate": version,
        "weight": routing.candidate_weight,
        "shadow_share": routing.shadow_share,
        "router_version": router_version,
        "smoke": answer,
    }


def _require_active(settings: Settings, rollout_id: str | None) -> RoutingConfig:
    routing = active_rollout(settings)
    if routing is None:
        raise RolloutError(f"no rollout of {settings.model_name} is under way")
    if rollout_id and routing.rollout_id != rollout_id:
        raise RolloutError(
            f"rollout {rollout_id} of {settings.model_name} is over; {routing.rollout_id} "
            f"(v{routing.candidate}) is under way now"
        )
    return routing


def set_weight(
    settings: Settings, weight: float, why: str, *, rollout_id: str | None = None
) -> RoutingConfig:
    """Give the candidate ``weight`` of the routed traffic (takes effect on the router's next
    request); only while a canary or an experiment is under way."""
    from recsys import audit

    routing = _require_active(settings, rollout_id)
    if routing.mode == "shadow":
        raise RolloutError("a shadow serves no user from the candidate; it has no weight")
    updated = update_routing(
        settings.triton_repo, settings.model_name, why, candidate_weight=float(weight)
    )
    audit.append_record(
        settings.audit_log,
        ROLLOUT_WEIGHT,
        settings.model_name,
        version=routing.candidate,
        rollout_id=routing.rollout_id,
        weight=float(weight),
        reason=why,
    )
    return updated


def promote_rollout(
    settings: Settings,
    reason: str,
    report: dict[str, Any] | None = None,
    *,
    rollout_id: str | None = None,
) -> dict[str, Any]:
    """Make the candidate the only served version and the registry's champion."""
    from recsys import audit, registry
    from recsys.locking import model_lock
    from recsys.monitoring.policy import rebaseline
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import version_serving_config

    model, repo = settings.model_name, settings.triton_repo
    control = TritonControl(settings.triton_grpc_url)
    with model_lock(settings.home / "locks", model):
        routing = _require_active(settings, rollout_id)
        candidate, stable = int(routing.candidate), int(routing.stable)
        if routing.mode != "shadow":
            update_routing(repo, model, "promoting: all routed traffic to the candidate",
                           candidate_weight=1.0)  # fmt: skip
        control.load_version(model, candidate, repo, config=version_serving_config(
            repo, model, candidate))  # fmt: skip
        follow_switch(repo, model, candidate, f"v{candidate} promoted")
        old = registry.promote_to_champion(settings.mlflow_tracking_uri, model, candidate)
        _set_candidate_alias(settings, None)
        _tag_candidate(settings, candidate, {
            "rollout_result": "promoted", "rollout_reason": reason,
            "rollout_report": report or {},
        })  # fmt: skip
        record = audit.append_record(
            settings.audit_log,
            ROLLOUT_PROMOTE,
            model,
            version=candidate,
            replaced=old if old is not None else stable,
            mode=routing.mode,
            rollout_id=routing.rollout_id,
            reason=reason,
            report=report or {},
        )
    rebaseline(settings.monitor_state, model, settings.triton_metrics_url)
    log.info("%s v%d promoted (%s)", model, candidate, reason)
    return {"model": model, "promoted": candidate, "replaced": stable, "record": record}


def abort_rollout(
    settings: Settings,
    reason: str,
    report: dict[str, Any] | None = None,
    *,
    rollout_id: str | None = None,
    alert: bool = True,
    outcome: str = "aborted",
) -> dict[str, Any]:
    """Send every routed request to the stable version, unload the candidate, tag it with why,
    and (``alert``) send one alert. With ``alert=False`` and ``outcome="ended"`` this is the
    quiet end of an experiment or a shadow that was not promoted (:func:`end_rollout`)."""
    from recsys import audit
    from recsys.locking import model_lock
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import version_serving_config

    model, repo = settings.model_name, settings.triton_repo
    control = TritonControl(settings.triton_grpc_url)
    with model_lock(settings.home / "locks", model):
        routing = _require_active(settings, rollout_id)
        candidate, stable = int(routing.candidate), int(routing.stable)
        update_routing(repo, model, f"{outcome}: {reason}"[:300], candidate_weight=0.0,
                       shadow_share=0.0)  # fmt: skip
        control.load_version(model, stable, repo, config=version_serving_config(
            repo, model, stable))  # fmt: skip
        follow_switch(repo, model, stable, f"v{candidate} {outcome}")
        _set_candidate_alias(settings, None)
        _tag_candidate(settings, candidate, {
            "rollout_result": outcome, "rollout_reason": reason, "rollout_report": report or {},
        })  # fmt: skip
        action = ROLLOUT_ABORT if outcome == "aborted" else ROLLOUT_END
        record = audit.append_record(
            settings.audit_log,
            action,
            model,
            version=candidate,
            stable=stable,
            mode=routing.mode,
            rollout_id=routing.rollout_id,
            reason=reason,
            report=report or {},
        )
    if alert:
        audit.send_alert(
            settings.alerts_log,
            f"{model}: {routing.mode} of v{candidate} aborted, v{stable} serves all traffic",
            {
                "model": model,
                "kind": ROLLOUT_ABORT,
                "version": candidate,
                "stable": stable,
                "rollout_id": routing.rollout_id,
                "reason": reason,
            },
        )
    log.warning("%s v%d %s: %s", model, candidate, outcome, reason)
    return {"model": model, outcome: candidate, "serving": stable, "record": record}


def end_rollout(
    settings: Settings, reason: str, report: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """End an experiment or shadow without promoting: the candidate leaves, no alert."""
    return abort_rollout(settings, reason, report, alert=False, outcome="ended", **kwargs)
