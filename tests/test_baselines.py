"""Baselines on the held-out queries: BM25 (bm25s, stemmed, k1/b tuned on the training queries)
and the un-fine-tuned base model, scored by the same ranx code as the fine-tuned model, and the
comparison table the pipeline logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from recsys.config import load_settings
from recsys.data import product_catalog, read_relevance_csv, split_by_query
from recsys.families.search.baselines import (
    TABLE_KEYS,
    UNTUNED_BM25,
    bm25_run,
    comparison_table,
    evaluate_bm25,
    sample_queries,
    tune_bm25,
)
from recsys.families.search.evaluation import judged_queries, ranking_metrics
from recsys.families.search.hybrid import LexicalConfig
from recsys.families.search.pipeline import evaluate_baselines

SMALL_GRID = {"stemmer": ("english", None), "k1": (0.9, 1.5), "b": (0.5, 0.9)}


@pytest.fixture(scope="module")
def train_frames(homedepot_sample: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fixture's training queries (the pipeline's default split) and its whole catalogue."""
    frame = read_relevance_csv(homedepot_sample)
    return split_by_query(frame, test_fraction=0.2, seed=13).train, product_catalog(frame)


def test_bm25_ranks_the_exact_title_first(frames) -> None:
    _, catalog = frames
    rows = catalog.sample(5, random_state=3)
    titles = rows["product_title"].astype(str).tolist()

    run = bm25_run(titles, catalog)

    for title, pid in zip(titles, rows["product_uid"].astype(str), strict=True):
        ranked = sorted(run[title].items(), key=lambda item: -item[1])
        assert ranked[0][0] == pid, (title, ranked[:3])


def test_stemming_matches_plural_queries_to_singular_titles() -> None:
    catalog = pd.DataFrame(
        {
            "product_uid": ["1", "2", "3"],
            "product_title": [
                "Simpson Strong-Tie 12-Gauge Angle Bracket",
                "Everbilt 3 in. Zinc-Plated Corner Braces",
                "Husky 24 in. Tool Box",
            ],
        }
    )

    stemmed = bm25_run(["brackets", "corner brace", "boxes"], catalog)
    unstemmed = bm25_run(
        ["brackets", "corner brace", "boxes"], catalog, config=LexicalConfig(stemmer=None)
    )

    assert list(stemmed["brackets"]) == ["1"]
    assert next(iter(stemmed["corner brace"])) == "2"  # "braces" in the title, "brace" queried
    assert list(stemmed["boxes"]) == ["3"]
    assert "brackets" not in unstemmed and "boxes" not in unstemmed  # no shared term: no run
    assert list(unstemmed["corner brace"]) == ["2"]  # only "corner" matches unstemmed


def test_ties_at_the_depth_cut_go_to_the_earlier_catalogue_products() -> None:
    catalog = pd.DataFrame(
        {
            "product_uid": ["10", "11", "12", "13", "14"],
            "product_title": ["oak shelf", "oak shelf", "pine shelf", "oak shelf", "oak shelf"],
        }
    )
    run = bm25_run(["oak shelf"], catalog, depth=3)
    assert list(run["oak shelf"]) == ["10", "11", "13"]  # four equal scores, three slots


def test_query_blocks_give_the_same_run_as_one_block(train_frames) -> None:
    train, catalog = train_frames
    queries = [*judged_queries(train)[:40], "zzzz qqqq"]  # one query with no known term

    whole = bm25_run(queries, catalog, block=len(queries))
    for block in (1, 7):
        assert bm25_run(queries, catalog, block=block) == whole
    assert "zzzz qqqq" not in whole
    assert all(0 < len(hits) <= 100 and min(hits.values()) > 0 for hits in whole.values())
    with pytest.raises(ValueError, match="block"):
        bm25_run(queries, catalog, block=0)


