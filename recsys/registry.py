"""MLflow 3 tracking and model registry: runs, registered versions, lineage and aliases.

Registry versions are the platform's source of truth for what may serve: a version's number is
also its Triton version directory, the alias ``champion`` names what serves, ``previous`` the
known-good version a rollback returns to. Aliases replace the deprecated registry stages.

The tracking server requires a login (MLflow's basic-auth app). MLflow's client reads it from
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``; the stack exports both to Airflow
workers, and a process on the stack's machine without them (the CLI) gets them from the stack's
secret file via :func:`ensure_credentials`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from recsys.config import PROJECT_ROOT

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
TAG_DEPLOYED = "deployed"
TAG_ROLLED_BACK = "rolled_back"

# MLflow's REST client retries for minutes by default; a platform task should fail fast and clearly.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class RegistryUnavailableError(RuntimeError):
    """The MLflow registry cannot be used: the tracking server cannot be reached (this class),
    refused the request (:class:`RegistryAuthError`) or failed it (:class:`RegistryRequestError`).
    Callers treat all three as "MLflow is down" and report the message, which says which."""


class RegistryAuthError(RegistryUnavailableError, PermissionError):
    """The MLflow tracking server refused the credentials (or got none), or the login lacks the
    permission a request needs (MLflow's PERMISSION_DENIED)."""


class RegistryRequestError(RegistryUnavailableError):
    """The tracking server answered but failed a registry request: a server error such as a
    locked or broken database (HTTP 5xx after the client's retries), or an answer that is not
    "not found". A :class:`RegistryUnavailableError`, so callers take the same MLflow-down path
    (plan from Triton and the audit log, keep a registry update pending, CLI exit 3); the
    message carries MLflow's error code and text."""


# MLflow 3.17.2, measured against `mlflow server` (tests/test_registry_errors.py):
# a missing registered model is RESOURCE_DOES_NOT_EXIST (HTTP 404), and so is a missing
# version; a missing alias of an existing model is INVALID_PARAMETER_VALUE (HTTP 400), the same
# code as other bad requests, so aliases are read from the registered model instead of being
# told apart by error text. A login without permission gets PERMISSION_DENIED (HTTP 403), even
# for a model that does not exist; a failing database (locked, broken) answers 503, which the
# client retries and then reports as INTERNAL_ERROR "too many 503 error responses".
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_REFUSED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})


def is_not_found(exc: BaseException) -> bool:
    """True only for MLflow's "resource does not exist" (a missing model or version)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == NOT_FOUND


def request_error(exc: BaseException, tracking_uri: str, what: str) -> RegistryUnavailableError:
    """The platform's error for a failed MLflow request ``what`` (e.g. "reading alias
    'champion' of m"), keeping MLflow's code and text: refused (401/403) ->
    :class:`RegistryAuthError`; the connection dropped -> :class:`RegistryUnavailableError`
    ("unreachable"); anything else -> :class:`RegistryRequestError`."""
    import requests

    code = str(getattr(exc, "error_code", "") or type(exc).__name__)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    detail = text if text.startswith(code) else f"{code}: {text}"
    transport = exc.__cause__ or exc.__context__
    if code in _REFUSED:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(none)")
        return RegistryAuthError(
            f"MLflow tracking server at {tracking_uri} refused {what} for user {user!r}: {detail}"
        )
    if isinstance(transport, requests.ConnectionError | requests.Timeout):
        return RegistryUnavailableError(
            f"MLflow tracking server at {tracking_uri} became unreachable while {what}: {detail}"
        )
    return RegistryRequestError(f"MLflow tracking server at {tracking_uri} failed {what}: {detail}")


@contextlib.contextmanager
def registry_request(tracking_uri: str, what: str) -> Iterator[None]:
    """Turn an ``MlflowException`` raised inside into :func:`request_error` (not-found
    included: callers for whom "not found" is an answer check :func:`is_not_found` first)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise request_error(exc, tracking_uri, what) from exc


