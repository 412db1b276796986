"""Calibrated pair classification: a score threshold chosen on training pairs, and the
constant classifier every precision/recall/F1 has to be read against.

Judged Home Depot pairs are mostly relevant (about 68% at ``relevance >= 2.33``), so a model that
calls every pair relevant already scores F1 ~0.81: an F1 of 0.81 says nothing until it is shown
beside that constant classifier's. And a fixed ``score >= 0.5`` is an arbitrary operating point
for a cosine or a sigmoid that was never trained to be calibrated at 0.5; the threshold is
chosen on training (or validation) pairs by the metric that is reported, F1, and then applied
unchanged to the held-out pairs, so the held-out numbers are an honest estimate.
"""

from __future__ import annotations

import numpy as np

THRESHOLD_CRITERIA = ("f1", "accuracy")
CLASSIFICATION_KEYS = ("precision", "recall", "f1", "accuracy")
"""The pair-classification metrics; :func:`.evaluation.pair_classification_metrics` returns each
also with a ``majority_`` prefix (the majority-class baseline), plus ``score_threshold`` and
``positive_rate``."""


def _labels_and_scores(
    relevance: np.ndarray, scores: np.ndarray, positive_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(relevance, dtype=np.float64).ravel() >= positive_threshold
    values = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != values.shape:
        raise ValueError(f"{labels.size} relevance labels but {values.size} scores")
    if labels.size == 0:
        raise ValueError("no pairs to choose a score threshold on")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite (NaN or inf found)")
    return labels, values


def choose_threshold(
    relevance: np.ndarray,
    scores: np.ndarray,
    positive_threshold: float,
    *,
    criterion: str = "f1",
) -> float:
    """The score threshold (predict relevant when ``score >= threshold``) that maximises
    ``criterion`` on these pairs: training or validation pairs, never the ones reported.

    ``criterion`` is ``"f1"`` (default: the metric the tables report, so the operating point is
    the one that metric favours) or ``"accuracy"`` (the natural choice when the result is read
    against the majority class's accuracy). Every distinct score is a candidate cut; the
    returned threshold lies halfway between the lowest score predicted relevant and the next
    lower score, so held-out scores between two training scores are not decided by which
    training score happened to be nearest. When predicting every pair relevant is best, the
    lowest score itself is returned (held-out scores below every training score are then
    predicted irrelevant).

    Ties (several cuts with the same best value) go to the highest threshold, the one that
    predicts the fewest pairs relevant. With F1 on data that is mostly positive the best cut can
    be "everything relevant": that is an answer, not an error, and it is why the majority
    baseline (:func:`majority_baseline`) is reported beside it.

    Raises ``ValueError`` for empty inputs, non-finite scores, or pairs of one class only
    (all relevant or none): no threshold is learnable from them, and a silent fallback would
    report a calibration that never happened.
    """
    if criterion not in THRESHOLD_CRITERIA:
        raise ValueError(f"criterion must be one of {THRESHOLD_CRITERIA}, got {criterion!r}")
    labels, values = _labels_and_scores(relevance, scores, positive_threshold)
    positives = int(labels.sum())
    if positives in (0, labels.size):
        kind = "relevant" if positives else "irrelevant"
        raise ValueError(
            f"all {labels.size} pairs are {kind} at relevance >= {positive_threshold}: "
            "a score threshold needs both classes to be chosen"
        )
    order = np.argsort(-values, kind="stable")
    sorted_values, sorted_labels = values[order], labels[order]
    # Cut after the last occurrence of each distinct score: predicted relevant = score >= it.
    last_of_value = np.flatnonzero(np.r_[sorted_values[1:] != sorted_values[:-1], True])
    true_pos = np.cumsum(sorted_labels)[last_of_value].astype(np.float64)
    predicted = (last_of_value + 1).astype(np.float64)
    if criterion == "f1":
        objective = 2.0 * true_pos / (predicted + positives)
    else:
        negatives = labels.size - positives
        objective = (true_pos + (negatives - (predicted - true_pos))) / labels.size
    best = int(np.flatnonzero(objective >= objective.max() - 1e-12)[0])  # highest threshold
    cut = float(sorted_values[last_of_value[best]])
    if best + 1 < len(last_of_value):
        below = float(sorted_values[last_of_value[best + 1]])
        middle = (cut + below) / 2.0
        return middle if below < middle <= cut else cut  # adjacent floats: no room between
    return cut


def _constant_metrics(labels: np.ndarray, predict_relevant: bool) -> dict[str, float]:
    positives = float(labels.sum())
    total = float(labels.size)
    if predict_relevant:
        precision = positives / total
        recall = 1.0
        f1 = 2.0 * precision / (precision + 1.0) if positives else 0.0
        accuracy = positives / total
    else:  # predicts nothing relevant: precision/recall/F1 are 0 (sklearn's zero_division=0)
        precision = recall = f1 = 0.0
        accuracy = (total - positives) / total
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def majority_baseline(relevance: np.ndarray, positive_threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of constant classifiers on these pairs.

    ``majority_*``: the classifier that always predicts these pairs' majority class (relevant
    on a tie), i.e. the best constant guess by accuracy: any model's accuracy should be read
    against ``majority_accuracy``. Predicting "irrelevant" has precision/recall/F1 of 0 (no
    predicted positives; sklearn's ``zero_division=0``). ``always_relevant_*``: the constant
    "relevant" classifier, the one to read an F1 against (its recall is 1 and its precision the
    positive rate); equal to ``majority_*`` whenever relevant pairs are the majority.
    ``positive_rate`` is the share of relevant pairs and ``majority_relevant`` 1.0 when the
    majority class is "relevant", else 0.0 (all values are floats, ready for MLflow).
    """
    labels = np.asarray(relevance, dtype=np.float64).ravel() >= positive_threshold
    if labels.size == 0:
        raise ValueError("no pairs to compute a majority baseline on")
    majority_relevant = 2 * int(labels.sum()) >= labels.size
    out = {f"majority_{k}": v for k, v in _constant_metrics(labels, majority_relevant).items()}
    out.update({f"always_relevant_{k}": v for k, v in _constant_metrics(labels, True).items()})
    out["majority_relevant"] = 1.0 if majority_relevant else 0.0
    out["positive_rate"] = float(labels.mean())
    return out
