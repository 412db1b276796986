"""The recommendation family served for real: export folder, Triton python backend, client.

One tiny SASRec (fitted once on the Amazon Grocery fixture), one version folder and one real
Triton server (with request sampling on) for the module. Every served answer is checked
against onnxruntime run here on the same folder, so the model code, the users table and
the batching are what is tested, not a re-implementation of them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from recsys.families.recommend.client import RecommendError, recommend, smoke_check
from recsys.families.recommend.data import read_interactions, read_item_meta
from recsys.families.recommend.evaluate import (
    build_cases,
    evaluate_full,
    evaluate_sampled,
    sample_negatives,
)
from recsys.families.recommend.export import build_serving_artifacts, score_artifacts
from recsys.families.recommend.sasrec import SASRec, SASRecParams
from recsys.families.recommend.split import ITEM_IDX, USER_IDX, leave_one_out
from recsys.monitoring.metrics import scrape
from recsys.monitoring.query_samples import read_new_samples
from recsys.triton.control import ModelLoadError
from recsys.triton.repository import (
    publish_version,
    smoke_test_version,
    version_serving_config,
)
from tests.triton_testing import copy_artifacts, metric_value, running_triton, settled_value

SAMPLE = Path(__file__).parent / "fixtures" / "amazon_grocery_sample"
PARAMS = SASRecParams(dim=16, blocks=1, heads=1, max_len=20, epochs=3, batch_size=32, lr=5e-3)
MODEL = "item_recommender"
QUEUE_DELAY_US = 50_000
"""Long enough that requests sent together land in one dynamic batch on a busy CI machine."""


@pytest.fixture(scope="module")
def split():
    return leave_one_out(read_interactions(SAMPLE / "train.tsv"))


@pytest.fixture(scope="module")
def item_meta():
    return read_item_meta(SAMPLE / "item_meta.tsv")


@pytest.fixture(scope="module")
def model(split, item_meta):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only spins on a busy machine
    try:
        return SASRec(PARAMS, item_meta=item_meta).fit(split)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifacts(model, split, item_meta, tmp_path_factory) -> Path:
    return build_serving_artifacts(
        model, split, tmp_path_factory.mktemp("recommend") / "artifacts", item_meta=item_meta
    )


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture(scope="module")
def triton(tmp_path_factory, sample_dir):
    """The module's Triton, sampling every valid request (rate 1) into ``sample_dir``."""
    with running_triton(
        tmp_path_factory.mktemp("triton"), query_sample_dir=sample_dir, query_sample_rate=1.0
    ) as harness:
        yield harness


@pytest.fixture(scope="module")
def served(triton, control, artifacts) -> Path:
    """Version 1 of :data:`MODEL`, loaded; yields its version folder."""
    folder = publish_version(
        triton.repo, MODEL, 1, artifacts, serving={"max_queue_delay_us": QUEUE_DELAY_US}
    )
    control.load_version(
        MODEL, 1, triton.repo, config=version_serving_config(triton.repo, MODEL, 1)
    )
    return folder


