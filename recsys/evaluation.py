"""Offline evaluation of a bi-encoder on held-out queries.

Ranking metrics come from ranx (a maintained IR metrics library) so NDCG/Recall/MRR follow the
standard TREC definitions; classification metrics from scikit-learn. Human relevance (1-3,
averaged over raters) becomes an integer gain 0-6 so that NDCG rewards exact matches more than
partial ones, and the binary metrics count a product as relevant at ``positive_threshold``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

RANKING_DEPTH = 100


def relevance_grade(relevance: float) -> int:
    """Map a 1-3 rater average to a 0-6 integer gain (1 -> 0, 1.33 -> 1, ..., 3 -> 6)."""
    return round((float(relevance) - 1.0) * 3.0)


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, float]
    queries: int
    products: int

    def summary(self) -> str:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.metrics.items()))
        return f"{self.queries} queries over {self.products} products: {shown}"


def _ranx_metrics(
    test_frame: pd.DataFrame,
    query_texts: list[str],
    query_emb: np.ndarray,
    product_ids: list[str],
    product_emb: np.ndarray,
    positive_grade: int,
    k_values: tuple[int, ...],
) -> dict[str, float]:
    from ranx import Qrels, Run, evaluate

    qrels_dict: dict[str, dict[str, int]] = {}
    for query, pid, rel in zip(
        test_frame["search_term"],
        test_frame["product_uid"].astype(str),
        test_frame["relevance"],
        strict=True,
    ):
        grade = relevance_grade(rel)
        if grade > 0:
            qrels_dict.setdefault(query, {})[pid] = max(
                grade, qrels_dict.get(query, {}).get(pid, 0)
            )
    scores = query_emb @ product_emb.T
    depth = min(RANKING_DEPTH, len(product_ids))
    run_dict: dict[str, dict[str, float]] = {}
    for row, query in enumerate(query_texts):
        top = np.argpartition(-scores[row], depth - 1)[:depth]
        run_dict[query] = {product_ids[i]: float(scores[row, i]) for i in top}
    qrels = Qrels(qrels_dict)
    run = Run({q: r for q, r in run_dict.items() if q in qrels_dict})
    names = [f"ndcg@{k_values[0]}", "mrr"] + [f"recall@{k}" for k in k_values]
    names = [f"{n}-l{positive_grade}" if not n.startswith("ndcg") else n for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = evaluate(qrels, run, names, make_comparable=True)
    return {name.split("-l")[0].replace("@", "_at_"): float(v) for name, v in values.items()}


def evaluate_encoder(
    model_dir: Path,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    k_values: tuple[int, ...] = (10, 100),
    positive_threshold: float = 2.33,
    score_threshold: float = 0.5,
    max_length: int = 64,
) -> EvaluationResult:
    """Rank the whole ``catalog`` for every held-out query and score the judged pairs.

    ``catalog`` should hold every product the shop would serve (train and test), so the held-out
    queries compete against distractors exactly as in production.
    """
    from sklearn.metrics import precision_recall_fscore_support

    from recsys.encoder import BiEncoder, encode_texts, load_tokenizer
    from recsys.training import pick_device

    device = pick_device()
    model = BiEncoder.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    query_texts = sorted(test_frame["search_term"].astype(str).unique())
    product_ids = catalog["product_uid"].astype(str).tolist()
    encode = {"max_length": max_length, "device": device}
    query_emb = encode_texts(model, tokenizer, query_texts, desc="embed queries", **encode).numpy()
    product_emb = encode_texts(
        model,
        tokenizer,
        catalog["product_title"].astype(str).tolist(),
        desc="embed products",
        **encode,
    ).numpy()

    positive_grade = relevance_grade(positive_threshold)
    metrics = _ranx_metrics(
        test_frame, query_texts, query_emb, product_ids, product_emb, positive_grade, k_values
    )

    query_row = {q: i for i, q in enumerate(query_texts)}
    product_row = {p: i for i, p in enumerate(product_ids)}
    q_idx = test_frame["search_term"].astype(str).map(query_row).to_numpy()
    p_idx = test_frame["product_uid"].astype(str).map(product_row).to_numpy()
    pair_scores = np.einsum("ij,ij->i", query_emb[q_idx], product_emb[p_idx])
    labels = test_frame["relevance"].to_numpy() >= positive_threshold
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pair_scores >= score_threshold, average="binary", zero_division=0
    )
    metrics.update({"precision": float(precision), "recall": float(recall), "f1": float(f1)})
    result = EvaluationResult(metrics=metrics, queries=len(query_texts), products=len(product_ids))
    log.info("evaluation: %s", result.summary())
    return result
