"""Baselines on the held-out queries: BM25 (bm25s) and the un-fine-tuned base model, scored by
the same ranx code as the fine-tuned model, and the comparison table the pipeline logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from recsys.config import load_settings
from recsys.families.search.baselines import TABLE_KEYS, bm25_run, comparison_table, evaluate_bm25
from recsys.families.search.pipeline import evaluate_baselines


def test_bm25_ranks_the_exact_title_first(frames) -> None:
    _, catalog = frames
    rows = catalog.sample(5, random_state=3)
    titles = rows["product_title"].astype(str).tolist()

    run = bm25_run(titles, catalog)

    for title, pid in zip(titles, rows["product_uid"].astype(str), strict=True):
        ranked = sorted(run[title].items(), key=lambda item: -item[1])
        assert ranked[0][0] == pid, (title, ranked[:3])


def test_bm25_metrics_are_valid_and_better_than_nothing(frames) -> None:
    test, catalog = frames
    result = evaluate_bm25(test, catalog)

    assert set(result.metrics) == set(TABLE_KEYS)
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