def ensure_credentials() -> tuple[str, str] | None:
    """Make sure MLflow's client has the platform's login in its environment variables.

    Variables already set win; otherwise the stack's generated admin password under
    ``$RECSYS_HOME`` is used if it exists. Returns the ``(user, password)`` in effect.
    """
    from recsys.config import load_settings
    from recsys.credentials import MLFLOW_PASSWORD_ENV, MLFLOW_USER_ENV, mlflow_credentials

    credentials = mlflow_credentials(load_settings())
    if credentials is not None:
        os.environ.setdefault(MLFLOW_USER_ENV, credentials[0])
        os.environ.setdefault(MLFLOW_PASSWORD_ENV, credentials[1])
    return credentials


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str


def git_sha() -> str:
    """Commit of the code that produced a model; 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def ensure_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server is down (file and database
    URIs are local and need no check). The check sends the login, so a proxy that guards
    ``/health`` as well is handled, and a refused login is reported as such."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    credentials = ensure_credentials()
    try:
        response = requests.get(
            tracking_uri.rstrip("/") + "/health", timeout=timeout_s, auth=credentials
        )
        if response.status_code in (401, 403):
            raise RegistryAuthError(
                f"MLflow tracking server at {tracking_uri} refused the login "
                f"(HTTP {response.status_code}); set MLFLOW_TRACKING_USERNAME/PASSWORD"
            )
        response.raise_for_status()
    except requests.RequestException as exc:
        raise RegistryUnavailableError(
            f"MLflow tracking server at {tracking_uri} is unreachable ({exc.__class__.__name__}); "
            "start it with `recsys stack up` or set MLFLOW_TRACKING_URI"
        ) from exc


def client(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri`` after a reachability check."""
    from mlflow import MlflowClient

    ensure_reachable(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(mlflow_client: Any, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist yet.

    The pipeline's two training tasks run at the same time and both start a run in the same
    experiment, so on a fresh server both may find it missing and both create it; the one that
    loses gets ``RESOURCE_ALREADY_EXISTS`` and uses the winner's."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        raise RegistryRequestError(
            f"MLflow said experiment {name!r} already exists but cannot find it"
        )
    return found.experiment_id


def start_training_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """Create the MLflow run that every later stage of one pipeline run logs into."""
    mlflow_client = client(tracking_uri)
    run = mlflow_client.create_run(
        ensure_experiment(mlflow_client, experiment), run_name=run_name, tags=tags
    )
    for key, value in params.items():
        mlflow_client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` to an existing run (settings chosen by a later task, e.g. tuned BM25)."""
    mlflow_client = client(tracking_uri)
    for key, value in params.items():
        mlflow_client.log_param(run_id, key, value)


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    mlflow_client = client(tracking_uri)
    for key, value in metrics.items():
        mlflow_client.log_metric(run_id, key, float(value), step=step)


def register_serving_model(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    artifacts_dir: Path,
    lineage: dict[str, Any],
) -> RegisteredVersion:
    """Log the folder's ONNX graph (the one its family names, e.g. the search encoder or the
    recommender's sequence model) as an MLflow model, register it, and attach lineage tags.

    The complete serving folder is logged too, so a Triton version can be rebuilt from the
    registry alone if its directory is lost.
    """
    import mlflow
    import onnx
    import onnxruntime

    from recsys.families import family_of
    from recsys.families.base import read_manifest

    manifest = read_manifest(artifacts_dir)
    family = family_of(manifest)
    onnx_file = family.registry_onnx_file(manifest)

    ensure_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(artifacts_dir), artifact_path="serving")
        info = mlflow.onnx.log_model(
            onnx.load(str(artifacts_dir / onnx_file)),
            name=Path(onnx_file).stem,
            registered_model_name=model_name,
            pip_requirements=[
                f"onnxruntime=={onnxruntime.__version__}",
                "numpy<2",
                f"onnx=={onnx.__version__}",
            ],
            save_as_external_data=False,
        )
    version = int(info.registered_model_version)
    _set_tags(client(tracking_uri), model_name, version, {"family": family.name, **lineage})
    log.info("registered %s version %d from run %s", model_name, version, run_id)
    return RegisteredVersion(name=model_name, version=version, run_id=run_id)


TAG_LIMIT = 5000
"""Characters kept of a tag value (MLflow's limit on a model version tag)."""


def _set_tags(mlflow_client: Any, model_name: str, version: int, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        mlflow_client.set_model_version_tag(model_name, str(version), key, text[:TAG_LIMIT])


def set_version_tags(
    tracking_uri: str, model_name: str, version: int, tags: dict[str, Any]
) -> None:
    """Set ``tags`` on a registry version: strings as they are, anything else as JSON, each cut
    to :data:`TAG_LIMIT` characters (rollout outcomes and results); a failure is a
    :class:`RegistryUnavailableError` naming MLflow's error."""
    with registry_request(tracking_uri, f"tagging {model_name} v{version}"):
        _set_tags(client(tracking_uri), model_name, version, tags)


def alias_version(tracking_uri: str, model_name: str, alias: str) -> int | None:
    """The version an alias points at, or None when the alias (or the model) does not exist.

    Only a genuinely missing model or alias is None. Any other failure (the server failed the
    request, refused the login, dropped the connection) raises :class:`RegistryUnavailableError`
    or a subclass naming the cause: read as "no champion", it would let a gate promote without a
    comparison and a failed deploy unload what serves."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        registered = mlflow_client.get_registered_model(model_name)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise request_error(exc, tracking_uri, f"reading alias {alias!r} of {model_name}") from exc
    version = (registered.aliases or {}).get(alias)
    return None if version is None else int(version)


def promote_to_champion(tracking_uri: str, model_name: str, version: int) -> int | None:
    """Point ``champion`` at ``version`` and ``previous`` at the old champion; return the old
    champion. Called only after the version serves and passed its smoke query."""
    mlflow_client = client(tracking_uri)
    old = alias_version(tracking_uri, model_name, CHAMPION)
    with registry_request(tracking_uri, f"promoting {model_name} v{version} to {CHAMPION}"):
        if old is not None and old != version:
            mlflow_client.set_registered_model_alias(model_name, PREVIOUS, str(old))
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, str(version))
        mlflow_client.set_model_version_tag(model_name, str(version), TAG_DEPLOYED, "true")
    return old


def last_good_version_before(tracking_uri: str, model_name: str, version: int) -> int | None:
    """Newest version older than ``version`` that was deployed and never rolled back."""
    mlflow_client = client(tracking_uri)
    with registry_request(tracking_uri, f"listing the versions of {model_name}"):
        candidates = mlflow_client.search_model_versions(f"name = '{model_name}'")
    good = [
        int(v.version)
        for v in candidates
        if int(v.version) < version
        and v.tags.get(TAG_DEPLOYED) == "true"
        and v.tags.get(TAG_ROLLED_BACK) != "true"
    ]
    return max(good) if good else None


def record_rollback(
    tracking_uri: str,
    model_name: str,
    bad_version: int,
    good_version: int,
    reason: str,
    metrics: dict[str, Any],
) -> None:
    """Move ``champion`` to the good version, tag the bad one with why it was pulled, and
    re-point ``previous`` at the next older good version (or drop it when there is none)."""
    mlflow_client = client(tracking_uri)
    what = f"recording the rollback of {model_name} from v{bad_version} to v{good_version}"
    with registry_request(tracking_uri, what):
        mlflow_client.set_registered_model_alias(model_name, CHAMPION, str(good_version))
        mlflow_client.set_model_version_tag(model_name, str(bad_version), TAG_ROLLED_BACK, "true")
        mlflow_client.set_model_version_tag(
            model_name, str(bad_version), "rollback_reason", reason[:5000]
        )
        mlflow_client.set_model_version_tag(
            model_name,
            str(bad_version),
            "rollback_metrics",
            json.dumps(metrics, default=str)[:5000],
        )
    older = last_good_version_before(tracking_uri, model_name, good_version)
    with registry_request(tracking_uri, what):
        if older is None:
            if alias_version(tracking_uri, model_name, PREVIOUS) is not None:
                mlflow_client.delete_registered_model_alias(model_name, PREVIOUS)
        else:
            mlflow_client.set_registered_model_alias(model_name, PREVIOUS, str(older))
