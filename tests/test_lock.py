"""The locks (requirements.lock, requirements-dev.lock) against their inputs, setup, the images
and the installed environment. Fast, no network: scripts/lock.sh makes the locks,
scripts/setup.sh installs them, deploy/docker/*.Dockerfile build from them."""

from __future__ import annotations

import hashlib
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
DOCKER = ROOT / "deploy" / "docker"
TRITON_CONSTRAINTS = DOCKER / "triton-constraints.txt"
# The CUDA build of torch pulls these from PyPI; the platform runs the CPU build.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
NOT_CUDA = {"nvidia-pytriton"}  # PyTriton, a real runtime dependency
KEY_PACKAGES = [
    "apache-airflow",
    "mlflow",
    "transformers",
    "sentence-transformers",
    "onnx",
    "onnxruntime",
    "tritonclient",
    "pandas",
    "great-expectations",
    "torch",
]


def requirement_lines(path: Path) -> list[str]:
    """The file's requirement lines: comments and blank lines dropped (as scripts/lock.sh does)."""
    lines = (re.sub(r"\s*#.*$", "", line).rstrip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def input_sha(path: Path) -> str:
    """The hash that a lock header records for an input file (scripts/lock.sh's req_sha)."""
    return hashlib.sha256(
        "".join(f"{line}\n" for line in requirement_lines(path)).encode()
    ).hexdigest()


def pins(path: Path) -> dict[str, str]:
    """name -> version of a lock; fails on any line that is not an exact == pin."""
    out: dict[str, str] = {}
    for line in requirement_lines(path):
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{path.name}: {line!r} is not an exact == pin"
        )
        assert not req.marker and not req.url, f"{path.name}: {line!r} has a marker or URL"
        name = canonicalize_name(req.name)
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = specs[0].version
    return out


def inputs(path: Path) -> list[Requirement]:
    return [Requirement(line) for line in requirement_lines(path)]


RUNTIME = pins(RUNTIME_LOCK)
DEV = pins(DEV_LOCK)
ALL = {**RUNTIME, **DEV}


@pytest.mark.parametrize(
    ("source", "lock"),
    [("requirements.txt", RUNTIME), ("requirements-dev.txt", DEV)],
)
def test_every_requirement_is_pinned_in_the_lock_within_its_specifier(source, lock):
    for req in inputs(ROOT / source):
        name = canonicalize_name(req.name)
        assert name in lock, f"{source}: {req.name} is not in the lock: run scripts/lock.sh"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{source}: {req} but the lock pins {name}=={lock[name]}: run scripts/lock.sh"
        )


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK, TRITON_CONSTRAINTS])
def test_lock_headers_match_their_inputs(lock):
    """A requirement edited without relocking fails here (and scripts/setup.sh refuses to run)."""
    recorded = re.findall(r"^# input-sha256: (\S+) ([0-9a-f]{64})$", lock.read_text(), re.M)
    assert recorded, f"{lock.name} records no input hash"
    for source, sha in recorded:
        assert input_sha(ROOT / source) == sha, (
            f"{source} changed after {lock.name} was generated: run scripts/lock.sh"
        )


def test_the_locks_agree_and_are_not_trivial():
    assert len(RUNTIME) > 100  # transitive dependencies included, not only the inputs
    for name in DEV.keys() & RUNTIME.keys():
        assert DEV[name] == RUNTIME[name], (
            f"{name}: dev lock {DEV[name]} != runtime {RUNTIME[name]}"
        )


def test_torch_is_pinned_without_its_cuda_packages():
    assert RUNTIME["torch"] == "2.13.0"
    for lock in (RUNTIME, DEV):
        cuda = sorted(n for n in lock if CUDA_ONLY.match(n) and n not in NOT_CUDA)
        assert not cuda, f"CUDA-only packages in a lock: {cuda}"


def test_setup_installs_from_the_locks_only():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-r requirements.lock -r requirements-dev.lock" in setup
    assert not re.search(r"-r\s+requirements(-dev)?\.txt", setup)
    assert "input-sha256" in setup  # the stale-lock check
    assert "redis-server" in setup
    assert os.access(ROOT / "scripts" / "lock.sh", os.X_OK)


def dockerfile(name: str) -> str:
    text = (DOCKER / name).read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases, f"{name} has no FROM"
    for base in bases:
        tag = base.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: base image {base} is not pinned by tag"
    return text


def test_airflow_image_installs_the_lock():
    text = dockerfile("airflow.Dockerfile")
    assert "FROM apache/airflow:3.3.2-python3.11" in text
    assert "COPY --chown=airflow:root requirements.lock" in text
    assert "-r /opt/recsys/requirements.lock" in text
    assert "torch==2.13.0" in text and "ARG TORCH_INDEX_URL=" in text
    assert "PYTHONPATH=/opt/recsys" in text
    assert RUNTIME["apache-airflow"] == "3.3.2"


def test_triton_image_installs_pinned_cp310_versions():
    text = dockerfile("triton.Dockerfile")
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in text
    assert "-c /opt/recsys/triton-constraints.txt" in text and "ARG ORT_PACKAGE=" in text
    assert "gcc" in text
    triton = pins(TRITON_CONSTRAINTS)
    for req in inputs(DOCKER / "triton-requirements.txt"):
        name = canonicalize_name(req.name)
        assert name in triton and req.specifier.contains(triton[name])
    assert Version(triton["numpy"]) < Version("2")
    # Where a cp310 wheel exists the Triton image runs the runtime lock's version.
    for name in ("numpy", "tokenizers", "bm25s", "pystemmer"):
        assert triton[name] == RUNTIME[name], name


def test_mlflow_image_pins_its_additions():
    text = dockerfile("mlflow.Dockerfile")
    assert "FROM ghcr.io/mlflow/mlflow:v3.17.2" in text
    assert "-r /opt/recsys/mlflow-requirements.txt" in text
    extra = pins(DOCKER / "mlflow-requirements.txt")
    assert extra.keys() >= {"mlflow", "psycopg2-binary", "boto3"}
    assert extra["mlflow"] == RUNTIME["mlflow"]


def test_dockerignore_keeps_local_state_out_of_the_images():
    ignored = set(requirement_lines(ROOT / ".dockerignore"))
    assert {".git", ".venv", ".recsys", ".bench_work", "triton_repo/*/"} <= ignored


def test_installed_environment_matches_the_lock():
    """The venv the tests run in is the lock, exactly: catches a venv drifting from the lock."""
    drift, missing = [], []
    for name, pinned in sorted(ALL.items()):
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        # torch's CPU build is 2.13.0+cpu: the local label is not part of the pin.
        if installed.public != Version(pinned).public or (installed.local and name != "torch"):
            drift.append(f"{name} {installed} (lock {pinned})")
    for name in KEY_PACKAGES:
        assert name not in missing, f"{name} is not installed"
    assert not drift and not missing, (
        f"the environment differs from the locks: {drift} missing {missing}: run scripts/setup.sh"
    )
