"""Progressive delivery end to end: the ``rollout`` DAG under Airflow's ``dag.test()`` (its
analysis runs inline, as the triggerer runs it), a real Triton with the router in front, a real
MLflow, and simulated shoppers from the fixture's held-out queries sending traffic and clicking.

* a faulty canary is aborted at its first step (5%): only shoppers on the candidate arm ever saw
  a failure, the stable version was never touched, one alert names the model;
* a good canary is promoted through every step, with no failed request;
* an A/A experiment (two copies of one model) finds no significant difference, and its result is
  logged to MLflow and tagged on both versions.
"""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from recsys import registry
from recsys.audit import read_records
from recsys.delivery import routing
from recsys.delivery.feedback import FeedbackLog, feedback_log_path
from recsys.delivery.rollout import start_rollout
from recsys.delivery.traffic import ShopperTraffic, visitor_key
from recsys.deploy import deploy_model
from recsys.families import get_family
from recsys.triton.control import TritonControl
from tests.stack_testing import wait_for
from tests.triton_testing import register_version

pytestmark = pytest.mark.e2e

SEARCH = get_family("search")
SMOKE = {"query": "angle bracket", "top_k": 5}
FAST = {"check_interval_s": 0.5, "min_requests": 3, "windows_per_step": 1, "window_s": 2.0}


@pytest.fixture
def artifacts(search_artifacts):
    return search_artifacts


@pytest.fixture
def shoppers(split_files):
    return SEARCH.simulated_shoppers(split_files["test_path"], seed=3)


def _run(dag, conf):
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    finish = next(ti for ti in run.get_task_instances() if ti.task_id == "finish")
    return run.state, states, finish.xcom_pull(task_ids="finish")


def test_a_faulty_canary_is_aborted_at_the_first_step(
    platform, dagbag, webhook, artifacts, shoppers
):
    model, uri = platform.model_name, platform.mlflow_tracking_uri
    control = TritonControl(platform.triton_grpc_url)
    good = artifacts("good")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), SMOKE)
    faulty = artifacts("faulty", fault={"mode": "raise", "after_requests": 3})
    v2 = register_version(platform, faulty)

    # As `recsys deploy --canary` does: start the rollout here, then the DAG takes it over.
    started = start_rollout(platform, v2, str(faulty), weight=0.05, smoke_request=SMOKE)
    assert (started["stable"], started["candidate"], started["weight"]) == (v1, v2, 0.05)
    assert control.loaded_versions(model) == [v1, v2]
    traffic = ShopperTraffic(control, model, SEARCH, shoppers, repo=platform.triton_repo)
    traffic.start()
    began = time.time()
    try:
        state, tasks, result = _run(dagbag.get_dag("rollout"), {"version": v2, **FAST})
        aborted_at = time.time()
        wait_for(
            "20 shopper requests after the abort",
            lambda: len([o for o in traffic.outcomes if o.at > aborted_at]) >= 20,
            30,
            poll_s=0.05,
        )
    finally:
        traffic.stop()
    assert state == "success" and tasks["finish"] == "success", tasks
    assert result["decision"] == "abort" and result["step"] == 5.0, result
    assert "candidate error rate" in " ".join(result["reasons"])

    # Only shoppers whose key puts them on the 5% arm ever failed, and none after the abort.
    salt = started["rollout_id"]
    failed = [o for o in traffic.outcomes if not o.ok]
    assert failed, "the faulty canary was never exercised"
    assert all("injected fault" in o.error for o in failed)
    assert not [o for o in failed if o.at > aborted_at]
    counts = traffic.counts(since=began)
    assert counts["failed"] / counts["requests"] <= 0.15, counts
    candidate_visitors = {
        v
        for v in range(traffic.visitors)
        if routing.key_share(salt, visitor_key(v).encode()) < 0.05
    }
    assert 0 < len(candidate_visitors) < 0.1 * traffic.visitors

    # The stable version never stopped serving and never failed; the candidate is gone.
    assert control.loaded_versions(model) == [v1]
    assert {o.version for o in traffic.outcomes if o.ok} <= {v1, v2}
    assert [o.version for o in traffic.outcomes if o.ok][-20:] == [v1] * 20
    assert registry.alias_version(uri, model, registry.CHAMPION) == v1
    assert registry.alias_version(uri, model, "candidate") is None
    tags = MlflowClient(tracking_uri=uri).get_model_version(model, str(v2)).tags
    assert tags["rollout_result"] == "aborted" and "error rate" in tags["rollout_reason"]
    after = routing.read_routing(platform.triton_repo, model)
    assert not after.active and after.stable == v1
    actions = [r["action"] for r in read_records(platform.audit_log, model)]
    assert actions == ["deploy", "rollout_start", "rollout_abort"]
    alerts = webhook.all()
    assert len(alerts) == 1 and alerts[0]["model"] == model, alerts
    assert "aborted" in alerts[0]["title"] and alerts[0]["version"] == v2


