"""Triton python-backend model of the recommendation family: a user or a session in, top-K
items out.

Published into every version folder as ``model.py`` next to ``sasrec.onnx``, ``items.npz``,
``users.npz`` and ``manifest.json`` (written by :mod:`recsys.families.recommend.export`). It
imports only numpy, onnxruntime, ``triton_python_backend_utils`` and the standard library, never
``recsys``: the python stub runs it in its own process, and a version folder has to keep working
whatever happens to the platform code.

Serving contract, one recommendation per inference request (batch dimension 1):

* ``USER_ID`` (BYTES ``[1, 1]``, optional): a user of ``users.npz``. Their stored history (their
  latest ``max_len`` items, everything the platform knew at export) is scored; ``SOURCE`` is
  ``user``. An unknown user gets the popularity ranking, ``SOURCE``
  ``popularity: unknown user '<id>'``.
* ``HISTORY`` (BYTES ``[1, n]``, optional): an anonymous session's item ids, oldest first, at
  most ``max_history`` (manifest, default 200). Ids the version does not know are skipped (and
  counted in the drift sample); the known ones are scored, ``SOURCE`` is ``session``. No known
  id (or an empty HISTORY) gets the popularity ranking, ``SOURCE``
  ``popularity: no known item in HISTORY`` / ``popularity: empty HISTORY``.
* Exactly one of the two: both is an error (``send USER_ID or HISTORY, not both``) rather than a
  silent precedence, since a client that sends both has a bug it should hear about, and so is
  neither.
* ``TOP_K`` (INT32 ``[1, 1]``): 1 .. ``min(max_top_k, n_items)``.
* ``EXCLUDE_SEEN`` (BOOL ``[1, 1]``, optional, default true): the user's every known item (or
  the session's known items) is scored ``-inf`` before the top K, so a user is not offered what
  they already bought. When fewer than ``TOP_K`` items are left, fewer are returned (never a
  ``-inf`` score).
* Outputs: ``ITEM_IDS`` (BYTES ``[1, k]``), ``SCORES`` (FP32 ``[1, k]``, best first: the
  model's logits, or train interaction counts for the popularity ranking), ``CATEGORIES``
  (BYTES ``[1, k]``, ``""`` when unknown) and ``SOURCE`` (BYTES ``[1, 1]``).

Requests of one dynamic batch that need the model (known users, sessions with a known item) are
scored with a single onnxruntime call. Triton batches only requests with the same inputs and
shapes (measured on 2.51: a request without ``EXCLUDE_SEEN`` never shares a batch with one that
sends it, and sessions share one only with sessions of the same length), so clients should
always send ``EXCLUDE_SEEN``; :mod:`recsys.families.recommend.client` does.

Validation: a bad request gets its own INVALID_ARG error response and never fails the other
requests of its batch. ``USER_ID`` must be non-empty UTF-8 of at most 64 bytes, each ``HISTORY``
id UTF-8 of at most 64 bytes, ``HISTORY`` at most ``max_history`` ids; size limits are checked
with ``len()`` before anything is decoded. These errors are successes to Triton's own
``nv_inference_request_*`` counters, so the model counts them in
``recsys_request_errors_total{model, version, instance, reason}`` (``reason``
``invalid_argument`` or ``oversized``), with exactly the search model's lifecycle rules: the
metric family and its metrics are created in ``initialize`` and destroyed in ``finalize``
(each ``Metric`` before its ``MetricFamily``) while the server still answers their destructors,
and the ``instance`` label keeps two instances or versions from sharing a series (an earlier
counter destroyed from the stub's teardown made replaced versions hang in UNLOADING on Triton
2.51; Triton issue #8663).

The manifest's ``fault_injection`` works as in search (``"raise"``, ``{"mode": "raise",
"after_requests": k}``, ``{"mode": "sleep", "sleep_ms": n}``): the rollback rehearsals deploy a
version that passes its smoke test and then fails under traffic.

With ``RECSYS_QUERY_SAMPLE_DIR`` set, a ``RECSYS_QUERY_SAMPLE_RATE`` share of the valid requests
is appended to ``<dir>/<model>/<version>/queries-<host>-<pid>-<n>.jsonl`` as
``{"ts": ..., "request": {"known_user", "user", "items", "unknown_items", "source"}}`` for the
drift check (:class:`RequestSampler`): ``known_user`` is ``None`` and ``items`` the sent ids for
a session, ``items`` is empty for a user request (their stored history is not a served input).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILE = "sasrec.onnx"
REQUIRED_FILES = (ONNX_FILE, "items.npz", "users.npz", "manifest.json")
MAX_ID_BYTES = 64
DEFAULT_MAX_TOP_K = 100
DEFAULT_MAX_HISTORY = 200
PAD = 0

SOURCE_USER = "user"
SOURCE_SESSION = "session"
SOURCE_POPULARITY = "popularity"


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to that client only.
    ``reason`` is its ``reason`` label in :data:`ERROR_METRIC`."""

    reason = "invalid_argument"


