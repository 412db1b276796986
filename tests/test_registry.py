"""MLflow registry: registration with lineage, champion/previous aliases, rollback bookkeeping,
against a real ``mlflow server``."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from recsys import registry


@pytest.fixture(scope="module")
def serving_artifacts(tiny_bert_dir, homedepot_sample, tmp_path_factory):
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.export import build_serving_artifacts

    catalog = product_catalog(read_relevance_csv(homedepot_sample))
    return build_serving_artifacts(
        tiny_bert_dir, catalog, tmp_path_factory.mktemp("serving"), model_name="registry_test"
    )


def _register(uri: str, model: str, artifacts, **lineage):
    run_id = registry.start_training_run(uri, "registry-tests", "t", {"epochs": 1}, {"k": "v"})
    registry.log_metrics(uri, run_id, {"ndcg_at_10": 0.5})
    return registry.register_serving_model(uri, run_id, model, artifacts, lineage)


def test_register_promote_and_roll_back_aliases(mlflow_server, serving_artifacts):
    model = "registry_test"
    lineage = {"data_hash": "abc", "git_sha": "deadbeef", "params": {"epochs": 1}}
    v1 = _register(mlflow_server, model, serving_artifacts, **lineage)
    v2 = _register(mlflow_server, model, serving_artifacts, **lineage)
    assert (v1.version, v2.version) == (1, 2)

    client = MlflowClient(tracking_uri=mlflow_server)
    tags = client.get_model_version(model, "1").tags
    assert tags["data_hash"] == "abc" and tags["git_sha"] == "deadbeef"
    assert json.loads(tags["params"]) == {"epochs": 1}
    artifacts = {a.path for a in client.list_artifacts(v1.run_id, "serving")}
    assert "serving/encoder.onnx" in artifacts and "serving/products.npz" in artifacts

    assert registry.promote_to_champion(mlflow_server, model, 1) is None
    assert registry.promote_to_champion(mlflow_server, model, 2) == 1
    assert registry.alias_version(mlflow_server, model, registry.CHAMPION) == 2
    assert registry.alias_version(mlflow_server, model, registry.PREVIOUS) == 1
    assert registry.last_good_version_before(mlflow_server, model, 2) == 1

    registry.record_rollback(
        mlflow_server, model, 2, 1, "error rate 0.9 > 0.05", {"error_rate": 0.9}
    )
    assert registry.alias_version(mlflow_server, model, registry.CHAMPION) == 1
    assert registry.alias_version(mlflow_server, model, registry.PREVIOUS) is None
    bad = client.get_model_version(model, "2").tags
    assert bad[registry.TAG_ROLLED_BACK] == "true"
    assert bad["rollback_reason"] == "error rate 0.9 > 0.05"
    assert json.loads(bad["rollback_metrics"]) == {"error_rate": 0.9}
    # A rolled-back version is never a rollback target again.
    assert registry.last_good_version_before(mlflow_server, model, 3) == 1


def test_unknown_model_has_no_aliases(mlflow_server):
    assert registry.alias_version(mlflow_server, "no_such_model", registry.CHAMPION) is None


def test_unreachable_tracking_server_fails_fast_and_clearly():
    from tests.triton_testing import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(registry.RegistryUnavailableError, match="unreachable"):
        registry.alias_version(uri, "product_search", registry.CHAMPION)
    assert time.monotonic() - started < 10


def test_training_tasks_starting_at_once_share_one_new_experiment(mlflow_server):
    """The pipeline's two training tasks start their runs at the same moment; on a fresh
    server both find the experiment missing and both create it. The loser must use the
    winner's experiment, not fail with RESOURCE_ALREADY_EXISTS (as a training task once did)."""
    import threading
    import uuid

    from mlflow import MlflowClient

    from recsys.registry import start_training_run

    def start_at_once(experiment: str, callers: int) -> list[str | BaseException]:
        barrier = threading.Barrier(callers)
        results: list[str | BaseException] = []

        def start() -> None:
            barrier.wait()
            try:
                results.append(start_training_run(mlflow_server, experiment, "t", {}, {}))
            except BaseException as exc:  # reported below with the others
                results.append(exc)

        threads = [threading.Thread(target=start) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    client = MlflowClient(mlflow_server)
    for _ in range(3):
        experiment = f"race-{uuid.uuid4().hex[:8]}"
        results = start_at_once(experiment, 4)
        assert len(results) == 4 and all(isinstance(r, str) for r in results), results
        experiments = {client.get_run(run_id).info.experiment_id for run_id in results}
        assert experiments == {client.get_experiment_by_name(experiment).experiment_id}
