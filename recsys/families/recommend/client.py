"""Ask a served recommendation model (Triton gRPC) for a user's or a session's top-K items.

:func:`recommend` sends one request of the contract in :mod:`.serving_model` through
:meth:`recsys.triton.control.TritonControl.infer`, so an unreachable server raises
:class:`~recsys.triton.control.TritonUnavailableError` like every other platform call, and an
error the model answers (a bad request, an injected fault) raises :class:`RecommendError` with
the server's message. ``EXCLUDE_SEEN`` is always sent: Triton only batches requests with the
same set of inputs, so one client that sometimes omits it would split the batches.

:func:`smoke_check` is the deploy's and the rollback's question to a freshly loaded version
(:meth:`.family.RecommendFamily.smoke_test`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.triton.control import ModelLoadError, TritonControl

_INT32_MAX = 2**31 - 1
POPULARITY_SOURCE = "popularity"


class RecommendError(RuntimeError):
    """Triton answered a recommendation request with an error; message from the server."""


@dataclass(frozen=True)
class Recommendation:
    """One answer: ``(item_id, score, category)`` best first, where they came from (``user``,
    ``session`` or ``popularity: <why>``) and the version that answered (``None`` when Triton
    does not say)."""

    items: list[tuple[str, float, str]]
    source: str
    version: int | None

    @property
    def is_fallback(self) -> bool:
        """Whether the popularity ranking answered instead of the model."""
        return self.source.startswith(POPULARITY_SOURCE)


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def recommend_inputs(
    *,
    user: str | bytes | None = None,
    history: list[str] | None = None,
    top_k: int = 10,
    exclude_seen: bool = True,
) -> list[Any]:
    """The tensors of one recommendation request (``USER_ID`` or ``HISTORY``, ``TOP_K``,
    ``EXCLUDE_SEEN``; always sent, so requests batch together, see the serving model)."""
    import tritonclient.grpc as grpcclient

    if (user is None) == (history is None):
        raise ValueError("give user or history, not both and not neither")
    if not -_INT32_MAX <= int(top_k) <= _INT32_MAX:
        raise RecommendError(f"top_k {top_k} does not fit TOP_K (INT32)")
    inputs = []
    if user is not None:
        raw = user if isinstance(user, bytes) else str(user).encode("utf-8")
        tensor = grpcclient.InferInput("USER_ID", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        inputs.append(tensor)
    else:
        ids = [i if isinstance(i, bytes) else str(i).encode("utf-8") for i in history or []]
        tensor = grpcclient.InferInput("HISTORY", [1, len(ids)], "BYTES")
        tensor.set_data_from_numpy(np.array(ids, dtype=np.object_).reshape(1, len(ids)))
        inputs.append(tensor)
    top_k_input = grpcclient.InferInput("TOP_K", [1, 1], "INT32")
    top_k_input.set_data_from_numpy(np.array([[int(top_k)]], dtype=np.int32))
    exclude_input = grpcclient.InferInput("EXCLUDE_SEEN", [1, 1], "BOOL")
    exclude_input.set_data_from_numpy(np.array([[bool(exclude_seen)]], dtype=bool))
    return [*inputs, top_k_input, exclude_input]


def recommend(
    control: TritonControl,
    model_name: str,
    *,
    user: str | None = None,
    history: list[str] | None = None,
    top_k: int = 10,
    exclude_seen: bool = True,
    version: int | None = None,
) -> Recommendation:
    """The ``top_k`` best items for ``user`` (a known user id) or ``history`` (a session's item
    ids, oldest first) from ``model_name`` (``version`` pins one). Exactly one of ``user`` and
    ``history`` must be given; ids may be ``bytes`` (sent as-is, the model refuses invalid
    UTF-8). Raises :class:`RecommendError` for an error the model answered."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = recommend_inputs(user=user, history=history, top_k=top_k, exclude_seen=exclude_seen)
    outputs = [
        grpcclient.InferRequestedOutput(name)
        for name in ("ITEM_IDS", "SCORES", "CATEGORIES", "SOURCE")
    ]
    try:
        result = control.infer(
            model_name,
            inputs,
            outputs,
            version=version,
            what=f"recommendation from {model_name}",
        )
    except InferenceServerException as exc:
        raise RecommendError(f"{model_name} on {control.url}: {exc.message()}") from exc
    arrays = {
        name: result.as_numpy(name) for name in ("ITEM_IDS", "SCORES", "CATEGORIES", "SOURCE")
    }
    missing = [name for name, array in arrays.items() if array is None]
    if missing:
        raise RecommendError(f"{model_name} on {control.url} returned no {', '.join(missing)}")
    ids, scores, categories = (arrays[n].reshape(-1) for n in ("ITEM_IDS", "SCORES", "CATEGORIES"))
    if not len(ids) == len(scores) == len(categories):
        raise RecommendError(
            f"{model_name} on {control.url} returned {len(ids)} ids, {len(scores)} scores and "
            f"{len(categories)} categories"
        )
    source = arrays["SOURCE"].reshape(-1)
    items = [
        (_text(item), float(score), _text(category))
        for item, score, category in zip(ids, scores, categories, strict=True)
    ]
    answered = str(result.get_response().model_version)
    return Recommendation(
        items=items,
        source=_text(source[0]) if len(source) else "",
        version=int(answered) if answered.isdigit() else None,
    )


