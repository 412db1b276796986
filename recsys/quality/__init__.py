"""Data-quality gate: Great Expectations suites that every training run's data must pass.

The suites (``expectations/*.json``) check schema, nulls, ranges, value sets, uniqueness, row
counts, string lengths and label drift. Rows that break a row-level rule are quarantined with a
reason rather than dropped; a failed *critical* rule stops the pipeline with
:class:`DataQualityError` once the report (CSV files, ``summary.json``, GX Data Docs) is written.
"""

from recsys.quality.gate import (
    REASONS_COLUMN,
    DataQualityError,
    QualityReport,
    SuiteOutcome,
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
    "REASONS_COLUMN",
    "DataQualityError",
    "QualityReport",
    "SuiteConfigError",
    "SuiteOutcome",
    "build_drift_reference",
    "load_suite",
    "validate_frame",
]
