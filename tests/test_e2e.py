"""End to end through the real components: both DAGs under Airflow's ``dag.test()``, a real
Triton server, a real MLflow server, real GX suites.

Deploy v1 -> deploy a deliberately broken v2 (it answers its smoke query, then raises in
``execute``) -> drive traffic -> the monitor DAG detects the breach and rolls back to v1; the
served version, the registry aliases and tags, and the audit trail must all agree.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from recsys.families.search.client import search

pytestmark = pytest.mark.e2e


def _run(dag, conf):
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run.state, states


def test_deploy_breach_rollback(platform, dagbag, tiny_bert_dir, homedepot_sample):
    from recsys import registry
    from recsys.audit import read_records
    from recsys.triton.control import TritonControl

    uri = platform.mlflow_tracking_uri
    model = platform.model_name
    control = TritonControl(platform.triton_grpc_url)
    pipeline = dagbag.get_dag("search_model_pipeline")
    monitor = dagbag.get_dag("triton_monitor")
    conf = {
        "data_path": str(homedepot_sample),
        "base_model": str(tiny_bert_dir),
        "epochs": 1,
        "batch_size": 16,
        "max_steps": 5,
        "smoke_query": "angle bracket",
        # A 5-step tiny cross-encoder need not beat its retriever; serve it to test serving.
        "reranker_must_beat_bi_encoder": False,
        # Both served models retrieve with BM25 + dense; the reranker learns from mined
        # hard negatives.
        "retrieval": "hybrid",
        "hard_negatives_per_query": 2,
    }

    state, tasks = _run(pipeline, conf)
    assert state == "success", tasks
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1
    assert control.loaded_versions(model) == [1]
    healthy_answer = search(control, model, "angle bracket", top_k=5)
    assert len(healthy_answer) == 5

    assert tasks["evaluate_baselines"] == "success" and tasks["champion_gate"] == "success"
    reranker_model = f"{model}_reranker"
    assert tasks["deploy_reranker"] == "success", tasks
    assert registry.alias_version(uri, reranker_model, registry.CHAMPION) == 1
    reranked = search(control, reranker_model, "angle bracket", top_k=5)
    assert len(reranked) == 5
    assert [score for _, score in reranked] == sorted((s for _, s in reranked), reverse=True)
    assert tasks["tune_lexical"] == "success" and tasks["mine_hard_negatives"] == "success"
    for served in (model, reranker_model):
        manifest = json.loads((platform.triton_repo / served / "1" / "manifest.json").read_text())
        assert manifest["hybrid"]["method"] == "rrf", served
        assert manifest["lexical"]["stemmer"] in ("english", None), served
    reranker_run = MlflowClient(tracking_uri=uri).get_model_version(reranker_model, "1").run_id
    run_params = MlflowClient(tracking_uri=uri).get_run(reranker_run).data.params
    assert int(run_params["hard_negatives_count"]) > 0

    # The same data, seed and params again: no better than the champion, so not deployed.
    rehearsal = {"train_reranker": False}
    state, tasks = _run(pipeline, {**conf, **rehearsal})
    assert state == "success", tasks
    assert tasks["promoted"] == "success" and tasks["deploy"] == "skipped", tasks
    assert tasks["fine_tune_reranker"] == "skipped", tasks
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1
    gated = MlflowClient(tracking_uri=uri).get_model_version(model, "2").tags
    assert "keeping the champion" in gated["promotion"]
    assert control.loaded_versions(model) == [1]

    fault = {"mode": "raise", "after_requests": 2}
    state, tasks = _run(
        pipeline, {**conf, **rehearsal, "fault_injection": fault, "force_deploy": True}
    )
    assert state == "success", tasks
    assert registry.alias_version(uri, model, registry.CHAMPION) == 3
    assert registry.alias_version(uri, model, registry.PREVIOUS) == 1
    assert control.loaded_versions(model) == [3]

    # The monitor's watch (run inline by dag.test(), as the triggerer runs it) checks every
    # second; a watch without traffic ends after its period with nothing to roll back.
    monitor_conf = {
        "min_requests": 5,
        "max_error_rate": 0.05,
        "consecutive_windows": 1,
        "check_interval_s": 1,
        "watch_minutes": 0.05,
    }
    state, tasks = _run(monitor, monitor_conf)
    assert state == "success" and tasks["rollback"] == "skipped", tasks

    failures = 0
    for i in range(30):
        try:
            search(control, model, f"angle bracket {i}", top_k=3)
        except Exception:
            failures += 1
    assert failures >= 25

    # The deploy stored a fresh baseline, so the first check of the next watch judges v3's
    # failures and ends the watch at once with a rollback due.
    state, tasks = _run(monitor, {**monitor_conf, "watch_minutes": 5})
    assert state == "success" and tasks["rollback"] == "success", tasks

    assert control.loaded_versions(model) == [1]
    assert search(control, model, "angle bracket", top_k=5) == healthy_answer
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1
    assert registry.alias_version(uri, model, registry.PREVIOUS) is None
    bad_tags = MlflowClient(tracking_uri=uri).get_model_version(model, "3").tags
    assert bad_tags[registry.TAG_ROLLED_BACK] == "true"
    assert "error rate" in bad_tags["rollback_reason"]
    lineage = MlflowClient(tracking_uri=uri).get_model_version(model, "1").tags
    assert {"data_hash", "gx_result", "params", "git_sha", "metrics"} <= set(lineage)

    actions = [
        (r["action"], r.get("version") or r.get("to_version"))
        for r in read_records(platform.audit_log, model)
    ]
    assert actions == [("deploy", 1), ("deploy", 3), ("rollback", 1)]
    assert "forced (force_deploy)" in read_records(platform.audit_log, model)[1]["reason"]
