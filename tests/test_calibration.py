"""Calibrated pair classification: the F1-best score threshold chosen on training pairs, and the
constant classifiers (majority class, "always relevant") every P/R/F1 is read against."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from recsys.families.search.calibration import choose_threshold, majority_baseline
from recsys.families.search.evaluation import pair_classification_metrics


def _f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    return float(
        precision_recall_fscore_support(
            labels, scores >= threshold, average="binary", zero_division=0
        )[2]
    )


def test_threshold_separates_separable_pairs_halfway_between_the_classes() -> None:
    relevance = np.array([3.0, 2.67, 2.33, 1.0, 1.33, 2.0])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.4])

    threshold = choose_threshold(relevance, scores, 2.33)

    assert threshold == pytest.approx(0.55)  # halfway between 0.7 (relevant) and 0.4
    assert _f1(relevance >= 2.33, scores, threshold) == 1.0


def test_threshold_is_the_f1_best_cut_and_ties_go_to_the_higher_threshold() -> None:
    rng = np.random.default_rng(0)
    relevance = rng.choice([1.0, 1.67, 2.33, 3.0], size=300)
    labels = relevance >= 2.33
    scores = np.round(labels * 0.3 + rng.normal(0.4, 0.25, size=300), 2)  # many equal scores

    threshold = choose_threshold(relevance, scores, 2.33)

    # Brute force over every candidate cut: none beats the chosen one.
    best = max(_f1(labels, scores, t) for t in np.unique(scores))
    assert _f1(labels, scores, threshold) == pytest.approx(best)

    # Two cuts with the same F1 (2/3): {0.9, 0.8, 0.7} relevant, or every pair relevant.
    tie_relevance = np.array([3.0, 1.0, 3.0, 1.0, 1.0, 3.0])
    tie_scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    labels = tie_relevance >= 2.33
    assert _f1(labels, tie_scores, 0.7) == pytest.approx(_f1(labels, tie_scores, 0.1))
    assert choose_threshold(tie_relevance, tie_scores, 2.33) == pytest.approx(0.5)


def test_mostly_relevant_pairs_can_make_always_relevant_the_f1_best_cut() -> None:
    # Scores that do not separate the classes: the F1-best cut keeps every pair relevant, and
    # the threshold is then the lowest score (nothing lower was seen).
    relevance = np.array([3.0, 3.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert choose_threshold(relevance, scores, 2.33) == pytest.approx(0.1)


def test_accuracy_is_another_criterion_with_another_answer() -> None:
    # Best first: relevant x4, irrelevant, relevant, irrelevant x2, relevant (6 of 9 relevant).
    relevance = np.array([3.0, 3.0, 3.0, 3.0, 1.0, 3.0, 1.0, 1.0, 3.0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # F1: the top 6 relevant (10/12); accuracy: the top 4 and the top 6 tie at 7/9, the higher
    # threshold wins.
    assert choose_threshold(relevance, scores, 2.33) == pytest.approx(0.35)
    assert choose_threshold(relevance, scores, 2.33, criterion="accuracy") == pytest.approx(0.55)
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold(relevance, scores, 2.33, criterion="auc")
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold(relevance, scores, 2.33, criterion="auc")


def test_degenerate_inputs_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="all 3 pairs are relevant"):
        choose_threshold(np.array([3.0, 2.67, 2.33]), np.array([0.1, 0.5, 0.9]), 2.33)
    with pytest.raises(ValueError, match="all 2 pairs are irrelevant"):
        choose_threshold(np.array([1.0, 2.0]), np.array([0.1, 0.5]), 2.33)
    with pytest.raises(ValueError, match="no pairs"):
        choose_threshold(np.array([]), np.array([]), 2.33)
    with pytest.raises(ValueError, match="2 relevance labels but 3 scores"):
        choose_threshold(np.array([1.0, 3.0]), np.array([0.1, 0.5, 0.9]), 2.33)
    with pytest.raises(ValueError, match="finite"):
        choose_threshold(np.array([1.0, 3.0]), np.array([0.1, np.nan]), 2.33)
    with pytest.raises(ValueError, match="no pairs"):
        majority_baseline(np.array([]), 2.33)


def test_majority_baseline_matches_hand_computation() -> None:
    # 17 relevant of 25 pairs (68%, like the Home Depot judged pairs).
    relevance = np.array([3.0] * 10 + [2.33] * 7 + [2.0] * 5 + [1.0] * 3)
    out = majority_baseline(relevance, 2.33)

    precision, recall = 17 / 25, 1.0
    assert out["positive_rate"] == pytest.approx(0.68)
    assert out["majority_relevant"] == 1.0
    assert out["majority_precision"] == pytest.approx(precision)
    assert out["majority_recall"] == 1.0
    assert out["majority_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert out["majority_f1"] == pytest.approx(34 / 42)  # 2 * 17 / (25 + 17) = 0.8095
    assert out["majority_accuracy"] == pytest.approx(0.68)
    assert {k: out[f"always_relevant_{k}"] for k in ("precision", "recall", "f1", "accuracy")} == {
        k: out[f"majority_{k}"] for k in ("precision", "recall", "f1", "accuracy")
    }


def test_majority_baseline_when_most_pairs_are_irrelevant() -> None:
    relevance = np.array([3.0, 1.0, 1.0, 1.33])  # 1 relevant of 4
    out = majority_baseline(relevance, 2.33)

    assert out["majority_relevant"] == 0.0
    assert (out["majority_precision"], out["majority_recall"], out["majority_f1"]) == (0, 0, 0)
    assert out["majority_accuracy"] == pytest.approx(0.75)
    assert out["always_relevant_precision"] == pytest.approx(0.25)
    assert out["always_relevant_f1"] == pytest.approx(2 * 0.25 / 1.25)  # 0.4
    assert out["always_relevant_accuracy"] == pytest.approx(0.25)
    # A tie (2 of 4) counts relevant as the majority.
    assert majority_baseline(np.array([3.0, 3.0, 1.0, 1.0]), 2.33)["majority_relevant"] == 1.0


def test_pair_metrics_report_the_majority_baseline_and_the_threshold_used() -> None:
    relevance = np.array([3.0, 2.67, 1.0, 2.33, 1.0])
    scores = np.array([0.9, 0.4, 0.6, 0.7, 0.1])
    labels = relevance >= 2.33

    fixed = pair_classification_metrics(relevance, scores, 2.33, 0.5)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, scores >= 0.5, average="binary"
    )
    assert fixed["score_threshold"] == 0.5
    assert (fixed["precision"], fixed["recall"], fixed["f1"]) == pytest.approx(
        (precision, recall, f1)
    )
    assert fixed["accuracy"] == pytest.approx(accuracy_score(labels, scores >= 0.5))
    assert fixed["positive_rate"] == pytest.approx(0.6)
    assert fixed["majority_f1"] == pytest.approx(2 * 0.6 / 1.6)
    assert fixed["majority_accuracy"] == pytest.approx(0.6)
    assert fixed["majority_recall"] == 1.0

    # Chosen on training pairs (separable at 0.3..0.5 -> 0.4), applied to the reported ones.
    train_relevance = np.array([3.0, 3.0, 1.0, 1.0])
    train_scores = np.array([0.8, 0.5, 0.3, 0.2])
    calibrated = pair_classification_metrics(
        relevance, scores, 2.33, train_relevance=train_relevance, train_scores=train_scores
    )
    assert calibrated["score_threshold"] == pytest.approx(0.4)
    assert calibrated["recall"] == 1.0  # 0.4 >= 0.4: the 2.67 pair is now predicted relevant
    with pytest.raises(ValueError, match="train_relevance and train_scores"):
        pair_classification_metrics(relevance, scores, 2.33)
