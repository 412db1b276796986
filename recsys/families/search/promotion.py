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

import pandas as pd

from recsys.families.search.evaluation import EvaluationResult, evaluate_embeddings, onnx_embedder

log = logging.getLogger(__name__)


def evaluate_serving_artifacts(
    artifacts_dir: Path,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    positive_threshold: float = 2.33,
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
        )
    return evaluate_embeddings(
        query_embed,
        test_frame,
        catalog,
        product_embed=product_embed,
        positive_threshold=positive_threshold,
    )
