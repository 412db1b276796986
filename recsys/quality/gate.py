"""Run expectation suites over a frame, quarantine bad rows, and stop on critical failures.

One GX checkpoint validates the frame against every requested suite with ``COMPLETE`` results,
so each row-level expectation reports the index of every row it rejected. Those rows are moved,
with the reasons, to a quarantine file instead of being dropped: the clean and quarantined
frames always add up to the input. Table-level expectations (schema, row count, drift) cannot
point at rows; when one of them, or a row-level one beyond its ``mostly`` budget, fails with
severity ``critical``, the gate raises :class:`DataQualityError` after the report is written so
that the evidence is on disk when the pipeline stops.

Cells a loader could not take as they are (``frame.attrs[READ_REJECTS]``, filled by
:func:`recsys.data.read_relevance_csv`) reach GX as missing values, so every column GX sees has
one type and no check can crash on the whole file, and they still count against the
``not_null`` budgets. Their rows are quarantined as ``read:<column>(<problem>)`` with the raw
text, which is also put back into the quarantined frame; GX verdicts on those placeholder cells
are not repeated as reasons.

Untrusted text (search terms are typed by customers) leaves the gate in three forms:

* ``clean.csv`` and ``report.clean``: machine data, written exactly as read. Nothing is escaped
  or prefixed, because training must see what the shop exported; cells that a spreadsheet
  would run as a formula (``=...``, ``+cmd|...``, ``@SUM(...)``) are quarantined by the
  ``expect_column_values_to_not_match_regex`` checks of the suites instead.
* ``quarantine.csv``: for people, who open it in a spreadsheet. Every text cell that starts
  with ``=``, ``+``, ``-``, ``@``, tab or carriage return is prefixed with a single quote
  (OWASP's CSV-injection advice), so it shows as text. The in-memory ``report.quarantined``
  keeps the raw values; ``row`` points at the untouched input row.
* the GX Data Docs HTML: every string of the validation results (unexpected values, observed
  values, error text) is HTML-escaped before GX renders the site, because GX writes them into
  the page verbatim (a search term ``<script>...`` would otherwise run in the reader's browser).
"""

from __future__ import annotations

import copy
import html
import json
import logging
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity

from recsys.data import READ_REJECTS
from recsys.quality.suites import load_suite

log = logging.getLogger(__name__)
# GX logs every metric lookup at INFO; in an Airflow task log that buries the gate's own report.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

DOCS_SITE = "recsys_quality_docs"
REASONS_COLUMN = "quarantine_reasons"
READ_REASON_PREFIX = "read"  # reason prefix of cells the loader rejected (not a GX suite)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""Leading characters that make a spreadsheet evaluate a cell (OWASP CSV injection)."""
_MAX_TEXT = 300  # per failure message in the summary, which also becomes MLflow tags (5000 max)
# kwargs that are noise in a failure message (the column is already in the label)
_HIDDEN_KWARGS = {
    "column",
    "column_list",
    "column_set",
    "partition_object",
    "result_format",
    "catch_exceptions",
    "batch_id",
}


