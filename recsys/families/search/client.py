"""Ask a served search model over gRPC: query text in, ``(product id, score)`` hits out.

The search family's side of inference (its tensors: ``QUERY``, ``TOP_K`` -> ``PRODUCT_IDS``,
``SCORES``); the transport, timeouts and error mapping are
:meth:`recsys.triton.control.TritonControl.infer`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_INT32_MAX = 2**31 - 1


class SearchError(RuntimeError):
    """Triton answered a query with an error (bad input, model failure); message from server."""


def search(
    control: Any,
    model_name: str,
    query: str | bytes,
    top_k: int = 10,
    *,
    version: int | None = None,
) -> list[tuple[str, float]]:
    """The ``top_k`` best ``(product_id, score)`` pairs for ``query``, best first.

    ``query`` may be raw bytes (sent as-is; the model rejects invalid UTF-8). Errors the
    model reports (empty query, TOP_K out of range, failures) raise :class:`SearchError`.
    """
    return search_answered(control, model_name, query, top_k, version=version)[0]


def search_inputs(query: str | bytes, top_k: int) -> list[Any]:
    """The ``QUERY`` and ``TOP_K`` tensors of one search request."""
    import tritonclient.grpc as grpcclient

    if not -_INT32_MAX <= int(top_k) <= _INT32_MAX:
        raise SearchError(f"top_k {top_k} does not fit TOP_K (INT32)")
    raw = query if isinstance(query, bytes) else query.encode("utf-8")
    query_input = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
    query_input.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
    top_k_input = grpcclient.InferInput("TOP_K", [1, 1], "INT32")
    top_k_input.set_data_from_numpy(np.array([[int(top_k)]], dtype=np.int32))
    return [query_input, top_k_input]


def search_answered(
    control: Any,
    model_name: str,
    query: str | bytes,
    top_k: int = 10,
    *,
    version: int | None = None,
) -> tuple[list[tuple[str, float]], int | None]:
    """:func:`search`, and the version that answered (``None`` if Triton does not say).

    Triton picks the version per request, and during a deploy or rollback two can be
    loaded: whatever goes with the hits (e.g. product titles from the version folder) must
    come from the version that ranked them, which only the response names."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    outputs = [
        grpcclient.InferRequestedOutput("PRODUCT_IDS"),
        grpcclient.InferRequestedOutput("SCORES"),
    ]
    try:
        result = control.infer(
            model_name,
            search_inputs(query, top_k),
            outputs,
            version=version,
            what=f"search on {model_name}",
        )
    except InferenceServerException as exc:
        raise SearchError(f"{model_name} on {control.url}: {exc.message()}") from exc
    ids = result.as_numpy("PRODUCT_IDS")
    scores = result.as_numpy("SCORES")
    if ids is None or scores is None:
        raise SearchError(f"{model_name} on {control.url} returned no PRODUCT_IDS/SCORES")
    hits = [
        (pid.decode("utf-8") if isinstance(pid, bytes) else str(pid), float(score))
        for pid, score in zip(ids.reshape(-1), scores.reshape(-1), strict=True)
    ]
    answered = str(result.get_response().model_version)
    return hits, int(answered) if answered.isdigit() else None
