"""Write a recommendation version folder, and score one the way Triton serves it.

:func:`build_serving_artifacts` turns a fitted :class:`.sasrec.SASRec` and its
:class:`.split.LeaveOneOutSplit` into the folder :mod:`.family` describes and
:mod:`.serving_model` serves:

* ``sasrec.onnx``: :func:`.sasrec.export_onnx` (``HISTORY`` int64 ``[B, max_len]`` ->
  ``SCORES`` float32 ``[B, n_items]``).
* ``items.npz``: ``item_ids`` (str, by item index), ``categories`` (str, the metadata's
  ``i_category``, ``""`` when unknown) and ``popularity`` (float32 train interaction counts:
  the ranking of the popularity fallback).
* ``users.npz``: ``user_ids`` (str, sorted: the server finds a user by binary search),
  ``history_tokens`` (int64 ``[n_users, max_len]``, left-padded tokens of each user's latest
  ``max_len`` items) and ``seen_indptr`` / ``seen_items`` (CSR of every item index each user
  interacted with, for ``EXCLUDE_SEEN``). Histories and seen items cover *all* of a user's
  known interactions, train, validation and test: offline the last two are held out to measure
  the model, but once it serves they are simply the user's past, and leaving them out would
  recommend the very items the user just bought. Items the split could not index (first seen
  after train) have no embedding and are left out.
* ``manifest.json``: ``family``, ``onnx_file``, ``max_len``, ``n_items``, ``n_users``, the
  serving limits ``max_top_k`` / ``max_history``, the deploy's ``smoke_request`` (the known user
  with the longest history: a broken users table cannot hide behind a fallback),
  ``fault_injection`` when given (rehearsals) and the model's ``describe()`` summary.
* ``interaction_reference.json``: what the drift check compares served requests with (each
  item's training-popularity bucket, :mod:`.drift`; history lengths, counts).

:func:`score_artifacts` computes the held-out metrics of such a folder through onnxruntime and
the folder's own ``max_len``, with histories rebuilt from the split exactly as
:meth:`.sasrec.SASRec.histories` builds them: the champion gate and the "served" benchmark
judge the graph Triton runs, not the PyTorch object that produced it (which a champion's
folder no longer has anyway).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.families.recommend.data import ITEM
from recsys.families.recommend.evaluate import (
    Stage,
    build_cases,
    evaluate_both,
    sample_negatives,
)
from recsys.families.recommend.family import ITEMS_FILE, ONNX_FILE, REFERENCE_FILE, USERS_FILE
from recsys.families.recommend.split import ITEM_IDX, USER_IDX, LeaveOneOutSplit

if TYPE_CHECKING:
    from recsys.families.recommend.sasrec import SASRec

FAMILY_NAME = "recommend"
PAD = 0


def _user_sequences(frames: Sequence[pd.DataFrame], n_users: int) -> list[np.ndarray]:
    """Each user's item indices over ``frames`` taken in order (e.g. train, then validation,
    then test), time order kept within each frame, unindexed items (``-1``) left out."""
    parts = []
    for order, frame in enumerate(frames):
        users = frame[USER_IDX].to_numpy(dtype=np.int64)
        items = frame[ITEM_IDX].to_numpy(dtype=np.int64)
        parts.append((users, items, np.full(len(users), order), np.arange(len(users))))
    users, items, order, position = (np.concatenate(p) for p in zip(*parts, strict=True))
    keep = items >= 0
    users, items, order, position = users[keep], items[keep], order[keep], position[keep]
    sort = np.lexsort((position, order, users))  # by user, then frame, then row
    users, items = users[sort], items[sort]
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    return [items[bounds[u] : bounds[u + 1]] for u in range(n_users)]


def encode_tokens(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """``[len(sequences), max_len]`` int64 left-padded tokens (item index + 1) of each
    sequence's last ``max_len`` items: the graph's ``HISTORY`` (the same rule as
    :func:`.sasrec.encode_histories`, without importing torch for a scoring job)."""
    out = np.full((len(sequences), max_len), PAD, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tail = np.asarray(sequence, dtype=np.int64)[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail + 1
    return out


def stage_histories(split: LeaveOneOutSplit, stage: Stage, max_len: int) -> np.ndarray:
    """``[n_users, max_len]`` tokens the model scores ``stage`` from, for every user index:
    the train sequence (``"validation"``), or the train sequence then the validation item when
    it is indexed (``"test"``), as :meth:`.sasrec.SASRec.histories` builds them."""
    if stage not in ("validation", "test"):
        raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")
    frames = [split.train] if stage == "validation" else [split.train, split.validation]
    return encode_tokens(_user_sequences(frames, split.n_users), max_len)


def _item_categories(split: LeaveOneOutSplit, item_meta: pd.DataFrame | None) -> np.ndarray:
    categories = np.full(split.n_items, "", dtype=object)
    if item_meta is None or "i_category" not in item_meta.columns:
        return categories.astype(str)
    meta = item_meta.dropna(subset=[ITEM]).drop_duplicates(ITEM, keep="first")
    lookup = dict(zip(meta[ITEM].astype(str), meta["i_category"], strict=True))
    for index, item in enumerate(split.item_ids):
        value = lookup.get(str(item))
        categories[index] = "" if value is None or pd.isna(value) else str(value)
    return categories.astype(str)


def _interaction_reference(
    split: LeaveOneOutSplit, popularity: np.ndarray, sequences: list[np.ndarray]
) -> dict[str, Any]:
    """The drift reference (:func:`.drift.build_reference`: each item's training-popularity
    bucket) plus what the data says about history lengths, for a person reading it."""
    from recsys.families.recommend.drift import build_reference

    lengths = np.array([len(s) for s in sequences], dtype=np.float64)
    return {
        "family": FAMILY_NAME,
        **build_reference(split.item_ids, popularity, split.n_users),
        "n_train_interactions": int(popularity.sum()),
        "history_length": {
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "p50": float(np.percentile(lengths, 50)) if len(lengths) else 0.0,
            "p90": float(np.percentile(lengths, 90)) if len(lengths) else 0.0,
        },
    }


def build_serving_artifacts(
    model: SASRec,
    split: LeaveOneOutSplit,
    out_dir: Path,
    *,
    item_meta: pd.DataFrame | None = None,
    fault_injection: Any = None,
    smoke_user: str | None = None,
    max_top_k: int = 100,
    max_history: int = 200,
) -> Path:
    """Write the serving-artifacts folder of ``model`` (fitted on ``split``) to ``out_dir``
    and return it (see the module docstring for its files). ``smoke_user`` names the user of
    the deploy's smoke request (default: the known user with the longest history, ties by
    id); ``max_top_k`` and ``max_history`` are the served limits on TOP_K and HISTORY ids."""
    from recsys.families.recommend.sasrec import export_onnx

    if max_top_k < 1 or max_history < 1:
        raise ValueError("max_top_k and max_history must be >= 1")
    max_len = int(model.params.max_len)
    if getattr(model, "n_items", split.n_items) != split.n_items:
        raise ValueError(f"model has {model.n_items} items, the split {split.n_items}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / ONNX_FILE)

    popularity = np.bincount(
        split.train[ITEM_IDX].to_numpy(dtype=np.int64), minlength=split.n_items
    ).astype(np.float32)
    np.savez(
        out / ITEMS_FILE,
        item_ids=np.asarray(split.item_ids, dtype=str),
        categories=_item_categories(split, item_meta),
        popularity=popularity,
    )

    user_ids = np.asarray(split.user_ids, dtype=str)
    if list(user_ids) != sorted(user_ids):  # the split sorts them; the server relies on it
        raise ValueError("split.user_ids must be sorted")
    sequences = _user_sequences([split.train, split.validation, split.test], split.n_users)
    seen = [np.unique(s) for s in sequences]
    indptr = np.zeros(split.n_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(s) for s in seen])
    np.savez(
        out / USERS_FILE,
        user_ids=user_ids,
        history_tokens=encode_tokens(sequences, max_len),
        seen_indptr=indptr,
        seen_items=np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64),
    )

    if smoke_user is None:
        lengths = np.array([len(s) for s in sequences])
        smoke_user = str(user_ids[int(np.argmax(lengths))])  # first of the longest: by id
    elif smoke_user not in split.user_index:
        raise ValueError(f"smoke_user {smoke_user!r} is not a known user of the split")
    manifest: dict[str, Any] = {
        "family": FAMILY_NAME,
        "onnx_file": ONNX_FILE,
        "max_len": max_len,
        "n_items": int(split.n_items),
        "n_users": int(split.n_users),
        "max_top_k": int(min(max_top_k, split.n_items)),
        "max_history": int(max_history),
        "smoke_request": {"user": smoke_user, "top_k": int(min(5, split.n_items))},
        "model": _json_safe(model.describe()),
    }
    if fault_injection is not None:
        manifest["fault_injection"] = fault_injection
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    reference = _interaction_reference(split, popularity, sequences)
    (out / REFERENCE_FILE).write_text(json.dumps(reference, separators=(",", ":")))
    return out


def _json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and tuples turned into plain JSON types."""
    return json.loads(
        json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def score_artifacts(
    folder: Path,
    split: LeaveOneOutSplit,
    stage: Stage = "test",
    negatives_seed: int = 2024,
) -> dict[str, float]:
    """Held-out metrics of the folder's ``sasrec.onnx`` on ``split``'s ``stage``, both
    protocols of :mod:`.evaluate` (sampled: ``hr_at_5``, ``ndcg_at_5``, ``hr_at_10``,
    ``ndcg_at_10``; full ranking: ``recall_at_20``, ``ndcg_at_20``), plus ``n_cases``.

    The folder must have been exported for this split's item index (``n_items`` is checked):
    a champion exported from another split scores garbage, so that is an error."""
    import onnxruntime as ort

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    max_len = int(manifest["max_len"])
    n_items = int(manifest.get("n_items", split.n_items))
    if n_items != split.n_items:
        raise ValueError(
            f"{folder} serves {n_items} items but the split indexes {split.n_items}: it was "
            "exported for another split"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(folder / manifest.get("onnx_file", ONNX_FILE)),
        options,
        providers=["CPUExecutionProvider"],
    )
    histories = stage_histories(split, stage, max_len)

    def scorer(users: np.ndarray) -> np.ndarray:
        tokens = histories[np.asarray(users, dtype=np.int64)]
        return session.run(["SCORES"], {"HISTORY": tokens})[0]

    cases = build_cases(split, stage)
    metrics = evaluate_both(scorer, cases, sample_negatives(cases, seed=negatives_seed))
    metrics["n_cases"] = float(len(cases))
    return metrics
