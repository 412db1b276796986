"""The router of a served model: its Triton model (``<model>_router``) and its split.

Progressive delivery serves two versions of one model at once (Triton's version policy lists
both) behind a router model (:mod:`recsys.delivery.router_model`) that forwards each request to
one of them through BLS. Clients that should take part in a rollout call the router, not the
model: a request that names the model directly gets Triton's default, the newest loaded
version, which during a canary is the candidate.

The split is ``<repo>/<model>_router/routing.json`` (:class:`RoutingConfig`), beside the
router's version folders, so it travels with the model repository to every Triton that serves
it (a shared volume in ``docker-compose.yaml``). Every change is a read-modify-write under a lock
and an atomic replace (:func:`update_routing`), with a ``generation`` that counts changes, so
the router never reads half a file and two writers never lose each other's change.

The platform's other switches keep the router's ``stable`` on the version Triton serves
(:func:`follow_switch`, called by deploys and rollbacks), so ``ROUTED_VERSION`` names the real
version even outside a rollout; the router also falls back to the unpinned default when its
pinned version is gone, so a switch never fails a routed request.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from recsys.statefile import state_lock, write_json_atomically

ROUTER_SUFFIX = "_router"
ROUTING_FILE = "routing.json"
ROUTER_SOURCE = Path(__file__).with_name("router_model.py")
ROUTING_KEY = "ROUTING_KEY"
ROUTED_VERSION = "ROUTED_VERSION"
ROUTED_ARM = "ROUTED_ARM"
STABLE = "stable"
CANDIDATE = "candidate"
MODES = ("canary", "experiment", "shadow")
_LOCK_TIMEOUT_S = 30.0
DEFAULT_ROUTER_INSTANCES = 4
"""Router instances: each forwards one request at a time (see the router's docstring), so this
is how many routed requests are in flight at once; an instance is a small stub process that
mostly waits on BLS."""


class RoutingError(RuntimeError):
    """The routing file is unreadable or a requested change is invalid."""


def router_name(model_name: str) -> str:
    """The Triton model that routes ``model_name``'s traffic."""
    from recsys.config import check_model_name

    return check_model_name(f"{check_model_name(model_name)}{ROUTER_SUFFIX}")


def routing_path(repo: Path, model_name: str) -> Path:
    return Path(repo) / router_name(model_name) / ROUTING_FILE


def key_share(salt: str, key: bytes) -> float:
    """Where a routing key falls in [0, 1) for a rollout salted with ``salt``: the same hash as
    the router's, so tests and analyses can tell which arm a user is on."""
    digest = hashlib.blake2b(key, digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class RoutingConfig:
    """The router's split (see :mod:`recsys.delivery.router_model` for how it is applied)."""

    target: str
    stable: int | None = None
    candidate: int | None = None
    mode: str | None = None
    candidate_weight: float = 0.0
    shadow_share: float = 0.0
    salt: str = ""
    rollout_id: str = ""
    generation: int = 0
    updated_at: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    """The last changes (time, weight, why), newest last; kept short."""

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise RoutingError(f"routing mode {self.mode!r} is not one of {MODES}")
        for name in ("candidate_weight", "shadow_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
                raise RoutingError(f"{name} must be within [0, 1], got {value!r}")
        for name in ("stable", "candidate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise RoutingError(f"{name} must be a version >= 1 or None, got {value!r}")
        if self.mode is not None and (self.stable is None or self.candidate is None):
            raise RoutingError(f"a {self.mode} needs both a stable and a candidate version")
        if self.candidate is not None and self.candidate == self.stable:
            raise RoutingError(f"candidate v{self.candidate} is the stable version")

    @property
    def active(self) -> bool:
        """Whether a rollout (canary, experiment or shadow) is under way."""
        return self.mode is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_routing(repo: Path, model_name: str) -> RoutingConfig | None:
    """The routing of ``model_name``; ``None`` when it has no router yet. An unreadable file
    raises :class:`RoutingError` (it is never taken for "no rollout")."""
    path = routing_path(repo, model_name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return RoutingConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise RoutingError(f"routing file {path} is unreadable: {exc}") from exc


def update_routing(
    repo: Path, model_name: str, why: str, *, create: bool = False, **changes: Any
) -> RoutingConfig:
    """Apply ``changes`` to the routing under its lock and replace the file atomically; return
    the new routing. ``create`` allows a first file (otherwise a model without a router raises
    :class:`RoutingError`). ``why`` is kept in the routing's short history."""
    path = routing_path(repo, model_name)
    with state_lock(path, _LOCK_TIMEOUT_S, f"routing of {model_name}"):
        current = read_routing(repo, model_name)
        if current is None:
            if not create:
                raise RoutingError(f"{model_name} has no router ({path} does not exist)")
            current = RoutingConfig(target=model_name)
        history = [*current.history, {"at": time.time(), "why": why, **changes}][-20:]
        updated = replace(
            current,
            **changes,
            generation=current.generation + 1,
            updated_at=time.time(),
            history=history,
        )
        write_json_atomically(path, updated.to_dict())
    return updated


def new_rollout_id(model_name: str, candidate: int) -> str:
    return f"{model_name}-v{candidate}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def follow_switch(repo: Path, model_name: str, version: int, why: str) -> RoutingConfig | None:
    """After a deploy or rollback made ``version`` the only served version: end any rollout
    and point the router's ``stable`` at ``version``. Nothing to do (``None``) when the model
    has no router."""
    if read_routing(repo, model_name) is None:
        return None
    return update_routing(
        repo, model_name, why, stable=version, candidate=None, mode=None, candidate_weight=0.0,
        shadow_share=0.0,
    )  # fmt: skip


# -- the router model in Triton ------------------------------------------------------------


def router_config(
    model_name: str,
    family: str,
    *,
    max_batch_size: int,
    instance_count: int = DEFAULT_ROUTER_INSTANCES,
) -> dict[str, Any]:
    """The router's Triton config: the family's inputs and outputs plus ``ROUTING_KEY`` in and
    ``ROUTED_VERSION`` / ``ROUTED_ARM`` out. No dynamic batching: the router forwards each
    request on its own, so a queue delay would only add latency."""
    from recsys.families import get_family

    family_impl = get_family(family)
    inputs, outputs = family_impl.triton_io()
    return {
        "name": router_name(model_name),
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [
            *inputs,
            {"name": ROUTING_KEY, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        ],
        "output": [
            *outputs,
            {"name": ROUTED_VERSION, "data_type": "TYPE_INT64", "dims": [1]},
            {"name": ROUTED_ARM, "data_type": "TYPE_STRING", "dims": [1]},
        ],
        "instance_group": [{"kind": "KIND_CPU", "count": instance_count}],
        "parameters": {
            "target_model": {"string_value": model_name},
            "ranked_output": {"string_value": family_impl.ranked_output or ""},
        },
    }


ROUTER_INSTANCES_ENV = "RECSYS_ROUTER_INSTANCES"


def router_instances_from_env() -> int:
    """``$RECSYS_ROUTER_INSTANCES`` (an integer >= 1), or :data:`DEFAULT_ROUTER_INSTANCES`.
    Each instance forwards one request at a time, so set it to the concurrency the model
    should see (the canary benchmark: 4 instances halve MiniLM's batch size at 8 clients)."""
    raw = os.environ.get(ROUTER_INSTANCES_ENV, "").strip()
    if not raw:
        return DEFAULT_ROUTER_INSTANCES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{ROUTER_INSTANCES_ENV} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def publish_router(repo: Path, model_name: str) -> int:
    """Publish the router's ``model.py`` as a numbered version folder (atomically: staging
    folder, then rename) unless the newest one already holds this exact code; return the
    version to serve. Like model versions, a published router folder is never rewritten."""
    from recsys.triton.repository import STAGING_DIR, file_sha256

    repo = Path(repo).resolve()
    model_dir = repo / router_name(model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    wanted = file_sha256(ROUTER_SOURCE)
    if versions and file_sha256(model_dir / str(versions[-1]) / "model.py") == wanted:
        return versions[-1]
    version = (versions[-1] + 1) if versions else 1
    staging = repo / STAGING_DIR / f"{model_dir.name}-{version}-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    (staging / "model.py").write_bytes(ROUTER_SOURCE.read_bytes())
    with open(staging / "model.py", "rb") as handle:
        os.fsync(handle.fileno())
    os.rename(staging, model_dir / str(version))
    return version


def ensure_router(control: Any, repo: Path, model_name: str, family: str, stable: int) -> int:
    """Publish and load ``model_name``'s router (a no-op when this code already serves) with
    ``stable`` as its stable version when it has no routing yet; return the router version.
    Its batch size follows the stable version's config, so the router accepts exactly the
    requests the model does."""
    from recsys.triton.repository import version_serving_config

    if read_routing(repo, model_name) is None:
        update_routing(repo, model_name, "router created", create=True, stable=stable)
    version = publish_router(repo, model_name)
    name = router_name(model_name)
    if control.loaded_versions(name) == [version]:
        return version
    target = version_serving_config(repo, model_name, stable)
    config = router_config(
        model_name,
        family,
        max_batch_size=int(target["max_batch_size"]),
        instance_count=router_instances_from_env(),
    )
    control.load_config(name, version, config)
    return version
