"""The recommendation family end to end through the same platform as search: its pipeline DAG
and its monitor DAG under Airflow's ``dag.test()``, a real Triton server, a real MLflow server,
real GX suites, on the documented interaction fixture.

Deploy v1 -> a retrain with the same data is gated (not better than the champion) -> deploy a
deliberately faulty v3 (it answers its smoke request, then raises in ``execute``) -> traffic ->
the recommender's own monitor DAG detects the breach and rolls back to v1: served version,
aliases, tags, audit trail and the one alert must all agree and name the recommender.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).parent / "fixtures" / "amazon_grocery_sample"


def _run(dag, conf):
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run.state, states


def test_recommender_deploy_gate_breach_rollback(platform, dagbag, webhook):
    from recsys import registry
    from recsys.audit import read_records
    from recsys.config import family_model_name
    from recsys.families.recommend.client import recommend
    from recsys.triton.control import TritonControl

    uri = platform.mlflow_tracking_uri
    model = family_model_name("recommend")
    assert model != platform.model_name  # its own registered and served model
    control = TritonControl(platform.triton_grpc_url)
    pipeline = dagbag.get_dag("recommend_model_pipeline")
    monitor = dagbag.get_dag("triton_monitor_recommend")
    conf = {
        "data_path": str(SAMPLE / "train.tsv"),
        "item_meta_path": str(SAMPLE / "item_meta.tsv"),
        "epochs": 3,
        "sasrec_dim": 16,
        "bpr_epochs": 2,
    }

    state, tasks = _run(pipeline, conf)
    assert state == "success", tasks
    assert tasks["deploy"] == "success", tasks
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1
    assert control.loaded_versions(model) == [1]
    manifest = json.loads((platform.triton_repo / model / "1" / "manifest.json").read_text())
    user = manifest["smoke_request"]["user"]
    healthy = recommend(control, model, user=user, top_k=5)
    assert len(healthy.items) == 5 and healthy.source == "user"
    assert all(category is not None for _, _, category in healthy.items)
    fallback = recommend(control, model, user="no-such-shopper", top_k=5)
    assert fallback.source.startswith("popularity") and "unknown user" in fallback.source

    tags = MlflowClient(tracking_uri=uri).get_model_version(model, "1").tags
    assert tags["family"] == "recommend"
    assert {"data_hash", "gx_result", "params", "git_sha", "metrics", "baselines"} <= set(tags)
    assert set(json.loads(tags["baselines"])) == {"sasrec", "popularity", "itemknn", "bpr"}

    # The same data, seed and params again: no better than the champion, so not deployed.
    state, tasks = _run(pipeline, conf)
    assert state == "success", tasks
    assert tasks["promoted"] == "success" and tasks["deploy"] == "skipped", tasks
    gated = MlflowClient(tracking_uri=uri).get_model_version(model, "2").tags
    assert "keeping the champion" in gated["promotion"]
    assert control.loaded_versions(model) == [1]

    fault = {"mode": "raise", "after_requests": 2}
    state, tasks = _run(pipeline, {**conf, "fault_injection": fault, "force_deploy": True})
    assert state == "success", tasks
    assert registry.alias_version(uri, model, registry.CHAMPION) == 3
    assert registry.alias_version(uri, model, registry.PREVIOUS) == 1
    assert control.loaded_versions(model) == [3]

    monitor_conf = {
        "min_requests": 5,
        "max_error_rate": 0.05,
        "consecutive_windows": 1,
        "check_interval_s": 1,
        "watch_minutes": 5,
    }
    failures = 0
    for _ in range(30):
        try:
            recommend(control, model, user=user, top_k=3)
        except Exception:
            failures += 1
    assert failures >= 25

    state, tasks = _run(monitor, monitor_conf)
    assert state == "success" and tasks["rollback"] == "success", tasks

    assert control.loaded_versions(model) == [1]
    assert recommend(control, model, user=user, top_k=5).items == healthy.items
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1
    bad_tags = MlflowClient(tracking_uri=uri).get_model_version(model, "3").tags
    assert bad_tags[registry.TAG_ROLLED_BACK] == "true"
    assert "error rate" in bad_tags["rollback_reason"]
    actions = [
        (r["action"], r.get("version") or r.get("to_version"))
        for r in read_records(platform.audit_log, model)
    ]
    assert actions == [("deploy", 1), ("deploy", 3), ("rollback", 1)]
    alerts = webhook.all()
    assert [a["title"] for a in alerts] == [f"{model} rolled back from v3 to v1"]
    # The search model was never touched by any of this.
    assert read_records(platform.audit_log, platform.model_name) == []
