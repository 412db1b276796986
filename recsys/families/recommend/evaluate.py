"""Ranking evaluation of held-out items: one code path for every system.

A *system* is any callable ``scores(user_idx) -> array (len(user_idx), n_items)``: it scores
every train-indexed item for a batch of users (:class:`Scorer`). Baselines, trained models and
a future ONNX/Triton client are all evaluated by the same functions, on the same cases and the
same sampled negatives, so their numbers are comparable.

Two protocols, each with one relevant (held-out) item per user:

* **sampled** (:func:`evaluate_sampled`): the held-out item is ranked among ``n_negatives``
  (99) items the user never interacted with (train, validation or test), drawn once with a
  fixed seed by :func:`sample_negatives` and shared by every system; HR@k and NDCG@k. This is
  the protocol of ReChorus' published numbers.
* **full ranking** (:func:`evaluate_full`): the held-out item is ranked among *every* item the
  user has not interacted with before it: train items are excluded, and for the test stage the
  validation item too (it is known by then); Recall@k and NDCG@k. Harder and unbiased by
  sampling, so it is the number to decide on.

Ties (pessimistic, as in ReChorus): ``rank = 1 + number of other candidates scoring >= the
held-out item``. A tie never favours the held-out item, so a system cannot gain by scoring
everything alike: a constant scorer ranks every held-out item last (rank = number of
candidates) and gets HR = NDCG = 0 unless k covers all candidates. NaN scores are refused.

With one relevant item, HR@k = Recall@k = share of cases with ``rank <= k`` and NDCG@k is
``1 / log2(rank + 1)`` for those cases (the ideal DCG is 1). A held-out item that never occurs
in train (``item_idx == -1``, see :mod:`.split`) has no score; it counts as a miss (rank
infinity) and the results report how many there were. ``ranx`` is not used: it sorts by score
and breaks ties by document order, which would need a rank convention of its own, and it is a
few lines of numpy with one relevant item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import scipy.sparse as sp

from recsys.families.recommend.split import (
    ITEM_IDX,
    USER_IDX,
    LeaveOneOutSplit,
    interaction_matrix,
)

Stage = Literal["validation", "test"]
DEFAULT_BATCH = 512


class Scorer(Protocol):
    """A system under evaluation: scores for every item (columns) of each user (rows)."""

    def __call__(self, users: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EvalCases:
    """One row per evaluated user: its index, the held-out item's index (-1 if unseen in
    train), the items to leave out of its full ranking and every item it interacted with."""

    stage: str
    users: np.ndarray
    targets: np.ndarray
    exclude: sp.csr_matrix
    interacted: sp.csr_matrix
    n_items: int

    def __len__(self) -> int:
        return len(self.users)


def build_cases(split: LeaveOneOutSplit, stage: Stage = "test") -> EvalCases:
    """The evaluation cases of ``stage``: validation excludes train items from the full
    ranking, test excludes train and validation items. Negatives are never drawn from any
    item of the user's train, validation or test rows."""
    if stage not in ("validation", "test"):
        raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")
    held_out = split.validation if stage == "validation" else split.test
    n_users, n_items = split.n_users, split.n_items
    train = split.train_matrix()
    validation = interaction_matrix(split.validation, n_users, n_items)
    test = interaction_matrix(split.test, n_users, n_items)
    users = held_out[USER_IDX].to_numpy(dtype=np.int64)
    exclude = train if stage == "validation" else train + validation
    interacted = train + validation + test
    return EvalCases(
        stage=stage,
        users=users,
        targets=held_out[ITEM_IDX].to_numpy(dtype=np.int64),
        exclude=_binary(exclude)[users],
        interacted=_binary(interacted)[users],
        n_items=n_items,
    )