def test_a_good_canary_is_promoted_through_every_step(platform, dagbag, artifacts, shoppers):
    model, uri = platform.model_name, platform.mlflow_tracking_uri
    control = TritonControl(platform.triton_grpc_url)
    good = artifacts("good")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), SMOKE)
    v2 = register_version(platform, artifacts("good-again"))
    # The router in front before the rollout (the first rollout would create it), so shoppers
    # use it from their first request; v2's folder is rebuilt from MLflow by the DAG's start.
    routing.ensure_router(control, platform.triton_repo, model, "search", stable=v1)
    traffic = ShopperTraffic(control, model, SEARCH, shoppers, repo=platform.triton_repo)
    traffic.start()
    try:
        conf = {"version": v2, "steps": [10, 50, 100], "smoke_request": SMOKE, **FAST}
        state, tasks, result = _run(dagbag.get_dag("rollout"), conf)
    finally:
        traffic.stop()
    assert state == "success" and tasks["start"] == "success", tasks
    assert result["decision"] == "promote", result
    assert "every step passed (10%, 50%, 100%" in result["reasons"][0]
    assert traffic.counts()["failed"] == 0
    assert {o.version for o in traffic.outcomes if o.ok} == {v1, v2}

    assert control.loaded_versions(model) == [v2]
    assert registry.alias_version(uri, model, registry.CHAMPION) == v2
    assert registry.alias_version(uri, model, registry.PREVIOUS) == v1
    final = routing.read_routing(platform.triton_repo, model)
    assert not final.active and final.stable == v2
    weights = [h.get("candidate_weight") for h in final.history if "candidate_weight" in h]
    assert [w for w in weights if w][:4] == [0.1, 0.5, 1.0, 1.0], final.history
    run = MlflowClient(tracking_uri=uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["decision"] == "promote"
    assert run.data.metrics["candidate_requests"] > 0
    actions = [r["action"] for r in read_records(platform.audit_log, model)]
    assert actions == ["deploy", "rollout_start", "rollout_promote"]


def test_an_a_a_experiment_finds_no_difference_and_is_logged(platform, dagbag, artifacts, shoppers):
    model, uri = platform.model_name, platform.mlflow_tracking_uri
    control = TritonControl(platform.triton_grpc_url)
    good = artifacts("good")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), SMOKE)
    v2 = register_version(platform, good)  # the same model twice: A/A
    start_rollout(platform, v2, str(good), mode="experiment", weight=0.5, salt="a-a-test")
    feedback = FeedbackLog(feedback_log_path(platform.home, model))
    # A fixed salt, seeded shoppers and clicks, one request at a time: the same run every time.
    traffic = ShopperTraffic(
        control, model, SEARCH, shoppers, repo=platform.triton_repo, feedback=feedback,
        max_requests=800, seed=11,
    )  # fmt: skip
    traffic.start()
    traffic.join(300)
    traffic.stop()
    assert traffic.counts()["failed"] == 0 and len(traffic.outcomes) == 800

    conf = {"version": v2, "mode": "experiment", "sample_size": 800, "min_impressions": 200,
            **FAST, "window_s": 0.5}  # fmt: skip
    state, tasks, result = _run(dagbag.get_dag("rollout"), conf)
    assert state == "success" and tasks["start"] == "success", tasks  # taken over
    assert result["decision"] == "end", result
    comparison = result["comparison"]
    assert comparison["decision"] == "no_significant_difference", comparison["summary"]
    assert not comparison["significant"] and comparison["p_value"] > 0.05
    arms = (comparison["stable"], comparison["candidate"])
    assert all(arm["impressions"] >= 200 for arm in arms)
    assert sum(arm["impressions"] for arm in arms) == 800
    assert all(0 < arm["rate"] < 1 for arm in arms)

    assert control.loaded_versions(model) == [v1]
    assert registry.alias_version(uri, model, registry.CHAMPION) == v1
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mode"] == "experiment" and run.data.tags["decision"] == "end"
    assert {"stable_rate", "candidate_rate", "p_value"} <= set(run.data.metrics)
    for version in (v1, v2):
        tags = client.get_model_version(model, str(version)).tags
        assert tags["rollout_experiment_run_id"] == run.info.run_id
        assert "no_significant_difference" in tags["rollout_experiment_result"] or (
            "end" in tags["rollout_experiment_result"]
        )
    actions = [r["action"] for r in read_records(platform.audit_log, model)]
    assert actions == ["deploy", "rollout_start", "rollout_end"]


