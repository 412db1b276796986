"""Simulated shoppers for the search family: held-out queries that click on relevant products.

A canary or A/B rollout needs online feedback before real traffic is risked, and in tests and
demos there is no real traffic at all. These shoppers stand in for it: each one is a held-out
query of the relevance data (the ``test.csv`` that :func:`recsys.families.search.pipeline.
split_data` writes, i.e. queries no model trained on) together with the human relevance grades
of its judged products, and clicks on a ranking the way a shopper would, so an arm whose model
ranks relevant products higher earns a higher click-through rate.

Click model (cascade with position-dependent examination): the shopper looks down the ranking
from the top; rank ``r`` (1-based) is examined with probability ``1 / log2(r + 1)`` (1.0, 0.63,
0.5, ... 0.29 at rank 10: the DCG discount, the usual stand-in for position bias), an examined
product is clicked with its grade's attractiveness, and the shopper stops after the first click.
So ``P(click at r | no click above) = examine(r) * attract(grade_r)``.

Attractiveness by the Home Depot grade (mean of three raters: 1 irrelevant, 2 partially
relevant, 3 exact match):

* ``>= 2.67`` (at least two raters said exact match): 0.45, the product is what was searched;
* ``>= 2.0`` (partially relevant on average): 0.20, a plausible alternative;
* below 2.0 (judged, mostly irrelevant): 0.05;
* not judged for this query: 0.02, noise (a shopper sometimes clicks anything).

The exact numbers matter less than their order, which gives the two properties the rollout
comparison needs:

* a better ranking gets a higher CTR: ``P(click) = 1 - prod_r (1 - examine(r) * attract_r)``,
  and since ``log(1 - e * a)`` has a negative cross derivative in ``e`` and ``a``, the product
  is smallest (CTR largest) when the most attractive products sit where examination is most
  likely, i.e. ranked by grade;
* two copies of one model get the same expected CTR: the probability depends on the shown
  list only, not on which arm showed it (:meth:`SearchShopper.expected_ctr` computes it).

The clicks themselves are drawn from the caller's ``numpy.random.Generator``, so a simulation is
reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

TOP_K = 10
HIGH_GRADE, MEDIUM_GRADE = 2.67, 2.0
GRADE_TOLERANCE = 0.005
"""Grades are rater means written with two decimals (2.67 for 8/3): compare with a margin."""
ATTRACT_HIGH, ATTRACT_MEDIUM, ATTRACT_LOW, ATTRACT_UNJUDGED = 0.45, 0.20, 0.05, 0.02


def examination_probability(rank: int) -> float:
    """Probability that a shopper looks at 1-based ``rank`` at all: ``1 / log2(rank + 1)``."""
    if rank < 1:
        raise ValueError(f"rank is 1-based, got {rank}")
    return 1.0 / math.log2(rank + 1)


def attractiveness(grade: float | None) -> float:
    """Click probability of an examined product with relevance ``grade`` (None: unjudged)."""
    if grade is None:
        return ATTRACT_UNJUDGED
    if grade >= HIGH_GRADE - GRADE_TOLERANCE:
        return ATTRACT_HIGH
    if grade >= MEDIUM_GRADE - GRADE_TOLERANCE:
        return ATTRACT_MEDIUM
    return ATTRACT_LOW


@dataclass(frozen=True)
class SearchShopper:
    """One held-out query and the grades of its judged products (``{product_uid: grade}``)."""

    query: str
    judged: Mapping[str, float]
    top_k: int = TOP_K

    def request(self) -> dict[str, object]:
        """The request the search family's smoke test takes (``{"query", "top_k"}``)."""
        return {"query": self.query, "top_k": self.top_k}

    def click_probabilities(self, shown_product_ids: Sequence[str]) -> np.ndarray:
        """Per rank, the probability of a click there given none above."""
        return np.array(
            [
                examination_probability(rank) * attractiveness(self.judged.get(str(pid)))
                for rank, pid in enumerate(shown_product_ids, start=1)
            ],
            dtype=float,
        )

    def expected_ctr(self, shown_product_ids: Sequence[str]) -> float:
        """Probability that this shopper clicks anything on ``shown_product_ids``."""
        return float(1.0 - np.prod(1.0 - self.click_probabilities(shown_product_ids)))

    def clicks(self, shown_product_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """The products clicked on ``shown_product_ids`` (best first): at most one, the
        cascade stops at the first click."""
        probabilities = self.click_probabilities(shown_product_ids)
        hits = np.flatnonzero(rng.random(len(probabilities)) < probabilities)
        return [str(shown_product_ids[hits[0]])] if len(hits) else []

    def ideal_ranking(self) -> list[str]:
        """The judged products best grade first (ties by id): the ranking with the highest CTR
        among those of judged products."""
        return sorted(self.judged, key=lambda pid: (-self.judged[pid], pid))


class SearchShoppers:
    """A population of :class:`SearchShopper`, one per held-out query."""

    def __init__(self, shoppers: Sequence[SearchShopper], *, seed: int = 0) -> None:
        if not shoppers:
            raise ValueError("a shopper population needs at least one shopper")
        self.shoppers: tuple[SearchShopper, ...] = tuple(shoppers)
        self.rng = np.random.default_rng(seed)
        """Used by :meth:`sample` when no generator is given."""

    @classmethod
    def from_csv(cls, path: Path | str, *, min_judged: int = 2, seed: int = 0) -> SearchShoppers:
        """One shopper per query of a relevance CSV with at least ``min_judged`` judged
        products (a query with a single judged product cannot tell two rankings apart).

        Give it the held-out ``test.csv`` of a run (:func:`.pipeline.split_data`): shoppers
        built from training queries would reward a model for memorising them. The file is read
        with the platform's strict reader (:func:`recsys.data.read_relevance_csv`); rows with a
        missing or unreadable cell or a grade outside 1..3 (what the quality gate quarantines)
        are left out, and a product judged twice for one query gets its mean grade.
        """
        from recsys.data import read_relevance_csv

        if min_judged < 1:
            raise ValueError(f"min_judged must be >= 1, got {min_judged}")
        frame = read_relevance_csv(path)
        frame = frame.dropna(subset=["product_uid", "search_term", "relevance"])
        frame = frame[
            frame["relevance"].between(1.0, 3.0) & (frame["search_term"].str.strip() != "")
        ]
        frame = frame.assign(product_uid=frame["product_uid"].astype("int64").astype(str))
        grades = frame.groupby(["search_term", "product_uid"], sort=True)["relevance"].mean()
        queries = grades.index.get_level_values(0).to_numpy()
        products = grades.index.get_level_values(1).to_numpy()
        values = grades.to_numpy(dtype=float)
        starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])  # sorted by query
        shoppers = []
        for start, end in zip(starts, [*starts[1:], len(queries)], strict=True):
            if end - start >= min_judged:
                judged = dict(
                    zip(products[start:end].tolist(), values[start:end].tolist(), strict=True)
                )
                shoppers.append(SearchShopper(str(queries[start]), MappingProxyType(judged)))
        if not shoppers:
            raise ValueError(f"{path} has no query with {min_judged} or more judged products")
        return cls(shoppers, seed=seed)

    def __len__(self) -> int:
        return len(self.shoppers)

    def __getitem__(self, index: int) -> SearchShopper:
        return self.shoppers[index]

    def sample(self, n: int, rng: np.random.Generator | None = None) -> list[SearchShopper]:
        """``n`` shoppers drawn uniformly with replacement (each query equally often in
        expectation), from ``rng`` or else the population's own seeded generator."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = self.rng if rng is None else rng
        return [self.shoppers[i] for i in rng.integers(0, len(self.shoppers), size=n)]
