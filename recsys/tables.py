"""Comparison tables of systems scored on the same held-out data, as MLflow artifacts.

Every family's pipeline writes its model-vs-baselines and challenger-vs-champion tables with
these, so the MLflow UI reads alike whatever the model: JSON and CSV for machines, a grouped
bar chart for people.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def comparison_table(results: Mapping[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per system, ``{"system": name, <key>: value, ...}``, with the same keys in
    every row (a system lacking one is an error, not a silent blank). A result is a metrics
    mapping or an object with a ``metrics`` mapping."""
    rows = []
    for system, result in results.items():
        metrics = result if isinstance(result, Mapping) else result.metrics
        missing = [k for k in keys if k not in metrics]
        if missing:
            raise KeyError(f"{system} lacks metric(s) {missing}")
        rows.append({"system": system, **{k: float(metrics[k]) for k in keys}})
    return rows


def write_table(rows: list[dict[str, Any]], path_stem: Path) -> list[Path]:
    """Write ``rows`` as ``<stem>.json`` and ``<stem>.csv`` (for MLflow artifacts); return both."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = path_stem.with_suffix(".json")
    csv_path = path_stem.with_suffix(".csv")
    json_path.write_text(json.dumps(rows, indent=2))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["system"])
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def plot_table(
    rows: list[dict[str, Any]], path: Path, keys: tuple[str, ...], title: str = ""
) -> Path:
    """Draw ``rows`` (from :func:`comparison_table`) as grouped bars, one group per metric, so
    the MLflow UI shows at a glance which system wins where."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = tuple(k for k in keys if all(k in row for row in rows))
    figure, axes = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 4.0))
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        positions = [i + (index - (len(rows) - 1) / 2) * width for i in range(len(keys))]
        bars = axes.bar(positions, [row[k] for k in keys], width, label=row["system"])
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axes.set_xticks(range(len(keys)), keys)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("score on held-out data")
    axes.set_title(title or "model quality")
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
