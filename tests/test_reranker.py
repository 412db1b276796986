"""The cross-encoder reranker: fine-tuning, reranking a run, ONNX export, evaluation and a real
Triton server serving a two-stage version, all on the tiny offline BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data import read_relevance_csv, split_by_query
from recsys.families.search.client import SearchError, search
from recsys.families.search.evaluation import onnx_embedder, torch_embedder
from recsys.families.search.export import build_serving_artifacts
from recsys.families.search.family import smoke_check
from recsys.families.search.promotion import evaluate_serving_artifacts
from recsys.families.search.reranker import (
    RerankerParams,
    evaluate_reranked,
    export_reranker_onnx,
    fine_tune_reranker,
    load_cross_encoder,
    onnx_pair_scorer,
    rerank_run,
    torch_pair_scorer,
)
from recsys.triton.control import ModelLoadError, TritonControl
from recsys.triton.repository import (
    COMPLETE_MARKER,
    IncompleteArtifactsError,
    UnsafePathError,
    publish_version,
    validate_artifacts,
)
from tests.triton_testing import (
    CATALOG,
    MAX_QUERY_TOKENS,
    RERANK_CANDIDATES,
    TritonHarness,
    build_test_reranker_artifacts,
    copy_artifacts,
)

MODEL = "product_search_reranker"
N_PRODUCTS = len(CATALOG)


@pytest.fixture(scope="module")
def train_frame(homedepot_sample: Path) -> pd.DataFrame:
    return split_by_query(read_relevance_csv(homedepot_sample), test_fraction=0.2, seed=13).train


@pytest.fixture(scope="module")
def reranker(tiny_bert_dir, train_frame, tmp_path_factory):
    params = RerankerParams(batch_size=16, learning_rate=1e-3, max_steps=6, max_length=48)
    epochs: list[tuple[int, float]] = []
    result = fine_tune_reranker(
        train_frame,
        tiny_bert_dir,
        tmp_path_factory.mktemp("reranker"),
        params,
        on_epoch_end=lambda epoch, loss: epochs.append((epoch, loss)),
    )
    return result, epochs


def test_fine_tuning_writes_a_loadable_cross_encoder(reranker, train_frame):
    result, epochs = reranker
    assert result.steps == 6
    assert result.pairs == len(train_frame)
    assert result.device == "cpu" and not result.mixed_precision
    assert len(result.step_losses) == 6 and all(np.isfinite(result.step_losses))
    assert epochs == [(1, pytest.approx(result.epoch_losses[0]))]
    assert (result.checkpoint_dir / "tokenizer.json").is_file()
    config = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    model = load_cross_encoder(result.checkpoint_dir)
    assert model.config.num_labels == 1

    score = torch_pair_scorer(result.checkpoint_dir, max_length=48)
    logits = score(["cordless drill", "wood stain"], ["drill kit", "mahogany wood stain"])
    assert logits.shape == (2,) and logits.dtype == np.float32 and np.all(np.isfinite(logits))


def test_fine_tuning_refuses_an_empty_frame(tiny_bert_dir, train_frame, tmp_path):
    with pytest.raises(ValueError, match="no judged"):
        fine_tune_reranker(train_frame.head(0), tiny_bert_dir, tmp_path, RerankerParams())


def test_rerank_run_reorders_only_the_candidates():
    run = {
        "q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5},
        "q2": {"a": 0.1, "b": 0.3},
    }
    titles = {"a": "alpha", "b": "bravo", "c": "charlie", "d": "delta", "e": "echo"}
    # The "cross-encoder" prefers longer titles: c (7) > a, b, ... among the top 3.
    calls: list[int] = []

    def score_pairs(queries: list[str], texts: list[str]) -> np.ndarray:
        calls.append(len(queries))
        return np.array([len(t) for t in texts], dtype=np.float32)

    reranked = rerank_run(run, titles, score_pairs, candidates=3)

    assert calls == [5], "all pairs of all queries go to the scorer in one call"
    assert {q: set(r) for q, r in reranked.items()} == {q: set(r) for q, r in run.items()}
    order = sorted(reranked["q1"], key=reranked["q1"].get, reverse=True)
    assert order[:3] == ["c", "a", "b"]  # rescored: charlie (7) > alpha = bravo (5)
    assert order[3:] == ["d", "e"]  # the rest keep the bi-encoder order, below the reranked
    assert min(reranked["q1"][p] for p in "abc") > max(reranked["q1"][p] for p in "de")
    assert sorted(reranked["q2"], key=reranked["q2"].get, reverse=True) == ["b", "a"]
    with pytest.raises(ValueError, match="candidates"):
        rerank_run(run, titles, score_pairs, candidates=0)


def test_onnx_export_matches_torch(reranker, tmp_path):
    import onnxruntime as ort

    from recsys.families.search.encoder import load_tokenizer

    model_dir = reranker[0].checkpoint_dir
    onnx_path = export_reranker_onnx(model_dir, tmp_path / "reranker.onnx", max_length=48)
    inputs = [i.name for i in ort.InferenceSession(str(onnx_path)).get_inputs()]
    assert inputs == ["input_ids", "attention_mask", "token_type_ids"]  # query vs title segments

    load_tokenizer(model_dir).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    queries = ["mahogany stain", "drill", "x" * 300, "cordless drill with two batteries"]
    titles = ["Varathane 1 qt. Wood Stain", "hammer drill bit set", "door knob", "long " * 100]
    served = onnx_pair_scorer(onnx_path, tmp_path / "tokenizer.json", 48)(queries, titles)
    torch_score = torch_pair_scorer(model_dir, 48, device="cpu")
    reference = torch_score(queries, titles)
    np.testing.assert_allclose(served, reference, atol=1e-4)
    # Pairs are batched by length internally; the scores still come back in the caller's order.
    one_by_one = [torch_score([q], [t])[0] for q, t in zip(queries, titles, strict=True)]
    np.testing.assert_allclose(reference, one_by_one, atol=1e-4)


def test_evaluate_reranked_reports_every_metric(reranker, tiny_bert_dir, frames):
    test, catalog = frames
    result = evaluate_reranked(
        torch_embedder(tiny_bert_dir),
        torch_pair_scorer(reranker[0].checkpoint_dir, max_length=48),
        test,
        catalog,
        candidates=10,
    )
    expected = {"ndcg_at_10", "mrr", "recall_at_10", "recall_at_100", "precision", "recall", "f1"}
    expected |= {"accuracy", "score_threshold", "positive_rate"}
    expected |= {f"majority_{key}" for key in ("precision", "recall", "f1", "accuracy")}
    assert set(result.metrics) == expected
    assert all(0.0 <= v <= 1.0 for k, v in result.metrics.items() if k != "score_threshold")
    assert result.queries == test["search_term"].nunique()
    assert result.products == len(catalog)
    assert result.metrics["recall_at_100"] >= result.metrics["recall_at_10"]


# -- serving ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_reranker_artifacts(tmp_path_factory.mktemp("artifacts") / "reranker")


@pytest.fixture(scope="module")
def serving(triton: TritonHarness, control: TritonControl, artifacts: Path) -> Path:
    version_dir = publish_version(triton.repo, MODEL, 1, artifacts)
    control.load_version(MODEL, 1, triton.repo)
    return version_dir


def expected_hits(artifacts: Path, query: str, top_k: int) -> list[tuple[str, float]]:
    """What the served model must answer, computed offline with the platform's own scorers:
    the bi-encoder's best max(candidates, top_k), re-sorted by the cross-encoder's logits."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    section = manifest["reranker"]
    with np.load(artifacts / "products.npz") as products:
        ids, embeddings, titles = products["ids"], products["embeddings"], products["titles"]
    embed = onnx_embedder(
        artifacts / "encoder.onnx", artifacts / "tokenizer.json", manifest["max_query_tokens"]
    )
    scores = embeddings @ embed([query])[0]
    depth = max(section["candidates"], top_k)
    retrieved = np.argsort(-scores, kind="stable")[:depth]
    score_pairs = onnx_pair_scorer(
        artifacts / section["onnx_file"],
        artifacts / section["tokenizer_file"],
        section["max_length"],
    )
    logits = score_pairs([query] * len(retrieved), [str(titles[i]) for i in retrieved])
    order = np.argsort(-logits, kind="stable")[:top_k]
    return [(str(ids[retrieved[i]]), float(logits[i])) for i in order]


