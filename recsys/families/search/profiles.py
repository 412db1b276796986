"""Training profiles: named sets of pipeline params for the hardware a run gets.

A newcomer should not have to know that MiniLM wants batch 512 and two epochs on a GPU but a
few hundred steps on a laptop. ``profile`` (a DAG param and ``recsys train --profile``) picks
one of :data:`PROFILES`; its values replace the DAG's defaults, and any param the user set to
something other than its default still wins (an explicit choice is never overridden).

Measured results of each profile are in the README ("Training profiles"): the ``gpu`` profile is
the issue's best system (hybrid BM25 + bi-encoder retrieval, a cross-encoder trained with hard
negatives reranking the top 50); the ``cpu`` profile bounds training to about an hour on 2 cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        # Bi-encoder: the CPU quality run (300 steps x 64), ~15 minutes on 2 cores.
        "epochs": 1,
        "batch_size": 64,
        "learning_rate": 1e-4,
        "max_steps": 300,
        # Cross-encoder: bounded steps, hard negatives, ~35 minutes on 2 cores.
        "train_reranker": True,
        "reranker_batch_size": 32,
        "reranker_learning_rate": 5e-5,
        "reranker_max_steps": 600,
        "hard_negatives_per_query": 2,
        "rerank_candidates": 20,
        "retrieval": "hybrid",
        "fusion": "rrf",
        "tune_bm25": True,
    },
    "gpu": {
        # Bi-encoder: full epochs, large batches (the best: 2 epochs, 512, 2e-4).
        "epochs": 2,
        "batch_size": 512,
        "learning_rate": 2e-4,
        "max_steps": 0,
        # Cross-encoder: a full epoch of judged pairs plus 4 hard negatives per query.
        "train_reranker": True,
        "reranker_epochs": 1,
        "reranker_batch_size": 64,
        "reranker_learning_rate": 3e-5,
        "reranker_max_steps": 0,
        "hard_negatives_per_query": 4,
        "hard_negatives_min_rank": 4,
        "hard_negatives_max_rank": 30,
        "rerank_candidates": 50,
        "retrieval": "hybrid",
        "fusion": "rrf",
        "tune_bm25": True,
    },
}
PROFILE_NAMES = ("custom", *PROFILES)
"""``custom`` (the default) applies nothing: every param as given."""


class UnknownProfileError(ValueError):
    """The named profile does not exist (the message lists the ones that do)."""


def apply_profile(params: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with ``params["profile"]``'s values for every param still at its default
    (``defaults``: the DAG's declared values). Unknown profiles raise; a profile naming a param
    the DAG does not declare raises too (a typo there must not silently do nothing)."""
    name = str(params.get("profile") or "custom")
    if name == "custom":
        return dict(params)
    if name not in PROFILES:
        raise UnknownProfileError(
            f"unknown training profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}"
        )
    profile = PROFILES[name]
    undeclared = sorted(set(profile) - set(defaults))
    if undeclared:
        raise UnknownProfileError(f"profile {name!r} sets params the DAG lacks: {undeclared}")
    resolved = dict(params)
    for key, value in profile.items():
        if key not in params or params[key] == defaults[key]:
            resolved[key] = value
    return resolved