def _binary(matrix: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.sum_duplicates()
    out.data[:] = 1.0
    return out


def sample_negatives(cases: EvalCases, n_negatives: int = 99, seed: int = 2024) -> np.ndarray:
    """``(len(cases), n_negatives)`` distinct item indices per case, none of them an item the
    user interacted with, uniformly drawn; the same ``seed`` gives the same array.

    Raises ``ValueError`` when a user has fewer than ``n_negatives`` items left to draw from.
    """
    if n_negatives < 1:
        raise ValueError("n_negatives must be >= 1")
    rng = np.random.default_rng(seed)
    out = np.empty((len(cases), n_negatives), dtype=np.int64)
    indptr, indices = cases.interacted.indptr, cases.interacted.indices
    for row in range(len(cases)):
        seen = indices[indptr[row] : indptr[row + 1]]
        if cases.n_items - len(seen) < n_negatives:
            raise ValueError(
                f"user index {cases.users[row]} has {cases.n_items - len(seen)} items it never "
                f"interacted with, fewer than n_negatives={n_negatives}"
            )
        picked: np.ndarray = np.empty(0, dtype=np.int64)
        while len(picked) < n_negatives:  # rejection sampling: seen items are few
            draw = rng.integers(0, cases.n_items, size=2 * n_negatives + len(seen))
            draw = draw[~np.isin(draw, seen)]
            merged = np.concatenate([picked, draw])
            _, first = np.unique(merged, return_index=True)
            picked = merged[np.sort(first)]  # distinct, in draw order
        out[row] = picked[:n_negatives]
    return out


def _scores(scorer: Scorer, users: np.ndarray, n_items: int) -> np.ndarray:
    scores = np.asarray(scorer(users))
    if scores.shape != (len(users), n_items):
        raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(users), n_items)}")
    if np.isnan(scores).any():
        raise ValueError("scorer returned NaN scores")
    return scores


def _sampled_batch_ranks(
    scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray
) -> np.ndarray:
    """Sampled-protocol ranks of one batch (rows of ``scores`` = cases)."""
    seen = targets >= 0
    target_scores = scores[np.arange(len(targets)), np.where(seen, targets, 0)]
    negative_scores = np.take_along_axis(scores, negatives, axis=1)
    beaten_or_tied = (negative_scores >= target_scores[:, None]).sum(axis=1)
    return np.where(seen, 1.0 + beaten_or_tied, np.inf)


def _full_batch_ranks(
    scores: np.ndarray, targets: np.ndarray, exclude: sp.csr_matrix
) -> np.ndarray:
    """Full-ranking ranks of one batch; ``exclude`` holds the batch's rows of excluded items."""
    seen = targets >= 0
    arange = np.arange(len(targets))
    safe = np.where(seen, targets, 0)
    beaten_or_tied = scores >= scores[arange, safe][:, None]
    beaten_or_tied &= ~exclude.toarray().astype(bool)
    beaten_or_tied[arange, safe] = False  # the item itself
    return np.where(seen, 1.0 + beaten_or_tied.sum(axis=1), np.inf)


def _batches(scorer: Scorer, cases: EvalCases, batch_size: int):
    """``(rows, scores)`` of each batch of cases: the scorer is asked once per batch."""
    for start in range(0, len(cases), batch_size):
        rows = slice(start, start + batch_size)
        yield rows, _scores(scorer, cases.users[rows], cases.n_items)


def sampled_ranks(
    scorer: Scorer, cases: EvalCases, negatives: np.ndarray, batch_size: int = DEFAULT_BATCH
) -> np.ndarray:
    """Rank (1 = best, pessimistic ties) of each held-out item among itself and its negatives;
    ``inf`` for an item unseen in train."""
    if negatives.shape[0] != len(cases):
        raise ValueError("negatives must have one row per case")
    ranks = np.full(len(cases), np.inf)
    for rows, scores in _batches(scorer, cases, batch_size):
        ranks[rows] = _sampled_batch_ranks(scores, cases.targets[rows], negatives[rows])
    return ranks