def test_export_writes_reranker_files_and_manifest(artifacts: Path):
    manifest = validate_artifacts(artifacts)
    assert manifest["reranker"] == {
        "onnx_file": "reranker.onnx",
        "tokenizer_file": "reranker_tokenizer.json",
        "candidates": RERANK_CANDIDATES,
        "max_length": 32,
        "onnx_inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "scores": "logits",
        "onnx_max_abs_diff": pytest.approx(0.0, abs=1e-3),
    }
    assert manifest["onnx_file"] == "encoder.onnx"
    assert manifest["max_query_tokens"] == MAX_QUERY_TOKENS
    with np.load(artifacts / "products.npz", allow_pickle=False) as products:
        assert products["titles"].dtype.kind == "U"
        assert dict(zip(products["ids"], products["titles"], strict=True)) == CATALOG


def test_served_artifacts_evaluate_like_they_serve(artifacts: Path):
    judged = pd.DataFrame(
        {
            "search_term": [CATALOG["100003"], CATALOG["100010"], "garden hose"],
            "product_uid": ["100003", "100010", "100007"],
            "product_title": [CATALOG["100003"], CATALOG["100010"], CATALOG["100007"]],
            "relevance": [3.0, 3.0, 2.67],
        }
    )
    catalog = pd.DataFrame({"product_uid": list(CATALOG), "product_title": list(CATALOG.values())})
    assert "reranker" in json.loads((artifacts / "manifest.json").read_text())
    result = evaluate_serving_artifacts(artifacts, judged, catalog)
    assert result.queries == 3 and result.products == N_PRODUCTS
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    # Every judged product is among the 36 retrieved, and reranking keeps them all.
    assert result.metrics["recall_at_100"] == 1.0