class OversizedRequestError(RequestError):
    """A request over a size limit, refused before its ids are decoded."""

    reason = "oversized"


ERROR_METRIC = "recsys_request_errors_total"
ERROR_REASONS = (RequestError.reason, OversizedRequestError.reason)
"""The ``reason`` label's values (a small fixed set: one series per reason and instance)."""


def parse_fault_injection(value: Any) -> tuple[str | None, float, int]:
    """Normalise the manifest's ``fault_injection`` to ``(mode, sleep_s, after_requests)``.

    Accepted: ``None``; ``"raise"``; ``{"sleep_ms": n}``; or ``{"mode": "raise" | "sleep",
    "sleep_ms": n, "after_requests": k}`` where the fault starts once this instance has answered
    ``k`` requests (so a faulty version can pass its deploy smoke test and fail under traffic).
    Anything else fails the load: a typo must not silently serve a healthy model in a rehearsal.
    """
    if value is None:
        return None, 0.0, 0
    if value == "raise":
        return "raise", 0.0, 0
    if isinstance(value, dict):
        mode = value.get("mode", "sleep" if "sleep_ms" in value else None)
        sleep_ms = value.get("sleep_ms", 0)
        after = value.get("after_requests", 0)
        valid = (
            mode in ("raise", "sleep")
            and isinstance(sleep_ms, int | float)
            and not isinstance(sleep_ms, bool)
            and sleep_ms >= 0
            and isinstance(after, int)
            and not isinstance(after, bool)
            and after >= 0
        )
        if valid:
            return str(mode), float(sleep_ms) / 1000.0, int(after)
    raise ValueError(f"unsupported fault_injection in manifest: {value!r}")


def _error_response(message: str) -> Any:
    """An error response for one request; INVALID_ARG where this stub version supports codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _positive_int(value: Any, default: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"manifest {what} must be a positive integer, got {value!r}")
    return value


def _rows(tensor: Any, name: str) -> np.ndarray:
    """The request's one row of ``tensor`` as a flat array; a batch dimension other than 1 is
    refused (one recommendation per request keeps errors, sources and limits per client)."""
    array = tensor.as_numpy()
    if array.ndim < 1 or array.shape[0] != 1:
        raise RequestError(
            f"{name} has batch dimension {array.shape[0] if array.ndim else 'none'}; send one "
            "recommendation per request (batch dimension 1)"
        )
    return array.reshape(-1)


def _decode(raw: Any, name: str) -> str:
    if isinstance(raw, bytes | np.bytes_):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    if isinstance(raw, str):
        return raw
    raise RequestError(f"{name} must be a UTF-8 string, got {type(raw).__name__}")


def _size(raw: Any) -> int:
    return len(raw) if isinstance(raw, bytes | str) else 0


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` highest finite scores of a row, best first (ties: lower
    index first, so equal scores always come back in the same order)."""
    finite = np.flatnonzero(np.isfinite(scores))
    if not len(finite):
        return finite
    candidates = scores[finite]
    if k < len(finite):
        part = np.argpartition(-candidates, k - 1)[:k]
        finite, candidates = finite[part], candidates[part]
    order = np.lexsort((finite, -candidates))
    return finite[order][:k]