class DataQualityError(RuntimeError):
    """A critical expectation failed; the message lists suites, failures and the report path."""

    def __init__(self, message: str, report: QualityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class SuiteOutcome:
    """What one suite found. ``success`` means no *critical* failure: warnings do not count."""

    suite_name: str
    success: bool
    critical_failures: list[str]
    warnings: list[str]
    statistics: dict


@dataclass
class QualityReport:
    """The gate's verdict, the split data, and where the evidence was written."""

    clean: pd.DataFrame
    quarantined: pd.DataFrame
    outcomes: list[SuiteOutcome]
    report_dir: Path
    success: bool
    reason_counts: dict[str, int] = field(default_factory=dict)

    @property
    def paths(self) -> dict[str, str]:
        return {
            "report_dir": str(self.report_dir),
            "clean_csv": str(self.report_dir / "clean.csv"),
            "quarantine_csv": str(self.report_dir / "quarantine.csv"),
            "summary_json": str(self.report_dir / "summary.json"),
            "data_docs": str(self.report_dir / "docs" / "index.html"),
        }

    def to_summary(self) -> dict[str, Any]:
        """Small JSON-serialisable digest for Airflow XCom and MLflow tags (no row data)."""
        return {
            "success": self.success,
            "rows": {
                "input": len(self.clean) + len(self.quarantined),
                "clean": len(self.clean),
                "quarantined": len(self.quarantined),
            },
            "suites": {
                outcome.suite_name: {
                    "success": outcome.success,
                    "critical_failures": outcome.critical_failures,
                    "warnings": outcome.warnings,
                    "statistics": outcome.statistics,
                }
                for outcome in self.outcomes
            },
            "critical_failures": [
                f"{outcome.suite_name}: {failure}"
                for outcome in self.outcomes
                for failure in outcome.critical_failures
            ],
            "quarantine_reasons": dict(self.reason_counts),
            "paths": self.paths,
        }


def _ephemeral_context(docs_dir: Path) -> gx.data_context.AbstractDataContext:
    """An in-memory GX context whose only Data Docs site is a folder in the report.

    In-memory stores keep runs independent (no ``gx/`` project folder to share or clean up);
    progress bars are off because they flood Airflow task logs.
    """
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _short(value: Any, limit: int = 120) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, list | tuple) and len(value) > 6:
        value = [*value[:6], f"... {len(value) - 6} more"]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(result: ExpectationValidationResult) -> str:
    """``expectation(column)`` for column domains, ``expectation(a,b)`` for multi-column ones."""
    columns = _columns(result)
    name = result.expectation_config.type
    return f"{name}({','.join(columns)})" if columns else name


def _columns(result: ExpectationValidationResult) -> list[str]:
    """The columns an expectation's domain covers (none for table-level ones, whose
    ``column_list`` is the expected schema rather than a domain)."""
    config = result.expectation_config
    if config.type.startswith("expect_table_"):
        return []
    if config.kwargs.get("column"):
        return [config.kwargs["column"]]
    return list(config.kwargs.get("column_list") or [])


def _exception_message(result: ExpectationValidationResult) -> str | None:
    info = result.exception_info or {}
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]
    for candidate in candidates:
        if candidate.get("raised_exception"):
            return " ".join(str(candidate.get("exception_message", "")).split())
    return None