def test_bi_encoder_only_artifacts_are_unchanged(tiny_bert_dir, frames, tmp_path):
    _, catalog = frames
    out = build_serving_artifacts(
        tiny_bert_dir, catalog.head(20), tmp_path / "plain", model_name="m"
    )
    assert "reranker" not in json.loads((out / "manifest.json").read_text())
    with np.load(out / "products.npz") as products:
        assert set(products.files) == {"ids", "embeddings", "titles"}
    assert not (out / "reranker.onnx").exists()


def test_publish_seals_the_reranker_files(serving: Path, artifacts: Path, triton: TritonHarness):
    names = {p.name for p in serving.iterdir() if p.is_file()}  # not the stub's __pycache__
    assert {"reranker.onnx", "reranker_tokenizer.json", "encoder.onnx", "model.py"} <= names
    seal = json.loads((serving / COMPLETE_MARKER).read_text())
    assert set(seal["sha256"]) == names - {COMPLETE_MARKER}
    assert publish_version(triton.repo, MODEL, 1, artifacts) == serving  # idempotent retry


def test_served_reranking_matches_offline(serving: Path, artifacts: Path, control: TritonControl):
    known = set(CATALOG)
    for query, top_k in [
        (CATALOG["100003"], 3),  # fewer than the candidates: the best of 5 reranked
        ("cordless drill battery", RERANK_CANDIDATES),
        ("garden hose", 8),  # more than the candidates: 8 retrieved and reranked
        ("paint", N_PRODUCTS),  # the whole catalogue
    ]:
        hits = search(control, MODEL, query, top_k=top_k)
        assert len(hits) == top_k
        assert {pid for pid, _ in hits} <= known
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)
        want = expected_hits(artifacts, query, top_k)
        assert dict(hits) == pytest.approx(dict(want), abs=1e-4)
        assert [pid for pid, _ in hits] == [pid for pid, _ in want]
    assert len(smoke_check(control, MODEL, "kitchen faucet", top_k=3)) == 3


def test_bad_requests_still_get_clear_errors(serving: Path, control: TritonControl):
    cases = [
        ("", 5, "QUERY is empty"),
        ("drill", 0, f"TOP_K must be between 1 and {N_PRODUCTS}, got 0"),
        ("drill", N_PRODUCTS + 1, f"TOP_K must be between 1 and {N_PRODUCTS}"),
        (b"\xff\xfe drill", 5, "not valid UTF-8"),
    ]
    for query, top_k, message in cases:
        with pytest.raises(SearchError, match=message):
            search(control, MODEL, query, top_k=top_k)
    assert search(control, MODEL, "drill", top_k=2)


