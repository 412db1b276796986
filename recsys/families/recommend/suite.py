"""The data-quality suite for interactions of the recommendation family, built in Python.

The platform keeps its suites as reviewed JSON in ``expectations/`` (see
:mod:`recsys.quality.suites`); :func:`build_interactions_suite` returns exactly that JSON
content, so it can be written there once the family is wired into the pipeline, and until then
:func:`validate_interactions` writes it next to the report and runs it through the platform's
own gate (:func:`recsys.quality.validate_frame`): the same quarantine with per-row reasons,
``summary.json``, Data Docs and critical/warning semantics as the search data.

Three rules are not about one cell, and GX has no pandas expectation that points at the rows
breaking them (``UnexpectedRowsExpectation`` is SQL-only). :func:`annotate_interactions` adds one
derived column per rule, and ordinary row-level expectations check those columns, so every
offending row is quarantined with a reason that names the rule:

* ``duplicate_rank``: 0 for the first row of a ``(user_id, item_id, time)`` triple, 1, 2, ...
  for its repeats. Only the repeats are rejected: an exact duplicate is an export glitch, and
  quarantining the first copy too would lose a real interaction.
* ``item_in_catalogue``: 1 when the item has a row in the item metadata, 0 when not. Checked
  through a column rather than ``value_set`` so the suite stays a reviewable rule, not a copy
  of the catalogue that changes with every new product.
* ``user_interactions``: how many *usable* rows (ids and time present and in range, item known,
  not a repeat) the user has. Leave-one-out needs 3 (train, validation, test), so users below
  that are quarantined (severity warning: the run goes on without them). Counting only usable
  rows means a user whose other rows are quarantined is not passed with 2 left.

The derived columns are removed from ``report.clean`` and ``report.quarantined``; the
``clean.csv`` written by the gate keeps them as evidence of what was checked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.families.recommend.data import ITEM, TIME, USER
from recsys.quality import DataQualityError, QualityReport, validate_frame

SUITE_NAME = "recommend_interactions"
DUPLICATE_RANK = "duplicate_rank"
IN_CATALOGUE = "item_in_catalogue"
USER_INTERACTIONS = "user_interactions"
DERIVED_COLUMNS = (DUPLICATE_RANK, IN_CATALOGUE, USER_INTERACTIONS)

EARLIEST_TIME = 804556800
"""1995-07-01 00:00 UTC: Amazon sold its first book in July 1995, so no earlier review exists;
an earlier value means milliseconds/days or another epoch, not unix seconds."""

MIN_USER_INTERACTIONS = 3
"""Leave-one-out needs one test, one validation and at least one training interaction."""


@dataclass(frozen=True)
class InteractionRules:
    """The thresholds of the suite. ``latest_time`` defaults to the moment the rules are made
    (no interaction can be in the future); ``catalogue`` (item ids from the item metadata)
    enables the unknown-item check; ``max_bad_fraction`` is the share of rows the critical
    row-level checks may quarantine before the run stops (GX ``mostly``)."""

    earliest_time: int = EARLIEST_TIME
    latest_time: int = dataclasses.field(default_factory=lambda: int(time.time()))
    min_user_interactions: int = MIN_USER_INTERACTIONS
    max_bad_fraction: float = 0.01
    catalogue: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.earliest_time >= self.latest_time:
            raise ValueError(f"earliest_time {self.earliest_time} >= latest {self.latest_time}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        if self.min_user_interactions < 1:
            raise ValueError("min_user_interactions must be >= 1")


def _expectation(kind: str, severity: str, notes: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "severity": severity, "notes": notes}


def build_interactions_suite(rules: InteractionRules) -> dict[str, Any]:
    """The suite as the JSON object :func:`recsys.quality.load_suite` reads.

    Critical (a broken export stops the run; single bad rows are quarantined): the three
    columns exist, ids and time are present, time lies in ``[earliest, latest]``, the item is in
    the catalogue. Warning (the rows are quarantined, the run goes on): exact repeats, users
    with too few interactions for leave-one-out.
    """
    mostly = 1.0 - rules.max_bad_fraction
    expectations: list[dict[str, Any]] = [
        _expectation(
            "expect_column_to_exist", "critical", "Interaction exports need this column.", column=c
        )
        for c in (USER, ITEM, TIME)
    ]
    expectations += [
        _expectation(
            "expect_column_values_to_not_be_null",
            "critical",
            "An interaction without a user, item or time cannot be used.",
            column=c,
            mostly=mostly,
        )
        for c in (USER, ITEM, TIME)
    ]
    expectations.append(
        _expectation(
            "expect_column_values_to_be_between",
            "critical",
            "Unix seconds from 1995-07-01 (Amazon's first sale) to when the rules were made; "
            "outside it the export uses another unit or epoch.",
            column=TIME,
            min_value=rules.earliest_time,
            max_value=rules.latest_time,
            mostly=mostly,
        )
    )
    if rules.catalogue is not None:
        expectations.append(
            _expectation(
                "expect_column_values_to_be_in_set",
                "critical",
                "The item has a row in the item metadata (derived column, 1 = known).",
                column=IN_CATALOGUE,
                value_set=[1],
                mostly=mostly,
            )
        )
    expectations += [
        _expectation(
            "expect_column_values_to_be_in_set",
            "warning",
            "Exact repeats of a (user, item, time) row; the first copy is kept.",
            column=DUPLICATE_RANK,
            value_set=[0],
        ),
        _expectation(
            "expect_column_values_to_be_between",
            "warning",
            "Leave-one-out needs train, validation and test interactions per user.",
            column=USER_INTERACTIONS,
            min_value=rules.min_user_interactions,
            max_value=None,
        ),
    ]
    return {
        "name": SUITE_NAME,
        "meta": {
            "applies_to": "user-item interactions (user_id, item_id, time) for recommendation",
            "derived_columns": list(DERIVED_COLUMNS),
            "built_by": "recsys.families.recommend.suite.build_interactions_suite",
        },
        "notes": "Leave-one-out ready interactions: ids, plausible times, no repeats, known items.",
        "expectations": expectations,
    }


def annotate_interactions(frame: pd.DataFrame, rules: InteractionRules) -> pd.DataFrame:
    """A copy of ``frame`` with the derived columns the suite checks (see the module docstring);
    each is missing where the cells it depends on are, so only the not-null checks judge those
    rows. ``attrs`` (the reader's rejections) are kept."""
    clash = [column for column in DERIVED_COLUMNS if column in frame.columns]
    if clash:  # they would be overwritten, then dropped from the clean frame
        raise ValueError(f"interactions already hold derived column name(s) {clash}")
    out = frame.copy()
    present = (out[USER].notna() & out[ITEM].notna() & out[TIME].notna()).to_numpy()
    rank = np.zeros(len(out), dtype=np.int64)
    keys = out.loc[present, [USER, ITEM, TIME]]
    rank[present] = keys.groupby([USER, ITEM, TIME], sort=False).cumcount().to_numpy()
    out[DUPLICATE_RANK] = _nullable(rank, ~present)

    item_known = np.ones(len(out), dtype=bool)
    if rules.catalogue is not None:
        item_known = out[ITEM].isin(rules.catalogue).to_numpy(dtype=bool)
    no_item = out[ITEM].isna().to_numpy() | (rules.catalogue is None)
    out[IN_CATALOGUE] = _nullable(item_known.astype(np.int64), no_item)

    times = pd.to_numeric(out[TIME], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    in_range = (times >= rules.earliest_time) & (times <= rules.latest_time)
    usable = present & in_range & item_known & (rank == 0)
    counts = out.loc[usable, USER].value_counts()
    per_row = out[USER].map(counts).fillna(0).to_numpy(dtype=np.int64)
    out[USER_INTERACTIONS] = _nullable(per_row, out[USER].isna().to_numpy())
    return out


def _nullable(values: np.ndarray, missing: np.ndarray) -> pd.arrays.IntegerArray:
    """``values`` as a nullable ``Int64`` array, missing where ``missing`` is true."""
    return pd.arrays.IntegerArray(values.astype(np.int64), np.asarray(missing, dtype=bool))


def _strip(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in DERIVED_COLUMNS if c in frame.columns])


def validate_interactions(
    frame: pd.DataFrame,
    output_dir: Path | str,
    *,
    rules: InteractionRules | None = None,
    catalogue: Collection[str] | None = None,
    raise_on_failure: bool = True,
) -> QualityReport:
    """Run the interactions suite over ``frame`` (from :func:`.data.read_interactions`) with the
    platform gate and return its report, derived columns removed from the frames.

    ``catalogue`` is a shortcut for ``rules.catalogue``. The suite JSON that ran is written to
    ``output_dir/suite/`` next to the report. Raises :class:`recsys.quality.DataQualityError`
    on a critical failure unless ``raise_on_failure`` is false.
    """
    rules = rules or InteractionRules()
    if catalogue is not None:
        rules = dataclasses.replace(rules, catalogue=frozenset(map(str, catalogue)))
    output_dir = Path(output_dir)
    suite_dir = output_dir / "suite"
    suite_dir.mkdir(parents=True, exist_ok=True)
    suite = build_interactions_suite(rules)
    (suite_dir / f"{SUITE_NAME}.json").write_text(json.dumps(suite, indent=2) + "\n")
    annotated = annotate_interactions(frame, rules)
    try:
        report = validate_frame(
            annotated,
            [SUITE_NAME],
            output_dir / "report",
            expectations_dir=suite_dir,
            raise_on_failure=raise_on_failure,
        )
    except DataQualityError as exc:
        if exc.report is not None:
            exc.report = dataclasses.replace(
                exc.report,
                clean=_strip(exc.report.clean),
                quarantined=_strip(exc.report.quarantined),
            )
        raise
    return dataclasses.replace(
        report, clean=_strip(report.clean), quarantined=_strip(report.quarantined)
    )