def _describe_failure(result: ExpectationValidationResult) -> str:
    """One line a person can act on: what was observed and what the expectation wanted."""
    outcome = result.result or {}
    mismatched = (outcome.get("details") or {}).get("mismatched")
    error = _exception_message(result)
    if error:
        observed = f"error: {error}"
    elif result.expectation_config.type == "expect_column_to_exist":
        observed = "column is missing"
    elif isinstance(mismatched, dict):  # column set: name what is missing rather than all
        observed = ", ".join(f"{key} columns {_short(value)}" for key, value in mismatched.items())
    elif isinstance(mismatched, list):  # ordered list: the positions that differ
        observed = "; ".join(
            f"position {m.get('Expected Column Position')}: expected {m.get('Expected')!r}, "
            f"found {m.get('Found')!r}"
            for m in mismatched[:5]
            if isinstance(m, dict)
        )
    elif "unexpected_count" in outcome and "element_count" in outcome:
        sample = outcome.get("partial_unexpected_list") or outcome.get("unexpected_list") or []
        observed = (
            f"{outcome['unexpected_count']} of {outcome['element_count']} rows unexpected "
            f"({outcome.get('unexpected_percent') or 0:.2f}%), e.g. {_short(list(sample[:5]))}"
        )
    else:
        observed = f"observed {_short(outcome.get('observed_value'))}"
    wanted = ", ".join(
        f"{key}={_short(value, 60)}"
        for key, value in result.expectation_config.kwargs.items()
        if key not in _HIDDEN_KWARGS and value is not None
    )
    text = f"{_label(result)}: {observed}" + (f"; expected {wanted}" if wanted else "")
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _jsonable(value: Any) -> Any:
    """GX statistics may hold numpy scalars or NaN; XCom and JSON need plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _missing_columns(results: Sequence[ExpectationValidationResult]) -> set[str]:
    """Columns that a failed existence or column-set expectation reports as absent."""
    missing: set[str] = set()
    for result in results:
        if result.success:
            continue
        if result.expectation_config.type == "expect_column_to_exist":
            missing.add(result.expectation_config.kwargs["column"])
        mismatched = ((result.result or {}).get("details") or {}).get("mismatched")
        if isinstance(mismatched, dict):
            missing.update(mismatched.get("missing") or [])
    return missing


def _is_critical(result: ExpectationValidationResult) -> bool:
    return FailureSeverity(result.expectation_config.severity) == FailureSeverity.CRITICAL


def _collect(
    suite_result: ExpectationSuiteValidationResult,
    row_reasons: dict[int, list[tuple[str, str]]],
    placeholders: dict[int, set[str]] | None = None,
) -> SuiteOutcome:
    """Sort one suite's results into critical failures / warnings and record rejected rows.

    A row-level verdict on a cell in ``placeholders`` (row -> columns the loader rejected) is
    not recorded: it judges the missing value standing in for the file's text, and the row is
    already quarantined with the loader's reason.
    """
    placeholders = placeholders or {}
    suite = suite_result.suite_name
    critical: list[str] = []
    warnings: list[str] = []
    flagged: set[int] = set()
    missing = _missing_columns(suite_result.results)
    cascaded: list[ExpectationValidationResult] = []
    for result in suite_result.results:
        rows = (result.result or {}).get("unexpected_index_list") or []
        reason = f"{suite}:{_label(result)}"
        columns = set(_columns(result))
        for row in map(int, rows):
            if columns & placeholders.get(row, set()):
                continue
            row_reasons[row].append((reason, reason))
            flagged.add(row)
        if result.success:
            continue
        if _exception_message(result) and set(_columns(result)) & missing:
            cascaded.append(result)  # could not run at all; the schema failure says why
            continue
        (critical if _is_critical(result) else warnings).append(_describe_failure(result))
    if cascaded:
        note = (
            f"{len(cascaded)} more expectation(s) could not run on missing column(s) "
            f"{sorted(missing)}: {', '.join(_label(result) for result in cascaded)}"
        )
        (critical if any(map(_is_critical, cascaded)) else warnings).append(note[:_MAX_TEXT])
    statistics = _jsonable(dict(suite_result.statistics))
    statistics["rows_flagged"] = len(flagged)
    for message in critical:
        log.error("data quality [%s] CRITICAL %s", suite, message)
    for message in warnings:
        log.warning("data quality [%s] warning %s", suite, message)
    return SuiteOutcome(
        suite_name=suite,
        success=not critical,
        critical_failures=critical,
        warnings=warnings,
        statistics=statistics,
    )


def _run_checkpoint(
    frame: pd.DataFrame, suites: list[gx.ExpectationSuite], docs_dir: Path
) -> tuple[gx.data_context.AbstractDataContext, dict[Any, ExpectationSuiteValidationResult]]:
    """Validate ``frame`` against ``suites`` in one checkpoint; return the context (its stores
    hold the results) and the results by their store key. Data Docs are built separately, by
    :func:`_build_escaped_docs`, because GX would render the raw values into HTML."""
    context = _ephemeral_context(docs_dir)
    batch_definition = (
        context.data_sources.add_pandas("recsys")
        .add_dataframe_asset("frame")
        .add_batch_definition_whole_dataframe("whole_frame")
    )
    definitions = [
        context.validation_definitions.add(
            gx.ValidationDefinition(
                name=suite.name, data=batch_definition, suite=context.suites.add(suite)
            )
        )
        for suite in suites
    ]
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="recsys_quality_gate",
            validation_definitions=definitions,
            actions=[],
            # COMPLETE is what lists *every* rejected row index, not a sample of 20.
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return context, dict(result.run_results)


def _html_escaped(value: Any) -> Any:
    """``value`` with every string in it (keys included) HTML-escaped, quotes too."""
    if isinstance(value, str):
        return html.escape(value, quote=True)
    if isinstance(value, dict):
        return {_html_escaped(k): _html_escaped(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_html_escaped(v) for v in value)
    return value


def _build_escaped_docs(
    context: gx.data_context.AbstractDataContext,
    run_results: dict[Any, ExpectationSuiteValidationResult],
) -> None:
    """Build the Data Docs site from copies of the results whose data strings are escaped.

    GX renders unexpected values, observed values and exception text into the pages without
    escaping; a quarantined search term is customer input, so the copy stored for rendering
    carries ``&lt;script&gt;`` where the data said ``<script>``. The results the gate reads
    (and the messages it prints) keep the real values.
    """
    store = context.validation_results_store
    for key, suite_result in run_results.items():
        safe = copy.deepcopy(suite_result)
        for result in safe.results:
            result.result = _html_escaped(result.result or {})
            result.exception_info = _html_escaped(result.exception_info or {})
        store.set(key, safe)
    context.build_data_docs(site_names=[DOCS_SITE])


def _placeholders(df: pd.DataFrame) -> dict[int, dict[str, tuple[str, str]]]:
    """``df.attrs[READ_REJECTS]`` by row *position*: {position: {column: (problem, raw)}}.

    Keyed by index label in the attrs, so a slice of the loaded frame (``frame.head(n)``)
    keeps only its own rows' entries.
    """
    rejects = df.attrs.get(READ_REJECTS) or {}
    if not rejects:
        return {}
    if not df.index.is_unique:
        raise ValueError(f"a frame with {READ_REJECTS} in attrs needs a unique index")
    labels = list(rejects)
    positions = df.index.get_indexer(labels)
    return {
        int(position): {column: (str(p), str(raw)) for column, (p, raw) in rejects[label].items()}
        for label, position in zip(labels, positions, strict=True)
        if position >= 0
    }


def spreadsheet_safe(value: Any) -> Any:
    """``value`` with a leading single quote when it is text a spreadsheet would evaluate
    (starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return); anything else as is.

    For files people open (``quarantine.csv``), never for data a program reads.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _for_spreadsheets(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with :func:`spreadsheet_safe` applied to every text column."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].astype(object).map(spreadsheet_safe)
    return safe


def _failure_message(report: QualityReport) -> str:
    failed = [outcome for outcome in report.outcomes if outcome.critical_failures]
    lines = [
        f"data-quality gate failed: critical expectation(s) failed in suite(s) "
        f"{', '.join(outcome.suite_name for outcome in failed)}:"
    ]
    lines += [
        f"  - {outcome.suite_name}: {failure}"
        for outcome in failed
        for failure in outcome.critical_failures
    ]
    lines.append(
        f"report: {report.report_dir} (summary.json, quarantine.csv, docs/index.html); "
        f"{len(report.quarantined)} of {len(report.clean) + len(report.quarantined)} rows "
        "quarantined"
    )
    return "\n".join(lines)


def validate_frame(
    df: pd.DataFrame,
    suite_names: Sequence[str],
    output_dir: Path,
    *,
    expectations_dir: Path | None = None,
    raise_on_failure: bool = True,
) -> QualityReport:
    """Validate ``df`` against the named suites and write the report to ``output_dir``.

    Rows rejected by any row-level expectation (whatever its severity), and rows with a cell
    listed in ``df.attrs[READ_REJECTS]``, go to ``quarantined`` with their reasons; the rest
    are ``clean``, unchanged. ``len(clean) + len(quarantined) == len(df)`` always. The report
    folder always receives ``clean.csv`` (exact), ``quarantine.csv`` (spreadsheet-safe, with a
    ``row`` column: position in ``df``), ``summary.json`` (counts, no row data) and the GX Data
    Docs site ``docs/`` (HTML-escaped values). With ``raise_on_failure`` a critical failure
    then raises :class:`DataQualityError` carrying the report.
    """
    if isinstance(suite_names, str) or not suite_names:
        raise ValueError(f"suite_names must be a non-empty sequence of names, got {suite_names!r}")
    suites = [load_suite(name, expectations_dir) for name in suite_names]  # fail before any work
    names = [suite.name for suite in suites]
    if len(set(names)) != len(names):
        raise ValueError(f"suite names must be distinct (reasons are keyed by them): {names}")
    report_dir = Path(output_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = report_dir / "docs"
    shutil.rmtree(docs_dir, ignore_errors=True)  # the site must show this run only

    # GX reports rejected rows by index label; a fresh RangeIndex makes labels positions, so
    # duplicate or odd labels of the caller's frame cannot misattribute a reason.
    placeholders = _placeholders(df)
    frame = df.reset_index(drop=True)
    frame.attrs = {}  # pandas deep-copies attrs on every operation GX does
    context, run_results = _run_checkpoint(frame, suites, docs_dir)
    by_suite = {result.suite_name: result for result in run_results.values()}
    suite_results = [by_suite[suite.name] for suite in suites]

    # (count key, text for the row): GX reasons are their own key; a loader rejection names
    # the raw value in the row's text but not in the key (summary.json holds no row data)
    row_reasons: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for row, cells in placeholders.items():
        for column, (problem, raw) in cells.items():
            key = f"{READ_REASON_PREFIX}:{column}({problem})"
            row_reasons[row].append((key, f"{key}: {_short(raw, 80)}"))
    skip = {row: set(cells) for row, cells in placeholders.items()}
    outcomes = [_collect(result, row_reasons, skip) for result in suite_results]

    bad = np.zeros(len(frame), dtype=bool)
    bad[sorted(row_reasons)] = True
    bad_rows = np.flatnonzero(bad)
    reasons = ["; ".join(dict.fromkeys(text for _, text in row_reasons[row])) for row in bad_rows]
    clean = df.iloc[np.flatnonzero(~bad)].copy()
    quarantined = df.iloc[bad_rows].copy()
    slot = {int(row): i for i, row in enumerate(bad_rows)}  # put back what the file said:
    for column in dict.fromkeys(c for cells in placeholders.values() for c in cells):
        rows = [row for row, cells in placeholders.items() if column in cells]
        values = quarantined[column].astype(object).to_numpy(copy=True)
        values[[slot[row] for row in rows]] = [placeholders[row][column][1] for row in rows]
        quarantined[column] = pd.Series(values, index=quarantined.index, dtype=object)
    quarantined[REASONS_COLUMN] = pd.Series(reasons, index=quarantined.index, dtype=object)
    for part in (clean, quarantined):  # the rejections are in the reasons now
        part.attrs.pop(READ_REJECTS, None)
    if len(clean) + len(quarantined) != len(df):  # pragma: no cover - invariant guard
        raise RuntimeError("quality gate lost rows: clean + quarantined != input")
    reason_counts: dict[str, int] = defaultdict(int)
    for row_list in row_reasons.values():
        for key in dict.fromkeys(key for key, _ in row_list):
            reason_counts[key] += 1

    report = QualityReport(
        clean=clean,
        quarantined=quarantined,
        outcomes=outcomes,
        report_dir=report_dir,
        success=all(outcome.success for outcome in outcomes),
        reason_counts=dict(sorted(reason_counts.items())),
    )
    clean.to_csv(report_dir / "clean.csv", index=False)
    _for_spreadsheets(quarantined).set_axis(np.flatnonzero(bad), axis=0).to_csv(
        report_dir / "quarantine.csv", index_label="row"
    )
    summary = report.to_summary()
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _build_escaped_docs(context, run_results)
    log.info(
        "data quality: %d rows, %d clean, %d quarantined, success=%s; report %s",
        len(df),
        len(clean),
        len(quarantined),
        report.success,
        report_dir,
    )
    if raise_on_failure and not report.success:
        raise DataQualityError(_failure_message(report), report)
    return report