class _Parsed:
    """One valid request: what to score and how to answer it."""

    __slots__ = (
        "exclude",
        "items",
        "known_user",
        "row",
        "seen",
        "source",
        "tokens",
        "top_k",
        "unknown_items",
        "user",
    )

    def __init__(self, top_k: int, exclude: bool) -> None:
        self.top_k = top_k
        self.exclude = exclude
        self.user: str | None = None
        self.known_user: bool | None = None
        self.items: list[str] = []
        self.unknown_items = 0
        self.tokens: np.ndarray | None = None
        """``[max_len]`` tokens to score, or ``None`` for the popularity ranking."""
        self.seen: np.ndarray = np.zeros(0, dtype=np.int64)
        self.source = SOURCE_POPULARITY
        self.row = -1


SAMPLE_DIR_ENV = "RECSYS_QUERY_SAMPLE_DIR"
SAMPLE_RATE_ENV = "RECSYS_QUERY_SAMPLE_RATE"
SAMPLE_MAX_BYTES_ENV = "RECSYS_QUERY_SAMPLE_MAX_BYTES"
SAMPLE_RETRY_ENV = "RECSYS_QUERY_SAMPLE_RETRY_S"
DEFAULT_SAMPLE_RATE = 0.1
DEFAULT_SAMPLE_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_SAMPLE_RETRY_S = 30.0
MAX_SAMPLE_RETRY_S = 900.0
SAMPLE_SEGMENTS_KEPT = 4


def _error_key(exc: OSError) -> str:
    """A short name for an ``OSError`` in log lines: its errno name, else its class name."""
    return errno.errorcode.get(exc.errno or 0) or type(exc).__name__


