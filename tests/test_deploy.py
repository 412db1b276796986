"""Deploy and rollback functions against real Triton and MLflow: failures keep the good
version serving and say why."""

from __future__ import annotations

import os
import re

import pytest

from recsys import registry
from recsys.audit import read_records
from recsys.config import load_settings
from recsys.deploy import deploy_model
from recsys.families.search.client import search
from recsys.rollback import DeployFailedError, RollbackError, rollback
from recsys.triton.control import ModelLoadError, TritonControl
from recsys.triton.repository import COMPLETE_MARKER, IncompleteArtifactsError
from tests.triton_testing import free_port, register_version


@pytest.fixture
def artifacts(search_artifacts):
    return search_artifacts


def test_failed_smoke_test_restores_the_champion(platform, artifacts):
    good = artifacts("good")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), {"query": "angle bracket", "top_k": 5})

    broken = artifacts("broken", fault="raise")
    v2 = register_version(platform, broken)
    with pytest.raises(ModelLoadError, match="injected fault") as failure:
        deploy_model(platform, v2, str(broken), {"query": "angle bracket", "top_k": 5})
    assert isinstance(failure.value, DeployFailedError)
    assert f"restored v{v1} (v{v1} served before the attempt)" in str(failure.value)

    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v1]
    assert len(search(control, platform.model_name, "angle bracket", 5)) == 5
    assert (
        registry.alias_version(platform.mlflow_tracking_uri, platform.model_name, "champion") == v1
    )
    actions = [r["action"] for r in read_records(platform.audit_log)]
    assert actions == ["deploy", "deploy_failed", "deploy_restored"]


def test_failed_redeploy_of_the_champion_falls_back_to_the_last_good_version(platform, artifacts):
    """Re-deploying the champion (a retried task, `recsys deploy --version <champion>`) fails:
    its folder lost its COMPLETE marker. What Triton served before is that very version, so the
    deploy falls back to the last known-good version before it, records what it restored, and
    says what serves and that the registry still names the failed version."""
    model, query = platform.model_name, "angle bracket"
    first, second = artifacts("first"), artifacts("second")
    v1 = register_version(platform, first)
    deploy_model(platform, v1, str(first), {"query": query, "top_k": 5})
    v2 = register_version(platform, second)
    deploy_model(platform, v2, str(second), {"query": query, "top_k": 5})
    (platform.triton_repo / model / str(v2) / COMPLETE_MARKER).unlink()

    with pytest.raises(DeployFailedError) as failure:
        deploy_model(platform, v2, None, {"query": query, "top_k": 5})
    message = str(failure.value)
    assert isinstance(failure.value.__cause__, IncompleteArtifactsError)
    assert f"v{v2} itself served before the attempt, and failed it" in message
    assert f"v{v1} is the last known-good version before it (registry)" in message
    assert f"Triton serves v{v1} of {model} now" in message
    assert f"`recsys rollback --to {v1}`" in message
    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(model) == [v1]
    assert len(search(control, model, query, 5)) == 5
    records = read_records(platform.audit_log)
    assert [r["action"] for r in records] == [
        "deploy",
        "deploy",
        "deploy_failed",
        "deploy_restored",
    ]
    assert records[2]["served_before"] == [v2] and records[2]["restoring"] == v1
    assert (records[3]["restored"], records[3]["from_version"]) == (v1, v2)

    uri = platform.mlflow_tracking_uri
    assert registry.alias_version(uri, model, registry.CHAMPION) == v2  # not touched...
    rollback(platform, "v2's folder is damaged", smoke_request={"query": query}, to_version=v1)
    assert registry.alias_version(uri, model, registry.CHAMPION) == v1  # ...until recorded
    assert control.loaded_versions(model) == [v1]


