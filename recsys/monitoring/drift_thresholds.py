"""The drift check's limits, in a module of their own with no numpy behind it.

:mod:`recsys.monitoring.config` reads these from the same file as the metrics thresholds, and
the per-minute metrics monitor imports that module on every check: keeping the dataclass apart
from :mod:`recsys.families.search.drift_policy` (numpy, the reference and featurizer modules) keeps
those imports off the monitor's path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DriftThresholds:
    """Limits of the drift check; per-model values come from ``RECSYS_MONITOR_CONFIG``'s
    ``drift`` section (see :mod:`recsys.monitoring.config`)."""

    min_queries: int = 200
    """Fewer new sampled queries than this: no judgement, and they stay for the next check."""
    max_queries: int = 5000
    """At most this many (a random subset) are measured per check, bounding its cost."""
    max_length_psi: float = 0.25
    """PSI above the sampling-noise floor, for token and word lengths (0.25: a large shift)."""
    max_oov_rate_increase: float = 0.15
    """Allowed rise of the OOV rate over the reference's hold-out rate (absolute)."""
    max_unk_rate_increase: float = 0.05
    """Allowed rise of the [UNK] token rate over the training rate (absolute)."""
    max_centroid_shift: float = 0.5
    """Centroid distance above the noise floor, in training spreads."""
    retrain_cooldown_hours: float = 24.0
    """After a retraining request, drift is still alerted but no new request is made for this
    long: one retraining at a time answers a lasting shift."""

    def __post_init__(self) -> None:
        if self.min_queries < 1:
            raise ValueError(f"min_queries must be >= 1, got {self.min_queries}")
        if self.max_queries < self.min_queries:
            raise ValueError(
                f"max_queries ({self.max_queries}) must be >= min_queries ({self.min_queries})"
            )
        for name in ("max_length_psi", "max_centroid_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_oov_rate_increase", "max_unk_rate_increase"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within (0, 1], got {getattr(self, name)}")
        if self.retrain_cooldown_hours < 0:
            raise ValueError(
                f"retrain_cooldown_hours must be >= 0, got {self.retrain_cooldown_hours}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