def test_tuning_picks_the_grid_config_with_the_best_training_ndcg(train_frames) -> None:
    train, catalog = train_frames
    progress: list[str] = []

    chosen, results = tune_bm25(
        train, catalog, grid=SMALL_GRID, max_queries=30, progress=progress.append
    )

    assert len(results) == len(progress) == 8  # 2 stemmers x 2 k1 x 2 b, one line each
    grid = {(r["stemmer"], r["k1"], r["b"]) for r in results}
    assert grid == {(s, k, b) for s in ("english", None) for k in (0.9, 1.5) for b in (0.5, 0.9)}
    assert (chosen.stemmer, chosen.k1, chosen.b) in grid
    best = max(r["ndcg_at_10"] for r in results)
    row = next(
        r
        for r in results
        if LexicalConfig.from_dict({k: r[k] for k in ("k1", "b", "stemmer", "stopwords")}) == chosen
    )
    assert row["ndcg_at_10"] == best
    assert row["ndcg_at_10"] == next(  # ties go to the first config in grid order
        r["ndcg_at_10"] for r in results if r["ndcg_at_10"] == best
    )
    # The reported value is the chosen config's NDCG@10 on the sampled training queries.
    sample = sample_queries(train, 30)
    assert sample["search_term"].nunique() == 30
    rerun = ranking_metrics(sample, bm25_run(judged_queries(sample), catalog, config=chosen), 4)
    assert rerun["ndcg_at_10"] == pytest.approx(best)
    assert all(0.0 <= r[k] <= 1.0 for r in results for k in TABLE_KEYS)


def test_tuning_refuses_a_grid_it_cannot_build(train_frames) -> None:
    train, catalog = train_frames
    with pytest.raises(ValueError, match="unknown BM25 grid fields"):
        tune_bm25(train, catalog, grid={"k1": (1.2,), "b": (0.75,), "delta": (0.5,)})
    with pytest.raises(ValueError, match="k1 and b"):
        tune_bm25(train, catalog, grid={"k1": (1.2,), "b": ()})
    with pytest.raises(ValueError, match="k1 > 0"):
        tune_bm25(train, catalog, grid={"k1": (0.0,), "b": (0.75,)})


def test_bm25_metrics_are_valid_and_better_than_nothing(frames) -> None:
    test, catalog = frames
    result = evaluate_bm25(test, catalog)
    untuned = evaluate_bm25(test, catalog, config=UNTUNED_BM25)

    assert set(result.metrics) == set(untuned.metrics) == set(TABLE_KEYS)
    assert all(0.0 <= v <= 1.0 for v in untuned.metrics.values())
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.metrics["ndcg_at_10"] > 0.0  # lexical overlap finds some judged products
    assert result.metrics["recall_at_100"] >= result.metrics["recall_at_10"]
    assert result.queries == test["search_term"].nunique()


def test_comparison_table_has_one_row_per_system_with_the_same_keys(
    tiny_bert_dir: Path, split_files: dict[str, str], tmp_path: Path
) -> None:
    split = split_files
    fine_tuned = {"ndcg_at_10": 0.5, "mrr": 0.5, "recall_at_10": 0.4, "recall_at_100": 0.9}

    out = evaluate_baselines(
        load_settings(), split, tmp_path, str(tiny_bert_dir), challenger_metrics=fine_tuned
    )

    table = out["table"]
    assert [row["system"] for row in table] == ["bm25", "base_model", "fine_tuned"]
    assert all(set(row) == {"system", *TABLE_KEYS} for row in table)
    assert all(0.0 <= row[k] <= 1.0 for row in table for k in TABLE_KEYS)
    json_path, csv_path, png_path = map(Path, out["table_paths"])
    assert png_path.suffix == ".png" and png_path.stat().st_size > 0  # the plot MLflow shows
    assert json.loads(json_path.read_text()) == table
    with csv_path.open() as handle:
        assert [r["system"] for r in csv.DictReader(handle)] == ["bm25", "base_model", "fine_tuned"]
    with pytest.raises(KeyError, match="lacks metric"):
        comparison_table({"broken": {"ndcg_at_10": 0.1}})
