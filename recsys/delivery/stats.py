"""Is the candidate's conversion rate different from the stable arm's? Per-arm comparison.

Each request an arm serves is one Bernoulli trial (converted or not, see
:meth:`recsys.delivery.feedback.FeedbackLog.arm_outcomes`), so each arm is a binomial sample
and the comparison is of two independent proportions. The choices, and why:

* **Per-arm interval**: Wilson score interval (``scipy.stats.binomtest(...).proportion_ci(
  method="wilson")``). Unlike the textbook normal (Wald) interval it stays inside [0, 1] and
  keeps its coverage for the small rates (CTR of a few percent) and small canary samples that
  rollouts produce.
* **Interval of the difference** (candidate - stable): Newcombe's hybrid score interval
  (Newcombe 1998, method 10), built from the two Wilson intervals. It inherits their good
  coverage near 0 and 1 where the unpooled Wald interval of the difference is too narrow.
* **p-value**: two-sided two-proportion z-test with the pooled standard error (the standard
  test of H0 "same rate"; it equals Pearson's chi-square test without continuity correction).
  When any cell of the 2x2 table (conversions and non-conversions of each arm) is below 5 the
  normal approximation is poor, so Fisher's exact test (``scipy.stats.fisher_exact``) is used
  instead; ``test`` says which.
* **Harm guard**: ``p_value_worse`` is the one-sided p-value of "candidate < stable" with the
  same test. A rollout must stop as soon as the candidate is credibly worse, and the one-sided
  test has more power for exactly that question; ``candidate_worse`` uses it at ``alpha``.

Intervals are at the confidence level ``1 - alpha`` (95% for the default ``alpha=0.05``), so
they tell the same story as the test at the same level. The decision is ``not_enough_data``
until both arms have ``min_impressions``, because a significance test on a handful of requests
is mostly noise (and peeking often at small samples inflates false alarms).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

from recsys.delivery.feedback import ArmOutcome

DECISIONS = ("candidate_better", "candidate_worse", "no_significant_difference", "not_enough_data")
Z_TEST, FISHER = "z_test_pooled", "fisher_exact"
MIN_CELL = 5
"""Smallest 2x2 cell count for which the z-test's normal approximation is trusted."""


@dataclass(frozen=True)
class ArmResult:
    """One arm's conversion rate with its Wilson interval (all None without impressions)."""

    arm: str
    versions: list[int]
    impressions: int
    conversions: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None

    @classmethod
    def from_outcome(cls, outcome: ArmOutcome, confidence_level: float = 0.95) -> ArmResult:
        """The rate and Wilson interval of ``outcome``; ``ValueError`` for impossible counts."""
        n, k = outcome.impressions, outcome.conversions
        for name, value in (("impressions", n), ("conversions", k)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{outcome.arm} {name} must be an integer >= 0, got {value!r}")
        if k > n:
            raise ValueError(f"{outcome.arm} has {k} conversions but only {n} impressions")
        if n == 0:
            return cls(outcome.arm, list(outcome.versions), 0, 0, None, None, None)
        ci = stats.binomtest(int(k), int(n)).proportion_ci(
            confidence_level=confidence_level, method="wilson"
        )
        return cls(
            outcome.arm,
            list(outcome.versions),
            int(n),
            int(k),
            k / n,
            float(ci.low),
            float(ci.high),
        )


@dataclass(frozen=True)
class ArmComparison:
    """Candidate vs stable: the two arms, the difference with its interval, the tests and the
    decision. Statistics that need data from both arms are None while an arm has none."""

    stable: ArmResult
    candidate: ArmResult
    difference: float | None
    """Candidate rate minus stable rate."""
    difference_ci_low: float | None
    difference_ci_high: float | None
    test: str | None
    """``"z_test_pooled"`` or ``"fisher_exact"`` (some 2x2 cell below 5)."""
    p_value: float | None
    """Two-sided: is there any difference?"""
    p_value_worse: float | None
    """One-sided: is the candidate worse?"""
    significant: bool
    candidate_worse: bool
    enough_data: bool
    decision: str
    summary: str
    alpha: float
    confidence_level: float
    min_impressions: int
    metric: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for audit records and MLflow params)."""
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The numeric results as a flat ``{name: float}`` (for ``mlflow.log_metrics``); a
        statistic that is None (no data yet) is left out."""
        values: dict[str, float | None] = {}
        for arm in (self.stable, self.candidate):
            values.update(
                {
                    f"{arm.arm}_impressions": arm.impressions,
                    f"{arm.arm}_conversions": arm.conversions,
                    f"{arm.arm}_rate": arm.rate,
                    f"{arm.arm}_ci_low": arm.ci_low,
                    f"{arm.arm}_ci_high": arm.ci_high,
                }
            )
        values.update(
            difference=self.difference,
            difference_ci_low=self.difference_ci_low,
            difference_ci_high=self.difference_ci_high,
            p_value=self.p_value,
            p_value_worse=self.p_value_worse,
            significant=float(self.significant),
            candidate_worse=float(self.candidate_worse),
            enough_data=float(self.enough_data),
        )
        return {name: float(value) for name, value in values.items() if value is not None}


