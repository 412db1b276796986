"""Baselines a fine-tuned model has to beat, scored on the same held-out queries.

A fine-tuned encoder is only worth serving if it beats what the shop gets for free: lexical
BM25 over product titles and the off-the-shelf base model it was fine-tuned from. All systems
go through :func:`.evaluation.ranking_metrics` so the comparison table's rows are comparable by
construction.

BM25 is scored at its best, not at library defaults: titles and queries are stemmed (Snowball,
so "brackets" finds "bracket") and ``k1``/``b`` are tuned on the training queries
(:func:`tune_bm25`). It uses :class:`.hybrid.LexicalIndex`, the same index and tokeniser the
served hybrid retrieval uses, so the baseline row and the served lexical half are one thing.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
from recsys.families.search.hybrid import LexicalConfig, LexicalIndex, positive_top_indices

log = logging.getLogger(__name__)

TABLE_KEYS = ("ndcg_at_10", "mrr", "recall_at_10", "recall_at_100")
"""The ranking metrics every system has; encoder-only scores (precision/recall/F1 at a cosine
threshold) have no BM25 counterpart and stay out of the table."""

UNTUNED_BM25 = LexicalConfig(k1=1.5, b=0.75, stemmer=None, stopwords="en")
"""``bm25s``'s defaults without stemming: the BM25 baseline before it was tuned, kept as a
reference row."""

BM25_GRID: dict[str, tuple[Any, ...]] = {
    "stemmer": ("english", None),
    "k1": (0.3, 0.6, 0.9, 1.2, 1.5, 2.0),
    "b": (0.3, 0.5, 0.75, 0.9),
}
"""The :func:`tune_bm25` grid: every combination of these :class:`.hybrid.LexicalConfig`
fields (``stopwords`` may be listed too; it defaults to ``"en"``). 48 configs at ~2 s each on
1,000 Home Depot training queries over the 54,667-product catalogue: ~2 minutes on 2 CPU cores.
On that data stemming is worth ~0.04 NDCG@10, and short titles want a small ``k1`` (a term
repeated in a title says little more); with ``k1`` <= 0.6, ``b`` moves NDCG@10 by < 0.002."""

QUERY_BLOCK = 256
"""Queries scored at once: a block's ``[block, products]`` float32 score matrix is ~56 MB for the
54,667-product Home Depot catalogue, where all 2,359 held-out queries at once would be ~0.5 GB."""


def lexical_run(
    index: LexicalIndex,
    query_texts: Sequence[str],
    product_ids: Sequence[str],
    depth: int = RANKING_DEPTH,
    block: int = QUERY_BLOCK,
) -> RunDict:
    """Top-``depth`` products per query by ``index``'s BM25 scores, scoring ``block`` queries at
    a time. Queries retrieving nothing (no term in the catalogue) are left out of the run."""
    if len(product_ids) != index.products:
        raise ValueError(f"{len(product_ids)} product ids for an index of {index.products}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    run: RunDict = {}
    queries = list(query_texts)
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        for query, row in zip(chunk, index.scores(chunk), strict=True):
            top = positive_top_indices(row, depth)
            if len(top):
                run[query] = {product_ids[i]: float(row[i]) for i in top}
    return run


def bm25_run(
    query_texts: list[str],
    catalog: pd.DataFrame,
    depth: int = RANKING_DEPTH,
    config: LexicalConfig | None = None,
    *,
    block: int = QUERY_BLOCK,
) -> RunDict:
    """Top-``depth`` products per query by BM25 over titles (``config``, default
    :class:`.hybrid.LexicalConfig`: English stopwords and stemming, k1=1.2, b=0.75).

    Products with a zero score share no term with the query: BM25 did not retrieve them, so
    they are left out of the run rather than ranked in arbitrary order. Queries are scored in
    blocks of ``block``, so the run is the same whatever the block size.
    """
    index = LexicalIndex.build(
        catalog["product_title"].astype(str).tolist(), config or LexicalConfig()
    )
    return lexical_run(
        index, query_texts, catalog["product_uid"].astype(str).tolist(), depth, block
    )


def _grid_configs(grid: Mapping[str, Sequence[Any]]) -> list[LexicalConfig]:
    known = ("stemmer", "stopwords", "k1", "b")
    unknown = sorted(set(grid) - set(known))
    if unknown:
        raise ValueError(f"unknown BM25 grid fields {unknown}; known: {list(known)}")
    axes = {"stopwords": ("en",), **{k: tuple(v) for k, v in grid.items()}}
    empty = [k for k in known if k in axes and not axes[k]]
    if empty or "k1" not in axes or "b" not in axes:
        raise ValueError(f"the BM25 grid needs values for k1 and b, got {dict(grid)}")
    axes.setdefault("stemmer", (LexicalConfig().stemmer,))
    names = [k for k in known if k in axes]
    return [
        LexicalConfig(**dict(zip(names, values, strict=True)))
        for values in itertools.product(*(axes[k] for k in names))
    ]


def sample_queries(frame: pd.DataFrame, max_queries: int | None, seed: int = 13) -> pd.DataFrame:
    """The rows of at most ``max_queries`` of ``frame``'s queries (a seeded sample; all of them
    when ``max_queries`` is 0/None or not smaller than their number)."""
    queries = judged_queries(frame)
    if not max_queries or max_queries >= len(queries):
        return frame
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(np.asarray(queries, dtype=object), size=max_queries, replace=False))
    return frame[frame["search_term"].astype(str).isin(chosen)]


def tune_bm25(
    train_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    grid: Mapping[str, Sequence[Any]] = BM25_GRID,
    max_queries: int | None = 1000,
    positive_threshold: float = 2.33,
    metric: str = "ndcg_at_10",
    seed: int = 13,
    block: int = QUERY_BLOCK,
    progress: Callable[[str], None] | None = None,
) -> tuple[LexicalConfig, list[dict[str, Any]]]:
    """Grid-search BM25's settings on the TRAINING queries; return (best config, every result).

    Each combination of ``grid`` (:data:`BM25_GRID`: stemmer x k1 x b) ranks the whole
    ``catalog`` for a seeded sample of at most ``max_queries`` training queries (0/None: all)
    and is scored by :func:`.evaluation.ranking_metrics` (``metric``, NDCG@10 by default). The
    held-out queries are never seen, so the chosen config's held-out score is an honest one.
    ``bm25s`` computes BM25 weights when it indexes, so every config is indexed afresh (about a
    second for the 54,667 Home Depot titles) by :meth:`.hybrid.LexicalIndex.build`, exactly as
    served. The best value wins; ties go to the earliest config in grid order.

    Returns the chosen :class:`.hybrid.LexicalConfig` and one dict per config (its fields, its
    metrics and ``seconds``) in grid order. ``progress`` (default: the module logger at INFO)
    gets one line per config.
    """
    configs = _grid_configs(grid)
    frame = sample_queries(train_frame, max_queries, seed)
    queries = judged_queries(frame)
    if not queries:
        raise ValueError("no training queries to tune BM25 on")
    titles = catalog["product_title"].astype(str).tolist()
    product_ids = catalog["product_uid"].astype(str).tolist()
    grade = relevance_grade(positive_threshold)
    report = progress or log.info
    results: list[dict[str, Any]] = []
    best: tuple[float, LexicalConfig] | None = None
    started = time.perf_counter()
    for number, config in enumerate(configs, 1):
        config_started = time.perf_counter()
        run = lexical_run(LexicalIndex.build(titles, config), queries, product_ids, block=block)
        metrics = ranking_metrics(frame, run, grade)
        if metric not in metrics:
            raise KeyError(f"unknown tuning metric {metric!r}; available: {sorted(metrics)}")
        seconds = round(time.perf_counter() - config_started, 2)
        results.append({**config.to_dict(), **metrics, "seconds": seconds})
        if best is None or metrics[metric] > best[0]:
            best = (metrics[metric], config)
        report(
            f"BM25 tuning {number}/{len(configs)}: k1={config.k1} b={config.b} "
            f"stemmer={config.stemmer} {metric}={metrics[metric]:.4f} ({seconds:.1f} s)"
        )
    assert best is not None
    log.info(
        "BM25 tuned on %d training queries in %.0f s: %s (%s=%.4f)",
        len(queries),
        time.perf_counter() - started,
        best[1].to_dict(),
        metric,
        best[0],
    )
    return best[1], results


def evaluate_bm25(
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    positive_threshold: float = 2.33,
    k_values: tuple[int, ...] = (10, 100),
    config: LexicalConfig | None = None,
) -> EvaluationResult:
    """BM25's ranking metrics on the held-out queries over the whole catalogue, with
    ``config`` (from :func:`tune_bm25`; default :class:`.hybrid.LexicalConfig`)."""
    config = config or LexicalConfig()
    queries = judged_queries(test_frame)
    metrics = ranking_metrics(
        test_frame,
        bm25_run(queries, catalog, config=config),
        relevance_grade(positive_threshold),
        k_values,
    )
    result = EvaluationResult(metrics=metrics, queries=len(queries), products=len(catalog))
    log.info("BM25 baseline %s: %s", config.to_dict(), result.summary())
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
