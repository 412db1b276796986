"""Control and query a running Triton over gRPC: load a pinned version, roll back, search.

Triton runs with ``--model-control-mode=explicit``, so nothing serves until this client asks. A
load carries a JSON config override whose version policy is ``specific: [version]``: Triton then
serves exactly that version and unloads the others once it is ready, so deploying and rolling
back are the same call with a different number. A failed load leaves the version that served
before in place (Triton only swaps on success).

Model-control calls (load, unload, repository index) carry the admin key as gRPC metadata,
since the server refuses them without it; health checks and inference carry nothing, so query
clients need no secret.

Every call has a client-side deadline: a python stub that cannot start makes a load hang forever
on the server side, and a pipeline task must fail instead of hanging with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from recsys.credentials import TRITON_GRPC_ADMIN_HEADER
from recsys.triton.repository import serving_config, validate_model_name, verify_version_dir

log = logging.getLogger(__name__)

_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}

RETIRE_TIMEOUT_ENV = "RECSYS_TRITON_RETIRE_TIMEOUT_S"
DEFAULT_RETIRE_TIMEOUT_S = 30.0
"""How long a load waits for the versions it replaced to leave memory (see :meth:`load_version`)."""
STILL_LOADED_STATES = ("READY", "UNLOADING")
"""Repository-index states of a version Triton has not let go of. Measured on Triton 2.51: after
a load with a new version policy, the old version turns UNLOADING the moment the new one is
READY and stays UNLOADING while requests it already accepted are still running (new requests go
to the new version); it then turns UNAVAILABLE with reason "unloaded"."""


class TritonUnavailableError(RuntimeError):
    """Triton cannot be reached (connection refused, not running, deadline exceeded)."""


class TritonAuthError(PermissionError):
    """Triton refused a model-control call: no admin key, or the wrong one."""


class ModelLoadError(RuntimeError):
    """A version did not load, did not become ready, or answered its smoke test wrongly."""


class VersionsNotRetiredError(ModelLoadError):
    """The new version is READY and Triton's version policy lists only it, but versions it
    replaced are still loaded after the retire timeout (UNLOADING: requests still in flight or a
    hung model instance hold them; READY: Triton did not retire them).

    The switch itself happened, so callers must not report the old version as serving; they
    finish their bookkeeping and then raise this (with ``done`` saying what they completed) so
    the leftover is seen. ``still_loaded`` maps each version to its state."""

    def __init__(
        self,
        model_name: str,
        version: int,
        still_loaded: dict[int, str],
        timeout_s: float,
        url: str,
        done: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.still_loaded = dict(still_loaded)
        self.timeout_s = timeout_s
        self.url = url
        listed = ", ".join(f"v{v} ({state})" for v, state in sorted(self.still_loaded.items()))
        super().__init__(
            f"{model_name} v{version} is READY on {url} and is the only version in Triton's "
            f"version policy{f' ({done})' if done else ''}, but {listed} still loaded "
            f"{timeout_s:g}s later (UNLOADING: requests still in flight or a hung model "
            f"instance keep it in memory; READY: Triton did not retire it); see the Triton log "
            f"(wait longer with {RETIRE_TIMEOUT_ENV})"
        )

    def with_done(self, done: str) -> VersionsNotRetiredError:
        """The same error, its message also saying what the caller completed."""
        return VersionsNotRetiredError(
            self.model_name, self.version, self.still_loaded, self.timeout_s, self.url, done
        )


def retire_timeout_from_env() -> float:
    """``$RECSYS_TRITON_RETIRE_TIMEOUT_S`` (seconds, >= 0), or the default when unset."""
    raw = os.environ.get(RETIRE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_RETIRE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{RETIRE_TIMEOUT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


class TritonControl:
    """gRPC client for model control and inference against one Triton server.

    ``timeout_s`` bounds every call, loads included (``load_timeout_s`` overrides it for loads,
    which start a python stub and read the artifacts, and so take longest). ``retire_timeout_s``
    (default ``$RECSYS_TRITON_RETIRE_TIMEOUT_S`` or 30 s) bounds the wait after a load for the
    replaced versions to leave memory.

    ``admin_key`` authorises model control; by default it is the platform's key
    (``$RECSYS_TRITON_ADMIN_KEY`` or the stack's secret file), looked up on the first
    model-control call so that inference-only clients never touch it.
    """

    def __init__(
        self,
        grpc_url: str,
        *,
        timeout_s: float = 60.0,
        load_timeout_s: float | None = None,
        admin_key: str | None = None,
        retire_timeout_s: float | None = None,
    ) -> None:
        self.url = grpc_url.split("://", 1)[-1].rstrip("/")
        self.timeout_s = float(timeout_s)
        self.load_timeout_s = float(load_timeout_s or timeout_s)
        if retire_timeout_s is not None and not 0 <= retire_timeout_s < math.inf:
            raise ValueError(f"retire_timeout_s must be >= 0 seconds, got {retire_timeout_s!r}")
        self._retire_timeout_s = retire_timeout_s
        self._admin_key = admin_key
        self._client: Any = None

    def __repr__(self) -> str:  # never show the admin key
        return f"TritonControl({self.url!r})"

    @property
    def retire_timeout_s(self) -> float:
        """Seconds a load waits for replaced versions to leave memory; the environment is read
        on first use, so search-only clients never fail on a bad value they do not use."""
        if self._retire_timeout_s is None:
            self._retire_timeout_s = retire_timeout_from_env()
        return float(self._retire_timeout_s)

    def _admin_headers(self) -> dict[str, str] | None:
        """gRPC metadata for model-control calls (None when no key is configured anywhere)."""
        if self._admin_key is None:
            from recsys.config import load_settings
            from recsys.credentials import triton_admin_key

            self._admin_key = triton_admin_key(load_settings()) or ""
        return {TRITON_GRPC_ADMIN_HEADER: self._admin_key} if self._admin_key else None

    @property
    def client(self) -> Any:
        """The tritonclient gRPC client, created on first use (it connects lazily anyway)."""
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> TritonControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a client call; turn 'cannot reach the server' into TritonUnavailableError."""
        from tritonclient.utils import InferenceServerException

        kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except InferenceServerException as exc:
            if "is restricted, expecting header" in (exc.message() or ""):
                raise TritonAuthError(
                    f"Triton at {self.url} refused {what}: model control and the other "
                    "operator APIs need the admin key (set RECSYS_TRITON_ADMIN_KEY or use the "
                    "stack's secret file)"
                ) from exc
            # Triton also answers UNAVAILABLE for "model version not ready": that is the model's
            # state, not the server's, so it stays an ordinary error while the server is live.
            model_state = exc.status() == "StatusCode.UNAVAILABLE" and self.is_live()
            if exc.status() in _UNAVAILABLE and not model_state:
                raise TritonUnavailableError(
                    f"Triton gRPC at {self.url} is unavailable ({what}): "
                    f"{exc.status()}: {exc.message()}"
                ) from exc
            raise

    # -- server ---------------------------------------------------------------------------

    def is_live(self) -> bool:
        """True when the server answers its liveness check within a few seconds."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.client.is_server_live(client_timeout=min(self.timeout_s, 5.0)))
        except InferenceServerException:
            return False

    def wait_live(self, timeout_s: float = 60.0) -> None:
        """Block until the server is live; raise TritonUnavailableError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.is_live():
            if time.monotonic() > deadline:
                raise TritonUnavailableError(
                    f"Triton gRPC at {self.url} not live after {timeout_s:.0f}s"
                )
            time.sleep(0.5)

    # -- model control --------------------------------------------------------------------

    def load_version(
        self,
        model_name: str,
        version: int,
        repo: Path,
        *,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Serve exactly ``version`` of ``model_name`` from ``repo``, replacing what served.

        The version folder is verified first (sealed and complete), so a half-written folder is
        never handed to Triton. ``config`` overrides the default serving config; its version
        policy is always forced to ``[version]``.

        Returns once ``version`` is READY and every other version has left memory. Raises
        :class:`VersionsNotRetiredError` when ``version`` is READY (and the only one new
        requests go to) but others are still loaded after ``retire_timeout_s``: the switch
        happened, the cleanup did not.
        """
        self.load_versions(model_name, [version], repo, config=config)

    def load_versions(
        self,
        model_name: str,
        versions: list[int],
        repo: Path,
        *,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Serve exactly ``versions`` of ``model_name`` at once (a stable and a candidate
        version during a canary, :mod:`recsys.delivery`): the version policy lists them all.
        Returns once each is READY and every other version has left memory; errors as
        :meth:`load_version`. Requests that name no version go to the newest of them."""
        validate_model_name(model_name)
        wanted = sorted({int(v) for v in versions})
        if not wanted:
            raise ValueError("load_versions needs at least one version")
        for version in wanted:
            verify_version_dir(Path(repo) / model_name / str(version))
        override = dict(config or serving_config(model_name))
        self._load(model_name, wanted, override)

    def load_config(self, model_name: str, version: int, config: dict[str, Any]) -> None:
        """Load ``version`` of a model the platform generates rather than publishes from a
        family's artifacts (a router, :mod:`recsys.delivery.routing`) with ``config``; same
        deadlines and readiness wait as :meth:`load_version`."""
        validate_model_name(model_name)
        self._load(model_name, [int(version)], dict(config))

    def _load(self, model_name: str, versions: list[int], override: dict[str, Any]) -> None:
        from tritonclient.utils import InferenceServerException

        listed = ",".join(f"v{v}" for v in versions)
        override["name"] = model_name
        override["version_policy"] = {"specific": {"versions": versions}}
        try:
            self._call(
                f"loading {model_name} {listed}",
                "load_model",
                model_name,
                headers=self._admin_headers(),
                config=json.dumps(override),
                client_timeout=self.load_timeout_s,
            )
        except TritonUnavailableError as exc:
            if "DEADLINE_EXCEEDED" in str(exc) and self.is_live():
                raise ModelLoadError(
                    f"loading {model_name} {listed} on {self.url} did not finish within "
                    f"{self.load_timeout_s:.0f}s (a python stub that cannot start hangs the load "
                    "forever; see the Triton log)"
                ) from exc
            raise
        except InferenceServerException as exc:
            raise ModelLoadError(
                f"Triton at {self.url} failed to load {model_name} {listed}: {exc.message()}"
            ) from exc
        self._wait_ready(model_name, versions)

    def _wait_ready(self, model_name: str, versions: list[int]) -> None:
        deadline = time.monotonic() + self.load_timeout_s
        for version in versions:
            while not self._call(
                f"readiness of {model_name} v{version}",
                "is_model_ready",
                model_name,
                str(version),
            ):
                if time.monotonic() > deadline:
                    raise ModelLoadError(
                        f"{model_name} v{version} loaded on {self.url} but is not ready after "
                        f"{self.load_timeout_s:.0f}s"
                    )
                time.sleep(0.2)
            log.info("%s v%d is ready on %s", model_name, version, self.url)
        # Triton retires the versions outside the new policy after the swap; one that still
        # runs requests stays UNLOADING until they finish (STILL_LOADED_STATES).
        deadline = time.monotonic() + self.retire_timeout_s
        while True:
            others = {
                v: state
                for v, state in self.version_states(model_name).items()
                if v not in versions and state in STILL_LOADED_STATES
            }
            if not others:
                return
            if time.monotonic() > deadline:
                raise VersionsNotRetiredError(
                    model_name, max(versions), others, self.retire_timeout_s, self.url
                )
            time.sleep(0.1)

    def version_states(self, model_name: str) -> dict[int, str]:
        """Every version of ``model_name`` in Triton's repository index and its state (READY,
        LOADING, UNLOADING, UNAVAILABLE, ...)."""
        index = self._call(
            "repository index",
            "get_model_repository_index",
            headers=self._admin_headers(),
            as_json=True,
        )
        return {
            int(entry["version"]): str(entry.get("state", ""))
            for entry in index.get("models", [])
            if entry.get("name") == model_name and str(entry.get("version", "")).isdigit()
        }

    def loaded_versions(self, model_name: str) -> list[int]:
        """Versions of ``model_name`` that are READY now, ascending."""
        return sorted(v for v, state in self.version_states(model_name).items() if state == "READY")

    def unload(self, model_name: str) -> None:
        """Unload every version of ``model_name`` and wait until none is ready."""
        validate_model_name(model_name)
        self._call(
            f"unloading {model_name}", "unload_model", model_name, headers=self._admin_headers()
        )
        deadline = time.monotonic() + self.timeout_s
        while self.loaded_versions(model_name):
            if time.monotonic() > deadline:
                raise ModelLoadError(f"{model_name} still ready {self.timeout_s:.0f}s after unload")
            time.sleep(0.2)

    def model_config(self, model_name: str) -> dict[str, Any]:
        """The configuration Triton loaded for ``model_name`` (an operator API: needs the key)."""
        validate_model_name(model_name)
        answer = self._call(
            f"reading the config of {model_name}",
            "get_model_config",
            model_name,
            headers=self._admin_headers(),
            as_json=True,
        )
        return dict(answer["config"])

    def inference_statistics(self, model_name: str, version: int) -> dict[str, Any]:
        """Triton's per-version inference statistics (an operator API: needs the key)."""
        validate_model_name(model_name)
        return dict(
            self._call(
                f"reading statistics of {model_name} v{version}",
                "get_inference_statistics",
                model_name,
                str(version),
                headers=self._admin_headers(),
                as_json=True,
            )
        )

    # -- inference ------------------------------------------------------------------------

    def infer(
        self,
        model_name: str,
        inputs: list[Any],
        outputs: list[Any],
        *,
        version: int | None = None,
        what: str | None = None,
        request_id: str = "",
    ) -> Any:
        """One gRPC inference request (``tritonclient.grpc`` ``InferInput`` /
        ``InferRequestedOutput`` lists), pinned to ``version`` when given and tagged with
        ``request_id`` (feedback is keyed by it, :mod:`recsys.delivery.feedback`); returns the
        ``InferResult``. Transport failures raise :class:`TritonUnavailableError` or
        :class:`TritonAuthError` like every call; an error the model or server answered
        (bad input, a failing ``execute``) raises ``tritonclient``'s
        ``InferenceServerException``, for the family's client to word. Which tensors a model
        takes is its family's business (e.g. :mod:`recsys.families.search.client`), never this
        client's."""
        return self._call(
            what or f"inference on {model_name}",
            "infer",
            model_name,
            inputs,
            model_version="" if version is None else str(int(version)),
            outputs=outputs,
            request_id=request_id,
        )
