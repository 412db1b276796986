"""Deploy and rollback functions against real Triton and MLflow: failures keep the good
version serving and say why."""

from __future__ import annotations

import pytest

from recsys import registry
from recsys.audit import read_records
from recsys.pipeline import deploy_model, register_model
from recsys.rollback import RollbackError, rollback
from recsys.triton.control import ModelLoadError, TritonControl
from recsys.triton.repository import IncompleteArtifactsError


@pytest.fixture
def artifacts(tiny_bert_dir, homedepot_sample, tmp_path):
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.export import build_serving_artifacts

    catalog = product_catalog(read_relevance_csv(homedepot_sample))

    def build(name: str, fault=None):
        return build_serving_artifacts(
            tiny_bert_dir, catalog, tmp_path / name, model_name="x", fault_injection=fault
        )

    return build


def _register(settings, artifacts_dir) -> int:
    run_id = registry.start_training_run(
        settings.mlflow_tracking_uri, "deploy-tests", "t", {"epochs": 1}, {}
    )
    return register_model(settings, run_id, str(artifacts_dir), {"data_hash": "h"})["version"]


def test_failed_smoke_test_restores_the_champion(platform, artifacts):
    good = artifacts("good")
    v1 = _register(platform, good)
    deploy_model(platform, v1, str(good), "angle bracket", 5)

    broken = artifacts("broken", fault="raise")
    v2 = _register(platform, broken)
    with pytest.raises(ModelLoadError, match="injected fault"):
        deploy_model(platform, v2, str(broken), "angle bracket", 5)

    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v1]
    assert len(control.search(platform.model_name, "angle bracket", 5)) == 5
    assert (
        registry.alias_version(platform.mlflow_tracking_uri, platform.model_name, "champion") == v1
    )
    actions = [r["action"] for r in read_records(platform.audit_log)]
    assert actions == ["deploy", "deploy_failed"]


def test_rollback_without_a_good_version_keeps_serving_and_says_why(platform, artifacts):
    good = artifacts("only")
    v1 = _register(platform, good)
    deploy_model(platform, v1, str(good), "angle bracket", 5)
    with pytest.raises(RollbackError, match="no earlier known-good version"):
        rollback(platform, "error rate 1.0 > 0.05")
    assert TritonControl(platform.triton_grpc_url).loaded_versions(platform.model_name) == [v1]


def test_rollback_to_a_version_whose_files_are_missing_fails_loudly(platform, artifacts):
    import shutil

    first, second = artifacts("first"), artifacts("second")
    v1 = _register(platform, first)
    deploy_model(platform, v1, str(first), "angle bracket", 5)
    v2 = _register(platform, second)
    deploy_model(platform, v2, str(second), "angle bracket", 5)
    shutil.rmtree(platform.triton_repo / platform.model_name / str(v1))

    with pytest.raises(RollbackError, match=f"to v{v1} failed") as failure:
        rollback(platform, "error rate 1.0 > 0.05")
    assert isinstance(failure.value.__cause__, IncompleteArtifactsError)
    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v2]
    assert (
        registry.alias_version(platform.mlflow_tracking_uri, platform.model_name, "champion") == v2
    )
    assert read_records(platform.audit_log)[-1]["action"] == "rollback_failed"
