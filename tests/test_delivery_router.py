"""The router model in a real Triton: weighted and sticky splits through BLS, the version and arm
in every answer, fallback when a pinned version is gone, shadow mirroring, and the monitor
leaving a rollout's candidate to its analysis."""

from __future__ import annotations

import collections
import json

import pytest
import requests

from recsys.delivery import routing
from recsys.delivery.client import RoutedRequestError, ask
from recsys.families import get_family
from recsys.triton.repository import publish_version, version_serving_config
from tests.triton_testing import (
    CATALOG,
    build_test_serving_artifacts,
    copy_artifacts,
    settled_value,
)

MODEL = "routed_search"
QUERY = {"query": "extension ladder aluminum", "top_k": 3}
SEARCH = get_family("search")


@pytest.fixture(scope="module")
def versions(triton, control, tmp_path_factory):
    """v1 healthy, v2 a copy that raises in ``execute``, v3 another healthy copy; v1 serves
    alone behind the router."""
    root = tmp_path_factory.mktemp("router")
    healthy = build_test_serving_artifacts(root / "healthy")
    faulty = copy_artifacts(healthy, root / "faulty", fault_injection={
        "mode": "raise", "after_requests": 1})  # fmt: skip
    publish_version(triton.repo, MODEL, 1, healthy)
    publish_version(triton.repo, MODEL, 2, faulty)
    publish_version(triton.repo, MODEL, 3, healthy)
    control.load_version(
        MODEL, 1, triton.repo, config=version_serving_config(triton.repo, MODEL, 1)
    )
    routing.ensure_router(control, triton.repo, MODEL, "search", stable=1)
    return triton.repo


def _serve(control, repo, versions_, **split):
    control.load_versions(
        MODEL, versions_, repo, config=version_serving_config(repo, MODEL, max(versions_))
    )
    return routing.update_routing(repo, MODEL, "test", **split)


