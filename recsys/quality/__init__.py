"""Data-quality gate: Great Expectations suites that every training run's data must pass.

The suites (``expectations/*.json``) check schema, nulls, ranges, value sets, uniqueness, row
counts, string lengths, spreadsheet formulas and label drift. Rows that break a row-level rule,
or hold a cell the loader could not read exactly (``read:<column>(<problem>)``), are quarantined
with a reason rather than dropped or repaired; a failed *critical* rule stops the pipeline with
:class:`DataQualityError` once the report (CSV files, ``summary.json``, GX Data Docs) is written.
Clean data is written exactly as read; the human-facing ``quarantine.csv`` is spreadsheet-safe
and the Data Docs HTML-escape every value.
"""

from recsys.quality.gate import (
    FORMULA_PREFIXES,
    READ_REASON_PREFIX,
    REASONS_COLUMN,
    DataQualityError,
    QualityReport,
    SuiteOutcome,
    spreadsheet_safe,
    validate_frame,
)
from recsys.quality.suites import (
    DEFAULT_EXPECTATIONS_DIR,
    DEFAULT_KL_THRESHOLD,
    DEFAULT_RELEVANCE_BINS,
    SuiteConfigError,
    build_drift_reference,
    load_suite,
)

__all__ = [
    "DEFAULT_EXPECTATIONS_DIR",
    "DEFAULT_KL_THRESHOLD",
    "DEFAULT_RELEVANCE_BINS",
    "FORMULA_PREFIXES",
    "READ_REASON_PREFIX",
    "REASONS_COLUMN",
    "DataQualityError",
    "QualityReport",
    "SuiteConfigError",
    "SuiteOutcome",
    "build_drift_reference",
    "load_suite",
    "spreadsheet_safe",
    "validate_frame",
]
