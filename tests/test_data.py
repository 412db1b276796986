"""Loading and query-level splitting of relevance data."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys.data import (
    DataFormatError,
    frame_fingerprint,
    product_catalog,
    read_relevance_csv,
    split_by_query,
)


def test_reads_latin1_fixture_without_dropping_rows(homedepot_sample):
    frame = read_relevance_csv(homedepot_sample)
    raw_lines = homedepot_sample.read_bytes().count(b"\n") - 1
    assert len(frame) == 560 == raw_lines
    assert frame["relevance"].between(1, 3).all()


def test_missing_file_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_relevance_csv(tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,search_term\n1,drill\n")
    with pytest.raises(DataFormatError, match=r"lacks required column\(s\).*product_uid"):
        read_relevance_csv(bad)


def test_split_keeps_every_query_on_one_side(homedepot_sample):
    frame = read_relevance_csv(homedepot_sample)
    split = split_by_query(frame, test_fraction=0.25, seed=3)
    train_queries = set(split.train["search_term"])
    test_queries = set(split.test["search_term"])
    assert not train_queries & test_queries
    assert len(split.train) + len(split.test) == len(frame)
    assert round(frame["search_term"].nunique() * 0.25) == len(test_queries)


def test_split_rejects_nonsense_fraction(homedepot_sample):
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_query(read_relevance_csv(homedepot_sample), test_fraction=1.5)


def test_fingerprint_changes_with_content_and_catalog_is_distinct(homedepot_sample):
    frame = read_relevance_csv(homedepot_sample)
    changed = frame.copy()
    changed.loc[0, "relevance"] = 1.0 if frame.loc[0, "relevance"] != 1.0 else 3.0
    assert frame_fingerprint(frame) == frame_fingerprint(frame.copy())
    assert frame_fingerprint(frame) != frame_fingerprint(changed)
    catalog = product_catalog(frame)
    assert catalog["product_uid"].is_unique
    assert set(catalog["product_uid"]) == set(frame["product_uid"].astype(str))
    assert isinstance(catalog, pd.DataFrame)


def test_blank_or_garbled_ids_become_missing_not_a_float_column(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text(
        "id,product_uid,product_title,search_term,relevance\n"
        "1,100001,Angle bracket,angle bracket,3\n"
        ",100002,Deck paint,deck paint,2.33\n"
        "3,abc,Drill,drill,2\n"
    )
    frame = read_relevance_csv(path)
    assert len(frame) == 3
    assert str(frame["id"].dtype) == "Int64" and frame["id"].isna().tolist() == [False, True, False]
    assert frame["product_uid"].isna().tolist() == [False, False, True]
