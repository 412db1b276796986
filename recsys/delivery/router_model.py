"""Triton python-backend router: one entry point that splits a model's traffic between its
stable and its candidate version (canary, A/B experiment) or mirrors a share to the candidate
(shadow), forwarding every request through BLS (business logic scripting).

Published by :mod:`recsys.delivery.router` as ``<repo>/<model>_router/<n>/model.py``. It imports
only numpy, ``triton_python_backend_utils`` and the standard library, never ``recsys``: the stub
runs it in its own process. It knows no model family. Its inputs and outputs are the target
model's (the config lists them) plus:

* ``ROUTING_KEY`` (BYTES ``[1, 1]``, optional): a user or session id. The arm is then a hash of
  the key and the rollout's salt, so one user stays on one arm for the whole rollout (and, since
  a user's hash never changes, stays on the candidate as its weight grows: 5% -> 25% keeps the
  first 5%). Without a key each request draws at random.
* ``ROUTED_VERSION`` (INT64 ``[1, 1]``) and ``ROUTED_ARM`` (BYTES ``[1, 1]``, ``stable`` or
  ``candidate``): which version answered, so feedback (clicks, purchases) can be credited to
  its arm.

The split lives in ``routing.json`` beside the router's version folders (``args
["model_repository"]``), written atomically (temp file + rename) by the platform; the router
re-reads it when its ``stat`` changes, which costs one ``stat`` per batch, so a weight change
takes effect on the next request. Fields: ``target``, ``stable`` and ``candidate`` (versions, or
``null``), ``mode`` (``canary``, ``experiment``, ``shadow`` or ``null``), ``candidate_weight``
(0-1), ``shadow_share`` (0-1), ``salt``, ``rollout_id``. With no rollout, ``stable`` may be
``null``: requests then go to whatever version Triton serves by default (the newest loaded).

A request pinned to a version that is no longer loaded (a rollback or deploy switched versions
under a rollout, or a stale routing file) is sent again unpinned, so a switch never fails client
requests; such fallbacks are counted in ``recsys_router_fallbacks_total`` and answer with arm
``default`` and version 0 (BLS does not say which version Triton picked). Each forwarded request
counts in ``recsys_router_requests_total{model, target, arm}`` (the version of each arm is in the
routing and in Triton's own per-version metrics of the target).

Shadow mode sends a mirrored request to the candidate after the stable answer is ready and
discards the candidate's answer after comparing it with the stable one: the share of the stable
top-k (``ranked_output`` parameter, e.g. ``PRODUCT_IDS``) also in the candidate's goes to
``recsys_shadow_topk_overlap_total`` / ``recsys_shadow_compared_total``, outcomes to
``recsys_shadow_requests_total{outcome}``. The candidate's own latency and failures are in
Triton's per-version metrics as usual. A mirrored request's answer waits for the mirror, so only
``shadow_share`` of the requests pay the candidate's latency once more; keep the share small.

Why synchronous, one request per execution, several instances: an ``async def execute`` that
awaits BLS ``async_exec`` (so one instance could forward many requests at once, and mirror in
the background) crashed Triton 2.51's server under load in testing (``malloc(): unaligned tcache
chunk detected`` in the python backend, with and without dynamic batching). Plain ``exec()``
is the path the platform's models have always used. Concurrency comes from ``instance_count``
router instances (stub processes that mostly wait on BLS).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

ROUTING_FILE = "routing.json"
ROUTING_KEY = "ROUTING_KEY"
ROUTED_VERSION = "ROUTED_VERSION"
ROUTED_ARM = "ROUTED_ARM"
STABLE = "stable"
CANDIDATE = "candidate"
DEFAULT = "default"
"""The arm of a request the router could not pin (see the fallback above): ``ROUTED_VERSION``
is then 0, since BLS does not say which version Triton picked."""
_MODES = {None, "canary", "experiment", "shadow"}
_NOT_SERVING = ("is not ready", "unknown model", "not found", "unavailable", "is not loaded")


def key_share(salt: str, key: bytes) -> float:
    """Where ``key`` falls in [0, 1) for this rollout: the arm is ``candidate`` when it is below
    the candidate's weight. Must equal :func:`recsys.delivery.routing.key_share`."""
    digest = hashlib.blake2b(key, digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Routing:
    """One validated ``routing.json``."""

    def __init__(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise ValueError("routing config is not a JSON object")
        self.mode = data.get("mode")
        if self.mode not in _MODES:
            raise ValueError(f"routing mode {self.mode!r} is not one of {sorted(map(str, _MODES))}")
        self.stable = _version(data.get("stable"), "stable")
        self.candidate = _version(data.get("candidate"), "candidate")
        self.weight = _share(data.get("candidate_weight", 0.0), "candidate_weight")
        self.shadow_share = _share(data.get("shadow_share", 0.0), "shadow_share")
        self.salt = str(data.get("salt") or "")
        self.rollout_id = str(data.get("rollout_id") or "")
        if self.mode is not None and self.candidate is None:
            raise ValueError(f"routing mode {self.mode!r} needs a candidate version")
        if self.mode is not None and self.stable is None:
            raise ValueError(f"routing mode {self.mode!r} needs a stable version")

    def arm(self, key: bytes | None) -> str:
        if self.mode not in ("canary", "experiment") or self.weight <= 0.0:
            return STABLE
        share = random.random() if key is None else key_share(self.salt, key)
        return CANDIDATE if share < self.weight else STABLE

    def version(self, arm: str) -> int:
        chosen = self.candidate if arm == CANDIDATE else self.stable
        return -1 if chosen is None else chosen

    def mirrors(self) -> bool:
        return self.mode == "shadow" and random.random() < self.shadow_share


def _version(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"routing {name} must be a version number >= 1 or null, got {value!r}")
    return value


def _share(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"routing {name} must be a number within [0, 1], got {value!r}")
    return float(value)


class _Counters:
    """One counter family and its metrics, every label set created up front in ``initialize``
    (on the stub's main thread, as the serving models do) and destroyed in ``finalize``: each
    ``Metric`` before its ``MetricFamily``, while the server still answers (see the serving
    models and Triton issue #8663). Nothing is created while requests run: a metric created
    lazily from ``execute`` and destroyed on a reload corrupted the server's heap in testing
    (``malloc(): unaligned tcache chunk detected`` after a router reload)."""

    def __init__(
        self, name: str, description: str, base: dict[str, str], key: str | None, values: tuple
    ) -> None:
        self._family = pb_utils.MetricFamily(
            name=name, description=description, kind=pb_utils.MetricFamily.COUNTER
        )
        variants = values if key is not None else (None,)
        self._metrics = {
            value: self._family.Metric(labels=base if key is None else {**base, key: value})
            for value in variants
        }

    def add(self, value: str | None = None, amount: float = 1.0) -> None:
        self._metrics[value].increment(amount)

    def close(self) -> None:
        self._metrics.clear()
        self._family = None


class TritonPythonModel:
    """Routes each request to the target model's stable or candidate version."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config["parameters"].items()}
        self.name = str(config["name"])
        self.target = parameters["target_model"]
        self.ranked_output = parameters.get("ranked_output") or None
        self.outputs = [
            o["name"] for o in config["output"] if o["name"] not in (ROUTED_VERSION, ROUTED_ARM)
        ]
        self.path = Path(args["model_repository"]) / ROUTING_FILE
        self.logger = pb_utils.Logger
        self._stamp: tuple[int, int, int] | None = None
        self.routing = self._read()  # a corrupt file at load time fails the load, loudly
        labels = {"model": self.name, "target": self.target}
        self.requests = _Counters(
            "recsys_router_requests_total", "Requests the router forwarded, by arm", labels,
            "arm", (STABLE, CANDIDATE, DEFAULT),
        )  # fmt: skip
        self.fallbacks = _Counters(
            "recsys_router_fallbacks_total",
            "Requests whose pinned version was not loaded, sent again to the default version",
            labels, None, (),
        )  # fmt: skip
        self.config_errors = _Counters(
            "recsys_router_config_errors_total",
            "Unreadable routing.json seen by the router (it kept the last good routing)",
            labels, None, (),
        )  # fmt: skip
        self.shadow = _Counters(
            "recsys_shadow_requests_total", "Mirrored requests to the shadow candidate",
            labels, "outcome", ("ok", "error"),
        )  # fmt: skip
        self.overlap = _Counters(
            "recsys_shadow_topk_overlap_total",
            "Sum of the top-k overlap of shadow and stable answers", labels, None, (),
        )  # fmt: skip
        self.overlap_count = _Counters(
            "recsys_shadow_compared_total", "Shadow answers compared for top-k overlap",
            labels, None, (),
        )  # fmt: skip

    # -- routing config -----------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _read(self) -> Routing:
        stamp = self._file_stamp()
        self._stamp = stamp
        if stamp is None:
            return Routing({})
        return Routing(json.loads(self.path.read_text()))

    def _current(self) -> Routing:
        if self._file_stamp() == self._stamp:
            return self.routing
        try:
            self.routing = self._read()
        except (OSError, ValueError) as exc:  # keep serving with the last good split
            self.config_errors.add()
            self.logger.log_error(f"{self.name}: unreadable {self.path}, kept last routing: {exc}")
        return self.routing

    # -- requests -----------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> list[Any]:
        routing = self._current()
        return [self._route(request, routing) for request in requests]

    def _forwarded_inputs(self, request: Any) -> tuple[list[Any], bytes | None]:
        inputs, key = [], None
        for tensor in request.inputs():
            if tensor.name() == ROUTING_KEY:
                raw = tensor.as_numpy().reshape(-1)
                key = bytes(raw[0]) if raw.size and raw[0] is not None else None
            else:
                inputs.append(tensor)
        return inputs, key

    def _send(self, inputs: list[Any], version: int) -> Any:
        request = pb_utils.InferenceRequest(
            model_name=self.target,
            model_version=version,
            inputs=inputs,
            requested_output_names=self.outputs,
        )
        return request.exec()

    def _route(self, request: Any, routing: Routing) -> Any:
        try:
            inputs, key = self._forwarded_inputs(request)
            arm = routing.arm(key)
            version = routing.version(arm)
            response = self._send(inputs, version)
            if response.has_error() and version != -1 and _not_serving(response):
                self.fallbacks.add()
                response = self._send(inputs, -1)
                version, arm = -1, DEFAULT
            if response.has_error():
                return pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(response.error().message())
                )
            outputs = list(response.output_tensors())
            answered = max(version, 0)
            self.requests.add(arm)
            if routing.mirrors() and routing.candidate is not None:
                self._mirror(inputs, outputs, routing.candidate)
            return pb_utils.InferenceResponse(
                output_tensors=[
                    *outputs,
                    pb_utils.Tensor(ROUTED_VERSION, np.array([[answered]], dtype=np.int64)),
                    pb_utils.Tensor(ROUTED_ARM, np.array([[arm.encode()]], dtype=np.object_)),
                ]
            )
        except Exception as exc:  # one bad request must not fail its batch
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {exc}")
            )

    # -- shadow -------------------------------------------------------------------------

    def _ranked(self, tensors: list[Any]) -> list[bytes] | None:
        for tensor in tensors:
            if tensor.name() == self.ranked_output:
                return [bytes(x) for x in tensor.as_numpy().reshape(-1)]
        return None

    def _mirror(self, inputs: list[Any], outputs: list[Any], candidate: int) -> None:
        """Ask the shadow candidate the same question and compare; never fails the request."""
        try:
            response = self._send(inputs, candidate)
            if response.has_error():
                self.shadow.add("error")
                return
            self.shadow.add("ok")
            stable_top = self._ranked(outputs)
            shadow_top = self._ranked(list(response.output_tensors()))
            if stable_top and shadow_top is not None:
                overlap = len(set(stable_top) & set(shadow_top)) / len(stable_top)
                self.overlap.add(amount=overlap)
                self.overlap_count.add()
        except Exception as exc:
            self.shadow.add("error")
            self.logger.log_warn(f"{self.name}: shadow request to v{candidate} failed: {exc}")

    def finalize(self) -> None:
        for counters in (
            self.requests,
            self.fallbacks,
            self.config_errors,
            self.shadow,
            self.overlap,
            self.overlap_count,
        ):
            counters.close()


def _not_serving(response: Any) -> bool:
    message = (response.error().message() or "").lower()
    return any(marker in message for marker in _NOT_SERVING)
