"""Ask a model through its router and learn which version and arm answered: the client side of
progressive delivery, for any model family.

The family turns a request dict into Triton inputs (:meth:`ModelFamily.request_inputs`) and says
which output holds the ranked ids (:attr:`ModelFamily.ranked_output`); this module adds the
routing key and a request id, and reads ``ROUTED_VERSION`` / ``ROUTED_ARM``. The request id is
what feedback (clicks, purchases) is recorded under (:mod:`recsys.delivery.feedback`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from recsys.delivery.routing import ROUTED_ARM, ROUTED_VERSION, ROUTING_KEY, router_name


class RoutedRequestError(RuntimeError):
    """The router (or the version it chose) answered the request with an error."""


@dataclass(frozen=True)
class RoutedAnswer:
    """One answer through the router: the ranked ids shown, who answered, how fast."""

    ids: list[str]
    version: int
    """The version that answered (0: Triton's default, when the router could not pin one)."""
    arm: str
    request_id: str
    latency_ms: float


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def ask(
    control: Any,
    model_name: str,
    family: Any,
    request: dict[str, Any],
    *,
    routing_key: str | None = None,
    request_id: str | None = None,
) -> RoutedAnswer:
    """Send ``request`` (the family's request dict) to ``model_name``'s router. ``routing_key``
    defaults to the family's (e.g. the user); ``request_id`` to a fresh UUID. Raises
    :class:`RoutedRequestError` for an error answer (transport failures raise as
    :meth:`TritonControl.infer` does)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = family.request_inputs(request)
    key = routing_key if routing_key is not None else family.routing_key(request)
    if key is not None:
        tensor = grpcclient.InferInput(ROUTING_KEY, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[str(key).encode("utf-8")]], dtype=np.object_))
        inputs.append(tensor)
    names = [family.ranked_output, ROUTED_VERSION, ROUTED_ARM]
    outputs = [grpcclient.InferRequestedOutput(name) for name in names]
    request_id = request_id or uuid.uuid4().hex
    router = router_name(model_name)
    started = time.perf_counter()
    try:
        result = control.infer(
            router, inputs, outputs, what=f"routed request to {router}", request_id=request_id
        )
    except InferenceServerException as exc:
        raise RoutedRequestError(f"{router} on {control.url}: {exc.message()}") from exc
    latency_ms = (time.perf_counter() - started) * 1000.0
    ids, version, arm = (result.as_numpy(name) for name in names)
    if ids is None or version is None or arm is None:
        raise RoutedRequestError(f"{router} on {control.url} returned no {names}")
    return RoutedAnswer(
        ids=[_text(i) for i in ids.reshape(-1)],
        version=int(version.reshape(-1)[0]),
        arm=_text(arm.reshape(-1)[0]),
        request_id=request_id,
        latency_ms=latency_ms,
    )