def smoke_check(
    control: TritonControl,
    model_name: str,
    request: dict[str, Any],
    version: int | None = None,
) -> Recommendation:
    """Ask ``model_name`` (``version`` pinned) one question and insist on a well-formed,
    personalised answer; raise :class:`~recsys.triton.control.ModelLoadError` otherwise.

    ``request``: ``{"user": id}`` or ``{"history": [ids]}``, plus ``top_k`` (default 5) and
    ``exclude_seen`` (default true). The answer must hold exactly ``top_k`` items with
    non-empty ids and finite, non-increasing scores, and must not be the popularity fallback:
    the export's smoke request names a user the version knows, so a fallback means its users
    (or items) table is broken, exactly what a deploy must not promote. A smoke request
    naming an unknown user or a session of unknown items fails for the same reason."""
    user, history = request.get("user"), request.get("history")
    if (user is None) == (history is None):
        raise ModelLoadError(
            f"smoke request for {model_name} must name a user or a history, not both or "
            f"neither: {request!r}"
        )
    top_k = int(request.get("top_k", 5))
    what = f"{model_name} v{version}" if version is not None else model_name
    try:
        answer = recommend(
            control,
            model_name,
            user=user,
            history=None if history is None else [str(i) for i in history],
            top_k=top_k,
            exclude_seen=bool(request.get("exclude_seen", True)),
            version=version,
        )
    except RecommendError as exc:
        raise ModelLoadError(f"smoke request to {what} failed: {exc}") from exc
    asked = f"user {user!r}" if user is not None else f"a history of {len(history)} items"
    if answer.is_fallback:
        raise ModelLoadError(
            f"smoke request to {what} for {asked} fell back to popularity ({answer.source!r}): "
            "the version does not know what the request names; its users or items table is "
            "broken (or the smoke request names an unknown user)"
        )
    if len(answer.items) != top_k:
        raise ModelLoadError(
            f"smoke request to {what} for {asked} returned {len(answer.items)} items, "
            f"expected {top_k}"
        )
    scores = [score for _, score, _ in answer.items]
    if any(not item for item, _, _ in answer.items):
        raise ModelLoadError(f"smoke request to {what} returned an empty item id")
    if not all(math.isfinite(s) for s in scores) or any(
        later > earlier for earlier, later in itertools.pairwise(scores)
    ):
        raise ModelLoadError(
            f"smoke request to {what} returned scores that are not finite and descending: {scores}"
        )
    return answer
