"""Every DAG in ``dags/`` keeps the platform's conventions, and the pipeline exposes every
hyperparameter of both models as a trigger param."""

from __future__ import annotations

import dataclasses

import pytest


def test_every_dag_follows_the_conventions(dagbag):
    assert dagbag.dags, "no DAG imported"
    for dag_id, dag in dagbag.dags.items():
        assert dag.catchup is False, dag_id
        assert dag.max_active_runs == 1, dag_id
        assert dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        for task in dag.tasks:
            assert task.retries is not None, (dag_id, task.task_id)
        assert any(task.retries >= 1 for task in dag.tasks), dag_id


@pytest.mark.parametrize(
    "params_class, prefix",
    [("recsys.training:TrainingParams", ""), ("recsys.reranker:RerankerParams", "reranker_")],
)
def test_every_hyperparameter_is_a_pipeline_param(dagbag, params_class, prefix):
    import importlib

    module, name = params_class.split(":")
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    shared = {"positive_threshold", "seed"}  # one value for both models of a run
    renamed = {"reranker_candidates": "rerank_candidates"}
    params = dagbag.get_dag("search_model_pipeline").params
    for field in fields:
        key = field if field in shared else prefix + field
        key = renamed.get(key, key)
        assert key in params, f"{name}.{field} has no DAG param {key!r}"


def test_the_pipeline_gates_deploys_on_the_champion(dagbag):
    dag = dagbag.get_dag("search_model_pipeline")
    gate, deploy = dag.get_task("promoted"), dag.get_task("deploy")
    assert "champion_gate" in gate.upstream_task_ids
    assert "promoted" in deploy.upstream_task_ids
    assert "reranker_promoted" in dag.get_task("deploy_reranker").upstream_task_ids
    assert dag.params["force_deploy"] is False
