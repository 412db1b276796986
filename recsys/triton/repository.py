"""The Triton model repository: one folder per model, one numbered folder per version.

Versions are published atomically. Files are copied into ``<repo>/.staging/`` (same filesystem),
fsynced, sealed with a ``COMPLETE`` marker written last, and only then renamed into
``<repo>/<model>/<version>``. A crash mid-copy therefore leaves debris in ``.staging`` and never a
half-written version that Triton could load; :func:`verify_version_dir` is the check the control
client runs before every load, and the one that refuses a version folder written by anything
else.

The repository knows no model family: a folder's ``manifest.json`` names its ``family``, and
:mod:`recsys.families` says which files that family requires, which python-backend model serves
it and which Triton inputs and outputs it has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from recsys.families import LEGACY_FAMILY, UnknownFamilyError, family_of, get_family
from recsys.families.base import ManifestError, ModelFamily, UnsafeFileNameError

MODEL_FILE = "model.py"
COMPLETE_MARKER = "COMPLETE"
STAGING_DIR = ".staging"
CONFIG_FILE = "config.pbtxt"
MANIFEST_FILE = "manifest.json"

SERVING_KNOBS = (
    "max_batch_size",
    "instance_count",
    "max_queue_delay_us",
    "intra_op_threads",
    "dynamic_batching",
    "preferred_batch_sizes",
    "response_cache",
)
"""``serving_config`` keyword arguments a publisher may pin per version (manifest ``serving``)."""

MAX_DEFAULT_INSTANCES = 4
"""The default instance count is one per CPU, at most this many."""

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_DYNAMIC_BATCHING = True
DEFAULT_MAX_QUEUE_DELAY_US = 2000
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_RESPONSE_CACHE = False

UNPINNED_SERVING: dict[str, Any] = {
    "max_batch_size": 8,
    "instance_count": 1,
    "max_queue_delay_us": 2000,
    "intra_op_threads": 1,
    "dynamic_batching": True,
    "preferred_batch_sizes": None,
    "response_cache": False,
}
"""What :func:`serving_config` fills in for a knob a version's manifest does not pin: the config
versions published before every deploy pinned all its knobs were served with, kept so that a
rollback to one of them loads it as it was served. Platform deploys pin every knob
(:func:`default_serving`, overridden by settings, CLI flags or pipeline params)."""

_KNOB_RANGES: dict[str, tuple[int, int]] = {
    "instance_count": (1, 64),
    "max_batch_size": (1, 1024),
    "max_queue_delay_us": (0, 10_000_000),
    "intra_op_threads": (1, 64),
}

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class RepositoryError(RuntimeError):
    """Base class for model-repository problems."""


class InvalidModelNameError(RepositoryError, ValueError):
    """A model name that is not a plain folder name (path traversal, separators, empty)."""


class IncompleteArtifactsError(RepositoryError):
    """Serving artifacts or a version folder lack files, or their manifest is unreadable."""


class UnsafePathError(RepositoryError, ValueError):
    """A model or version folder (or a file in it) that resolves outside its place in the
    repository, e.g. a symlink planted to make Triton load code from elsewhere."""


class VersionExistsError(RepositoryError):
    """The version folder already exists; published versions are immutable."""


def manifest_family(manifest: dict[str, Any]) -> ModelFamily:
    """The family that exported ``manifest`` (see :func:`recsys.families.family_of`); an
    unknown family makes the folder unusable (:class:`IncompleteArtifactsError`)."""
    try:
        return family_of(manifest)
    except UnknownFamilyError as exc:
        raise IncompleteArtifactsError(f"manifest names {exc}") from exc


def required_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The files the manifest's family requires in every artifacts and version folder."""
    return manifest_family(manifest).required_artifacts


def served_files(manifest: dict[str, Any]) -> list[str]:
    """Every file besides the required ones that the manifest makes Triton load (the family
    says which: e.g. the INT8 encoder, a reranker). Plain file names only
    (:class:`UnsafePathError` otherwise), so a manifest cannot make Triton read elsewhere."""
    try:
        return manifest_family(manifest).served_files(manifest)
    except UnsafeFileNameError as exc:
        raise UnsafePathError(str(exc)) from exc
    except ManifestError as exc:
        raise IncompleteArtifactsError(str(exc)) from exc


def validate_model_name(model_name: str) -> str:
    """Return ``model_name`` if it is safe as a single path component, else raise."""
    if not isinstance(model_name, str) or not _MODEL_NAME.fullmatch(model_name):
        raise InvalidModelNameError(
            f"invalid model name {model_name!r}: use only letters, digits, '_' and '-'"
        )
    return model_name