def _oracle(source, target, shoppers):
    """A copy of a search folder whose product embeddings are the embeddings of the held-out
    queries that judge them relevant (grade >= 2), so each query finds its own relevant
    products first: a model the simulated shoppers click a lot (the tiny random BERT alone
    ranks little better than chance)."""
    import shutil

    import numpy as np

    from recsys.families.search.query_features import query_embeddings

    shutil.copytree(source, target)
    with np.load(target / "products.npz") as products:
        arrays = {name: products[name] for name in products.files}
    index = {str(pid): i for i, pid in enumerate(arrays["ids"])}
    queries = [shoppers[i] for i in range(len(shoppers))]
    vectors = query_embeddings(target, [q.query for q in queries], 64)
    embeddings = arrays["embeddings"].copy()
    for shopper, vector in zip(queries, vectors, strict=True):
        for pid, grade in shopper.judged.items():
            if grade >= 2.0 and pid in index:
                embeddings[index[pid]] = vector.astype(np.float32)
    arrays["embeddings"] = embeddings
    np.savez(target / "products.npz", **arrays)
    return target


def _scrambled(source, target):
    """A copy of a search folder whose product ids are shuffled against their embeddings: it
    loads, answers and passes its smoke test, but ranks the wrong products (a model that is
    healthy to Triton and bad for shoppers)."""
    import shutil

    import numpy as np

    shutil.copytree(source, target)
    with np.load(target / "products.npz") as products:
        arrays = {name: products[name] for name in products.files}
    order = np.random.default_rng(0).permutation(len(arrays["ids"]))
    arrays["ids"], arrays["titles"] = arrays["ids"][order], arrays["titles"][order]
    np.savez(target / "products.npz", **arrays)
    return target


def test_a_canary_that_shoppers_click_less_is_aborted_on_online_quality(
    platform, dagbag, artifacts, shoppers, tmp_path
):
    model = platform.model_name
    control = TritonControl(platform.triton_grpc_url)
    good = _oracle(artifacts("tiny"), tmp_path / "oracle", shoppers)
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), SMOKE)
    worse = _scrambled(good, tmp_path / "scrambled")
    v2 = register_version(platform, worse)
    start_rollout(platform, v2, str(worse), weight=0.5, salt="worse")
    feedback = FeedbackLog(feedback_log_path(platform.home, model))
    traffic = ShopperTraffic(control, model, SEARCH, shoppers, repo=platform.triton_repo,
                             feedback=feedback, seed=5)  # fmt: skip
    traffic.start()
    try:
        conf = {"version": v2, "steps": [50, 100], "require_not_worse": True,
                "min_impressions": 150, **FAST}  # fmt: skip
        state, tasks, result = _run(dagbag.get_dag("rollout"), conf)
    finally:
        traffic.stop()
    assert state == "success", tasks
    assert result["decision"] == "abort" and result["step"] == 50.0, result
    assert result["reasons"][0].startswith("online quality: CTR candidate")
    assert result["comparison"]["decision"] == "candidate_worse"
    assert traffic.counts()["failed"] == 0  # healthy to Triton: only the clicks tell
    assert control.loaded_versions(model) == [v1]


