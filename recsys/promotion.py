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
from typing import NamedTuple

import pandas as pd

from recsys.evaluation import EvaluationResult, evaluate_embeddings, onnx_embedder

log = logging.getLogger(__name__)


class PromotionDecision(NamedTuple):
    promote: bool
    reason: str


def should_promote(
    challenger_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    metric: str = "ndcg_at_10",
    min_gain: float = 0.0,
) -> PromotionDecision:
    """Promote when the challenger beats the champion on ``metric`` by more than ``min_gain``
    (``min_gain=0``: any strict improvement; a tie keeps the champion, since a swap costs a
    deploy and risks a regression for nothing). No champion: promote."""
    if metric not in challenger_metrics:
        raise KeyError(f"challenger metrics lack {metric!r}: {sorted(challenger_metrics)}")
    challenger = float(challenger_metrics[metric])
    if champion_metrics is None:
        return PromotionDecision(True, f"no champion yet; challenger {metric}={challenger:.4f}")
    if metric not in champion_metrics:
        raise KeyError(f"champion metrics lack {metric!r}: {sorted(champion_metrics)}")
    champion = float(champion_metrics[metric])
    gain = challenger - champion
    if gain > min_gain:
        return PromotionDecision(
            True,
            f"challenger {metric}={challenger:.4f} beats champion {champion:.4f} "
            f"by {gain:+.4f} (> min_gain {min_gain:.4f})",
        )
    return PromotionDecision(
        False,
        f"challenger {metric}={challenger:.4f} vs champion {champion:.4f}: gain {gain:+.4f} "
        f"is not > min_gain {min_gain:.4f}; keeping the champion",
    )


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
    from recsys.triton.repository import served_onnx_file

    artifacts_dir = Path(artifacts_dir)
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    max_length = int(manifest.get("max_query_tokens", 64))
    tokenizer = artifacts_dir / "tokenizer.json"
    query_embed = onnx_embedder(artifacts_dir / served_onnx_file(manifest), tokenizer, max_length)
    product_embed = onnx_embedder(artifacts_dir / "encoder.onnx", tokenizer, max_length)
    if "reranker" in manifest:
        from recsys.reranker import evaluate_reranked, onnx_pair_scorer

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
