"""Run expectation suites over a frame, quarantine bad rows, and stop on critical failures.

One GX checkpoint validates the frame against every requested suite with ``COMPLETE`` results,
so each row-level expectation reports the index of every row it rejected. Those rows are moved,
with the reasons, to a quarantine file instead of being dropped: the clean and quarantined
frames always add up to the input. Table-level expectations (schema, row count, drift) cannot
point at rows; when one of them, or a row-level one beyond its ``mostly`` budget, fails with
severity ``critical``, the gate raises :class:`DataQualityError` after the report is written so
that the evidence is on disk when the pipeline stops.
"""

from __future__ import annotations

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
from great_expectations.checkpoint import UpdateDataDocsAction
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

from recsys.quality.suites import load_suite

log = logging.getLogger(__name__)
# GX logs every metric lookup at INFO; in an Airflow task log that buries the gate's own report.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

DOCS_SITE = "recsys_quality_docs"
REASONS_COLUMN = "quarantine_reasons"
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
    suite_result: ExpectationSuiteValidationResult, row_reasons: dict[int, list[str]]
) -> SuiteOutcome:
    """Sort one suite's results into critical failures / warnings and record rejected rows."""
    suite = suite_result.suite_name
    critical: list[str] = []
    warnings: list[str] = []
    flagged: set[int] = set()
    missing = _missing_columns(suite_result.results)
    cascaded: list[ExpectationValidationResult] = []
    for result in suite_result.results:
        rows = (result.result or {}).get("unexpected_index_list") or []
        reason = f"{suite}:{_label(result)}"
        for row in rows:
            row_reasons[int(row)].append(reason)
            flagged.add(int(row))
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
) -> list[ExpectationSuiteValidationResult]:
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
            actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
            # COMPLETE is what lists *every* rejected row index, not a sample of 20.
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    if not (docs_dir / "index.html").is_file():  # action failures are only logged by GX
        context.build_data_docs(site_names=[DOCS_SITE])
    by_suite = {run.suite_name: run for run in result.run_results.values()}
    return [by_suite[suite.name] for suite in suites]


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

    Rows rejected by any row-level expectation (whatever its severity) go to ``quarantined``
    with their reasons; the rest are ``clean``. The report folder always receives
    ``clean.csv``, ``quarantine.csv`` (with a ``row`` column: position in ``df``),
    ``summary.json`` and the GX Data Docs site ``docs/``. With ``raise_on_failure`` a critical
    failure then raises :class:`DataQualityError` carrying the report.
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
    frame = df.reset_index(drop=True)
    suite_results = _run_checkpoint(frame, suites, docs_dir)

    row_reasons: dict[int, list[str]] = defaultdict(list)
    outcomes = [_collect(result, row_reasons) for result in suite_results]
    bad = np.zeros(len(frame), dtype=bool)
    bad[sorted(row_reasons)] = True
    reasons = ["; ".join(dict.fromkeys(row_reasons[row])) for row in np.flatnonzero(bad)]
    clean = df.iloc[np.flatnonzero(~bad)].copy()
    quarantined = df.iloc[np.flatnonzero(bad)].copy()
    quarantined[REASONS_COLUMN] = pd.Series(reasons, index=quarantined.index, dtype=object)
    if len(clean) + len(quarantined) != len(df):  # pragma: no cover - invariant guard
        raise RuntimeError("quality gate lost rows: clean + quarantined != input")
    reason_counts: dict[str, int] = defaultdict(int)
    for row_list in row_reasons.values():
        for reason in dict.fromkeys(row_list):
            reason_counts[reason] += 1

    report = QualityReport(
        clean=clean,
        quarantined=quarantined,
        outcomes=outcomes,
        report_dir=report_dir,
        success=all(outcome.success for outcome in outcomes),
        reason_counts=dict(sorted(reason_counts.items())),
    )
    clean.to_csv(report_dir / "clean.csv", index=False)
    quarantined.set_axis(np.flatnonzero(bad), axis=0).to_csv(
        report_dir / "quarantine.csv", index_label="row"
    )
    summary = report.to_summary()
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