def test_a_shadow_mirrors_traffic_and_reports_its_top_k_overlap(
    platform, dagbag, artifacts, shoppers
):
    model = platform.model_name
    control = TritonControl(platform.triton_grpc_url)
    good = artifacts("good")
    v1 = register_version(platform, good)
    deploy_model(platform, v1, str(good), SMOKE)
    v2 = register_version(platform, good)
    routing.ensure_router(control, platform.triton_repo, model, "search", stable=v1)
    traffic = ShopperTraffic(control, model, SEARCH, shoppers, repo=platform.triton_repo)
    traffic.start()
    try:
        conf = {"version": v2, "mode": "shadow", "shadow_share": 1.0, "duration_minutes": 0.1,
                **FAST}  # fmt: skip
        state, tasks, result = _run(dagbag.get_dag("rollout"), conf)
    finally:
        traffic.stop()
    assert state == "success", tasks
    assert result["decision"] == "end", result
    shadow = result["shadow"]
    assert shadow["ok"] > 0 and shadow.get("error", 0) == 0
    assert shadow["overlap"] == pytest.approx(1.0)  # the same model: the same top-k
    assert {o.version for o in traffic.outcomes if o.ok} == {v1}  # shoppers saw only stable
    # Both counted over the analysis: every mirrored answer is one request of the candidate.
    assert result["totals"]["candidate"]["requests"] == pytest.approx(shadow["ok"], abs=5)
    assert control.loaded_versions(model) == [v1]
    actions = [r["action"] for r in read_records(platform.audit_log, model)]
    assert actions == ["deploy", "rollout_start", "rollout_end"]


def test_the_pipelines_deploy_can_start_a_canary_and_hand_it_to_the_rollout_dag(
    platform, dagbag, artifacts
):
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    from recsys.model_pipeline import deploy_or_roll_out

    good = artifacts("good")
    v1 = register_version(platform, good)
    first = deploy_or_roll_out(platform, v1, str(good), {}, SMOKE, "first")
    assert first["rollout_conf"] is None and first["version"] == v1
    v2 = register_version(platform, good)
    values = {"rollout": "canary", "canary_steps": [10, 100]}
    started = deploy_or_roll_out(platform, v2, str(good), values, SMOKE, "challenger")
    assert started["rollout_conf"] == {"version": v2, "mode": "canary", "smoke_request": SMOKE,
                                       "steps": [10.0, 100.0]}  # fmt: skip
    assert routing.read_routing(platform.triton_repo, platform.model_name).candidate_weight == 0.1
    for dag_id, target in (("search_model_pipeline", "rollout"),
                           ("recommend_model_pipeline", "rollout_recommend")):  # fmt: skip
        trigger = dagbag.get_dag(dag_id).get_task("start_rollout_analysis")
        assert isinstance(trigger, TriggerDagRunOperator) and trigger.trigger_dag_id == target
        assert dagbag.get_dag(target).params["version"] is None


def test_a_candidate_that_cannot_answer_never_takes_traffic(platform, artifacts):
    from recsys.delivery.rollout import RolloutError
    from recsys.triton.control import ModelLoadError

    model = platform.model_name
    control = TritonControl(platform.triton_grpc_url)
    good = artifacts("good")
    v1 = register_version(platform, good)
    with pytest.raises(RolloutError, match="Triton serves nothing"):
        start_rollout(platform, v1, str(good))
    deploy_model(platform, v1, str(good), SMOKE)
    with pytest.raises(RolloutError, match="already serves"):
        start_rollout(platform, v1, None)
    broken = artifacts("broken", fault="raise")  # fails its smoke query
    v2 = register_version(platform, broken)
    with pytest.raises(ModelLoadError, match=f"canary of {model} v{v2} did not start"):
        start_rollout(platform, v2, str(broken), smoke_request=SMOKE)
    assert control.loaded_versions(model) == [v1]
    assert routing.read_routing(platform.triton_repo, model) is None  # no router was put up
    actions = [r["action"] for r in read_records(platform.audit_log, model)]
    assert actions == ["deploy", "rollout_start_failed"]
