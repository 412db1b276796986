"""Loading and query-level splitting of relevance data."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys.data import (
    READ_REJECTS,
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
    # the blank id is simply missing; the garbled one is recorded for the gate to quarantine
    assert frame.attrs[READ_REJECTS] == {2: {"product_uid": ["not a plain decimal integer", "abc"]}}


def test_a_file_that_is_not_relevance_csv_says_what_was_expected_and_found(tmp_path):
    """Not the expected CSV at all: the error names the expected columns and what the file
    holds instead, never the parser's raw text alone."""
    expected = "expected a comma-separated CSV with the columns id, product_uid, product_title"
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1\nsync,x,4,65534,sync\n")
    with pytest.raises(DataFormatError) as info:
        read_relevance_csv(passwd)
    assert expected in str(info.value)
    assert "found a first line of 'root:x:0:0:root:/root:/bin/bash'" in str(info.value)
    assert "line 3 has 5 fields where that header has 1" in str(info.value)
    assert isinstance(info.value.__cause__, pd.errors.ParserError)  # pandas' text is kept

    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match=f"{expected}.*found an empty file"):
        read_relevance_csv(empty)

    with pytest.raises(DataFormatError, match=f"is a directory; {expected}"):
        read_relevance_csv(tmp_path)

    semicolons = tmp_path / "export.csv"
    semicolons.write_text("id;product_uid;product_title;search_term;relevance\n1;2;a;b;3\n")
    with pytest.raises(DataFormatError, match=r"separated by something other than commas"):
        read_relevance_csv(semicolons)


def test_a_test_session_removes_its_state_folder(tmp_path):
    """conftest's SESSION_DIR (Airflow DB, MLflow store, tiny models) is gone after a session:
    run one quick test in a child pytest whose temp folder is ``tmp_path``."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("RECSYS_KEEP_TEST_DIR", None)
    test = "tests/test_data.py::test_split_rejects_nonsense_fraction"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert not list(tmp_path.glob("recsys-tests-*")), list(tmp_path.iterdir())
