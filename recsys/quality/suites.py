"""Expectation suites as reviewed JSON files, and the drift reference stored inside them.

The suites live in ``expectations/*.json`` in Great Expectations 1.x format rather than in Python
so that a data owner can review a change to the gate as a plain diff, and so that the drift
reference (a histogram of a trusted data set) is versioned together with the rules that use it.

Severity uses GX's native ``severity`` field (``"critical"``, ``"warning"`` or ``"info"``, GX
default ``"critical"``): a failed critical expectation stops the pipeline, anything else is
reported and the run goes on.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.exceptions import GreatExpectationsError
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
from great_expectations.expectations.metadata_types import FailureSeverity

from recsys.config import PROJECT_ROOT

DEFAULT_EXPECTATIONS_DIR = PROJECT_ROOT / "expectations"

KL_EXPECTATION = "expect_column_kl_divergence_to_be_less_than"

DEFAULT_RELEVANCE_BINS: tuple[float, ...] = (1.0, 1.4, 1.8, 2.2, 2.6, 3.0)
"""Bin edges for the relevance drift check.

Judged labels are averages of three raters (1, 1.25, 1.33, ... 2.67, 2.75, 3), and every inner
edge lies between two label values, so no label sits on an edge where float noise could move it
from one bin to the next. ``np.histogram`` (which GX uses) closes the last bin, so 3.0 counts.
"""

DEFAULT_KL_THRESHOLD = 0.1
"""Largest tolerated KL divergence from the reference.

Measured on the full Home Depot train set against the fixture-built reference: the whole file
scores ~0.01, 560-row samples of 70 whole queries ~0.015 (median) to 0.08 (worst of 300), while
a collapse of labels (all 1.0: ~2.4, every top label -> 2.0: ~0.7) is far above it.
"""

DEFAULT_SMOOTHING = 1.0
"""Additive (Laplace) pseudo-count per bin: a bin that is empty in the reference would otherwise
get probability 0, and a single observed value in it would make the divergence infinite."""

DEFAULT_TAIL_WEIGHT = 0.001
"""Probability mass reserved below the first and above the last edge, for the same reason: an
out-of-range label (already quarantined by the range check) must not blow the divergence up."""

_EXPECTATION_KEYS = {"type", "kwargs", "meta", "notes", "description", "severity", "id"}
_IGNORED_KEYS = {"rendered_content"}  # written by GX itself; rebuilt on render


class SuiteConfigError(ValueError):
    """A suite file is missing or malformed; the message names the file and the bad entry."""


def resolve_suite_path(name_or_path: str | os.PathLike[str], expectations_dir: Path | None) -> Path:
    """A bare name (``"queries"``) is looked up in the expectations folder; anything that looks
    like a path (has a ``.json`` suffix or a folder part) is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or len(candidate.parts) > 1:
        return candidate
    return (expectations_dir or DEFAULT_EXPECTATIONS_DIR) / f"{candidate.name}.json"


