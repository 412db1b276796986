"""The Great Expectations data-quality gate, run for real on the committed fixtures.

Every test validates through an actual GX checkpoint; outputs go to ``tmp_path``. Bad data is
made by editing copies of the fixtures, so each test says exactly which defect it injects.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data import read_relevance_csv
from recsys.quality import (
    DEFAULT_EXPECTATIONS_DIR,
    DEFAULT_KL_THRESHOLD,
    DEFAULT_RELEVANCE_BINS,
    DataQualityError,
    QualityReport,
    SuiteConfigError,
    build_drift_reference,
    load_suite,
    validate_frame,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HOMEDEPOT_SUITES = ("products", "queries", "relevance_labels")
KL = "expect_column_kl_divergence_to_be_less_than"


@pytest.fixture(scope="module")
def relevance_frame() -> pd.DataFrame:
    return read_relevance_csv(FIXTURES / "homedepot_sample.csv")


@pytest.fixture(scope="module")
def interactions_frame() -> pd.DataFrame:
    return pd.read_csv(FIXTURES / "grocery_interactions_sample.tsv", sep="\t")


@pytest.fixture(scope="module")
def fixture_report(relevance_frame, tmp_path_factory) -> QualityReport:
    return validate_frame(relevance_frame, HOMEDEPOT_SUITES, tmp_path_factory.mktemp("ok"))


def test_fixture_passes_every_suite(fixture_report, relevance_frame):
    report = fixture_report
    assert report.success
    assert [o.suite_name for o in report.outcomes] == list(HOMEDEPOT_SUITES)
    for outcome in report.outcomes:
        assert outcome.success and not outcome.critical_failures and not outcome.warnings
        assert outcome.statistics["evaluated_expectations"] == len(
            load_suite(outcome.suite_name).expectations
        )
        assert outcome.statistics["unsuccessful_expectations"] == 0
    assert len(report.clean) == len(relevance_frame) == 560
    assert report.quarantined.empty and "quarantine_reasons" in report.quarantined.columns
    pd.testing.assert_frame_equal(report.clean, relevance_frame)

    summary = report.to_summary()
    assert json.loads(json.dumps(summary)) == summary  # XCom / MLflow-tag safe
    assert summary["success"] is True
    assert summary["rows"] == {"input": 560, "clean": 560, "quarantined": 0}
    assert summary["critical_failures"] == []
    written = json.loads((report.report_dir / "summary.json").read_text())
    assert written == summary
    assert len(pd.read_csv(report.report_dir / "clean.csv")) == 560


def test_data_docs_site_is_built_by_gx(fixture_report):
    docs = fixture_report.report_dir / "docs"
    index = docs / "index.html"
    assert index.is_file()
    html = index.read_text(encoding="utf-8")
    for suite in HOMEDEPOT_SUITES:
        assert suite in html
        assert list((docs / "validations" / suite).rglob("*.html")), f"no validation page: {suite}"
    assert Path(fixture_report.to_summary()["paths"]["data_docs"]) == index


def test_bad_rows_are_quarantined_with_reasons_and_counts_add_up(relevance_frame, tmp_path):
    frame = relevance_frame
    template = frame.iloc[[0, 1, 2]].copy()
    template["product_uid"] = [900001, 900002, 900003]  # keep query-product pairs unique
    template["id"] = [990001, 990002, int(frame["id"].iloc[10])]  # last one: duplicate id
    template["search_term"] = template["search_term"].astype(object)
    template.iloc[0, template.columns.get_loc("search_term")] = None  # null search term
    template.iloc[1, template.columns.get_loc("relevance")] = 7.0  # out of range
    dirty = pd.concat([frame, template], ignore_index=True)

    report = validate_frame(dirty, HOMEDEPOT_SUITES, tmp_path)

    # a handful of bad rows stays inside every `mostly` budget: quarantined, not fatal
    assert report.success
    assert len(report.clean) + len(report.quarantined) == len(dirty) == 563
    reasons = report.quarantined.set_index("id")["quarantine_reasons"]
    duplicate_id = int(frame["id"].iloc[10])
    assert set(reasons.index) == {990001, 990002, duplicate_id}
    assert len(report.quarantined) == 4  # both rows sharing the duplicated id
    assert "queries:expect_column_values_to_not_be_null(search_term)" in reasons[990001]
    assert "relevance_labels:expect_column_values_to_be_between(relevance)" in reasons[990002]
    assert "relevance_labels:expect_column_values_to_be_in_set(relevance)" in reasons[990002]
    assert (reasons[duplicate_id] == "queries:expect_column_values_to_be_unique(id)").all()

    clean = report.clean
    assert clean["search_term"].notna().all()
    assert clean["relevance"].between(1, 3).all()
    assert clean["id"].is_unique and duplicate_id not in set(clean["id"])

    written = pd.read_csv(report.report_dir / "quarantine.csv")
    assert sorted(written["row"]) == [10, 560, 561, 562]  # positions in the input frame
    assert set(written["quarantine_reasons"]) == set(report.quarantined["quarantine_reasons"])
    summary = report.to_summary()
    assert summary["rows"] == {"input": 563, "clean": 559, "quarantined": 4}
    assert summary["quarantine_reasons"]["queries:expect_column_values_to_be_unique(id)"] == 2
    assert summary["suites"]["queries"]["statistics"]["rows_flagged"] == 3


def test_drifted_labels_raise_after_writing_the_report(relevance_frame, tmp_path):
    drifted = relevance_frame.assign(relevance=1.0)  # every label valid, distribution gone

    with pytest.raises(DataQualityError) as caught:
        validate_frame(drifted, HOMEDEPOT_SUITES, tmp_path)

    message = str(caught.value)
    assert "relevance_labels" in message
    assert f"{KL}(relevance): observed 2." in message  # ~2.45 nats, far over the threshold
    assert f"threshold={DEFAULT_KL_THRESHOLD}" in message
    assert str(tmp_path) in message
    report = caught.value.report
    assert report is not None and not report.success
    assert len(report.clean) == 560 and report.quarantined.empty  # nothing dropped
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["suites"]["products"]["success"] and summary["suites"]["queries"]["success"]
    assert any(KL in failure for failure in summary["critical_failures"])
    # the mean check is a second, non-blocking signal
    assert any("expect_column_mean_to_be_between" in w for w in report.outcomes[2].warnings)
    assert (tmp_path / "docs" / "index.html").is_file()


def test_missing_column_is_critical_and_names_the_column(relevance_frame, tmp_path):
    broken = relevance_frame.drop(columns=["search_term"])

    with pytest.raises(DataQualityError) as caught:
        validate_frame(broken, HOMEDEPOT_SUITES, tmp_path / "raised")
    message = str(caught.value)
    assert "products, queries" in message
    assert "expect_table_columns_to_match_set: missing columns ['search_term']" in message
    assert "expect_column_to_exist(search_term): column is missing" in message
    assert "could not run on missing column(s) ['search_term']" in message
    assert (tmp_path / "raised" / "summary.json").is_file()

    report = validate_frame(broken, HOMEDEPOT_SUITES, tmp_path / "kept", raise_on_failure=False)
    assert not report.success
    assert [o.success for o in report.outcomes] == [False, False, True]
    assert len(report.clean) + len(report.quarantined) == 560


def test_too_few_rows_fail_the_row_count_gate(relevance_frame, tmp_path):
    with pytest.raises(DataQualityError, match=r"expect_table_row_count_to_be_between.*50"):
        validate_frame(relevance_frame.head(50), ["products"], tmp_path)


def test_interactions_fixture_passes_and_bad_timestamps_are_quarantined(
    interactions_frame, tmp_path
):
    report = validate_frame(interactions_frame, ["interactions"], tmp_path / "ok")
    assert report.success and len(report.clean) == len(interactions_frame) == 399
    assert not report.outcomes[0].warnings

    dirty = interactions_frame.copy()
    dirty.loc[5, "time"] = 1_400_000_000_000  # milliseconds, not seconds
    report = validate_frame(dirty, ["interactions"], tmp_path / "dirty")
    assert report.success
    assert report.quarantined.index.tolist() == [5]
    assert report.quarantined["quarantine_reasons"].iloc[0] == (
        "interactions:expect_column_values_to_be_between(time)"
    )
    assert len(report.clean) == 398


def _write(path: Path, payload: object) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ('{"name": "broken", "expectations": [', "is not valid JSON"),
        ({"name": "x", "expectations": []}, "no non-empty 'expectations' list"),
        (
            {"name": "x", "expectations": [{"type": "expect_column_to_be_magic", "kwargs": {}}]},
            r"expectation #0 \(expect_column_to_be_magic\)",
        ),
        (
            {
                "name": "x",
                "expectations": [
                    {
                        "type": "expect_column_values_to_not_be_null",
                        "kwargs": {"column": "id"},
                        "severity": "fatal",
                    }
                ],
            },
            r"severity 'fatal' is not one of \['critical', 'warning', 'info'\]",
        ),
        (
            {
                "name": "x",
                "expectations": [{"type": "expect_column_values_to_not_be_null", "kwargs": {}}],
            },
            r"expectation #0 \(expect_column_values_to_not_be_null\).*column",
        ),
        (
            {
                "name": "x",
                "expectations": [
                    {"type": "expect_column_to_exist", "kwargs": {"column": "id"}, "sevrity": "x"}
                ],
            },
            r"unknown key\(s\) \['sevrity'\]",
        ),
    ],
)
def test_malformed_suite_file_is_a_clear_error(tmp_path, relevance_frame, payload, problem):
    suite_file = _write(tmp_path / "broken.json", payload)
    with pytest.raises(SuiteConfigError, match=problem) as caught:
        load_suite("broken", tmp_path)
    assert str(suite_file) in str(caught.value)
    # the gate refuses to run on a broken suite before touching data or the report folder
    with pytest.raises(SuiteConfigError):
        validate_frame(relevance_frame, ["broken"], tmp_path / "out", expectations_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_unknown_suite_name_lists_the_available_ones():
    with pytest.raises(SuiteConfigError, match=r"not found.*'interactions'.*'queries'"):
        load_suite("no_such_suite")


def test_shipped_suites_mark_severity_and_cover_the_required_checks():
    types: dict[str, set[str]] = {}
    for path in sorted(DEFAULT_EXPECTATIONS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        assert raw["name"] == path.stem
        for item in raw["expectations"]:
            assert item["severity"] in {"critical", "warning"}, item
            assert item["type"] != "expect_column_quantile_values_to_be_between"
            if item["type"].startswith("expect_table_row_count") or item["type"] == KL:
                assert item["severity"] == "critical"
        types[path.stem] = {item["type"] for item in raw["expectations"]}
        assert load_suite(path).name == path.stem
    assert set(types) == {"products", "queries", "relevance_labels", "interactions"}
    hd = set().union(*(types[name] for name in HOMEDEPOT_SUITES))
    for required in (
        "expect_table_columns_to_match_set",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_unique",
        "expect_table_row_count_to_be_between",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_not_match_regex",  # spreadsheet formulas
        KL,
    ):
        assert required in hd, required
    lengths = [
        e
        for e in load_suite("queries").expectations
        if e.expectation_type == "expect_column_value_lengths_to_be_between"
    ]
    assert [(e.column, e.min_value, e.max_value) for e in lengths] == [("search_term", 1, 200)]


def test_shipped_drift_reference_is_the_smoothed_fixture_histogram(relevance_frame, tmp_path):
    shipped = DEFAULT_EXPECTATIONS_DIR / "relevance_labels.json"
    rebuilt = shutil.copy(shipped, tmp_path / "relevance_labels.json")
    build_drift_reference(relevance_frame, rebuilt)

    def partition(path: Path) -> dict:
        raw = json.loads(Path(path).read_text())
        [kl] = [e for e in raw["expectations"] if e["type"] == KL]
        return kl["kwargs"]["partition_object"]

    assert partition(rebuilt) == partition(shipped)
    part = partition(shipped)
    assert part["bins"] == list(DEFAULT_RELEVANCE_BINS)
    assert min(part["weights"]) > 0 and min(part["tail_weights"]) > 0  # smoothed: no empty bin
    assert math.isclose(sum(part["weights"]) + sum(part["tail_weights"]), 1.0, abs_tol=1e-8)


def test_rebuilt_reference_with_empty_bins_stays_finite(relevance_frame, tmp_path):
    # a reference with only top labels leaves four of five bins empty; smoothing must keep
    # the divergence of ordinary data finite (unsmoothed it is infinite and GX reports None)
    suite_file = shutil.copy(
        DEFAULT_EXPECTATIONS_DIR / "relevance_labels.json", tmp_path / "relevance_labels.json"
    )
    build_drift_reference(relevance_frame.assign(relevance=3.0), suite_file, source="test")
    raw = json.loads(Path(suite_file).read_text())
    [kl] = [e for e in raw["expectations"] if e["type"] == KL]
    assert kl["meta"]["drift_reference"]["bin_counts"] == [0, 0, 0, 0, 560]
    assert kl["severity"] == "critical" and kl["kwargs"]["threshold"] == DEFAULT_KL_THRESHOLD

    with pytest.raises(DataQualityError, match=rf"{KL}\(relevance\): observed (\d+\.\d+)") as e:
        validate_frame(
            relevance_frame, ["relevance_labels"], tmp_path / "out", expectations_dir=tmp_path
        )
    observed = float(str(e.value).split(f"{KL}(relevance): observed ")[1].split(";")[0])
    assert np.isfinite(observed) and observed > DEFAULT_KL_THRESHOLD


def test_drift_reference_rejects_out_of_range_reference(relevance_frame, tmp_path):
    suite_file = shutil.copy(
        DEFAULT_EXPECTATIONS_DIR / "relevance_labels.json", tmp_path / "relevance_labels.json"
    )
    before = Path(suite_file).read_text()
    with pytest.raises(ValueError, match="outside"):
        build_drift_reference(relevance_frame.assign(relevance=7.0), suite_file)
    assert Path(suite_file).read_text() == before  # failed rebuild leaves the suite intact