@pytest.mark.parametrize("bad", [0, -3, True, "2", 1.5])
def test_rollback_refuses_a_bad_target_version_before_asking_anything(bad, monkeypatch, tmp_path):
    # Nothing listens here, and the state folder is empty: a value that slipped through would
    # fail as "unreachable", or leave a lock or an audit record behind.
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")) as failure:
        rollback(load_settings(), "manual rollback (recsys rollback)", to_version=bad)
    assert "breach" not in str(failure.value)
    assert list(tmp_path.iterdir()) == []


def test_rollback_without_a_good_version_keeps_serving_and_says_why(platform, artifacts):
    good = artifacts("only")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), {"query": "angle bracket", "top_k": 5})
    with pytest.raises(RollbackError, match="no earlier known-good version") as failure:
        rollback(platform, "manual rollback (recsys rollback)")
    assert f"nothing was changed, v{v1} keeps serving" in str(failure.value)
    assert "breach" not in str(failure.value)
    assert TritonControl(platform.triton_grpc_url).loaded_versions(platform.model_name) == [v1]
    with pytest.raises(RollbackError, match=f"cannot roll back to v{v1}: it is the champion"):
        rollback(platform, "manual rollback (recsys rollback)", to_version=v1)


def test_rollback_to_a_version_whose_files_are_missing_fails_loudly(platform, artifacts):
    import shutil

    first, second = artifacts("first"), artifacts("second")
    v1 = register_version(platform, first)
    deploy_model(platform, v1, str(first), {"query": "angle bracket", "top_k": 5})
    v2 = register_version(platform, second)
    deploy_model(platform, v2, str(second), {"query": "angle bracket", "top_k": 5})
    shutil.rmtree(platform.triton_repo / platform.model_name / str(v1))

    with pytest.raises(RollbackError, match=f"to v{v1} failed") as failure:
        rollback(platform, "error rate 1.0 > 0.05")
    assert isinstance(failure.value.__cause__, IncompleteArtifactsError)
    assert str(failure.value).endswith(f"v{v2} keeps serving")  # read from Triton afterwards
    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v2]
    assert (
        registry.alias_version(platform.mlflow_tracking_uri, platform.model_name, "champion") == v2
    )
    assert read_records(platform.audit_log)[-1]["action"] == "rollback_failed"


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf"])
def test_a_bad_retire_timeout_is_named_when_a_load_needs_it(raw, monkeypatch):
    from recsys.triton.control import RETIRE_TIMEOUT_ENV

    monkeypatch.setenv(RETIRE_TIMEOUT_ENV, raw)
    control = TritonControl(f"127.0.0.1:{free_port()}")  # search-only clients never read it
    with pytest.raises(ValueError, match=f"{RETIRE_TIMEOUT_ENV} must be .* got '{raw}'"):
        _ = control.retire_timeout_s
    monkeypatch.setenv(RETIRE_TIMEOUT_ENV, "2.5")
    assert TritonControl("127.0.0.1:1").retire_timeout_s == 2.5


def test_a_platform_deploy_serves_with_the_configured_instances(platform, artifacts, monkeypatch):
    """A deploy publishes the version with ``RECSYS_TRITON_INSTANCES`` instances (the CPU count
    by default): Triton loads that many, and a rollback to it would load the same."""
    import dataclasses

    from recsys.triton.repository import version_serving_config

    monkeypatch.delenv("RECSYS_TRITON_INSTANCES")
    assert load_settings().triton_instances == max(1, min(4, os.cpu_count() or 1))
    settings = dataclasses.replace(platform, triton_instances=2)
    good = artifacts("good")
    version = register_version(settings, good)
    deploy_model(settings, version, str(good), {"query": "angle bracket", "top_k": 5})
    config = version_serving_config(settings.triton_repo, settings.model_name, version)
    assert config["instance_group"][0]["count"] == 2
    loaded = TritonControl(settings.triton_grpc_url).model_config(settings.model_name)
    assert loaded["instance_group"][0]["count"] == 2
    monkeypatch.setenv("RECSYS_TRITON_INSTANCES", "zero")
    with pytest.raises(ValueError, match="RECSYS_TRITON_INSTANCES must be a whole number"):
        load_settings()