def _writer_tag() -> str:
    """``<host>-<pid>``: names this process's sample files. Several Triton replicas write into
    one shared folder, and every container numbers its processes from 1, so the pid alone
    would let two replicas append to the same file."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}"


class RequestSampler:
    """Appends a random share of the served requests to JSON-lines files for the drift check.

    The search model's ``QuerySampler`` with a request object instead of a query string per
    line (``{"ts": ..., "request": {...}}``), and the same files and rules: one writer per
    ``<dir>/<model>/<version>/queries-<host>-<pid>-<n>.jsonl`` (each model instance is its own
    process), append-only so the reader can keep a byte offset per file, rotated at
    ``max_bytes`` with only the newest :data:`SAMPLE_SEGMENTS_KEPT` segments kept.

    Sampling must never fail or slow down a request: a write error is logged once per error
    (and once when writes work again, with the count dropped meanwhile), and the sampler retries
    after a backoff (``retry_s``, doubling up to :data:`MAX_SAMPLE_RETRY_S`) instead of staying
    off until a restart. An open file whose name was removed is noticed and reopened.
    """

    def __init__(
        self,
        directory: Path,
        rate: float,
        max_bytes: int,
        log: Any = None,
        retry_s: float = DEFAULT_SAMPLE_RETRY_S,
    ) -> None:
        self.directory = directory
        self.rate = min(max(rate, 0.0), 1.0)
        self.max_bytes = max(int(max_bytes), 1024)
        self.enabled = self.rate > 0
        self.retry_s = max(float(retry_s), 0.0)
        self.failure: str | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.dropped = 0
        self._log = log
        self._random = random.Random()
        self._handle: Any = None
        self._segment = -1

    @classmethod
    def from_environment(
        cls, model_name: str, version: str, environ: Any = None, log: Any = None
    ) -> RequestSampler | None:
        """The sampler ``RECSYS_QUERY_SAMPLE_*`` ask for, or ``None`` when no folder is set. A
        malformed rate, size or retry delay disables sampling (logged) rather than the model."""
        environ = os.environ if environ is None else environ
        root = environ.get(SAMPLE_DIR_ENV)
        if not root:
            return None
        try:
            rate = float(environ.get(SAMPLE_RATE_ENV) or DEFAULT_SAMPLE_RATE)
            max_bytes = int(environ.get(SAMPLE_MAX_BYTES_ENV) or DEFAULT_SAMPLE_MAX_BYTES)
            retry_s = float(environ.get(SAMPLE_RETRY_ENV) or DEFAULT_SAMPLE_RETRY_S)
        except ValueError as exc:
            if log is not None:
                log(
                    f"request sampling off: bad {SAMPLE_RATE_ENV}/{SAMPLE_MAX_BYTES_ENV}/"
                    f"{SAMPLE_RETRY_ENV}: {exc}"
                )
            return None
        return cls(Path(root) / model_name / str(version), rate, max_bytes, log, retry_s=retry_s)

    def _segment_path(self, segment: int) -> Path:
        return self.directory / f"queries-{_writer_tag()}-{segment:06d}.jsonl"

    def _segments(self) -> list[int]:
        prefix = f"queries-{_writer_tag()}-"
        found = []
        for path in self.directory.glob(f"{prefix}*.jsonl"):
            number = path.name[len(prefix) : -len(".jsonl")]
            if number.isdigit():
                found.append(int(number))
        return sorted(found)

    def _writable(self, size: int) -> Any:
        """The open segment, rotated first when ``size`` more bytes would pass ``max_bytes``,
        reopened when its file was removed from under it."""
        if self._handle is not None and os.fstat(self._handle.fileno()).st_nlink == 0:
            self.close()
        if self._handle is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = self._segments()
            # Never reuse a number this process wrote before: the reader's offset for that
            # name would skip the start of a new file that grew past it.
            self._segment = max(existing[-1] if existing else 0, self._segment + 1)
            self._handle = open(self._segment_path(self._segment), "ab")  # noqa: SIM115
        if self._handle.tell() and self._handle.tell() + size > self.max_bytes:
            self._handle.close()
            self._segment += 1
            self._handle = open(self._segment_path(self._segment), "ab")  # noqa: SIM115
            for old in self._segments()[:-SAMPLE_SEGMENTS_KEPT]:
                self._segment_path(old).unlink(missing_ok=True)
        return self._handle

    def sample(self, requests: list[dict[str, Any]]) -> None:
        """Write a random ``rate`` share of ``requests``; errors are recorded, never raised."""
        if not self.enabled or not requests:
            return
        chosen = [r for r in requests if self._random.random() < self.rate]
        if not chosen:
            return
        if self.failure is not None and time.monotonic() < self._retry_at:
            self.dropped += len(chosen)
            return
        now = round(time.time(), 3)
        data = "".join(
            json.dumps({"ts": now, "request": request}, ensure_ascii=False) + "\n"
            for request in chosen
        ).encode("utf-8", errors="replace")
        try:
            handle = self._writable(len(data))
            handle.write(data)  # one write per batch: a reader never sees half a line for long
            handle.flush()
        except OSError as exc:
            self.close()
            self._failed(exc)
            self.dropped += len(chosen)
            return
        if self.failure is not None:
            self._recovered()

    def _failed(self, exc: OSError) -> None:
        error = _error_key(exc)
        self._failures += 1
        delay = min(self.retry_s * 2 ** (self._failures - 1), max(self.retry_s, MAX_SAMPLE_RETRY_S))
        self._retry_at = time.monotonic() + delay
        if error == self.failure:
            return
        self.failure = error
        if self._log is not None:
            self._log(
                f"request sampling to {self.directory} failed ({error}: {exc}); sampled requests "
                f"are dropped, retrying in {delay:g} s with backoff"
            )

    def _recovered(self) -> None:
        if self._log is not None:
            self._log(
                f"request sampling to {self.directory} works again after {self._failures} "
                f"failed attempt(s) ({self.failure}); {self.dropped} sampled requests were dropped"
            )
        self.failure, self._failures, self._retry_at, self.dropped = None, 0, 0.0, 0

    def close(self) -> None:
        """Close the open segment (the next write opens one again)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()

    def shutdown(self) -> None:
        """Close for good (the instance unloads)."""
        self.close()


