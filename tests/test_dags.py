"""Every DAG in ``dags/`` keeps the platform's conventions, and the pipeline exposes every
hyperparameter of both models as a trigger param."""

from __future__ import annotations

import dataclasses

import pytest


def test_every_dag_follows_the_conventions(dagbag):
    from recsys.alerts import FailureAlert
    from recsys.scheduling import pool_slots

    pools = set(pool_slots())
    assert dagbag.dags, "no DAG imported"
    for dag_id, dag in dagbag.dags.items():
        assert dag.catchup is False, dag_id
        assert dag.max_active_runs == 1, dag_id
        assert dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        # One failure, one alert: tasks alert, the DAG run does not repeat it.
        assert not dag.has_on_failure_callback, dag_id
        for task in dag.tasks:
            assert task.retries is not None, (dag_id, task.task_id)
            assert task.pool in pools, (dag_id, task.task_id, task.pool)
            assert task.weight_rule == "absolute", (dag_id, task.task_id)
            callbacks = task.on_failure_callback
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            assert any(isinstance(c, FailureAlert) for c in callbacks), (dag_id, task.task_id)
        if dag_id.startswith("triton_monitor"):
            # Never retried: the next scheduled watch (seconds later) is the watch's retry,
            # and a second rollback attempt after a partial one would plan from the wrong
            # serving version.
            assert all(task.retries == 0 for task in dag.tasks), dag_id
        else:
            assert any(task.retries >= 1 for task in dag.tasks), dag_id


def test_monitoring_outranks_everything_and_training_cannot_fill_the_executor(dagbag):
    """The isolation rules, statically: monitor tasks are the only ones in the monitoring pool
    and have the highest priority; the other pools together leave the reserved slots free."""
    from recsys.scheduling import (
        MONITORING_POOL,
        RESERVED_MONITORING_SLOTS,
        TRAINING_POOL,
        executor_parallelism,
        pool_slots,
    )

    monitoring, others = [], []
    for dag in dagbag.dags.values():
        for task in dag.tasks:
            (monitoring if task.pool == MONITORING_POOL else others).append(task)
    monitors = {"triton_monitor", "triton_monitor_reranker", "triton_monitor_recommend"}
    assert {t.dag_id for t in monitoring} == monitors
    assert min(t.priority_weight for t in monitoring) > max(t.priority_weight for t in others)
    for dag_id in ("search_model_pipeline", "recommend_model_pipeline"):
        assert {t.pool for t in dagbag.get_dag(dag_id).tasks} == {TRAINING_POOL}, dag_id
    capped = sum(n for pool, n in pool_slots().items() if pool != MONITORING_POOL)
    assert executor_parallelism() - capped == RESERVED_MONITORING_SLOTS >= 2
    # The monitors watch from a fresh stack on; the pipeline waits to be asked.
    for dag_id in (*monitors, "query_drift", "input_drift_recommend"):
        assert dagbag.get_dag(dag_id).is_paused_upon_creation is False, dag_id


def test_every_task_is_routed_to_the_queue_of_its_kind_of_work(dagbag):
    """Queues (CeleryExecutor: one worker each): training work on ``training``, register and
    deploy on ``serving``, the monitor, its rollback, a rollout's analysis and finish and the
    drift checks on ``monitoring`` -- as the scheduler sees them, after serialization."""
    from airflow.serialization.serialized_objects import DagSerialization

    from recsys.scheduling import (
        MONITORING_QUEUE,
        QUEUES,
        SERVING_QUEUE,
        TRAINING_QUEUE,
    )

    queues: dict[str, dict[str, str]] = {}
    for dag_id, dag in dagbag.dags.items():
        serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        queues[dag_id] = {task.task_id: task.queue for task in serialized.tasks}
        assert queues[dag_id] == {task.task_id: task.queue for task in dag.tasks}, dag_id
        for task_id, queue in queues[dag_id].items():
            assert queue in QUEUES, (dag_id, task_id, queue)

    def on(dag_id: str, queue: str) -> set[str]:
        return {task_id for task_id, q in queues[dag_id].items() if q == queue}

    for dag_id, training in {
        "search_model_pipeline": {"validate_data", "fine_tune", "fine_tune_reranker",
                                  "evaluate", "export_onnx", "champion_gate", "reranker_gate"},
        "recommend_model_pipeline": {"validate_data", "train", "evaluate", "export", "gate"},
    }.items():  # fmt: skip
        serving = on(dag_id, SERVING_QUEUE)
        registered = {"register", "promoted", "deploy", "rolled_out", "start_rollout_analysis"}
        if dag_id == "search_model_pipeline":  # the reranker model's own versions
            registered |= {"register_reranker", "reranker_promoted", "deploy_reranker"}
        assert serving == registered, (dag_id, serving)
        assert training <= on(dag_id, TRAINING_QUEUE), dag_id
        assert on(dag_id, MONITORING_QUEUE) == set(), dag_id
    monitors = [dag_id for dag_id in queues if dag_id.startswith("triton_monitor")]
    assert len(monitors) == 3
    for dag_id in monitors:
        assert queues[dag_id] == {"watch_metrics": MONITORING_QUEUE, "rollback": MONITORING_QUEUE}
    rollouts = [dag_id for dag_id in queues if dag_id.startswith("rollout")]
    assert len(rollouts) == 3
    for dag_id in rollouts:
        assert queues[dag_id] == {
            "start": SERVING_QUEUE,
            "analyze": MONITORING_QUEUE,
            "finish": MONITORING_QUEUE,
        }, dag_id
    for dag_id in ("query_drift", "input_drift_recommend"):
        assert set(queues[dag_id].values()) == {MONITORING_QUEUE}, dag_id


@pytest.mark.parametrize(
    "params_class, prefix",
    [
        ("recsys.families.search.training:TrainingParams", ""),
        ("recsys.families.search.reranker:RerankerParams", "reranker_"),
    ],
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


def test_the_reranker_waits_for_the_bi_encoder_only_when_it_mines_hard_negatives(dagbag):
    """Hard negatives come from this run's bi-encoder, so mining follows ``fine_tune``; without
    them (the default) the reranker trains beside the bi-encoder, one training slot each."""
    dag = dagbag.get_dag("search_model_pipeline")
    mine, reranker = dag.get_task("mine_hard_negatives"), dag.get_task("fine_tune_reranker")
    assert {"fine_tune", "hard_negatives_wanted"} <= mine.upstream_task_ids
    assert "fine_tune" not in reranker.upstream_task_ids
    assert "mine_hard_negatives" in reranker.upstream_task_ids
    assert reranker.trigger_rule == "none_failed_min_one_success"  # runs when mining is skipped
    assert dag.params["hard_negatives_per_query"] == 0


def test_every_param_of_the_trigger_forms_says_what_it_is_for(dagbag):
    """The Airflow trigger form shows each param's description next to it: a param without one
    is a number a user has to guess at."""
    for dag_id in ("search_model_pipeline", "recommend_model_pipeline"):
        params = dagbag.get_dag(dag_id).params
        missing = [key for key in params if not (params.get_param(key).description or "").strip()]
        assert not missing, (dag_id, missing)