def full_ranks(scorer: Scorer, cases: EvalCases, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Rank (1 = best, pessimistic ties) of each held-out item among every item not excluded
    for its user (the held-out item itself is always a candidate); ``inf`` when unseen."""
    ranks = np.full(len(cases), np.inf)
    for rows, scores in _batches(scorer, cases, batch_size):
        ranks[rows] = _full_batch_ranks(scores, cases.targets[rows], cases.exclude[rows])
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose held-out item is in the top ``k`` (= Recall@k with one item)."""
    return float(np.mean(ranks <= k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item: ``1 / log2(rank + 1)`` inside the top ``k``."""
    if not len(ranks):
        return float("nan")
    gains = np.zeros(len(ranks))
    inside = ranks <= k
    gains[inside] = 1.0 / np.log2(ranks[inside] + 1.0)
    return float(gains.mean())


def _summary(cases: EvalCases) -> dict[str, float]:
    return {
        "n_cases": float(len(cases)),
        "n_unseen_targets": float(np.sum(cases.targets < 0)),
    }


def evaluate_sampled(
    scorer: Scorer,
    cases: EvalCases,
    negatives: np.ndarray,
    ks: Sequence[int] = (5, 10),
    batch_size: int = DEFAULT_BATCH,
) -> dict[str, float]:
    """``{"HR@k", "NDCG@k"}`` for each k on the sampled protocol, plus case counts."""
    ranks = sampled_ranks(scorer, cases, negatives, batch_size)
    metrics = _summary(cases)
    for k in ks:
        metrics[f"HR@{k}"] = hit_rate(ranks, k)
        metrics[f"NDCG@{k}"] = ndcg(ranks, k)
    return metrics


def evaluate_full(
    scorer: Scorer, cases: EvalCases, ks: Sequence[int] = (20,), batch_size: int = DEFAULT_BATCH
) -> dict[str, float]:
    """``{"Recall@k", "NDCG@k"}`` for each k on the full-ranking protocol, plus case counts."""
    ranks = full_ranks(scorer, cases, batch_size)
    metrics = _summary(cases)
    for k in ks:
        metrics[f"Recall@{k}"] = hit_rate(ranks, k)
        metrics[f"NDCG@{k}"] = ndcg(ranks, k)
    return metrics


METRIC_NAMES = {
    "HR@5": "hr_at_5",
    "NDCG@5": "ndcg_at_5",
    "HR@10": "hr_at_10",
    "NDCG@10": "ndcg_at_10",
    "Recall@20": "recall_at_20",
    "NDCG@20": "ndcg_at_20",
}
"""The metrics a pipeline run reports, as :func:`evaluate_sampled` / :func:`evaluate_full` name
them -> the registry's names (MLflow metric keys cannot hold ``@``)."""


def evaluate_both(
    scorer: Scorer, cases: EvalCases, negatives: np.ndarray, batch_size: int = DEFAULT_BATCH
) -> dict[str, float]:
    """Both protocols at the pipeline's cut-offs (:data:`METRIC_NAMES`: sampled HR/NDCG@5/10,
    full Recall/NDCG@20) from ONE scoring pass: each batch of users is scored once and ranked
    both ways, the same numbers as :func:`evaluate_sampled` plus :func:`evaluate_full` of a
    deterministic scorer for half the model calls."""
    if negatives.shape[0] != len(cases):
        raise ValueError("negatives must have one row per case")
    sampled = np.full(len(cases), np.inf)
    full = np.full(len(cases), np.inf)
    for rows, scores in _batches(scorer, cases, batch_size):
        targets = cases.targets[rows]
        sampled[rows] = _sampled_batch_ranks(scores, targets, negatives[rows])
        full[rows] = _full_batch_ranks(scores, targets, cases.exclude[rows])
    metrics = {}
    for k in (5, 10):
        metrics[f"HR@{k}"], metrics[f"NDCG@{k}"] = hit_rate(sampled, k), ndcg(sampled, k)
    metrics["Recall@20"], metrics["NDCG@20"] = hit_rate(full, 20), ndcg(full, 20)
    return {METRIC_NAMES[name]: value for name, value in metrics.items()}
