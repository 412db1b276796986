"""Champion/challenger: a new model replaces the serving one only if it is better on the SAME
held-out queries.

Metrics recorded when the champion was trained came from that run's own split, so comparing
them with a challenger's is comparing two different exams. Both models are therefore re-scored
here on the challenger's held-out set, through their ONNX serving artifacts (the encoder the
manifest serves for queries, the fp32 encoder for the catalogue, as at export), i.e. what each
one would actually serve.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.families.search.evaluation import (
    EvaluationResult,
    RetrieveFn,
    evaluate_embeddings,
    onnx_embedder,
)

log = logging.getLogger(__name__)


def evaluate_serving_artifacts(
    artifacts_dir: Path,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    positive_threshold: float = 2.33,
    calibration_frame: pd.DataFrame | None = None,
) -> EvaluationResult:
    """Score a serving-artifacts or published version folder as it serves: queries through the
    encoder its manifest names (fp32 or INT8), the catalogue through its fp32 ``encoder.onnx``,
    and, for a reranker model (a ``reranker`` manifest section), the top candidates through its
    cross-encoder."""
    from recsys.families.search.family import served_onnx_file

    artifacts_dir = Path(artifacts_dir)
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    max_length = int(manifest.get("max_query_tokens", 64))
    tokenizer = artifacts_dir / "tokenizer.json"
    query_embed = onnx_embedder(artifacts_dir / served_onnx_file(manifest), tokenizer, max_length)
    product_embed = onnx_embedder(artifacts_dir / "encoder.onnx", tokenizer, max_length)
    retrieve = served_retriever(artifacts_dir, manifest, catalog)
    if "reranker" in manifest:
        from recsys.families.search.reranker import evaluate_reranked, onnx_pair_scorer

        section = manifest["reranker"]
        if not isinstance(section, dict):
            raise ValueError(f"{artifacts_dir}/manifest.json has a malformed reranker section")
        return evaluate_reranked(
            query_embed,
            onnx_pair_scorer(
                artifacts_dir / Path(section["onnx_file"]).name,
                artifacts_dir / Path(section["tokenizer_file"]).name,
                int(section["max_length"]),
            ),
            test_frame,
            catalog,
            candidates=int(section["candidates"]),
            positive_threshold=positive_threshold,
            product_embed=product_embed,
            retrieve=retrieve,
            calibration_frame=calibration_frame,
        )
    return evaluate_embeddings(
        query_embed,
        test_frame,
        catalog,
        product_embed=product_embed,
        positive_threshold=positive_threshold,
        retrieve=retrieve,
        calibration_frame=calibration_frame,
    )


def served_retriever(
    artifacts_dir: Path, manifest: dict[str, Any], catalog: pd.DataFrame
) -> RetrieveFn | None:
    """How the folder retrieves: ``None`` (dense) or, with a ``hybrid`` section, its fusion of
    dense and BM25 scores, run by the folder's own ``hybrid.py`` (the code Triton runs) with its
    own tokenisation and BM25 parameters (``bm25.lexical.json``).

    The BM25 index is rebuilt over ``catalog``'s titles, as the product embeddings are
    re-computed over them: a champion exported from another catalogue is scored on the same
    products as the challenger (for the challenger it is the very index it serves)."""
    section = manifest.get("hybrid")
    if section is None:
        return None
    from recsys.families.search.evaluation import catalog_hybrid_retriever
    from recsys.families.search.hybrid import load_folder_copy

    folder = Path(artifacts_dir)
    module = load_folder_copy(folder, "recsys_gate_hybrid")
    return catalog_hybrid_retriever(
        catalog["product_title"].astype(str).tolist(),
        json.loads((folder / module.LEXICAL_CONFIG_FILE).read_text()),
        section,
        module,
    )
