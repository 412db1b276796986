"""Simulated shoppers for the recommendation family: users who click their actual next item.

Stand-ins for real traffic in canary and A/B rollouts (tests, demos, load generation). Each
shopper is an evaluated user of the family's time-ordered leave-one-out split
(:func:`recsys.families.recommend.split.leave_one_out`, the split the pipeline trains and
evaluates on) and knows their held-out *test* item: the item they really interacted with next,
which no model saw in training. The request is the one the family's smoke test takes,
``{"user": user_id, "top_k": 10}``; the model answers from the user's training history.

Click model:

* the held-out item, when shown at 1-based rank ``r``, is clicked with probability
  ``0.6 / log2(r + 1)``: 0.6 because even the item a user bought next is not always wanted
  right now, and the DCG discount for position bias (0.6 at rank 1, 0.17 at rank 10);
* independently, with probability 0.02 the shopper clicks one other shown item, chosen
  uniformly: clicks a leave-one-out split cannot explain (a second interesting item, a
  misclick).

The noise does not depend on the ranking (as long as anything besides the held-out item is
shown), so it adds the same base rate to both arms, while the signal rewards exactly what the
offline hit-rate/NDCG measures: showing the user's next item, the higher the better. So a better
model gets a higher expected CTR and two copies of one model the same one
(:meth:`RecommendShopper.expected_ctr`).

A user whose held-out item never occurs in training is kept: no model can recommend it, and
dropping such users would flatter every arm alike (the offline evaluation counts them as misses
too, see :mod:`.split`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_K = 10
HELD_OUT_CLICK = 0.6
NOISE_CLICK = 0.02


def examination_probability(rank: int) -> float:
    """Probability that a shopper looks at 1-based ``rank`` at all: ``1 / log2(rank + 1)``
    (the same position bias as the search family's shoppers)."""
    if rank < 1:
        raise ValueError(f"rank is 1-based, got {rank}")
    return 1.0 / math.log2(rank + 1)


@dataclass(frozen=True)
class RecommendShopper:
    """One evaluated user and their held-out next item."""

    user_id: str
    next_item: str
    next_item_in_train: bool = True
    """False when the held-out item never occurs in training (no model can recommend it)."""
    top_k: int = TOP_K

    def request(self) -> dict[str, object]:
        """The request the recommend family's smoke test takes (``{"user", "top_k"}``)."""
        return {"user": self.user_id, "top_k": self.top_k}

    def _hit_probability(self, shown: Sequence[str]) -> float:
        ids = [str(item) for item in shown]
        if self.next_item not in ids:
            return 0.0
        return HELD_OUT_CLICK * examination_probability(ids.index(self.next_item) + 1)

    def _noise_probability(self, shown: Sequence[str]) -> float:
        return NOISE_CLICK if any(str(item) != self.next_item for item in shown) else 0.0

    def expected_ctr(self, shown_item_ids: Sequence[str]) -> float:
        """Probability that this shopper clicks anything on ``shown_item_ids``."""
        miss = 1.0 - self._hit_probability(shown_item_ids)
        return 1.0 - miss * (1.0 - self._noise_probability(shown_item_ids))

    def clicks(self, shown_item_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """The items clicked on ``shown_item_ids``, in rank order: the held-out item (when
        shown, position-discounted) and/or one noise click on another shown item."""
        ids = [str(item) for item in shown_item_ids]
        hit, noise, pick = rng.random(3)
        clicked: set[str] = set()
        if hit < self._hit_probability(ids):
            clicked.add(self.next_item)
        others = [item for item in ids if item != self.next_item]
        if others and noise < NOISE_CLICK:
            clicked.add(others[min(int(pick * len(others)), len(others) - 1)])
        return [item for item in dict.fromkeys(ids) if item in clicked]


class RecommendShoppers:
    """A population of :class:`RecommendShopper`, one per evaluated user."""

    def __init__(self, shoppers: Sequence[RecommendShopper], *, seed: int = 0) -> None:
        if not shoppers:
            raise ValueError("a shopper population needs at least one shopper")
        self.shoppers: tuple[RecommendShopper, ...] = tuple(shoppers)
        self.rng = np.random.default_rng(seed)
        """Used by :meth:`sample` when no generator is given."""

    @classmethod
    def from_interactions(
        cls, path: Path | str, *, max_users: int = 0, seed: int = 0
    ) -> RecommendShoppers:
        """One shopper per user with a held-out test item in the leave-one-out split of the
        interactions at ``path``.

        Best given the run's ``interactions_clean.csv`` (the quality gate's output), whose
        split is exactly the one the pipeline evaluated. A raw export works too: it is read
        with the family's strict reader, and rows with a missing or unreadable cell and exact
        repeats of a ``(user, item, time)`` row are left out, as the gate would (its time-range
        and catalogue checks are not repeated here). ``max_users`` keeps the first N users by
        id, like the pipeline's ``max_users`` param, so the same users are evaluated.
        """
        from recsys.families.recommend.data import ITEM, TIME, USER, read_interactions
        from recsys.families.recommend.split import ITEM_IDX, UNSEEN, leave_one_out

        if max_users < 0:
            raise ValueError(f"max_users must be >= 0, got {max_users}")
        frame = read_interactions(path)
        if max_users:
            keep = sorted(frame[USER].dropna().astype(str).unique())[:max_users]
            frame = frame[frame[USER].isin(keep)]
        frame = frame.dropna(subset=[USER, ITEM, TIME]).drop_duplicates([USER, ITEM, TIME])
        split = leave_one_out(frame)
        test = split.test
        shoppers = [
            RecommendShopper(str(user), str(item), bool(idx != UNSEEN))
            for user, item, idx in zip(
                test[USER].to_numpy(), test[ITEM].to_numpy(), test[ITEM_IDX].to_numpy(), strict=True
            )
        ]
        return cls(shoppers, seed=seed)

    def __len__(self) -> int:
        return len(self.shoppers)

    def __getitem__(self, index: int) -> RecommendShopper:
        return self.shoppers[index]

    def sample(self, n: int, rng: np.random.Generator | None = None) -> list[RecommendShopper]:
        """``n`` shoppers drawn uniformly with replacement, from ``rng`` or else the
        population's own seeded generator."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = self.rng if rng is None else rng
        return [self.shoppers[i] for i in rng.integers(0, len(self.shoppers), size=n)]
