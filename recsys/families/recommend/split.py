"""Time-ordered leave-one-out split of interactions, and the id -> index mappings.

For every user with at least :data:`MIN_INTERACTIONS` interactions, the interactions are sorted
by time and the last one becomes the test item, the one before it the validation item and the
rest training data: the model is asked to predict each user's next item from their past, which
is what a recommender does in production (a random split would let it learn from the future).

Ties in time are common (31k of the 122k Amazon rows share a user and a day with another row:
reviews are dated to the day), so the order must not depend on the sort algorithm: ties are
broken by the row's position in the input, later rows counting as later. The split is
therefore a pure function of the frame.

Users with fewer interactions stay wholly in train: they carry co-occurrence signal, but cannot
be evaluated (the quality suite quarantines them already, so this only matters for frames that
did not go through the gate).

The user and item indices are built from TRAIN only, so no model can have a parameter for an
item it could only know from held-out data. An item that appears only in validation or test
keeps its id in those frames with ``item_idx == -1``; :mod:`.evaluate` keeps such cases and
counts them as misses (no system can recommend an item it has never seen, and leaving them out
would flatter every system alike). Every evaluated user has training rows, so ``user_idx`` is
always set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys.families.recommend.data import ITEM, TIME, USER

MIN_INTERACTIONS = 3
USER_IDX, ITEM_IDX = "user_idx", "item_idx"
UNSEEN = -1
"""``item_idx`` of a validation or test item that does not occur in train."""


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Train / validation / test frames (``user_id, item_id, time, user_idx, item_idx``, in
    input order within each user's time order) and the train-only indices.

    ``user_ids[k]`` / ``item_ids[k]`` is the id with index ``k``; ``user_index`` /
    ``item_index`` map back. Validation and test hold exactly one row per evaluated user.
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict[str, int]
    item_index: dict[str, int]
    train_only_users: np.ndarray
    """Ids of users with too few interactions to evaluate; all their rows are in train."""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def train_matrix(self) -> sp.csr_matrix:
        """Binary user x item matrix of train (a re-bought item counts once), float32."""
        return interaction_matrix(self.train, self.n_users, self.n_items)


def interaction_matrix(frame: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary ``n_users x n_items`` CSR matrix of the indexed rows of ``frame`` (rows with an
    unseen item, ``item_idx == -1``, are left out)."""
    known = frame[ITEM_IDX].to_numpy() >= 0
    rows = frame[USER_IDX].to_numpy()[known]
    cols = frame[ITEM_IDX].to_numpy()[known]
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, n_items)
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def leave_one_out(
    frame: pd.DataFrame, min_interactions: int = MIN_INTERACTIONS
) -> LeaveOneOutSplit:
    """Split clean interactions (``user_id, item_id, time`` without missing values, e.g. the
    quality gate's ``clean`` frame) by time, last -> test, second to last -> validation.

    Raises ``ValueError`` on missing values (a frame that skipped the gate) or when no user has
    ``min_interactions`` (>= 3) interactions.
    """
    if min_interactions < 3:
        raise ValueError("leave-one-out needs min_interactions >= 3 (train, validation, test)")
    missing = [c for c in (USER, ITEM, TIME) if c not in frame.columns]
    if missing:
        raise ValueError(f"interactions lack column(s) {missing}")
    data = frame[[USER, ITEM, TIME]].reset_index(drop=True)
    if data.isna().any().any():
        raise ValueError("interactions hold missing values; validate them with the suite first")
    data = data.assign(**{USER: data[USER].astype(str), ITEM: data[ITEM].astype(str)})
    data[TIME] = data[TIME].astype(np.int64)

    user_codes, _ = pd.factorize(data[USER], sort=True)
    position = np.arange(len(data))
    order = np.lexsort((position, data[TIME].to_numpy(), user_codes))  # last key sorts first
    data = data.iloc[order].reset_index(drop=True)
    from_end = data.groupby(USER, sort=False).cumcount(ascending=False).to_numpy()
    size = data.groupby(USER, sort=False)[USER].transform("size").to_numpy()
    eligible = size >= min_interactions
    is_test = eligible & (from_end == 0)
    is_validation = eligible & (from_end == 1)
    is_train = ~(is_test | is_validation)
    if not is_test.any():
        raise ValueError(f"no user has {min_interactions} or more interactions")

    train = data[is_train].reset_index(drop=True)
    user_ids = np.array(sorted(train[USER].unique()), dtype=object)
    item_ids = np.array(sorted(train[ITEM].unique()), dtype=object)
    user_index = {user: k for k, user in enumerate(user_ids)}
    item_index = {item: k for k, item in enumerate(item_ids)}

    def indexed(part: pd.DataFrame) -> pd.DataFrame:
        return part.assign(
            **{
                USER_IDX: part[USER].map(user_index).astype(np.int64),
                ITEM_IDX: part[ITEM].map(item_index).fillna(UNSEEN).astype(np.int64),
            }
        )

    return LeaveOneOutSplit(
        train=indexed(train),
        validation=indexed(data[is_validation].reset_index(drop=True)),
        test=indexed(data[is_test].reset_index(drop=True)),
        user_ids=user_ids,
        item_ids=item_ids,
        user_index=user_index,
        item_index=item_index,
        train_only_users=np.array(sorted(data.loc[~eligible, USER].unique()), dtype=object),
    )
