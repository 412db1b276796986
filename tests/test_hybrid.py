"""Hybrid retrieval (BM25 + dense, fused), hard-negative mining and training profiles.

The served test is the one that matters: a hybrid version folder published and loaded in a real
Triton answers exactly what the champion gate scored offline for it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from recsys.families.search.hybrid import (
    HYBRID_FILE,
    LEXICAL_FILES,
    FusionConfig,
    LexicalConfig,
    LexicalHits,
    LexicalIndex,
    fuse,
    fuse_sparse,
)

TITLES = [
    "steel angle bracket 2 in.",
    "wood deck screws 3 in.",
    "shelf brackets white",
    "cordless drill 18v",
    "galvanized joist hanger",
]


def test_stemming_lets_a_plural_query_find_the_singular_title_and_the_index_round_trips(tmp_path):
    stemmed = LexicalIndex.build(TITLES, LexicalConfig())
    scores = stemmed.scores(["brackets", "screw", "zzz unknown"])
    assert set(np.flatnonzero(scores[0])) == {0, 2}  # "bracket" and "brackets"
    assert set(np.flatnonzero(scores[1])) == {1}
    assert not scores[2].any()  # no shared term: no BM25 score at all
    plain = LexicalIndex.build(TITLES, LexicalConfig(stemmer=None))
    assert set(np.flatnonzero(plain.scores(["brackets"])[0])) == {2}

    stemmed.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(LEXICAL_FILES)
    loaded = LexicalIndex.load(tmp_path, products=len(TITLES))
    assert loaded.config == stemmed.config
    np.testing.assert_array_equal(loaded.scores(["brackets"]), stemmed.scores(["brackets"]))
    with pytest.raises(ValueError, match="covers 5 products, not 6"):
        LexicalIndex.load(tmp_path, products=6)


def test_fusion_rewards_agreement_and_adds_what_only_bm25_finds():
    dense = np.array([[0.9, 0.8, 0.1, 0.7, 0.0]], dtype=np.float32)
    lexical = np.array([[0.0, 5.0, 4.0, 0.0, 0.0]], dtype=np.float32)
    config = FusionConfig(method="rrf", depth=2)
    indices, scores = fuse(dense, lexical, config, 3)
    # Product 1 is in both lists; 0 tops the dense list; 2 only BM25 finds (dense ranks it 4th).
    assert indices.tolist() == [[1, 0, 2]]
    assert scores[0, 0] == pytest.approx(1 / 62 + 1 / 61)
    assert list(scores[0]) == sorted(scores[0], reverse=True)

    dense_only = fuse(dense, lexical, FusionConfig(method="weighted", dense_weight=1.0), 3)[0]
    assert dense_only.tolist() == [[0, 1, 3]]
    bm25_only = fuse(dense, lexical, FusionConfig(method="weighted", dense_weight=0.0), 2)[0]
    assert bm25_only.tolist() == [[1, 2]]

    with pytest.raises(ValueError, match="fusion method"):
        FusionConfig(method="max")
    with pytest.raises(ValueError, match="differ"):
        fuse(dense, lexical[:, :4], config, 3)


def test_the_top_k_bm25_path_ranks_exactly_as_the_full_score_path(frames):
    """What serves (BM25 hits of the queries' terms, fusion over the union of the dense and
    BM25 top-``depth`` lists) equals the full-array reference: same BM25 values to the bit,
    same top-k products in the same order with the same fused scores, for both fusions."""
    test, catalog = frames
    titles = [*TITLES, *catalog["product_title"].astype(str)]
    index = LexicalIndex.build(titles, LexicalConfig(k1=0.9, b=0.4))
    queries = [*sorted(set(test["search_term"].astype(str)))[:60], "zzz unknown", "brackets"]
    full = index.scores(queries)
    hits = index.sparse_scores(queries)
    reference = LexicalHits.from_dense(full)
    np.testing.assert_array_equal(hits.indptr, reference.indptr)
    np.testing.assert_array_equal(hits.docs, reference.docs)
    np.testing.assert_array_equal(hits.values, reference.values)  # bit for bit
    assert hits.row(len(queries) - 2)[0].size == 0  # no shared term: no hit at all

    rng = np.random.default_rng(3)
    dense = rng.standard_normal((len(queries), len(titles))).astype(np.float32)
    dense[:, ::7] = dense[:, :1]  # ties in the dense scores must break the same way too
    for config in (
        FusionConfig(method="rrf", depth=15),
        FusionConfig(method="weighted", depth=15, dense_weight=0.3),
        FusionConfig(method="rrf", depth=len(titles) + 5),  # deeper than the catalogue
    ):
        for k in (1, 10, 40):
            want = fuse(dense, full, config, k)
            got = fuse_sparse(dense, hits, config, k)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        # The first results do not depend on how many are asked (a client's 10, the gate's 100),
        # even when more are asked than the fusion depth.
        few, many = fuse_sparse(dense, hits, config, 10), fuse_sparse(dense, hits, config, 40)
        np.testing.assert_array_equal(many[0][:, :10], few[0])
        np.testing.assert_array_equal(many[1][:, :10], few[1])
    batch = slice(5, 17)  # one request's rows of a dynamic batch
    np.testing.assert_array_equal(
        fuse_sparse(dense[batch], hits.rows(batch), FusionConfig(depth=20), 10)[0],
        fuse(dense[batch], full[batch], FusionConfig(depth=20), 10)[0],
    )
    with pytest.raises(ValueError, match="BM25 hits for"):
        fuse_sparse(dense[:3], hits, FusionConfig(), 3)


def test_a_hybrid_version_serves_in_triton_exactly_what_the_gate_scored(
    platform, search_artifacts, frames
):
    from recsys.deploy import deploy_model
    from recsys.families.search.client import search
    from recsys.families.search.evaluation import judged_queries, onnx_embedder
    from recsys.families.search.export import add_hybrid
    from recsys.families.search.promotion import evaluate_serving_artifacts, served_retriever
    from recsys.triton.control import TritonControl
    from tests.triton_testing import register_version

    test, catalog = frames
    dense_folder = search_artifacts("dense")
    hybrid_folder = dense_folder.parent / "hybrid"
    shutil.copytree(dense_folder, hybrid_folder)
    add_hybrid(hybrid_folder, {"k1": 0.9, "b": 0.4}, {"method": "rrf", "depth": 50})
    manifest = json.loads((hybrid_folder / "manifest.json").read_text())
    assert manifest["hybrid"]["method"] == "rrf" and manifest["lexical"]["k1"] == 0.9
    for name in (*LEXICAL_FILES, HYBRID_FILE):
        assert (hybrid_folder / name).is_file()

    version = register_version(platform, hybrid_folder)
    deploy_model(platform, version, str(hybrid_folder), {"query": "angle bracket", "top_k": 5})
    control = TritonControl(platform.triton_grpc_url)
    queries = judged_queries(test)[:12]
    served = {q: [pid for pid, _ in search(control, platform.model_name, q, 10)] for q in queries}

    # Offline, through the folder's own hybrid.py: the gate's retriever.
    retrieve = served_retriever(hybrid_folder, manifest, catalog)
    embed = onnx_embedder(hybrid_folder / "encoder.onnx", hybrid_folder / "tokenizer.json")
    product_ids = catalog["product_uid"].astype(str).tolist()
    run = retrieve(
        queries, embed(queries), product_ids, embed(catalog["product_title"].tolist()), 10
    )
    offline = {q: sorted(run[q], key=lambda pid: -run[q][pid]) for q in queries}
    assert served == offline

    hybrid_ndcg = evaluate_serving_artifacts(hybrid_folder, test, catalog).metrics["ndcg_at_10"]
    dense_ndcg = evaluate_serving_artifacts(dense_folder, test, catalog).metrics["ndcg_at_10"]
    assert hybrid_ndcg != dense_ndcg  # the gate really scored the fused ranking
    # BM25 rescues the untrained tiny encoder: hybrid must rank far better than dense alone.
    assert hybrid_ndcg > dense_ndcg


def test_hard_negatives_come_from_the_window_and_are_never_judged(tiny_bert_dir, homedepot_sample):
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.evaluation import torch_embedder
    from recsys.families.search.hard_negatives import MiningParams, mine_hard_negatives

    frame = read_relevance_csv(homedepot_sample)
    catalog = product_catalog(frame)
    train = frame[frame["search_term"].isin(sorted(frame["search_term"].unique())[:40])]
    embed = torch_embedder(tiny_bert_dir)
    params = MiningParams(per_query=3, min_rank=2, max_rank=12, seed=7)
    negatives = mine_hard_negatives(embed, train, catalog, params)
    assert negatives == mine_hard_negatives(embed, train, catalog, params)  # seeded

    title_of = dict(zip(catalog["product_uid"].astype(str), catalog["product_title"], strict=True))
    judged = train.groupby("search_term")["product_uid"].apply(lambda s: set(s.astype(str)))
    per_query = pd.Series([q for q, _ in negatives]).value_counts()
    assert set(per_query.index) == set(train["search_term"].unique())
    assert per_query.max() <= 3
    product_emb = embed(catalog["product_title"].astype(str).tolist())
    for query, title in negatives[:30]:
        judged_titles = {title_of[pid] for pid in judged[query]}
        assert title not in judged_titles
        scores = embed([query])[0] @ product_emb.T
        order = [str(catalog["product_title"].iloc[i]) for i in np.argsort(-scores, kind="stable")]
        assert 2 <= order.index(title) + 1 <= 12

    assert mine_hard_negatives(embed, train, catalog, MiningParams(per_query=0)) == []
    with pytest.raises(ValueError, match="min_rank <= max_rank"):
        MiningParams(min_rank=10, max_rank=5)


def test_a_profile_fills_the_defaults_but_never_overrides_what_the_user_set(dagbag):
    from recsys.families.search.profiles import PROFILES, UnknownProfileError, apply_profile

    declared = dagbag.get_dag("search_model_pipeline").params
    defaults = {key: declared[key] for key in declared}
    for name, profile in PROFILES.items():
        assert set(profile) <= set(defaults), name  # every profile key is a real DAG param

    chosen = {**defaults, "profile": "gpu", "learning_rate": 1e-3}
    resolved = apply_profile(chosen, defaults)
    assert resolved["batch_size"] == PROFILES["gpu"]["batch_size"]
    assert resolved["retrieval"] == "hybrid"
    assert resolved["learning_rate"] == 1e-3  # set by the user: wins over the profile
    assert apply_profile({**defaults, "profile": "custom"}, defaults) == {
        **defaults,
        "profile": "custom",
    }
    with pytest.raises(UnknownProfileError, match="choose one of custom, cpu, gpu"):
        apply_profile({**defaults, "profile": "tpu"}, defaults)


def test_ort_device_cuda_without_the_cuda_provider_fails_the_load_with_a_clear_error(
    monkeypatch, tmp_path, search_artifacts
):
    """``RECSYS_ORT_DEVICE=cuda`` (the compose GPU override) must never serve on the CPU
    unnoticed: without onnxruntime's CUDA provider the load fails and says why. With the
    provider (a GPU host running onnxruntime-gpu) the same load serves on CUDA."""
    import onnxruntime as ort

    from recsys.families.search.client import search
    from recsys.triton.control import ModelLoadError, TritonControl
    from recsys.triton.repository import publish_version
    from tests.triton_testing import running_triton

    folder = search_artifacts("dense")
    monkeypatch.setenv("RECSYS_ORT_DEVICE", "cuda")
    with running_triton(tmp_path / "triton") as triton:
        publish_version(triton.repo, "search_cuda", 1, folder)
        control = TritonControl(f"127.0.0.1:{triton.server.grpc_port}")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            control.load_version("search_cuda", 1, triton.repo)
            assert len(search(control, "search_cuda", "angle bracket", 3)) == 3
        else:
            with pytest.raises(ModelLoadError, match="RECSYS_ORT_DEVICE=cuda but this onnxrun"):
                control.load_version("search_cuda", 1, triton.repo)


def test_weighted_fusion_without_a_weight_gets_one_tuned_on_the_training_queries(
    tiny_bert_dir, homedepot_sample, tmp_path
):
    from recsys.families.search import pipeline

    validated = pipeline.validate_data(str(homedepot_sample), tmp_path)
    split = pipeline.split_data(validated["clean_path"], tmp_path, 0.2, 13)
    exported = pipeline.export_model(
        split,
        str(tiny_bert_dir),
        tmp_path,
        "x",
        None,
        quantize=False,
        retrieval="hybrid",
        lexical={"k1": 0.9, "b": 0.5},
        fusion={"method": "weighted", "depth": 50, "dense_weight": None},
    )
    manifest = json.loads((tmp_path / "serving" / "manifest.json").read_text())
    assert exported["retrieval"] == "hybrid"
    assert manifest["hybrid"]["method"] == "weighted"
    assert manifest["hybrid"]["dense_weight"] in pipeline.DENSE_WEIGHT_GRID
    assert manifest["lexical"] == {"k1": 0.9, "b": 0.5, "stemmer": "english", "stopwords": "en"}
    with pytest.raises(ValueError, match="retrieval must be one of"):
        pipeline.export_model(
            split, str(tiny_bert_dir), tmp_path / "again", "x", None, quantize=False,
            retrieval="sparse",
        )  # fmt: skip
