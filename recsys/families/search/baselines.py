"""Baselines a fine-tuned model has to beat, scored on the same held-out queries.

A fine-tuned encoder is only worth serving if it beats what the shop gets for free: lexical
BM25 over product titles (``bm25s``, a maintained sparse-retrieval library) and the off-the-shelf
base model it was fine-tuned from. All systems go through :func:`.evaluation.ranking_metrics`
so the comparison table's rows are comparable by construction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.families.search.evaluation import (
    RANKING_DEPTH,
    EvaluationResult,
    RunDict,
    evaluate_encoder,
    judged_queries,
    ranking_metrics,
    relevance_grade,
)

log = logging.getLogger(__name__)

TABLE_KEYS = ("ndcg_at_10", "mrr", "recall_at_10", "recall_at_100")
"""The ranking metrics every system has; encoder-only scores (precision/recall/F1 at a cosine
threshold) have no BM25 counterpart and stay out of the table."""


def bm25_run(query_texts: list[str], catalog: pd.DataFrame, depth: int = RANKING_DEPTH) -> RunDict:
    """Top-``depth`` products per query by BM25 over titles (English stopwords, no stemming).

    Products with a zero score share no term with the query: BM25 did not retrieve them, so
    they are left out of the run rather than ranked in arbitrary order.
    """
    import bm25s

    product_ids = catalog["product_uid"].astype(str).tolist()
    titles = catalog["product_title"].astype(str).tolist()
    retriever = bm25s.BM25()
    corpus_tokens = bm25s.tokenize(titles, stopwords="en", show_progress=False)
    retriever.index(corpus_tokens, show_progress=False)
    tokens = bm25s.tokenize(query_texts, stopwords="en", return_ids=False, show_progress=False)
    run: RunDict = {}
    k = min(depth, len(product_ids))
    for query, query_tokens in zip(query_texts, tokens, strict=True):
        if not query_tokens:
            continue
        docs, scores = retriever.retrieve([query_tokens], k=k, show_progress=False)
        hits = {
            product_ids[int(d)]: float(s) for d, s in zip(docs[0], scores[0], strict=True) if s > 0
        }
        if hits:
            run[query] = hits
    return run


def evaluate_bm25(
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    positive_threshold: float = 2.33,
    k_values: tuple[int, ...] = (10, 100),
) -> EvaluationResult:
    """BM25's ranking metrics on the held-out queries over the whole catalogue."""
    queries = judged_queries(test_frame)
    metrics = ranking_metrics(
        test_frame, bm25_run(queries, catalog), relevance_grade(positive_threshold), k_values
    )
    result = EvaluationResult(metrics=metrics, queries=len(queries), products=len(catalog))
    log.info("BM25 baseline: %s", result.summary())
    return result


def evaluate_base_model(
    base_model_dir: Path,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    positive_threshold: float = 2.33,
) -> EvaluationResult:
    """The un-fine-tuned base model, evaluated exactly like the fine-tuned one."""
    return evaluate_encoder(
        Path(base_model_dir), test_frame, catalog, positive_threshold=positive_threshold
    )


def comparison_table(
    results: dict[str, EvaluationResult | dict[str, float]], keys: tuple[str, ...] = TABLE_KEYS
) -> list[dict[str, Any]]:
    """:func:`recsys.tables.comparison_table` with the search family's metrics by default."""
    from recsys.tables import comparison_table as table

    return table(results, keys)
