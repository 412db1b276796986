"""Baselines every recommendation model must beat: popularity, item-kNN and BPR-MF.

Each is fitted on the binary train matrix of :class:`.split.LeaveOneOutSplit` (users x items,
train indices) and is then a :class:`.evaluate.Scorer`: ``system(user_idx) -> scores`` for every
item. All are deterministic for a given seed, so a regression in a candidate model cannot hide
behind baseline noise.

* :class:`Popularity` scores an item by how many train users interacted with it: the floor a
  personalised model must clear (on Amazon data it is far from trivial).
* :class:`ItemKNN` scores an item by the summed cosine similarity to the user's train items
  (Deshpande & Karypis, 2004), optionally keeping only each item's ``neighbours`` most similar
  items. The similarity is a ``scipy.sparse`` product: a dense 8.7k x 8.7k float32 matrix would
  be 300 MB, the sparse one of the Amazon train split holds 1.4M entries (11 MB). The default
  keeps every neighbour: on that split pruning to 100 left many held-out items with score 0,
  tied with the negatives, which the pessimistic rank counts against them (sampled HR@10 0.24
  pruned vs 0.36 unpruned).
* :class:`BPR` is matrix factorisation trained with the Bayesian personalised ranking loss
  (Rendle et al., 2009) in torch on the CPU: the classic learned baseline of ReChorus' table.
* :class:`RandomScorer` is the sanity floor: any baseline must beat it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch


def _check_matrix(train: sp.spmatrix) -> sp.csr_matrix:
    matrix = sp.csr_matrix(train, dtype=np.float32, copy=True)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0 or matrix.nnz == 0:
        raise ValueError(f"train matrix is empty: shape {matrix.shape}, {matrix.nnz} entries")
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


class RandomScorer:
    """Uniform random scores, reproducible per (seed, user) whatever the batch."""

    def __init__(self, n_items: int, seed: int = 0) -> None:
        self.n_items = n_items
        self.seed = seed

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return np.stack(
            [np.random.default_rng([self.seed, int(user)]).random(self.n_items) for user in users]
        ).astype(np.float32)


class Popularity:
    """Number of train users per item, the same list for everyone."""

    def fit(self, train: sp.spmatrix) -> Popularity:
        matrix = _check_matrix(train)
        self.counts = np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel()
        return self

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


class ItemKNN:
    """Item-based k-nearest neighbours over the binary train matrix (cosine similarity)."""

    def __init__(self, neighbours: int | None = None) -> None:
        if neighbours is not None and neighbours < 1:
            raise ValueError("neighbours must be >= 1 or None (keep all)")
        self.neighbours = neighbours

    def fit(self, train: sp.spmatrix) -> ItemKNN:
        matrix = _check_matrix(train)
        self.user_items = matrix
        item_users = matrix.T.tocsr()
        co = (item_users @ matrix).tocsr()  # items x items co-occurrence counts
        norms = np.sqrt(np.asarray(co.diagonal(), dtype=np.float64))
        norms[norms == 0] = 1.0
        inverse = sp.diags((1.0 / norms).astype(np.float32))
        sim = (inverse @ co @ inverse).tocsr().astype(np.float32)
        sim.setdiag(0.0)
        sim.eliminate_zeros()
        self.similarity = self._prune(sim) if self.neighbours else sim
        return self

    def _prune(self, sim: sp.csr_matrix) -> sp.csr_matrix:
        """Keep each row's ``neighbours`` largest similarities (ties: lower item index)."""
        k = int(self.neighbours or 0)
        keep = np.zeros(sim.nnz, dtype=bool)
        for row in range(sim.shape[0]):
            start, end = sim.indptr[row], sim.indptr[row + 1]
            if end - start <= k:
                keep[start:end] = True
                continue
            values, columns = sim.data[start:end], sim.indices[start:end]
            order = np.lexsort((columns, -values))[:k]
            keep[start + order] = True
        pruned = sim.copy()
        pruned.data[~keep] = 0.0  # similarities are > 0 here, so only dropped entries vanish
        pruned.eliminate_zeros()
        return pruned

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.user_items[users] @ self.similarity).toarray(), dtype=np.float32)


@dataclass
class BPR:
    """Matrix factorisation with the BPR loss ``-log sigmoid(x_ui - x_uj)`` over (user, seen
    item, unseen item) triples, plus L2 on the embeddings of each triple, trained with Adam.

    Every epoch visits each train interaction once with one fresh negative, drawn uniformly and
    redrawn while it is one of the user's train items. ``seed`` fixes the initialisation and all
    sampling, so two fits give the same model on the same machine. ``loss_history`` holds the
    mean loss of each epoch.
    """

    dim: int = 64
    epochs: int = 20
    lr: float = 1e-3
    reg: float = 1e-5
    batch_size: int = 1024
    seed: int = 0
    loss_history: list[float] = field(default_factory=list, init=False)

    def fit(self, train: sp.spmatrix) -> BPR:
        matrix = _check_matrix(train).tocoo()
        n_users, n_items = matrix.shape
        users = matrix.row.astype(np.int64)
        positives = matrix.col.astype(np.int64)
        seen_keys = np.sort(users * n_items + positives)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.user_embedding = torch.nn.Parameter(
            torch.randn(n_users, self.dim, generator=generator) * 0.1
        )
        self.item_embedding = torch.nn.Parameter(
            torch.randn(n_items, self.dim, generator=generator) * 0.1
        )
        optimiser = torch.optim.Adam([self.user_embedding, self.item_embedding], lr=self.lr)
        self.loss_history = []
        for _ in range(self.epochs):
            order = rng.permutation(len(users))
            negatives = self._negatives(rng, users[order], n_items, seen_keys)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                u = torch.from_numpy(users[batch])
                i = torch.from_numpy(positives[batch])
                j = torch.from_numpy(negatives[start : start + self.batch_size])
                user_vectors = self.user_embedding[u]
                item_vectors = self.item_embedding[i]
                negative_vectors = self.item_embedding[j]
                margin = (user_vectors * (item_vectors - negative_vectors)).sum(dim=1)
                penalty = (
                    user_vectors.pow(2).sum(dim=1)
                    + item_vectors.pow(2).sum(dim=1)
                    + negative_vectors.pow(2).sum(dim=1)
                )
                loss = (-torch.nn.functional.logsigmoid(margin) + self.reg * penalty).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            self.loss_history.append(total / len(order))
            if not math.isfinite(self.loss_history[-1]):
                raise FloatingPointError(f"BPR loss diverged: {self.loss_history}")
        return self

    @staticmethod
    def _negatives(
        rng: np.random.Generator, users: np.ndarray, n_items: int, seen_keys: np.ndarray
    ) -> np.ndarray:
        """One uniform negative per row, redrawn (up to 50 rounds) while it is a train item of
        the user; a user who has seen every item keeps a positive, which adds no gradient bias
        worth a loop without end."""
        negatives = rng.integers(0, n_items, size=len(users))
        for _ in range(50):
            clash = np.isin(users * n_items + negatives, seen_keys)
            if not clash.any():
                break
            negatives[clash] = rng.integers(0, n_items, size=int(clash.sum()))
        return negatives

    def __call__(self, users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            vectors = self.user_embedding[torch.from_numpy(np.array(users, dtype=np.int64))]
            return (vectors @ self.item_embedding.T).numpy().astype(np.float32)
