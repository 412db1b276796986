"""Judge a sample of served queries against the training reference: pure, no I/O.

Four signals, each with its own limit (:class:`DriftThresholds`), any one of which is drift:

* **length** -- PSI (population stability index) of the token-length and word-length
  distributions over the reference's bins. Counts are smoothed (+0.5 per bin) so an empty bin
  is finite. PSI has a floor from sampling noise alone: both sides are samples of the same
  population (``n`` served queries, and the ``N`` training queries the reference counted), so
  even with no drift it is about ``(bins - 1) * (1/n + 1/N)``; the limit applies on top of
  that floor, so a small sample of perfectly ordinary queries is not called drifted. (The
  ``1/N`` half is the reference's own noise: invisible when the sample is drawn from the
  reference queries themselves, as large as the sample's when new queries meet a reference of
  a similar size);
* **OOV rate** -- share of the sample's words not in the training vocabulary, compared with
  the rate expected of new in-distribution queries (the reference's hold-out estimate);
* **[UNK] rate** -- share of tokens the tokenizer cannot spell at all (another script, emoji,
  binary junk), compared with the training rate;
* **centroid shift** -- cosine distance between the sample's embedding centroid and the
  training centroid, in units of the training spread (the mean cosine distance of a training
  query to its centroid), again on top of the distance sampling noise alone would give
  (about ``(1 - r^2) / (2 r^2) * (1/n + 1/N)``, ``r`` being the length of the training mean
  embedding and ``N`` the number of training queries its centroid was measured on).

Too few sampled queries means no judgement at all, like the metrics monitor's no-traffic rule:
a quiet hour is neither drift nor its absence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from recsys.families.search.drift_reference import (
    MAX_EMBEDDED_QUERIES,
    LengthHistogram,
    QueryReference,
)
from recsys.families.search.query_features import QueryFeatures, normalised_centroid
from recsys.monitoring.drift_thresholds import DriftThresholds


def psi(reference_counts: Sequence[int], sample_counts: Sequence[int]) -> float:
    """Population stability index of two count vectors over the same bins (+0.5 smoothing)."""
    ref = np.asarray(reference_counts, dtype=float) + 0.5
    got = np.asarray(sample_counts, dtype=float) + 0.5
    ref, got = ref / ref.sum(), got / got.sum()
    return float(np.sum((got - ref) * np.log(got / ref)))


def _length_stats(name: str, histogram: LengthHistogram, lengths: list[int]) -> dict[str, Any]:
    counts = histogram.bin_counts(lengths)
    both_samples = 1 / max(len(lengths), 1) + 1 / max(sum(histogram.counts), 1)
    return {
        f"{name}_psi": psi(histogram.counts, counts),
        f"{name}_psi_noise": (len(counts) - 1) * both_samples,
        f"mean_{name}": float(np.mean(lengths)) if lengths else None,
    }


def drift_stats(
    reference: QueryReference, features: QueryFeatures, embeddings: np.ndarray
) -> dict[str, Any]:
    """Every statistic the judgement uses, as plain floats (they go into XCom, the audit log
    and the alert)."""
    n = len(features.token_lengths)
    words = [word for query_words in features.words for word in query_words]
    oov = sum(1 for word in words if word not in reference.vocabulary)
    centroid, _ = normalised_centroid(embeddings)
    distance = float(1.0 - np.clip(centroid @ reference.centroid, -1.0, 1.0))
    r = max(reference.centroid_norm, 1e-6)
    embedded = min(reference.queries, MAX_EMBEDDED_QUERIES)  # what its centroid averaged
    noise = (1.0 - r * r) / (2.0 * r * r) * (1 / max(n, 1) + 1 / max(embedded, 1))
    return {
        "queries": n,
        **_length_stats("token_length", reference.token_length, features.token_lengths),
        **_length_stats("word_length", reference.word_length, features.word_lengths),
        "oov_rate": oov / len(words) if words else 0.0,
        "reference_oov_rate": reference.oov_rate,
        "unk_rate": features.unk_rate,
        "reference_unk_rate": reference.unk_rate,
        "centroid_distance": distance,
        "centroid_shift": distance / reference.spread,
        "centroid_shift_noise": noise / reference.spread,
        "mean_cosine_to_reference_centroid": float(np.mean(embeddings @ reference.centroid)),
        "reference_mean_cosine": 1.0 - reference.spread,
    }


def drift_reasons(stats: dict[str, Any], thresholds: DriftThresholds) -> list[str]:
    """One human-readable reason per signal over its limit; empty when nothing drifted."""
    reasons = []
    for name, label in (("token_length", "token-length"), ("word_length", "word-length")):
        value, floor = stats[f"{name}_psi"], stats[f"{name}_psi_noise"]
        if value > thresholds.max_length_psi + floor:
            reasons.append(
                f"{label} PSI {value:.3f} > max {thresholds.max_length_psi:g} "
                f"(+{floor:.3f} sampling noise); mean {stats[f'mean_{name}']:.1f}"
            )
    oov_rise = stats["oov_rate"] - stats["reference_oov_rate"]
    if oov_rise > thresholds.max_oov_rate_increase:
        reasons.append(
            f"OOV rate {stats['oov_rate']:.1%} vs {stats['reference_oov_rate']:.1%} expected "
            f"(+{oov_rise:.1%} > max +{thresholds.max_oov_rate_increase:.1%})"
        )
    unk_rise = stats["unk_rate"] - stats["reference_unk_rate"]
    if unk_rise > thresholds.max_unk_rate_increase:
        reasons.append(
            f"[UNK] token rate {stats['unk_rate']:.1%} vs {stats['reference_unk_rate']:.1%} in "
            f"training (+{unk_rise:.1%} > max +{thresholds.max_unk_rate_increase:.1%})"
        )
    shift, floor = stats["centroid_shift"], stats["centroid_shift_noise"]
    if math.isfinite(shift) and shift > thresholds.max_centroid_shift + floor:
        reasons.append(
            f"embedding centroid moved {shift:.2f} training spreads "
            f"(cosine distance {stats['centroid_distance']:.4f}) > max "
            f"{thresholds.max_centroid_shift:g} (+{floor:.2f} sampling noise)"
        )
    return reasons