def test_broken_reranker_sections_are_refused(
    serving: Path, artifacts: Path, triton: TritonHarness, control: TritonControl, tmp_path
):
    manifest = json.loads((artifacts / "manifest.json").read_text())
    escaping = copy_artifacts(
        artifacts,
        tmp_path / "escaping",
        reranker={**manifest["reranker"], "onnx_file": "../x.onnx"},
    )
    with pytest.raises(UnsafePathError, match="reranker onnx_file"):
        publish_version(triton.repo, MODEL, 2, escaping)

    missing = copy_artifacts(artifacts, tmp_path / "missing")
    (missing / "reranker_tokenizer.json").unlink()
    with pytest.raises(IncompleteArtifactsError, match=r"reranker_tokenizer\.json"):
        publish_version(triton.repo, MODEL, 2, missing)

    # Titles gone from products.npz: the version publishes but the model refuses to load,
    # and the serving version keeps answering.
    untitled = copy_artifacts(artifacts, tmp_path / "untitled")
    with np.load(artifacts / "products.npz") as products:
        np.savez(untitled / "products.npz", ids=products["ids"], embeddings=products["embeddings"])
    publish_version(triton.repo, MODEL, 3, untitled)
    with pytest.raises(ModelLoadError, match="no titles"):
        control.load_version(MODEL, 3, triton.repo)
    control.load_version(MODEL, 1, triton.repo)
    assert search(control, MODEL, "drill", top_k=2)


def test_export_refuses_bad_reranker_settings(reranker, tiny_bert_dir, frames, tmp_path):
    _, catalog = frames
    with pytest.raises(ValueError, match="rerank_candidates"):
        build_serving_artifacts(
            tiny_bert_dir,
            catalog.head(5),
            tmp_path / "bad",
            model_name="m",
            reranker_dir=reranker[0].checkpoint_dir,
            rerank_candidates=0,
        )


def test_a_reranker_that_does_not_beat_its_retriever_is_kept_out():
    from recsys.families.search.baselines import comparison_table
    from recsys.families.search.pipeline_reranker import require_gain_over_retriever

    def gate(challenger: float, promote: bool = True) -> dict:
        metrics = {"ndcg_at_10": challenger, "mrr": 0.5, "recall_at_10": 0.5, "recall_at_100": 0.9}
        table = comparison_table({"challenger": metrics})
        return {"promote": promote, "reason": "no champion yet", "table": table}

    worse = require_gain_over_retriever(gate(0.32), gate(0.35))
    assert worse["promote"] is False
    assert "does not beat the bi-encoder alone (0.3500)" in worse["reason"]
    assert "no champion yet" in worse["reason"] and worse["bi_encoder_ndcg_at_10"] == 0.35

    better = require_gain_over_retriever(gate(0.40), gate(0.35))
    assert better["promote"] is True and better["reason"] == "no champion yet"
    # Beating the retriever never overrides the champion gate.
    assert require_gain_over_retriever(gate(0.40, promote=False), gate(0.35))["promote"] is False


def test_reranker_model_reuses_the_bi_encoder_export_as_fp32(tmp_path: Path):
    from recsys.families.search.export import copy_fp32_artifacts
    from recsys.families.search.quantization import set_served_encoder
    from tests.triton_testing import build_test_serving_artifacts

    source = build_test_serving_artifacts(tmp_path / "bi", fault_injection="raise")
    set_served_encoder(source, "int8", {"decision": "int8 within margin"})
    copy = copy_fp32_artifacts(source, tmp_path / "reranker", model_name="m_reranker")

    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["model_name"] == "m_reranker"
    assert (manifest["onnx_file"], manifest["precision"]) == ("encoder.onnx", "fp32")
    assert manifest["fault_injection"] is None and "quantization" not in manifest
    for name in ("encoder.onnx", "tokenizer.json", "products.npz", "query_reference.json"):
        assert (copy / name).read_bytes() == (source / name).read_bytes(), name
    assert not (copy / "encoder.int8.onnx").exists()