class Reference:
    """What the served model must answer, computed here with onnxruntime on the folder."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(
            str(folder / "sasrec.onnx"), providers=["CPUExecutionProvider"]
        )
        users = np.load(folder / "users.npz")
        items = np.load(folder / "items.npz")
        self.user_ids = [str(u) for u in users["user_ids"]]
        self.tokens = users["history_tokens"]
        self.indptr, self.seen_items = users["seen_indptr"], users["seen_items"]
        self.item_ids = [str(i) for i in items["item_ids"]]
        self.categories = [str(c) for c in items["categories"]]
        self.popularity = items["popularity"]
        self.max_len = self.tokens.shape[1]

    def seen(self, user: str) -> np.ndarray:
        u = self.user_ids.index(user)
        return self.seen_items[self.indptr[u] : self.indptr[u + 1]]

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        return self.session.run(["SCORES"], {"HISTORY": tokens.reshape(1, -1)})[0][0]

    def top(self, scores: np.ndarray, k: int, exclude: np.ndarray) -> list[tuple[str, float]]:
        scores = scores.astype(np.float32).copy()
        scores[exclude] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [(self.item_ids[i], float(scores[i])) for i in order if np.isfinite(scores[i])]

    def for_user(self, user: str, k: int, exclude_seen: bool = True) -> list[tuple[str, float]]:
        tokens = self.tokens[self.user_ids.index(user)]
        exclude = self.seen(user) if exclude_seen else np.zeros(0, dtype=np.int64)
        return self.top(self.scores(tokens), k, exclude)

    def for_session(self, items: list[int], k: int) -> list[tuple[str, float]]:
        tokens = np.zeros(self.max_len, dtype=np.int64)
        tail = np.asarray(items[-self.max_len :]) + 1
        tokens[self.max_len - len(tail) :] = tail
        return self.top(self.scores(tokens), k, np.unique(items))


@pytest.fixture(scope="module")
def reference(artifacts) -> Reference:
    return Reference(artifacts)


def _assert_same(answer: list[tuple[str, float, str]], expected: list[tuple[str, float]]) -> None:
    assert [item for item, _, _ in answer] == [item for item, _ in expected]
    np.testing.assert_allclose(
        [score for _, score, _ in answer], [score for _, score in expected], rtol=1e-4, atol=1e-4
    )


def _raw_inputs(**tensors: tuple[list[Any], str]) -> list[Any]:
    """gRPC inputs from ``NAME=(nested list, datatype)``, shapes taken from the data, so a test
    can send what :func:`recommend` never would (both inputs, invalid UTF-8, a batch of 2)."""
    inputs = []
    for name, (data, datatype) in tensors.items():
        dtype = {"BYTES": np.object_, "INT32": np.int32, "BOOL": bool}[datatype]
        array = np.array(data, dtype=dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _infer_error(triton, inputs: list[Any]) -> str:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.infer(MODEL, inputs, client_timeout=30)
    except InferenceServerException as exc:
        return exc.message() or ""
    finally:
        client.close()
    raise AssertionError("the request was answered without an error")


# -- the folder, and scoring it offline ------------------------------------------------------


def test_export_writes_the_contract_folder(artifacts, split, item_meta, model):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["family"] == "recommend" and manifest["onnx_file"] == "sasrec.onnx"
    assert manifest["max_len"] == PARAMS.max_len
    assert (manifest["n_items"], manifest["n_users"]) == (split.n_items, split.n_users)
    assert manifest["model"]["dim"] == PARAMS.dim and "fault_injection" not in manifest
    smoke_user = manifest["smoke_request"]["user"]
    assert smoke_user in split.user_index and manifest["smoke_request"]["top_k"] == 5

    items = np.load(artifacts / "items.npz")
    assert list(items["item_ids"]) == [str(i) for i in split.item_ids]
    category = dict(zip(item_meta["item_id"], item_meta["i_category"], strict=True))
    assert list(items["categories"]) == [str(category[i]) for i in split.item_ids]
    counts = split.train[ITEM_IDX].value_counts()
    assert items["popularity"][int(counts.index[0])] == counts.iloc[0]
    assert items["popularity"].sum() == len(split.train)

    users = np.load(artifacts / "users.npz")
    assert list(users["user_ids"]) == sorted(split.user_ids)
    assert users["history_tokens"].shape == (split.n_users, PARAMS.max_len)
    # served histories end with the test item (everything is known when serving); the
    # offline test history ends with the validation item (the test item is held out)
    validation = split.validation.set_index(USER_IDX)[ITEM_IDX]
    test = split.test.set_index(USER_IDX)[ITEM_IDX]
    u = int(next(u for u in test.index if test[u] >= 0 and validation[u] >= 0))
    assert users["history_tokens"][u, -2:].tolist() == [validation[u] + 1, test[u] + 1]
    assert model.histories(np.array([u]), "test")[0, -1] == validation[u] + 1
    every = {*split.train.loc[split.train[USER_IDX] == u, ITEM_IDX], validation[u], test[u]}
    seen = users["seen_items"][users["seen_indptr"][u] : users["seen_indptr"][u + 1]]
    assert set(seen.tolist()) == every

    reference = json.loads((artifacts / "interaction_reference.json").read_text())
    assert reference["n_users"] == split.n_users
    assert sum(reference["bucket_shares"]) == pytest.approx(1.0)
    assert set(reference["item_bucket"]) == set(split.item_ids)
    head = str(split.item_ids[int(np.argmax(np.asarray(split.train_matrix().sum(axis=0))))])
    assert reference["item_bucket"][head] == 0  # the best-seller is in the head bucket


def test_score_artifacts_equals_evaluating_the_fitted_model(artifacts, split, model):
    served = score_artifacts(artifacts, split)
    cases = build_cases(split, "test")
    sampled = evaluate_sampled(model.scorer("test"), cases, sample_negatives(cases, seed=2024))
    full = evaluate_full(model.scorer("test"), cases, ks=(20,))
    fitted = {
        "hr_at_5": sampled["HR@5"],
        "ndcg_at_5": sampled["NDCG@5"],
        "hr_at_10": sampled["HR@10"],
        "ndcg_at_10": sampled["NDCG@10"],
        "recall_at_20": full["Recall@20"],
        "ndcg_at_20": full["NDCG@20"],
    }
    for name, value in fitted.items():
        assert served[name] == pytest.approx(value, abs=1e-4), name
    assert served["n_cases"] == len(cases)


# -- serving -----------------------------------------------------------------------------------


def test_known_user_gets_the_onnx_top_k_without_seen_items(control, served, reference):
    for user in [*reference.user_ids[:3], reference.user_ids[-1]]:
        answer = recommend(control, MODEL, user=user, top_k=10)
        assert answer.source == "user" and answer.version == 1
        _assert_same(answer.items, reference.for_user(user, 10))
        assert not {item for item, _, _ in answer.items} & {
            reference.item_ids[i] for i in reference.seen(user)
        }
        by_id = dict(zip(reference.item_ids, reference.categories, strict=True))
        assert [c for _, _, c in answer.items] == [by_id[i] for i, _, _ in answer.items]


def test_exclude_seen_off_returns_the_plain_top_k(triton, control, served, reference):
    # the user whose plain top 10 holds the most items they already have
    def overlap(user: str) -> int:
        plain = {i for i, _ in reference.for_user(user, 10, exclude_seen=False)}
        return len(plain & {reference.item_ids[i] for i in reference.seen(user)})

    user = max(reference.user_ids, key=overlap)
    assert overlap(user) > 0, "no user's plain top 10 holds a seen item: cannot tell apart"
    plain = recommend(control, MODEL, user=user, top_k=10, exclude_seen=False)
    _assert_same(plain.items, reference.for_user(user, 10, exclude_seen=False))
    excluded = recommend(control, MODEL, user=user, top_k=10, exclude_seen=True)
    _assert_same(excluded.items, reference.for_user(user, 10))
    assert plain.items != excluded.items
    # without EXCLUDE_SEEN (an optional input) seen items are excluded
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inputs = _raw_inputs(USER_ID=([[user.encode()]], "BYTES"), TOP_K=([[10]], "INT32"))
        ids = client.infer(MODEL, inputs, client_timeout=30).as_numpy("ITEM_IDS").reshape(-1)
    finally:
        client.close()
    assert [i.decode() for i in ids] == [item for item, _, _ in excluded.items]


def test_session_history_is_scored_with_unknown_ids_skipped(control, served, reference):
    known = [5, 17, 3]
    history = [
        reference.item_ids[known[0]],
        "no-such-item",
        *[reference.item_ids[i] for i in known[1:]],
    ]
    answer = recommend(control, MODEL, history=history, top_k=7)
    assert answer.source == "session"
    _assert_same(answer.items, reference.for_session(known, 7))
    assert not {item for item, _, _ in answer.items} & set(history)


def test_unknown_user_or_history_falls_back_to_popularity(control, served, reference):
    expected = [reference.item_ids[i] for i in np.argsort(-reference.popularity, kind="stable")[:5]]
    answer = recommend(control, MODEL, user="nobody-we-know", top_k=5)
    assert answer.source == "popularity: unknown user 'nobody-we-know'"
    assert [item for item, _, _ in answer.items] == expected
    assert [s for _, s, _ in answer.items] == sorted((s for _, s, _ in answer.items), reverse=True)
    answer = recommend(control, MODEL, history=["x1", "x2"], top_k=5)
    assert answer.source == "popularity: no known item in HISTORY"
    assert [item for item, _, _ in answer.items] == expected
    assert recommend(control, MODEL, history=[], top_k=5).source == "popularity: empty HISTORY"


def test_bad_requests_get_clear_errors_and_are_counted(triton, control, served):
    def rejected() -> dict[str, float]:
        counters = scrape(triton.metrics_url).models.get((MODEL, "1"))
        return dict(counters.rejected_by_reason) if counters else {}

    before = rejected()
    top_k = ([[5]], "INT32")
    cases = [
        (
            dict(USER_ID=([[b"some-user"]], "BYTES"), TOP_K=([[0]], "INT32")),
            "TOP_K must be between 1 and 100",
        ),
        (
            dict(USER_ID=([[b"some-user"]], "BYTES"), TOP_K=([[101]], "INT32")),
            "TOP_K must be between",
        ),
        (dict(USER_ID=([[b"u"]], "BYTES"), HISTORY=([[b"1"]], "BYTES"), TOP_K=top_k), "not both"),
        (dict(TOP_K=top_k), "send USER_ID (a known user) or HISTORY"),
        (dict(USER_ID=([[b""]], "BYTES"), TOP_K=top_k), "USER_ID is empty"),
        (dict(USER_ID=([[b"\xff\xfe"]], "BYTES"), TOP_K=top_k), "USER_ID is not valid UTF-8"),
        (
            dict(HISTORY=([[b"1", b"\xc3"]], "BYTES"), TOP_K=top_k),
            "HISTORY id 1 is not valid UTF-8",
        ),
        (
            dict(USER_ID=([[b"u"], [b"v"]], "BYTES"), TOP_K=([[5], [5]], "INT32")),
            "batch dimension 2",
        ),
    ]
    oversized = [
        (dict(USER_ID=([[b"u" * 65]], "BYTES"), TOP_K=top_k), "USER_ID is 65 bytes, over"),
        (dict(HISTORY=([[b"1", b"i" * 65]], "BYTES"), TOP_K=top_k), "HISTORY id 1 is 65 bytes"),
        (dict(HISTORY=([[b"1"] * 201], "BYTES"), TOP_K=top_k), "HISTORY holds 201 ids, over"),
    ]
    for tensors, message in cases + oversized:
        assert message in _infer_error(triton, _raw_inputs(**tensors))
    with pytest.raises(RecommendError, match="TOP_K must be between 1 and 100, got 0"):
        recommend(control, MODEL, user="some-user", top_k=0)

    invalid = before.get("invalid_argument", 0) + len(cases) + 1
    assert settled_value(lambda: rejected().get("invalid_argument", 0), invalid) == invalid
    big = before.get("oversized", 0) + len(oversized)
    assert settled_value(lambda: rejected().get("oversized", 0), big) == big


def test_a_bad_request_does_not_fail_its_batch(triton, control, served, reference):
    """Four requests of one shape sent at once share a dynamic batch (the queue waits
    :data:`QUEUE_DELAY_US`); the bad one is refused alone."""
    stats = control.inference_statistics(MODEL, 1)["model_stats"][0]
    executions = int(stats.get("execution_count", 0))
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    users = reference.user_ids[:3]
    requests = [
        _raw_inputs(
            USER_ID=([[u.encode()]], "BYTES"),
            TOP_K=([[k]], "INT32"),
            EXCLUDE_SEEN=([[True]], "BOOL"),
        )
        for u, k in [(users[0], 4), (users[1], 0), (users[2], 4), ("nobody", 4)]
    ]
    results: list[Any] = [None] * len(requests)
    done = threading.Event()
    lock = threading.Lock()

    def callback(index: int, result: Any, error: Any) -> None:
        with lock:
            results[index] = error if error is not None else result
            if all(r is not None for r in results):
                done.set()

    try:
        for index, inputs in enumerate(requests):
            client.async_infer(
                MODEL,
                inputs,
                lambda result, error, i=index: callback(i, result, error),
                client_timeout=30,
            )
        assert done.wait(30)
    finally:
        client.close()
    assert isinstance(results[1], InferenceServerException)
    assert "TOP_K must be between 1 and 100, got 0" in results[1].message()
    for index in (0, 2):
        ids = [i.decode() for i in results[index].as_numpy("ITEM_IDS").reshape(-1)]
        assert ids == [i for i, _ in reference.for_user(users[index], 4)]
    assert results[3].as_numpy("SOURCE").reshape(-1)[0].decode().startswith("popularity")
    stats = control.inference_statistics(MODEL, 1)["model_stats"][0]
    assert int(stats["execution_count"]) - executions < len(requests), "nothing was batched"


def test_smoke_check_accepts_the_export_request_and_refuses_a_fallback(control, served, triton):
    summary = smoke_test_version(control, triton.repo, MODEL, 1)
    assert len(summary) == 3 and all(isinstance(item, str) for item, _, _ in summary)
    manifest = json.loads((served / "manifest.json").read_text())
    answer = smoke_check(control, MODEL, manifest["smoke_request"], version=1)
    assert len(answer.items) == 5 and answer.source == "user" and answer.version == 1
    with pytest.raises(ModelLoadError, match="fell back to popularity"):
        smoke_check(control, MODEL, {"user": "nobody-we-know"}, version=1)
    with pytest.raises(ModelLoadError, match=r"failed: .*TOP_K"):
        smoke_check(control, MODEL, {"user": manifest["smoke_request"]["user"], "top_k": 0})


def test_sampler_writes_request_samples(control, served, sample_dir, reference):
    user = reference.user_ids[7]
    recommend(control, MODEL, user=user, top_k=3)
    recommend(control, MODEL, history=[reference.item_ids[2], "zz-unknown"], top_k=3)
    folder = sample_dir / MODEL / "1"

    def records() -> list[dict[str, Any]]:
        read = read_new_samples(folder, {})  # the platform's reader of the drift check
        assert read.bad_lines == 0
        return read.queries

    def has_both() -> float:
        found = records()
        return float(
            any(r["user"] == user and r["known_user"] and r["source"] == "user" for r in found)
            and any(r["items"] == [reference.item_ids[2], "zz-unknown"] for r in found)
        )

    assert settled_value(has_both, 1.0) == 1.0
    session = next(r for r in records() if r["items"] == [reference.item_ids[2], "zz-unknown"])
    assert session == {
        "known_user": None,
        "user": None,
        "items": [reference.item_ids[2], "zz-unknown"],
        "unknown_items": 1,
        "source": "session",
    }


def test_drift_of_served_requests_is_judged_through_the_platform(
    triton, control, served, sample_dir, reference, split, tmp_path
):
    """The platform's drift check (the one the drift DAG runs) judges the recommender's
    sampled requests with the family's features: ordinary traffic is no drift; a wave of
    unknown shoppers and tail-item sessions is, with a reason per signal."""
    import dataclasses

    from recsys.config import load_settings
    from recsys.monitoring.drift import check_query_drift
    from recsys.monitoring.drift_thresholds import DriftThresholds

    settings = dataclasses.replace(
        load_settings(),
        home=tmp_path / "home",
        triton_repo=triton.repo,
        triton_grpc_port=triton.server.grpc_port,
        triton_http_port=triton.server.http_port,
        triton_metrics_port=triton.server.metrics_port,
        query_sample_dir=sample_dir,
        query_sample_rate=1.0,
        model_name=MODEL,
    )
    thresholds = DriftThresholds(min_queries=40)
    folder = sample_dir / MODEL / "1"

    def sampled() -> int:
        return len(read_new_samples(folder, {}).queries)

    def send(requests: list[dict[str, Any]]) -> None:
        before = sampled()
        for request in requests:
            recommend(control, MODEL, top_k=3, **request)
        assert settled_value(sampled, before + len(requests)) == before + len(requests)

    # Judge (and so consume) what the earlier tests sent, however little it is.
    check_query_drift(settings, version=1, thresholds=DriftThresholds(min_queries=1))
    rng = np.random.default_rng(0)
    trained = split.train[ITEM_IDX].to_numpy()  # items as often as shoppers chose them
    ordinary = [{"user": reference.user_ids[i % 20]} for i in range(30)] + [
        {"history": [reference.item_ids[i] for i in rng.choice(trained, 5)]} for _ in range(60)
    ]
    send(ordinary)
    verdict = check_query_drift(settings, version=1, thresholds=thresholds)
    assert verdict["judged"] and not verdict["drift"], verdict["reasons"]
    assert verdict["stats"]["unknown_user_share"] == 0.0
    assert verdict["stats"]["popularity_psi"] < 0.25

    bucket = json.loads((served / "interaction_reference.json").read_text())["item_bucket"]
    tail = [item for item, b in bucket.items() if b == 9]
    shifted = [{"user": f"new-shopper-{i}"} for i in range(30)] + [
        {"history": list(rng.choice(tail, 5))} for _ in range(60)
    ]
    send(shifted)
    drifted = check_query_drift(settings, version=1, thresholds=thresholds)
    assert drifted["judged"] and drifted["drift"] and drifted["retrain_due"]
    reasons = " | ".join(drifted["reasons"])
    assert "user requests name users the model does not know" in reasons
    assert "popularity shifted" in reasons
    assert drifted["stats"]["served_bucket_shares"][-1] == 1.0


def test_fault_injection_after_requests_makes_execute_raise(
    triton, control, artifacts, reference, tmp_path
):
    faulty_model = "item_recommender_faulty"
    faulty = copy_artifacts(
        artifacts, tmp_path / "faulty", fault_injection={"mode": "raise", "after_requests": 1}
    )
    publish_version(triton.repo, faulty_model, 2, faulty)
    control.load_version(
        faulty_model, 2, triton.repo, config=version_serving_config(triton.repo, faulty_model, 2)
    )
    try:
        smoke_test_version(control, triton.repo, faulty_model, 2)  # the first request passes
        for _ in range(2):
            with pytest.raises(RecommendError, match="injected fault"):
                recommend(control, faulty_model, user=reference.user_ids[0], top_k=3)
        failures = settled_value(
            lambda: metric_value(triton.metrics_url, "failure", faulty_model, "2"), 2.0
        )
        assert failures == 2.0
    finally:
        control.unload(faulty_model)


def test_the_router_serves_the_recommender_and_keeps_each_user_on_one_arm(
    triton, control, served, reference
):
    """The same router as search's, knowing nothing of the family: the user id is the routing
    key, so a shopper sees one version's recommendations for the whole rollout."""
    from recsys.delivery import routing
    from recsys.delivery.client import ask
    from recsys.families import get_family

    family = get_family("recommend")
    publish_version(triton.repo, MODEL, 2, served, serving={"max_queue_delay_us": QUEUE_DELAY_US})
    control.load_versions(MODEL, [1, 2], triton.repo,
                          config=version_serving_config(triton.repo, MODEL, 2))  # fmt: skip
    routing.ensure_router(control, triton.repo, MODEL, "recommend", stable=1)
    routing.update_routing(triton.repo, MODEL, "test", stable=1, candidate=2, mode="canary",
                           candidate_weight=0.5, salt="users", rollout_id="r")  # fmt: skip
    try:
        users = reference.user_ids[:12]
        for user in users:
            answers = [ask(control, MODEL, family, {"user": user, "top_k": 5}) for _ in range(3)]
            expected = "candidate" if routing.key_share("users", user.encode()) < 0.5 else "stable"
            assert {a.arm for a in answers} == {expected}, user
            assert {a.version for a in answers} == {2 if expected == "candidate" else 1}
            assert answers[0].ids == [item for item, _ in reference.for_user(user, 5)]
    finally:
        routing.follow_switch(triton.repo, MODEL, 1, "test over")
        control.load_version(MODEL, 1, triton.repo,
                             config=version_serving_config(triton.repo, MODEL, 1))  # fmt: skip
