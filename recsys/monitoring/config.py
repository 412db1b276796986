"""Per-model monitor thresholds from a file, so a platform team tunes limits without a redeploy.

Different models have different normal latencies and error budgets: one set of DAG-wide numbers
either pages for a slow-but-fine reranker or misses a regression in a fast lookup model. The file
named by ``RECSYS_MONITOR_CONFIG`` (YAML or JSON; JSON is valid YAML, so one parser reads both)
holds defaults and per-model overrides::

    defaults:
      max_error_rate: 0.05
      max_rejected_rate: 0.5    # requests the model refused itself (bad/oversized input)
      max_mean_latency_ms: 1000
      max_p99_latency_ms: 2500
      min_requests: 5
      consecutive_windows: 1
    models:
      product_search:
        max_p99_latency_ms: 400
        consecutive_windows: 2
    drift:                      # the query_drift DAG's limits, same layout
      defaults:
        min_queries: 200
        max_centroid_shift: 0.5
      models:
        product_search:
          max_oov_rate_increase: 0.1

Precedence (for :class:`~recsys.monitoring.drift_thresholds.DriftThresholds` likewise, from the
``drift`` section), lowest first: :class:`~recsys.monitoring.policy.Thresholds` defaults, the file's
``defaults``, the file's entry for the model, then explicit overrides (the DAG params a person
set for one run). An unknown key or a bad value fails loudly: a typo like ``max_error_rte``
silently ignored would leave a model monitored with limits nobody chose.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recsys.monitoring.drift_thresholds import DriftThresholds
from recsys.monitoring.policy import Thresholds

CONFIG_ENV = "RECSYS_MONITOR_CONFIG"
THRESHOLD_FIELDS = frozenset(f.name for f in dataclasses.fields(Thresholds))
DRIFT_THRESHOLD_FIELDS = frozenset(f.name for f in dataclasses.fields(DriftThresholds))


class MonitorConfigError(ValueError):
    """The thresholds file is missing, unparseable or names unknown keys / invalid values."""


def _check_keys(section: str, values: Any, fields: frozenset[str]) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise MonitorConfigError(f"{section} must be a mapping of threshold names to values")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise MonitorConfigError(
            f"{section} has unknown threshold(s) {unknown}; known: {sorted(fields)}"
        )
    return dict(values)


def _sections(where: str, data: Mapping[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """``{"defaults": {...}, "models": {name: {...}}}`` of one part of the file, validated."""
    models = data.get("models") or {}
    if not isinstance(models, Mapping):
        raise MonitorConfigError(f"{where}'models' must map model names")
    return {
        "defaults": _check_keys(f"{where}defaults", data.get("defaults"), fields),
        "models": {
            str(name): _check_keys(f"{where}models.{name}", values, fields)
            for name, values in models.items()
        },
    }


def read_config(path: Path | str) -> dict[str, Any]:
    """Parse and validate the file's structure: ``{"defaults": {...}, "models": {name: {...}},
    "drift": {"defaults": {...}, "models": {...}}}`` (every part optional)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MonitorConfigError(f"cannot read monitor config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise MonitorConfigError(f"monitor config {path} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise MonitorConfigError(f"monitor config {path} must be a mapping at the top level")
    unknown = sorted(set(data) - {"defaults", "models", "drift"})
    if unknown:
        raise MonitorConfigError(f"monitor config {path}: unknown top-level key(s) {unknown}")
    drift = data.get("drift") or {}
    if not isinstance(drift, Mapping) or set(drift) - {"defaults", "models"}:
        raise MonitorConfigError(
            f"monitor config {path}: 'drift' must be a mapping with 'defaults' and/or 'models'"
        )
    return {
        **_sections(f"monitor config {path}: ", data, THRESHOLD_FIELDS),
        "drift": _sections(f"monitor config {path}: drift.", drift, DRIFT_THRESHOLD_FIELDS),
    }


def _resolve(
    model: str,
    path: Path | str | None,
    overrides: Mapping[str, Any] | None,
    *,
    drift: bool,
) -> Any:
    """Merge built-in defaults < file defaults < file model entry < set ``overrides`` into
    :class:`Thresholds`, or (``drift``) :class:`DriftThresholds` from the ``drift`` section."""
    if drift:
        cls, fields, label = DriftThresholds, DRIFT_THRESHOLD_FIELDS, "drift "
    else:
        cls, fields, label = Thresholds, THRESHOLD_FIELDS, ""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    merged: dict[str, Any] = {}
    if path is not None:
        config = read_config(path)
        section = config["drift"] if drift else config
        merged.update(section["defaults"])
        merged.update(section["models"].get(model, {}))
    set_overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged.update(_check_keys(f"{label}overrides", set_overrides, fields))
    try:
        return cls(**merged)
    except (TypeError, ValueError) as exc:
        raise MonitorConfigError(
            f"invalid {label}thresholds for {model} ({path or 'defaults'}): {exc}"
        ) from exc


def load_thresholds(
    model: str,
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Thresholds:
    """The thresholds for ``model``: built-in defaults < file defaults < file model entry <
    ``overrides`` (``None`` values in ``overrides`` mean "not set" and are skipped).

    ``path`` defaults to ``$RECSYS_MONITOR_CONFIG``; with neither, only the built-in defaults
    and the overrides apply.
    """
    return _resolve(model, path, overrides, drift=False)


def load_drift_thresholds(
    model: str,
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DriftThresholds:
    """The query-drift limits for ``model``, with the same precedence as
    :func:`load_thresholds` over the file's ``drift`` section."""
    return _resolve(model, path, overrides, drift=True)