def _validate_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"model version must be a positive integer, got {version!r}")
    return version


def default_instance_count(cpus: int | None = None) -> int:
    """One model instance per CPU (``cpus``, default ``os.cpu_count()``), at most
    :data:`MAX_DEFAULT_INSTANCES`: with one ONNX Runtime thread each, instances run one
    execution per core in parallel, and a slow or oversized request holds up one instance,
    not every query queued behind it."""
    count = os.cpu_count() if cpus is None else cpus
    return max(1, min(MAX_DEFAULT_INSTANCES, count or 1))


def default_serving(cpus: int | None = None) -> dict[str, Any]:
    """The serving knobs a platform deploy publishes a version with unless told otherwise: the
    one place that defines them, and the configuration ``benchmarks/serving_throughput.py``
    measures by default (``benchmarks/results/serving_throughput.json``: 2 instances on its
    2-CPU machine, dynamic batching up to 32 with a 2 ms queue delay, one ONNX Runtime thread
    per instance, no response cache). ``RECSYS_TRITON_*`` variables override them
    (:func:`recsys.config.serving_from_env`), and a deploy's ``serving`` overrides those
    (:meth:`recsys.config.Settings.serving_knobs`)."""
    return {
        "instance_count": default_instance_count(cpus),
        "max_batch_size": DEFAULT_MAX_BATCH_SIZE,
        "dynamic_batching": DEFAULT_DYNAMIC_BATCHING,
        "max_queue_delay_us": DEFAULT_MAX_QUEUE_DELAY_US,
        "intra_op_threads": DEFAULT_INTRA_OP_THREADS,
        "response_cache": DEFAULT_RESPONSE_CACHE,
    }


def check_serving_knobs(knobs: dict[str, Any], what: str | None = None) -> dict[str, Any]:
    """``knobs`` (a subset of :data:`SERVING_KNOBS`) if every name is known and every value fits,
    else a ``ValueError`` naming it (as ``what`` when given, e.g. an environment variable):
    whole numbers within range (``instance_count`` 1-64, ``max_batch_size`` 1-1024,
    ``max_queue_delay_us`` 0-10,000,000, ``intra_op_threads`` 1-64), booleans for
    ``dynamic_batching`` and ``response_cache``, and ``preferred_batch_sizes`` a list of batch
    sizes up to ``max_batch_size`` (or null)."""
    unknown = sorted(set(knobs) - set(SERVING_KNOBS))
    if unknown:
        raise ValueError(f"unknown serving option(s) {unknown}; allowed: {list(SERVING_KNOBS)}")

    def label(name: str) -> str:
        return what or f"serving option {name}"

    for name, (low, high) in _KNOB_RANGES.items():
        value = knobs.get(name)
        if name in knobs and (
            isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
        ):
            raise ValueError(f"{label(name)} must be a whole number {low}-{high}, got {value!r}")
    for name in ("dynamic_batching", "response_cache"):
        if name in knobs and not isinstance(knobs[name], bool):
            raise ValueError(f"{label(name)} must be true or false, got {knobs[name]!r}")
    sizes = knobs.get("preferred_batch_sizes")
    if sizes is not None:
        limit = knobs.get("max_batch_size", _KNOB_RANGES["max_batch_size"][1])
        if not isinstance(sizes, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= limit for b in sizes
        ):
            raise ValueError(
                f"{label('preferred_batch_sizes')} must be a list of batch sizes 1-{limit}, "
                f"got {sizes!r}"
            )
    return dict(knobs)


