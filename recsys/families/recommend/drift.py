"""Drift of served recommendation requests against the training interactions.

Three signals, each something a shop would act on:

* **unknown users**: the share of requests naming a user the served version has no history
  for. New customers arrive all the time, so the limit is generous; a jump means the users
  table is stale (the model was trained long ago) or ids changed format upstream.
* **unknown items**: the share of item ids in requests (sessions, and known users' histories)
  that the version's catalogue does not know: new products the model cannot score.
* **popularity shift**: where the requested items sit in the training popularity curve. Items
  are cut into :data:`POPULARITY_BUCKETS` buckets of equal training mass (the head bucket holds
  a handful of best-sellers, the tail bucket thousands of rare items), so under no drift each
  bucket gets ~1/10 of the served items whatever the catalogue size; the PSI of the served
  bucket shares against that says whether traffic moved to the head or the tail (a sale, a
  season, a new assortment). A bucket-level comparison needs few samples, unlike a per-item one.

The reference (:func:`build_reference`) is written by the export into the version folder as
``interaction_reference.json``; :func:`judge` is what the platform's drift plumbing calls
through :meth:`recsys.families.recommend.family.RecommendFamily.drift_check`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

POPULARITY_BUCKETS = 10
MIN_ITEMS_FOR_POPULARITY = 200
"""Fewer requested items than this: the popularity shift is not judged (too noisy)."""
_EPSILON = 1e-4


@dataclass(frozen=True)
class RecommendDriftLimits:
    """Limits of the recommendation drift check (defaults; DAG params override them)."""

    max_unknown_user_share: float = 0.5
    """Share of user requests naming a user the version does not know."""
    max_unknown_item_share: float = 0.25
    """Share of requested item ids the version's catalogue does not know."""
    max_popularity_psi: float = 0.25
    """PSI of the served items' popularity-bucket shares against training (0.25: large)."""

    def __post_init__(self) -> None:
        for name in ("max_unknown_user_share", "max_unknown_item_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within (0, 1], got {getattr(self, name)}")
        if not self.max_popularity_psi > 0:
            raise ValueError(f"max_popularity_psi must be > 0, got {self.max_popularity_psi}")

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Any]) -> RecommendDriftLimits:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown recommendation drift limit(s) {unknown}; known: {known}")
        return cls(**{k: float(v) for k, v in overrides.items() if v is not None})


def build_reference(item_ids: np.ndarray, train_counts: np.ndarray, n_users: int) -> dict:
    """The drift reference of a version: every catalogue item's popularity bucket (0 = the
    head), cut so each bucket holds ~1/:data:`POPULARITY_BUCKETS` of the training interactions.
    ``item_ids[k]`` is item index ``k``'s id, ``train_counts[k]`` its training interactions."""
    counts = np.asarray(train_counts, dtype=np.float64)
    if len(counts) != len(item_ids) or not len(counts):
        raise ValueError("item_ids and train_counts must be non-empty and of equal length")
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    cumulative = np.cumsum(counts[order]) / total if total > 0 else np.linspace(0, 1, len(order))
    # An item's bucket is where its cumulative mass *starts*, so a best-seller heavier than a
    # bucket's share fills the head bucket alone instead of skipping buckets.
    starts = np.concatenate([[0.0], cumulative[:-1]])
    buckets = np.minimum((starts * POPULARITY_BUCKETS).astype(int), POPULARITY_BUCKETS - 1)
    bucket_of = {str(item_ids[k]): int(b) for k, b in zip(order, buckets, strict=True)}
    mass = np.zeros(POPULARITY_BUCKETS)
    np.add.at(mass, buckets, counts[order])
    shares = (mass / total).tolist() if total > 0 else [1 / POPULARITY_BUCKETS] * POPULARITY_BUCKETS
    return {
        "format": 1,
        "n_users": int(n_users),
        "n_items": len(item_ids),
        "popularity_buckets": POPULARITY_BUCKETS,
        "bucket_shares": shares,
        "item_bucket": bucket_of,
    }


def _psi(expected: Iterable[float], observed: Iterable[float]) -> float:
    total = 0.0
    for e, o in zip(expected, observed, strict=True):
        e, o = max(e, _EPSILON), max(o, _EPSILON)
        total += (o - e) * math.log(o / e)
    return total


def judge(
    reference: dict, samples: list[Any], limits: RecommendDriftLimits
) -> tuple[dict[str, Any], list[str]]:
    """``(stats, reasons)`` of sampled requests (the serving model's ``request`` objects:
    ``known_user``, ``items``, ``unknown_items``) against ``reference``."""
    requests = [s for s in samples if isinstance(s, dict)]
    user_requests = [r for r in requests if r.get("known_user") is not None]
    unknown_users = sum(1 for r in user_requests if r.get("known_user") is False)
    bucket_of = reference["item_bucket"]
    buckets = [0] * int(reference["popularity_buckets"])
    known_items = unknown_items = 0
    for request in requests:
        unknown_items += int(request.get("unknown_items") or 0)
        for item in request.get("items") or []:
            bucket = bucket_of.get(str(item))
            if bucket is None:
                continue  # counted by the model as unknown_items
            buckets[bucket] += 1
            known_items += 1
    all_items = known_items + unknown_items
    stats: dict[str, Any] = {
        "requests": len(requests),
        "user_requests": len(user_requests),
        "unknown_user_share": unknown_users / len(user_requests) if user_requests else None,
        "items": all_items,
        "unknown_item_share": unknown_items / all_items if all_items else None,
        "popularity_psi": None,
        "limits": asdict(limits),
    }
    if known_items >= MIN_ITEMS_FOR_POPULARITY:
        served = [count / known_items for count in buckets]
        stats["served_bucket_shares"] = [round(share, 4) for share in served]
        stats["popularity_psi"] = _psi(reference["bucket_shares"], served)
    reasons = []
    share = stats["unknown_user_share"]
    if share is not None and share > limits.max_unknown_user_share:
        reasons.append(
            f"{share:.0%} of {len(user_requests)} user requests name users the model does not "
            f"know (> {limits.max_unknown_user_share:.0%}): its user table is stale"
        )
    share = stats["unknown_item_share"]
    if share is not None and share > limits.max_unknown_item_share:
        reasons.append(
            f"{share:.0%} of {all_items} requested items are unknown to the model "
            f"(> {limits.max_unknown_item_share:.0%}): the catalogue moved on"
        )
    psi = stats["popularity_psi"]
    if psi is not None and psi > limits.max_popularity_psi:
        head, tail = stats["served_bucket_shares"][0], stats["served_bucket_shares"][-1]
        reasons.append(
            f"requested items' popularity shifted (PSI {psi:.2f} > {limits.max_popularity_psi}; "
            f"head bucket {head:.0%}, tail bucket {tail:.0%} of requests vs "
            f"{reference['bucket_shares'][0]:.0%} / {reference['bucket_shares'][-1]:.0%} "
            "in training)"
        )
    return stats, reasons