class ErrorCounters:
    """This instance's :data:`ERROR_METRIC` series, one per reason, as Triton custom metrics.

    Created in ``initialize`` and destroyed by :meth:`close` from ``finalize``: the stub's
    destructors of a ``Metric`` and a ``MetricFamily`` each wait for the server's answer, so
    they must run while the server still serves this instance, never later from the
    interpreter's teardown (see the module docstring). Counting is best effort: a metrics
    error is logged once and never fails a request.
    """

    def __init__(self, labels: dict[str, str], log: Any = None) -> None:
        self._log = log
        self._family: Any = None
        self._metrics: dict[str, Any] = {}
        self._failed = False
        try:
            self._family = pb_utils.MetricFamily(
                name=ERROR_METRIC,
                description=(
                    "Requests the model answered with an error of its own (counted as "
                    "successes by nv_inference_request_success), by reason"
                ),
                kind=pb_utils.MetricFamily.COUNTER,
            )
            for reason in ERROR_REASONS:
                self._metrics[reason] = self._family.Metric(labels={**labels, "reason": reason})
        except Exception as exc:  # no metrics is a blind spot, not a reason to fail the load
            self._warn(f"request error counter {ERROR_METRIC} unavailable: {exc}")
            self.close()

    def _warn(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def count(self, counts: dict[str, int]) -> None:
        """Add ``counts`` (reason -> requests) to the counters; one call per reason."""
        for reason, count in counts.items():
            metric = self._metrics.get(reason)
            if metric is None or count <= 0:
                continue
            try:
                metric.increment(count)
            except Exception as exc:
                if not self._failed:
                    self._failed = True
                    self._warn(f"could not count {reason} errors in {ERROR_METRIC}: {exc}")

    def close(self) -> None:
        """Destroy every ``Metric``, then the ``MetricFamily`` (the order Triton requires). The
        objects' only references are dropped here, so their destructors run now."""
        metrics, self._metrics = self._metrics, {}
        while metrics:
            metrics.popitem()
        del metrics
        family, self._family = self._family, None
        del family


class TritonPythonModel:
    """SASRec next-item recommendation for known users and anonymous sessions, with a
    popularity fallback."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load everything once per instance: a request then costs a lookup, a share of one
        ONNX call and a top-K."""
        version_dir = Path(args["model_repository"]) / args["model_version"]
        missing = [name for name in REQUIRED_FILES if not (version_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{version_dir} lacks {', '.join(missing)}")
        self.version_dir = version_dir
        self.manifest = json.loads((version_dir / "manifest.json").read_text())
        onnx_file = self.manifest.get("onnx_file", ONNX_FILE)
        if onnx_file != ONNX_FILE:
            raise ValueError(f"manifest onnx_file {onnx_file!r}: this model serves {ONNX_FILE}")
        config = json.loads(args.get("model_config") or "{}")
        parameters = config.get("parameters") or {}
        threads = int((parameters.get("intra_op_threads") or {}).get("string_value") or 1)

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(version_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )

        with np.load(version_dir / "items.npz", allow_pickle=False) as items:
            item_ids = [str(i) for i in items["item_ids"]]
            categories = [str(c) for c in items["categories"]]
            self.popularity = np.asarray(items["popularity"], dtype=np.float32)
        self.n_items = len(item_ids)
        if (
            not self.n_items
            or len(categories) != self.n_items
            or len(self.popularity) != (self.n_items)
        ):
            raise ValueError(
                f"items.npz: {self.n_items} ids, {len(categories)} categories, "
                f"{len(self.popularity)} popularity counts"
            )
        self.item_ids = np.array([i.encode("utf-8") for i in item_ids], dtype=np.object_)
        self.categories = np.array([c.encode("utf-8") for c in categories], dtype=np.object_)
        self.item_index = {item: index for index, item in enumerate(item_ids)}
        self.popularity_order = np.argsort(-self.popularity, kind="stable")

        with np.load(version_dir / "users.npz", allow_pickle=False) as users:
            user_ids = [str(u) for u in users["user_ids"]]
            self.history_tokens = np.ascontiguousarray(users["history_tokens"], dtype=np.int64)
            self.seen_indptr = np.asarray(users["seen_indptr"], dtype=np.int64)
            self.seen_items = np.asarray(users["seen_items"], dtype=np.int64)
        self.user_index = {user: index for index, user in enumerate(user_ids)}
        n_users, self.max_len = self.history_tokens.shape
        if len(user_ids) != n_users or len(self.seen_indptr) != n_users + 1:
            raise ValueError(
                f"users.npz: {len(user_ids)} ids, {n_users} histories, "
                f"{len(self.seen_indptr) - 1} seen lists"
            )
        expected_len = self.manifest.get("max_len")
        if expected_len is not None and int(expected_len) != self.max_len:
            raise ValueError(f"users.npz max_len {self.max_len} != manifest max_len {expected_len}")
        if self.history_tokens.size and int(self.history_tokens.max()) > self.n_items:
            raise ValueError("users.npz holds tokens past the item catalogue")
        self.max_top_k = min(
            _positive_int(self.manifest.get("max_top_k"), DEFAULT_MAX_TOP_K, "max_top_k"),
            self.n_items,
        )
        self.max_history = _positive_int(
            self.manifest.get("max_history"), DEFAULT_MAX_HISTORY, "max_history"
        )

        self.fault_mode, self.fault_sleep_s, self.fault_after = parse_fault_injection(
            self.manifest.get("fault_injection")
        )
        self.answered = 0
        model_name = str(args.get("model_name") or self.manifest.get("model_name") or "model")
        self.sampler = RequestSampler.from_environment(
            model_name, args["model_version"], log=pb_utils.Logger.log_warn
        )
        self.error_counters = ErrorCounters(
            {
                "model": model_name,
                "version": str(args["model_version"]),
                "instance": str(args.get("model_instance_name") or "0"),
            },
            log=pb_utils.Logger.log_warn,
        )
        pb_utils.Logger.log_info(
            f"{model_name} v{args['model_version']} ({args.get('model_instance_name')}): "
            f"{self.n_items} items, {n_users} users, max_len {self.max_len}, pid {os.getpid()}, "
            f"max_top_k {self.max_top_k}, max_history {self.max_history}, "
            f"fault_injection={self.manifest.get('fault_injection')!r}"
        )

    # -- requests -------------------------------------------------------------------------

    def _parse(self, request: Any) -> _Parsed:
        """Validate one request (sizes before decoding) and resolve its user or session."""
        user_tensor = pb_utils.get_input_tensor_by_name(request, "USER_ID")
        history_tensor = pb_utils.get_input_tensor_by_name(request, "HISTORY")
        top_k_tensor = pb_utils.get_input_tensor_by_name(request, "TOP_K")
        exclude_tensor = pb_utils.get_input_tensor_by_name(request, "EXCLUDE_SEEN")
        if top_k_tensor is None:
            raise RequestError("TOP_K is required")
        if user_tensor is not None and history_tensor is not None:
            raise RequestError("send USER_ID or HISTORY, not both")
        if user_tensor is None and history_tensor is None:
            raise RequestError(
                "send USER_ID (a known user) or HISTORY (a session's item ids, oldest first)"
            )
        top_ks = _rows(top_k_tensor, "TOP_K")
        if len(top_ks) != 1:
            raise RequestError(f"TOP_K must hold one value, got {len(top_ks)}")
        exclude = True
        if exclude_tensor is not None:
            flags = _rows(exclude_tensor, "EXCLUDE_SEEN")
            if len(flags) != 1:
                raise RequestError(f"EXCLUDE_SEEN must hold one value, got {len(flags)}")
            exclude = bool(flags[0])

        if user_tensor is not None:
            raw_users = _rows(user_tensor, "USER_ID")
            if len(raw_users) != 1:
                raise RequestError(f"USER_ID must hold one id, got {len(raw_users)}")
            if _size(raw_users[0]) > MAX_ID_BYTES:
                raise OversizedRequestError(
                    f"USER_ID is {_size(raw_users[0])} bytes, over the limit of {MAX_ID_BYTES}"
                )
            user = _decode(raw_users[0], "USER_ID")
            if not user.strip():
                raise RequestError("USER_ID is empty; send a user id")
            raw_items = None
        else:
            raw_items = _rows(history_tensor, "HISTORY")
            if len(raw_items) > self.max_history:
                raise OversizedRequestError(
                    f"HISTORY holds {len(raw_items)} ids, over the limit of {self.max_history} "
                    "(max_history); send the session's latest items"
                )
            for position, raw in enumerate(raw_items):
                if _size(raw) > MAX_ID_BYTES:
                    raise OversizedRequestError(
                        f"HISTORY id {position} is {_size(raw)} bytes, over the limit of "
                        f"{MAX_ID_BYTES}"
                    )
            items = [_decode(raw, f"HISTORY id {p}") for p, raw in enumerate(raw_items)]

        top_k = int(top_ks[0])
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"TOP_K must be between 1 and {self.max_top_k}, got {top_k}")
        parsed = _Parsed(top_k, exclude)
        if raw_items is None:
            self._resolve_user(parsed, user)
        else:
            self._resolve_session(parsed, items)
        return parsed

    def _resolve_user(self, parsed: _Parsed, user: str) -> None:
        parsed.user = user
        index = self.user_index.get(user)
        parsed.known_user = index is not None
        if index is None:
            parsed.source = f"{SOURCE_POPULARITY}: unknown user {user!r}"
            return
        parsed.tokens = self.history_tokens[index]
        parsed.seen = self.seen_items[self.seen_indptr[index] : self.seen_indptr[index + 1]]
        parsed.source = SOURCE_USER

    def _resolve_session(self, parsed: _Parsed, items: list[str]) -> None:
        parsed.items = items
        known = [self.item_index[i] for i in items if i in self.item_index]
        parsed.unknown_items = len(items) - len(known)
        if not known:
            why = "empty HISTORY" if not items else "no known item in HISTORY"
            parsed.source = f"{SOURCE_POPULARITY}: {why}"
            return
        tokens = np.full(self.max_len, PAD, dtype=np.int64)
        tail = np.asarray(known[-self.max_len :], dtype=np.int64)
        tokens[self.max_len - len(tail) :] = tail + 1
        parsed.tokens = tokens
        parsed.seen = np.unique(np.asarray(known, dtype=np.int64))
        parsed.source = SOURCE_SESSION

    def _inject_fault(self) -> None:
        if self.fault_mode is None or self.answered < self.fault_after:
            return
        if self.fault_mode == "sleep":
            time.sleep(self.fault_sleep_s)
        elif self.fault_mode == "raise":
            raise RuntimeError(
                f"injected fault (manifest fault_injection) in {self.version_dir.name}"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer a dynamic batch: per-request validation, one ONNX call for every request
        the model scores, the popularity ranking for the others."""
        self._inject_fault()
        self.answered += len(requests)
        responses: list[Any] = [None] * len(requests)
        parsed: list[tuple[int, _Parsed]] = []
        errors: dict[str, int] = {}
        for index, request in enumerate(requests):
            try:
                parsed.append((index, self._parse(request)))
            except RequestError as exc:
                responses[index] = _error_response(str(exc))
                errors[exc.reason] = errors.get(exc.reason, 0) + 1
        if errors:
            self.error_counters.count(errors)
        if not parsed:
            return responses

        scored = [p for _, p in parsed if p.tokens is not None]
        scores = None
        if scored:
            for row, p in enumerate(scored):
                p.row = row
            batch = np.stack([p.tokens for p in scored])
            scores = self.session.run(["SCORES"], {"HISTORY": batch})[0]
        for index, p in parsed:
            if p.tokens is None:
                columns = self.popularity_order[: p.top_k]
                values = self.popularity[columns]
            else:
                row_scores = np.array(scores[p.row], dtype=np.float32, copy=True)
                if p.exclude and len(p.seen):
                    row_scores[p.seen] = -np.inf
                columns = _top(row_scores, p.top_k)
                values = row_scores[columns]
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("ITEM_IDS", self.item_ids[columns].reshape(1, -1)),
                    pb_utils.Tensor("SCORES", values.astype(np.float32).reshape(1, -1)),
                    pb_utils.Tensor("CATEGORIES", self.categories[columns].reshape(1, -1)),
                    pb_utils.Tensor(
                        "SOURCE", np.array([[p.source.encode("utf-8")]], dtype=np.object_)
                    ),
                ]
            )
        if self.sampler is not None:
            self._sample([p for _, p in parsed])
        return responses

    def _sample(self, parsed: list[_Parsed]) -> None:
        """Hand the valid requests to the drift sampler; nothing it does may fail the batch."""
        try:
            self.sampler.sample(
                [
                    {
                        "known_user": p.known_user,
                        "user": p.user,
                        "items": p.items,
                        "unknown_items": p.unknown_items,
                        "source": p.source,
                    }
                    for p in parsed
                ]
            )
        except Exception as exc:  # sampling is best effort, serving is not
            pb_utils.Logger.log_warn(f"request sampling failed: {exc}")

    def finalize(self) -> None:
        """Drop the session and tables so an unloaded version frees its memory at once."""
        self.session = None
        self.history_tokens = None
        self.user_index = {}
        self.item_index = {}
        sampler = getattr(self, "sampler", None)
        if sampler is not None:
            sampler.shutdown()
        counters = getattr(self, "error_counters", None)
        if counters is not None:
            counters.close()  # now, while the server answers the destructors (see the class)
            self.error_counters = None
