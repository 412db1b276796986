"""The INT8 cross-encoder: exported beside the fp32 graph, named by the manifest, served by a
real Triton behind hybrid retrieval, and answering what the champion gate scores offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.families.search.client import search
from recsys.families.search.evaluation import judged_queries, onnx_embedder
from recsys.families.search.export import add_hybrid, add_reranker, build_serving_artifacts
from recsys.families.search.promotion import evaluate_serving_artifacts, served_retriever
from recsys.families.search.reranker import onnx_pair_scorer, rerank_run
from recsys.triton.control import TritonControl
from recsys.triton.repository import publish_version

MODEL = "product_search_int8_reranker"
CANDIDATES = 8


@pytest.fixture(scope="module")
def folder(tiny_bert_dir, frames, tmp_path_factory) -> Path:
    """A hybrid + INT8 reranker folder (the tiny BERT as both encoders; the cross-encoder's head
    is untrained, which changes what it ranks, not how it is exported or served). Fusion depth
    100 (the default): the gate fuses ``max(depth, 100)``-deep lists, as serving does then."""
    from recsys.families.search.encoder import load_tokenizer
    from recsys.families.search.reranker import load_cross_encoder

    _, catalog = frames
    work = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)  # one saved head: a base model gets a fresh random one at every load
    load_cross_encoder(tiny_bert_dir).save_pretrained(str(work / "cross_encoder"))
    load_tokenizer(tiny_bert_dir).save_pretrained(str(work / "cross_encoder"))
    out = build_serving_artifacts(
        tiny_bert_dir,
        catalog,
        work / "reranker",
        model_name=MODEL,
        reranker_dir=work / "cross_encoder",
        rerank_candidates=CANDIDATES,
        rerank_max_length=48,
        rerank_precision="int8",
    )
    return add_hybrid(out, {"k1": 0.9, "b": 0.4}, {"method": "rrf", "depth": 100})


def test_the_manifest_serves_the_int8_cross_encoder_and_keeps_the_fp32_one(folder: Path):
    section = json.loads((folder / "manifest.json").read_text())["reranker"]
    assert section["onnx_file"] == "reranker.int8.onnx"
    assert section["fp32_onnx_file"] == "reranker.onnx"
    assert section["precision"] == "int8"
    assert (folder / "reranker.int8.onnx").is_file() and (folder / "reranker.onnx").is_file()
    assert section["int8_onnx_bytes"] < section["fp32_onnx_bytes"] / 2
    assert 0.0 <= section["int8_max_abs_diff"] < 0.5  # close to fp32, yet really quantised
    with pytest.raises(ValueError, match="rerank precision"):
        add_reranker(folder.parent / "x", folder, None, precision="fp16")


def test_triton_serves_the_int8_reranker_as_the_gate_scores_it(
    folder: Path, frames, triton, control: TritonControl
):
    test, catalog = frames
    manifest = json.loads((folder / "manifest.json").read_text())
    section = manifest["reranker"]
    publish_version(triton.repo, MODEL, 1, folder)
    control.load_version(MODEL, 1, triton.repo)
    queries = judged_queries(test)[:10]
    served = {q: search(control, MODEL, q, top_k=5) for q in queries}

    # The gate's own path: the folder's hybrid.py over the catalogue, its INT8 cross-encoder,
    # with the catalogue embeddings the folder serves (RRF ties break by the dense score, so
    # re-embedding the titles could reorder tied candidates at the rerank cut).
    retrieve = served_retriever(folder, manifest, catalog)
    embed = onnx_embedder(folder / "encoder.onnx", folder / "tokenizer.json")
    with np.load(folder / "products.npz") as products:
        product_ids = [str(i) for i in products["ids"]]
        titles = [str(t) for t in products["titles"]]
        product_emb = products["embeddings"]
    assert titles == catalog["product_title"].astype(str).tolist()
    run = retrieve(queries, embed(queries), product_ids, product_emb, 100)
    scorer = onnx_pair_scorer(folder / section["onnx_file"], folder / section["tokenizer_file"], 48)
    offline = rerank_run(run, dict(zip(product_ids, titles, strict=True)), scorer, CANDIDATES)

    for query, hits in served.items():
        head = sorted(offline[query].items(), key=lambda item: (-item[1], item[0]))[:CANDIDATES]
        logits = dict(head)
        assert [pid for pid, _ in hits] and {pid for pid, _ in hits} <= set(logits), query
        spread = max(1.0, max(logits.values()) - min(logits.values()))
        # Dynamic INT8 scales activations per call, so a pair's logit moves a little with the
        # batch it is scored in (served: Triton's batch, chunked by length; gate: 64 pairs).
        tolerance = 0.05 * spread
        for pid, score in hits:
            assert score == pytest.approx(logits[pid], abs=tolerance), (query, pid)
        want = [pid for pid, _ in head[: len(hits)]]
        for got_pid, want_pid in zip([pid for pid, _ in hits], want, strict=True):
            # Same order, except where two logits are closer than the INT8 jitter.
            assert abs(logits[got_pid] - logits[want_pid]) <= tolerance, (query, got_pid)

    result = evaluate_serving_artifacts(folder, test, catalog)
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