def _counter(metrics_url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(requests.get(metrics_url, timeout=5).text):
        for sample in family.samples:
            if sample.name.removesuffix("_total") == name.removesuffix("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def test_without_a_rollout_every_answer_comes_from_the_stable_version(control, versions):
    answer = ask(control, MODEL, SEARCH, QUERY)
    assert (answer.version, answer.arm) == (1, "stable")
    assert answer.ids[0] in CATALOG and len(answer.ids) == 3
    direct = ask(control, MODEL, SEARCH, QUERY, routing_key="shopper-1")
    assert direct.ids == answer.ids and direct.request_id != answer.request_id


def test_a_sticky_split_keeps_each_shopper_on_one_arm_as_the_weight_grows(
    control, versions, triton
):
    split = _serve(control, versions, [1, 3], stable=1, candidate=3, mode="canary",
                   candidate_weight=0.3, salt="sticky-test", rollout_id="r-sticky")  # fmt: skip
    try:
        arms: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
        for _ in range(3):
            for user in range(40):
                answer = ask(control, MODEL, SEARCH, QUERY, routing_key=f"user-{user}")
                arms[f"user-{user}"].add((answer.arm, answer.version))
        assert all(len(seen) == 1 for seen in arms.values()), arms
        expected = {
            user: ("candidate", 3) if routing.key_share(split.salt, user.encode()) < 0.3
            else ("stable", 1)
            for user in arms
        }  # fmt: skip
        assert {u: next(iter(s)) for u, s in arms.items()} == expected
        on_candidate = {u for u, arm in expected.items() if arm[0] == "candidate"}
        assert 0 < len(on_candidate) < 40

        routing.update_routing(versions, MODEL, "grow", candidate_weight=0.6)
        grown = {u: ask(control, MODEL, SEARCH, QUERY, routing_key=u).arm for u in arms}
        assert all(grown[u] == "candidate" for u in on_candidate), "a canary user fell back"
        assert sum(arm == "candidate" for arm in grown.values()) > len(on_candidate)
    finally:
        routing.follow_switch(versions, MODEL, 1, "test over")
        control.load_version(MODEL, 1, versions, config=version_serving_config(versions, MODEL, 1))


def test_requests_without_a_key_are_split_by_weight(control, versions, triton):
    _serve(control, versions, [1, 3], stable=1, candidate=3, mode="experiment",
           candidate_weight=0.5, salt="s", rollout_id="r-random")  # fmt: skip
    labels = {"target": MODEL, "arm": "candidate"}
    before = _counter(triton.metrics_url, "recsys_router_requests_total", **labels)
    try:
        arms = collections.Counter(ask(control, MODEL, SEARCH, QUERY).arm for _ in range(200))
        assert 60 <= arms["candidate"] <= 140, arms  # binomial(200, 0.5): 6 sigma either side
        forwarded = _counter(triton.metrics_url, "recsys_router_requests_total", **labels)
        assert forwarded - before == arms["candidate"]
    finally:
        routing.follow_switch(versions, MODEL, 1, "test over")
        control.load_version(MODEL, 1, versions, config=version_serving_config(versions, MODEL, 1))


def test_a_failing_candidate_fails_only_its_own_requests_and_triton_counts_them_per_version(
    control, versions, triton
):
    _serve(control, versions, [1, 2], stable=1, candidate=2, mode="canary",
           candidate_weight=0.25, salt="f", rollout_id="r-fault")  # fmt: skip
    before = _counter(triton.metrics_url, "nv_inference_request_failure", model=MODEL, version="2")
    try:
        outcomes = collections.Counter()
        for user in range(80):
            key = f"u{user}"
            try:
                ask(control, MODEL, SEARCH, QUERY, routing_key=key)
                outcomes["ok"] += 1
            except RoutedRequestError as exc:
                assert "injected fault" in str(exc)
                outcomes["failed"] += 1
                assert routing.key_share("f", key.encode()) < 0.25  # only candidate users fail

        def failures_v2() -> float:
            return _counter(
                triton.metrics_url, "nv_inference_request_failure", model=MODEL, version="2"
            )

        assert outcomes["failed"] >= 5
        expected = before + outcomes["failed"]
        assert settled_value(failures_v2, expected) == expected
        stable_failures = _counter(
            triton.metrics_url, "nv_inference_request_failure", model=MODEL, version="1"
        )
        assert stable_failures == 0
    finally:
        routing.follow_switch(versions, MODEL, 1, "test over")
        control.load_version(MODEL, 1, versions, config=version_serving_config(versions, MODEL, 1))


def test_a_request_pinned_to_an_unloaded_version_falls_back_instead_of_failing(
    control, versions, triton
):
    _serve(control, versions, [1, 3], stable=1, candidate=3, mode="canary",
           candidate_weight=1.0, salt="g", rollout_id="r-gone")  # fmt: skip
    control.load_version(MODEL, 1, versions, config=version_serving_config(versions, MODEL, 1))
    before = _counter(triton.metrics_url, "recsys_router_fallbacks_total", target=MODEL)
    try:
        answers = [ask(control, MODEL, SEARCH, QUERY, routing_key=f"k{i}") for i in range(5)]
        assert {(a.arm, a.version) for a in answers} == {("default", 0)}
        assert all(a.ids[0] in CATALOG for a in answers)
        after = _counter(triton.metrics_url, "recsys_router_fallbacks_total", target=MODEL)
        assert after - before == 5
    finally:
        routing.follow_switch(versions, MODEL, 1, "test over")


def test_shadow_mirrors_traffic_and_measures_top_k_overlap(control, versions, triton):
    _serve(control, versions, [1, 3], stable=1, candidate=3, mode="shadow",
           shadow_share=1.0, salt="h", rollout_id="r-shadow")  # fmt: skip
    try:
        answers = [ask(control, MODEL, SEARCH, QUERY) for _ in range(20)]
        assert {(a.arm, a.version) for a in answers} == {("stable", 1)}

        def mirrored() -> float:
            return _counter(triton.metrics_url, "recsys_shadow_compared_total", target=MODEL)

        assert settled_value(mirrored, 20.0) == 20.0
        overlap = _counter(triton.metrics_url, "recsys_shadow_topk_overlap_total", target=MODEL)
        assert overlap == pytest.approx(20.0)  # the same model: the same top-k every time
        success_v3 = _counter(
            triton.metrics_url, "nv_inference_request_success", model=MODEL, version="3"
        )
        assert success_v3 >= 20
    finally:
        routing.follow_switch(versions, MODEL, 1, "test over")
        control.load_version(MODEL, 1, versions, config=version_serving_config(versions, MODEL, 1))


def test_a_corrupt_routing_file_keeps_the_last_split_and_is_counted(control, versions, triton):
    path = routing.routing_path(versions, MODEL)
    good = path.read_text()
    try:
        path.write_text("{not json")
        answer = ask(control, MODEL, SEARCH, QUERY)
        assert (answer.arm, answer.version) == ("stable", 1)
        assert _counter(triton.metrics_url, "recsys_router_config_errors_total") >= 1
        with pytest.raises(routing.RoutingError, match="unreadable"):
            routing.read_routing(versions, MODEL)
    finally:
        path.write_text(good)


def test_routing_changes_are_validated_and_counted(versions):
    before = routing.read_routing(versions, MODEL)
    with pytest.raises(routing.RoutingError, match="candidate_weight"):
        routing.update_routing(versions, MODEL, "bad", candidate_weight=1.5)
    with pytest.raises(routing.RoutingError, match="needs both"):
        routing.update_routing(versions, MODEL, "bad", mode="canary", candidate=None)
    after = routing.read_routing(versions, MODEL)
    assert after == before  # a refused change writes nothing
    updated = routing.update_routing(versions, MODEL, "noted", shadow_share=0.0)
    assert updated.generation == before.generation + 1
    assert json.loads(routing.routing_path(versions, MODEL).read_text())["history"][-1]["why"] == (
        "noted"
    )


def test_the_monitor_leaves_out_a_rollout_candidate(tmp_path):
    from recsys.monitoring.metrics import parse_metrics
    from recsys.monitoring.policy import Thresholds, check_once

    def text(failures_v2: int, success: int) -> str:
        return (
            f'nv_inference_request_success{{model="m",version="1"}} {success}\n'
            f'nv_inference_request_failure{{model="m",reason="BACKEND",version="1"}} 0\n'
            f'nv_inference_request_success{{model="m",version="2"}} 0\n'
            f'nv_inference_request_failure{{model="m",reason="BACKEND",version="2"}} '
            f"{failures_v2}\n"
        )

    import http.server
    import threading

    bodies = [text(0, 0), text(30, 100)]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.pop(0).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        assert parse_metrics(text(1, 1), 0.0).models
        state = tmp_path / "state.json"
        limits = Thresholds(min_requests=5)
        check_once(url, "m", state, limits, exclude_versions=frozenset({"2"}))
        verdict = check_once(url, "m", state, limits, exclude_versions=frozenset({"2"}))
        assert verdict.judged and not verdict.breached, verdict.reasons
        assert verdict.stats.version == "1" and verdict.stats.requests == 100
        assert any("v2 left out" in r for r in verdict.reasons)
    finally:
        server.shutdown()


def test_router_instances_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(routing.ROUTER_INSTANCES_ENV, raising=False)
    assert routing.router_instances_from_env() == routing.DEFAULT_ROUTER_INSTANCES
    monkeypatch.setenv(routing.ROUTER_INSTANCES_ENV, "8")
    assert routing.router_config("m", "search", max_batch_size=8,
                                 instance_count=routing.router_instances_from_env(),
                                 )["instance_group"][0]["count"] == 8  # fmt: skip
    for bad in ("0", "-1", "four"):
        monkeypatch.setenv(routing.ROUTER_INSTANCES_ENV, bad)
        with pytest.raises(ValueError, match="RECSYS_ROUTER_INSTANCES"):
            routing.router_instances_from_env()