def serving_config(
    model_name: str,
    *,
    family: str = LEGACY_FAMILY,
    max_batch_size: int = UNPINNED_SERVING["max_batch_size"],
    instance_count: int = UNPINNED_SERVING["instance_count"],
    versions: list[int] | None = None,
    max_queue_delay_us: int = UNPINNED_SERVING["max_queue_delay_us"],
    intra_op_threads: int = UNPINNED_SERVING["intra_op_threads"],
    dynamic_batching: bool = UNPINNED_SERVING["dynamic_batching"],
    preferred_batch_sizes: list[int] | None = UNPINNED_SERVING["preferred_batch_sizes"],
    response_cache: bool = UNPINNED_SERVING["response_cache"],
) -> dict[str, Any]:
    """The model configuration as a JSON-able dict in Triton's protobuf JSON form.

    Its keyword defaults are :data:`UNPINNED_SERVING` (what a version whose manifest pins no
    knobs is served with), not the platform's defaults: those are :func:`default_serving`,
    which every platform deploy pins in full.

    The same dict becomes ``config.pbtxt`` and the JSON config override of a load request, so
    the file and what the control client loads can never drift apart. ``versions`` pins the
    version policy to exactly those versions.

    ``family`` (a :mod:`recsys.families` name) gives the inputs and outputs.
    ``response_cache`` lets Triton answer a repeated request from its cache without
    running the model (search traffic repeats head queries a lot); it only takes effect on a
    server started with ``--cache-config local,size=<bytes>``. ``dynamic_batching=False`` makes
    every request its own execution (lowest latency at low load, no queue delay).
    """
    validate_model_name(model_name)
    inputs, outputs = get_family(family).triton_io()
    config: dict[str, Any] = {
        "name": model_name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"kind": "KIND_CPU", "count": instance_count}],
        "parameters": {"intra_op_threads": {"string_value": str(intra_op_threads)}},
    }
    if dynamic_batching:
        batching: dict[str, Any] = {"max_queue_delay_microseconds": max_queue_delay_us}
        if preferred_batch_sizes:
            batching["preferred_batch_size"] = [int(b) for b in preferred_batch_sizes]
        config["dynamic_batching"] = batching
    if response_cache:
        config["response_cache"] = {"enable": True}
    if versions:
        config["version_policy"] = {
            "specific": {"versions": [_validate_version(v) for v in versions]}
        }
    return config