def _read_suite_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        folder = path.parent
        known = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise SuiteConfigError(f"expectation suite {path} not found (suites in {folder}: {known})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteConfigError(
            f"expectation suite {path} is not valid JSON: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(raw, dict):
        raise SuiteConfigError(f"expectation suite {path} must be a JSON object, got {type(raw)}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise SuiteConfigError(f"expectation suite {path} has no string 'name'")
    if not isinstance(raw.get("expectations"), list) or not raw["expectations"]:
        raise SuiteConfigError(f"expectation suite {path} has no non-empty 'expectations' list")
    return raw


def _build_expectation(path: Path, position: int, item: Any) -> gx.expectations.Expectation:
    where = f"expectation suite {path}, expectation #{position}"
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise SuiteConfigError(f"{where}: must be an object with a string 'type', got {item!r}")
    where = f"{where} ({item['type']})"
    unknown = set(item) - _EXPECTATION_KEYS - _IGNORED_KEYS
    if unknown:
        raise SuiteConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    severity = item.get("severity", FailureSeverity.CRITICAL.value)
    allowed = [s.value for s in FailureSeverity]
    if severity not in allowed:
        raise SuiteConfigError(f"{where}: severity {severity!r} is not one of {allowed}")
    try:
        config = ExpectationConfiguration(
            type=item["type"],
            kwargs=item.get("kwargs", {}),
            meta=item.get("meta"),
            notes=item.get("notes"),
            description=item.get("description"),
            severity=FailureSeverity(severity),
            id=item.get("id"),
        )
        return config.to_domain_obj()
    except (GreatExpectationsError, ValueError, TypeError, KeyError) as exc:
        # GX reports unknown types and bad kwargs with several exception classes (pydantic
        # validation errors are ValueErrors); one error type with the file and entry is what a
        # person editing the JSON needs.
        detail = " ".join(str(exc).split())
        raise SuiteConfigError(f"{where}: {type(exc).__name__}: {detail}") from exc


def load_suite(
    name_or_path: str | os.PathLike[str], expectations_dir: Path | None = None
) -> gx.ExpectationSuite:
    """Load and validate one suite file into a (context-free) GX ``ExpectationSuite``.

    Every expectation is instantiated here, so a typo in a type, kwarg or severity fails with a
    :class:`SuiteConfigError` before any data is touched instead of deep inside a validation run.
    """
    path = resolve_suite_path(name_or_path, expectations_dir)
    raw = _read_suite_json(path)
    expectations = [
        _build_expectation(path, position, item)
        for position, item in enumerate(raw["expectations"])
    ]
    return gx.ExpectationSuite(
        name=raw["name"],
        expectations=expectations,
        meta=raw.get("meta") or {},
        notes=raw.get("notes"),
    )


def smoothed_partition(
    values: pd.Series | Sequence[float],
    bins: Sequence[float],
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    tail_weight: float = DEFAULT_TAIL_WEIGHT,
) -> tuple[dict[str, list[float]], list[int]]:
    """A GX continuous partition object with no zero-probability bin, plus the raw bin counts.

    Laplace smoothing gives every bin ``(count + smoothing) / (n + k * smoothing)`` of the inner
    mass ``1 - 2 * tail_weight``; the tails get ``tail_weight`` each. The weights sum to one, as
    GX requires of a partition with ``tail_weights``.
    """
    edges = [float(edge) for edge in bins]
    if len(edges) < 2 or any(not math.isfinite(edge) for edge in edges):
        raise ValueError(f"bins must be at least two finite edges, got {edges}")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"bin edges must increase strictly, got {edges}")
    if smoothing <= 0 or not 0 < tail_weight < 0.5:
        raise ValueError("smoothing must be > 0 and tail_weight in (0, 0.5)")
    data = pd.to_numeric(pd.Series(values), errors="raise").dropna().to_numpy(dtype=float)
    outside = int(((data < edges[0]) | (data > edges[-1])).sum())
    if outside:
        raise ValueError(
            f"{outside} reference value(s) lie outside [{edges[0]}, {edges[-1]}]; "
            "build the reference from validated data"
        )
    if data.size == 0:
        raise ValueError("the reference column has no non-null values")
    counts, _ = np.histogram(data, bins=edges)
    probabilities = (counts + smoothing) / (counts.sum() + smoothing * len(counts))
    weights = [round(float(p) * (1.0 - 2.0 * tail_weight), 10) for p in probabilities]
    partition = {"bins": edges, "weights": weights, "tail_weights": [tail_weight, tail_weight]}
    return partition, [int(c) for c in counts]


def build_drift_reference(
    reference_df: pd.DataFrame,
    suite_path: str | os.PathLike[str],
    column: str = "relevance",
    bins: Sequence[float] = DEFAULT_RELEVANCE_BINS,
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    tail_weight: float = DEFAULT_TAIL_WEIGHT,
    source: str | None = None,
) -> None:
    """(Re)write the KL-divergence reference of ``column`` in the suite file at ``suite_path``.

    The reference is the smoothed histogram of ``reference_df[column]``; the expectation keeps
    its threshold and severity if it exists, and is added (critical, threshold
    :data:`DEFAULT_KL_THRESHOLD`) if not. The file is replaced atomically and only after the
    updated suite loads, so a failed rebuild never leaves a broken gate behind.
    """
    path = Path(suite_path)
    if column not in reference_df.columns:
        raise ValueError(f"reference frame has no column {column!r}: {list(reference_df.columns)}")
    partition, counts = smoothed_partition(
        reference_df[column], bins, smoothing=smoothing, tail_weight=tail_weight
    )
    raw = _read_suite_json(path)
    matches = [
        item
        for item in raw["expectations"]
        if isinstance(item, dict)
        and item.get("type") == KL_EXPECTATION
        and item.get("kwargs", {}).get("column") == column
    ]
    if not matches:
        matches = [
            {
                "type": KL_EXPECTATION,
                "kwargs": {"column": column, "threshold": DEFAULT_KL_THRESHOLD},
                "severity": FailureSeverity.CRITICAL.value,
                "notes": f"Distribution drift of {column} against a stored reference histogram.",
            }
        ]
        raw["expectations"].append(matches[0])
    for item in matches:
        item.setdefault("kwargs", {})["partition_object"] = partition
        item["kwargs"].setdefault("threshold", DEFAULT_KL_THRESHOLD)
        item["meta"] = {
            **(item.get("meta") or {}),
            "drift_reference": {
                "source": source or "unspecified",
                "rows": int(sum(counts)),
                "bin_counts": counts,
                "smoothing": smoothing,
                "tail_weight": tail_weight,
            },
        }
    text = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
    with tempfile.NamedTemporaryFile(
        "w",
        encoding="utf-8",
        dir=path.parent,
        prefix=f".{path.stem}-",
        suffix=".json",
        delete=False,
    ) as handle:
        handle.write(text)
        tmp_path = Path(handle.name)
    try:
        load_suite(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