def newcombe_interval(stable: ArmResult, candidate: ArmResult) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``candidate.rate - stable.rate`` from the two arms'
    Wilson intervals (same confidence level as those intervals)."""
    if candidate.rate is None or stable.rate is None:
        raise ValueError("both arms need impressions for an interval of the difference")
    assert candidate.ci_low is not None and candidate.ci_high is not None
    assert stable.ci_low is not None and stable.ci_high is not None
    difference = candidate.rate - stable.rate
    low = difference - math.hypot(candidate.rate - candidate.ci_low, stable.ci_high - stable.rate)
    high = difference + math.hypot(candidate.ci_high - candidate.rate, stable.rate - stable.ci_low)
    return max(-1.0, low), min(1.0, high)


def two_proportion_test(stable: ArmResult, candidate: ArmResult) -> tuple[str, float, float]:
    """``(test, two-sided p, one-sided p of candidate < stable)``: pooled z-test, or Fisher's
    exact test when a cell of the 2x2 table is below :data:`MIN_CELL`."""
    n_s, k_s = stable.impressions, stable.conversions
    n_c, k_c = candidate.impressions, candidate.conversions
    if n_s == 0 or n_c == 0:
        raise ValueError("both arms need impressions for a test")
    table = [[k_c, n_c - k_c], [k_s, n_s - k_s]]
    if min(min(row) for row in table) < MIN_CELL:
        two_sided = stats.fisher_exact(table, alternative="two-sided").pvalue
        worse = stats.fisher_exact(table, alternative="less").pvalue  # odds ratio < 1
        return FISHER, float(two_sided), float(worse)
    pooled = (k_s + k_c) / (n_s + n_c)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_s + 1.0 / n_c))
    z = (k_c / n_c - k_s / n_s) / se  # se > 0: every cell >= 5 means 0 < pooled < 1
    return Z_TEST, float(2.0 * stats.norm.sf(abs(z))), float(stats.norm.cdf(z))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _arm_text(arm: ArmResult) -> str:
    if arm.rate is None:
        return f"{arm.arm} n/a (0 impressions)"
    return f"{arm.arm} {_percent(arm.rate)}% [{_percent(arm.ci_low)}, {_percent(arm.ci_high)}]"


def _p_text(p: float) -> str:
    return "p<0.0001" if p < 0.0001 else f"p={p:.4f}"


def compare_arms(
    stable: ArmOutcome,
    candidate: ArmOutcome,
    *,
    alpha: float = 0.05,
    min_impressions: int = 100,
    metric: str = "CTR",
) -> ArmComparison:
    """Compare the candidate's conversion rate with the stable arm's (see the module docstring
    for the methods). ``metric`` only names the rate in ``summary`` ("CTR", "purchase rate").

    Decision, in this order: ``not_enough_data`` while either arm has fewer than
    ``min_impressions``; ``candidate_worse`` when the one-sided test says so at ``alpha``
    (checked before "better" so harm is never reported as anything else);
    ``candidate_better`` when the two-sided test is significant and the difference positive;
    otherwise ``no_significant_difference``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    if (
        isinstance(min_impressions, bool)
        or not isinstance(min_impressions, numbers.Integral)
        or min_impressions < 1
    ):
        raise ValueError(f"min_impressions must be an integer >= 1, got {min_impressions!r}")
    alpha = float(alpha)
    confidence = 1.0 - alpha
    stable_result = ArmResult.from_outcome(stable, confidence)
    candidate_result = ArmResult.from_outcome(candidate, confidence)
    enough = min(stable_result.impressions, candidate_result.impressions) >= min_impressions

    difference = low = high = p_value = p_worse = test = None
    if stable_result.impressions and candidate_result.impressions:
        assert candidate_result.rate is not None and stable_result.rate is not None
        difference = candidate_result.rate - stable_result.rate
        low, high = newcombe_interval(stable_result, candidate_result)
        test, p_value, p_worse = two_proportion_test(stable_result, candidate_result)
    significant = p_value is not None and p_value < alpha
    worse = p_worse is not None and p_worse < alpha

    if not enough:
        decision = "not_enough_data"
        verdict = (
            f"not enough data ({candidate_result.impressions} candidate / "
            f"{stable_result.impressions} stable impressions, need {min_impressions} each)"
        )
    elif worse:
        decision, verdict = "candidate_worse", "candidate worse"
    elif significant and difference is not None and difference > 0:
        decision, verdict = "candidate_better", "candidate better"
    else:
        decision, verdict = "no_significant_difference", "no significant difference"

    parts = [f"{metric} {_arm_text(candidate_result)} vs {_arm_text(stable_result)}"]
    if difference is not None and low is not None and high is not None:
        parts.append(
            f"{100 * difference:+.1f} pts [{100 * low:.1f}, {100 * high:.1f}]"
            + ("" if test == Z_TEST else " (Fisher exact)")
        )
    if p_value is not None:
        parts.append(_p_text(p_value))
    summary = f"{', '.join(parts)}: {verdict}"

    return ArmComparison(
        stable=stable_result,
        candidate=candidate_result,
        difference=difference,
        difference_ci_low=low,
        difference_ci_high=high,
        test=test,
        p_value=p_value,
        p_value_worse=p_worse,
        significant=significant,
        candidate_worse=worse,
        enough_data=enough,
        decision=decision,
        summary=summary,
        alpha=alpha,
        confidence_level=confidence,
        min_impressions=int(min_impressions),
        metric=metric,
    )