def render_config_pbtxt(config: dict[str, Any]) -> str:
    """Render ``config`` as text protobuf, validated against Triton's ModelConfig schema."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, fsyncing both."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_config_pbtxt(model_dir: Path, config: dict[str, Any]) -> Path:
    """Atomically write ``model_dir/config.pbtxt`` from ``config``; return its path."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILE
    _write_durably(path, render_config_pbtxt(config).encode("utf-8"))
    return path


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise IncompleteArtifactsError(f"{folder}/manifest.json is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise IncompleteArtifactsError(f"{folder}/manifest.json is not a JSON object")
    return manifest


def validate_artifacts(artifacts_dir: Path) -> dict[str, Any]:
    """Check a serving-artifacts folder has every required file and a parseable manifest;
    return the manifest."""
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        raise IncompleteArtifactsError(f"serving artifacts folder {artifacts_dir} does not exist")
    if not (artifacts_dir / MANIFEST_FILE).is_file():
        raise IncompleteArtifactsError(
            f"serving artifacts in {artifacts_dir} are incomplete: missing {MANIFEST_FILE}"
        )
    manifest = _read_manifest(artifacts_dir)
    missing = [name for name in required_files(manifest) if not (artifacts_dir / name).is_file()]
    if missing:
        raise IncompleteArtifactsError(
            f"serving artifacts in {artifacts_dir} are incomplete: missing {', '.join(missing)}"
        )
    for name in served_files(manifest):
        if not (artifacts_dir / name).is_file():
            raise IncompleteArtifactsError(
                f"serving artifacts in {artifacts_dir} lack {name}, which the manifest names"
            )
    return manifest


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_durably(source: Path, target: Path) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _ensure_in_place(path: Path, expected: Path) -> None:
    """Raise :class:`UnsafePathError` unless ``path`` really is ``expected`` once symlinks are
    resolved (``expected`` is built from the *resolved* repository root and validated names,
    so it names the one real place the path may be)."""
    if path.exists() and path.resolve() != expected:
        raise UnsafePathError(
            f"{path} resolves to {path.resolve()}, outside its place in the model repository; "
            "refusing to use it"
        )


def verify_version_dir(path: Path) -> dict[str, Any]:
    """Raise :class:`IncompleteArtifactsError` unless ``path`` is a sealed, complete version
    folder; return its manifest. Cheap (no hashing), so it can run before every load.

    ``path`` must be ``<repo>/<model>/<version>`` with neither folder a symlink that leads
    elsewhere and every required file inside it (:class:`UnsafePathError` otherwise), since
    Triton follows symlinks and would load whatever code they point at.
    """
    path = Path(path)
    if not path.name.isdigit():
        raise UnsafePathError(f"{path} is not a numbered version folder")
    validate_model_name(path.parent.name)
    repo = path.parent.parent.resolve()
    _ensure_in_place(path.parent, repo / path.parent.name)
    _ensure_in_place(path, repo / path.parent.name / path.name)
    if not path.is_dir():
        raise IncompleteArtifactsError(f"version folder {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise IncompleteArtifactsError(
            f"version folder {path} has no {COMPLETE_MARKER} marker: it was not published "
            "atomically (half-written or copied by hand); republish it with publish_version"
        )
    if not (path / MANIFEST_FILE).is_file():
        raise IncompleteArtifactsError(f"version folder {path} lacks {MANIFEST_FILE}")
    real = path.resolve()
    _ensure_in_place(path / MANIFEST_FILE, real / MANIFEST_FILE)
    manifest = _read_manifest(path)
    required = (*required_files(manifest), MODEL_FILE)
    missing = [n for n in required if not (path / n).is_file()]
    if missing:
        raise IncompleteArtifactsError(f"version folder {path} lacks {', '.join(missing)}")
    for name in (*required, COMPLETE_MARKER):
        _ensure_in_place(path / name, real / name)
    for name in served_files(manifest):
        if not (path / name).is_file():
            raise IncompleteArtifactsError(f"version folder {path} lacks {name}")
        _ensure_in_place(path / name, real / name)
    return manifest


def _serving_knobs(serving: dict[str, Any] | None) -> dict[str, Any]:
    return check_serving_knobs(dict(serving or {}))


def version_serving_knobs(repo: Path, model_name: str, version: int) -> dict[str, Any]:
    """Every serving knob ``version`` is served with: its manifest's ``serving`` on top of
    :data:`UNPINNED_SERVING` (a platform deploy pins them all); unset ones (``None``) left out."""
    manifest = verify_version_dir(Path(repo) / model_name / str(_validate_version(version)))
    knobs = {**UNPINNED_SERVING, **_serving_knobs(manifest.get("serving"))}
    return {name: value for name, value in knobs.items() if value is not None}


def version_serving_config(repo: Path, model_name: str, version: int) -> dict[str, Any]:
    """The Triton config ``version`` was published with (its manifest's ``serving`` knobs on
    top of :data:`UNPINNED_SERVING`): pass it as ``config=`` to ``TritonControl.load_version``
    so a deploy or a rollback serves each version with its own batching, instances and cache."""
    manifest = verify_version_dir(Path(repo) / model_name / str(_validate_version(version)))
    family = manifest_family(manifest).name
    return serving_config(model_name, family=family, **_serving_knobs(manifest.get("serving")))


class ServingKnobsConflictError(RepositoryError, ValueError):
    """A deploy asked for serving knobs a published version does not have: its knobs are
    pinned when it is published, and published versions are immutable."""


def check_requested_knobs(
    repo: Path, model_name: str, version: int, requested: dict[str, Any]
) -> None:
    """Raise :class:`ServingKnobsConflictError` when the published ``version`` is served with
    other values of the knobs in ``requested`` than those (e.g. ``recsys deploy --version 3
    --instances 4`` of a version published with 2). A folder that cannot be read is left to the
    deploy's load, which fails and restores what served."""
    try:
        pinned = version_serving_knobs(repo, model_name, version)
    except (IncompleteArtifactsError, UnsafePathError):
        return
    conflicts = {
        name: (pinned.get(name), value)
        for name, value in requested.items()
        if pinned.get(name) != value
    }
    if conflicts:
        said = ", ".join(
            f"{k}={new!r} (published with {old!r})" for k, (old, new) in conflicts.items()
        )
        raise ServingKnobsConflictError(
            f"{model_name} v{version} is already published with other serving knobs: {said}; "
            "a version's knobs are pinned when it is published and versions are immutable: "
            "deploy it without them, or register a new version and deploy that with them"
        )


def _holds_same_artifacts(
    final: Path, artifacts_dir: Path, required: tuple[str, ...], served: list[str]
) -> bool:
    """Whether a complete published version was made from exactly these artifact files (the
    manifest is excluded: publishing adds the version and serving knobs to it)."""
    try:
        recorded = json.loads((final / COMPLETE_MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    names = [n for n in dict.fromkeys((*required, *served)) if n != MANIFEST_FILE]
    return all(recorded.get(name) == file_sha256(artifacts_dir / name) for name in names)


def publish_version(
    repo: Path,
    model_name: str,
    version: int,
    artifacts_dir: Path,
    *,
    serving: dict[str, Any] | None = None,
) -> Path:
    """Publish ``artifacts_dir`` as ``<repo>/<model_name>/<version>`` atomically; return it.

    The version's manifest gets ``version`` filled in, and ``serving`` (keyword arguments of
    :func:`serving_config`: ``max_batch_size``, ``instance_count``, ``dynamic_batching``,
    ``max_queue_delay_us``, ``preferred_batch_sizes``, ``response_cache``, ...) when given:
    :func:`version_serving_config` turns them back into the load config (knobs it lacks are
    :data:`UNPINNED_SERVING`'s; platform deploys pass them all, :func:`default_serving`).
    ``config.pbtxt`` is written on the model's first publish, and rewritten whenever
    ``serving`` is given (loads carry their own config override, so it only matters to a server
    started without one). Raises :class:`VersionExistsError` rather than overwrite a published
    version, since a model that already served must stay reproducible for rollbacks.
    """
    validate_model_name(model_name)
    _validate_version(version)
    repo = Path(repo).resolve()
    artifacts_dir = Path(artifacts_dir)
    manifest = validate_artifacts(artifacts_dir)
    family = manifest_family(manifest)
    knobs = _serving_knobs(serving)
    config = serving_config(model_name, family=family.name, **knobs)
    render_config_pbtxt(config)  # fail before copying anything if Triton would reject it
    served = served_files(manifest)
    model_dir = repo / model_name
    final = model_dir / str(version)
    _ensure_in_place(model_dir, model_dir)  # repo is resolved: any symlink here leads away
    _ensure_in_place(repo / STAGING_DIR, repo / STAGING_DIR)
    if final.exists():
        if _holds_same_artifacts(final, artifacts_dir, family.required_artifacts, served):
            return final  # a retried deploy of the very same artifacts: nothing to do
        state = (
            "with different artifacts: does this repository belong to another MLflow registry?"
            if (final / COMPLETE_MARKER).is_file()
            else "INCOMPLETE, remove it"
        )
        raise VersionExistsError(
            f"{model_name} version {version} already exists at {final} ({state}); "
            "versions are immutable"
        )

    staging_root = repo / STAGING_DIR
    staging_root.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_root / f"{model_name}-{version}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        checksums = {}
        optional = [n for n in family.optional_artifacts if (artifacts_dir / n).is_file()]
        for name in dict.fromkeys((*family.required_artifacts, *served, *optional)):
            if name == MANIFEST_FILE:
                continue
            _copy_durably(artifacts_dir / name, staging / name)
            checksums[name] = file_sha256(staging / name)
        manifest = {**manifest, "version": version}
        if serving is not None:
            manifest["serving"] = knobs
        _write_durably(staging / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        _copy_durably(family.serving_model_source, staging / MODEL_FILE)
        for name in (MANIFEST_FILE, MODEL_FILE):
            checksums[name] = file_sha256(staging / name)
        marker = {"model_name": model_name, "version": version, "sha256": checksums}
        _write_durably(staging / COMPLETE_MARKER, json.dumps(marker, indent=2).encode())
        _fsync_dir(staging)
        if final.exists():  # lost a race with a concurrent publisher of the same version
            raise VersionExistsError(f"{model_name} version {version} appeared at {final}")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(model_dir)
    with contextlib.suppress(OSError):
        staging_root.rmdir()  # only if empty; concurrent publishers may still use it
    if serving is not None or not (model_dir / CONFIG_FILE).exists():
        write_config_pbtxt(model_dir, config)
    return final


def list_versions(repo: Path, model_name: str) -> list[int]:
    """Complete (sealed) versions of ``model_name`` in ``repo``, ascending."""
    validate_model_name(model_name)
    model_dir = Path(repo) / model_name
    if not model_dir.is_dir():
        return []
    _ensure_in_place(model_dir, Path(repo).resolve() / model_name)
    versions = []
    for entry in model_dir.iterdir():
        if not (entry.is_dir() and entry.name.isdigit()):
            continue
        try:
            verify_version_dir(entry)
        except (IncompleteArtifactsError, UnsafePathError):
            continue
        versions.append(int(entry.name))
    return sorted(versions)


def smoke_test_version(
    control: Any,
    repo: Path,
    model_name: str,
    version: int,
    request: dict[str, Any] | None = None,
) -> list[Any]:
    """Smoke-test ``version`` of ``model_name`` (loaded in Triton behind ``control``) with its
    family's check (:meth:`recsys.families.base.ModelFamily.smoke_test`), pinned to that
    version; ``request`` overrides the question its export recorded. Returns the family's
    summary of the answer; raises :class:`recsys.triton.control.ModelLoadError` when the
    answer is an error or malformed."""
    manifest = verify_version_dir(Path(repo) / model_name / str(_validate_version(version)))
    family = manifest_family(manifest)
    return family.smoke_test(control, model_name, version, manifest, request)
