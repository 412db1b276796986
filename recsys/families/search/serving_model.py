"""Triton python-backend model for product search: query text in, top-K product ids out.

Published into every version folder as ``model.py`` next to the serving artifacts
(``encoder.onnx``, ``tokenizer.json``, ``products.npz``, ``manifest.json``, and the encoder the
manifest's ``onnx_file`` names when that is another file, e.g. ``encoder.int8.onnx``; manifests
without the key serve ``encoder.onnx``). It imports only numpy,
onnxruntime, tokenizers and the standard library, never ``recsys``: the python stub runs it in
its own process, and a version folder has to keep working whatever happens to the platform code.

Per request: QUERY (BYTES [b, 1]) and TOP_K (INT32 [b, 1]) give PRODUCT_IDS (BYTES [b, k]) and
SCORES (FP32 [b, k]), best first. A bad request (undecodable or empty query, TOP_K out of range)
gets its own error response, so one bad client never fails the other requests of its batch; all
valid queries of a batch are embedded with a single ONNX call.

Size limits: a request is refused before any decoding or tokenising when one QUERY row is over
``max_query_bytes`` (default 2048, far more than any search box sends) or its QUERY rows together
are over ``max_request_bytes`` (default 16384): the tokenizer's pre-tokenisation walks the whole
string even though it truncates, so one 70 MB query used to stall every query batched or queued
behind it for over a minute. The limits come from the model config ``parameters``
``max_query_bytes`` / ``max_request_bytes`` when set, else from tritonserver's environment
(``RECSYS_MAX_QUERY_BYTES`` / ``RECSYS_MAX_REQUEST_BYTES``, inherited by the python stub), else
the defaults; a malformed value is logged and the default used (a typo must not make every load,
rollbacks included, fail). The refusal is an INVALID_ARG error for that request only, naming the
limit.

Errors the model answers itself (bad or oversized requests) are successes to Triton's own
``nv_inference_request_*`` counters, so the model counts them in a custom counter,
``recsys_request_errors_total{model, version, instance, reason}`` with ``reason`` one of
:data:`ERROR_REASONS` (``invalid_argument``, ``oversized``); the monitor judges a version that
refuses most of its requests by it (``Thresholds.max_rejected_rate``). Their lifetime is managed
explicitly, because an earlier custom counter (in the query sampler) made the version a swap
replaced hang in UNLOADING for good on Triton 2.51, and the stub's ``MetricFamily`` / ``Metric``
destructors each send a message to the server and wait for its answer, which must not happen
from a stub that is already tearing down: the family and its metrics are created in
``initialize`` and destroyed in ``finalize`` (each ``Metric`` before its ``MetricFamily``) while
the server still answers, and the ``instance`` label keeps two instances or versions from ever
sharing one Prometheus series (Triton issue #8663: a stale shared metric across reloads).
``tests/test_model_limits.py`` swaps versions under error-counting traffic to prove that every
replaced version leaves.

With ``RECSYS_QUERY_SAMPLE_DIR`` set, a share of the valid queries is also appended to files
there for the online drift check (:class:`QuerySampler`). The drift check sees a sampler that
cannot write from outside: Triton's own inference count of the version against the samples that
arrived, and the state of the sample folder.

A manifest with a ``hybrid`` section makes retrieval hybrid: BM25 over the product titles
(the ``bm25.*`` index files) is fused with the dense scores by ``hybrid.py``, a copy of
``recsys.families.search.hybrid`` that the export put in the version folder and that this model
loads from there (the gate scored that same code). SCORES are then fused scores. BM25 is read
only for the queries' terms (``LexicalIndex.sparse_scores``) and fused over the union of the
dense and BM25 top-``depth`` lists (``fuse_sparse``); a folder whose ``hybrid.py`` predates
them fuses full arrays (``fuse``), with the same results.

ONNX Runtime runs on the CPU unless ``RECSYS_ORT_DEVICE`` (inherited from tritonserver's
environment) says ``cuda`` (the CUDA execution provider, an error if this onnxruntime has none)
or ``auto`` (CUDA when available, else CPU, logged): the compose GPU override sets it.

A manifest with a ``reranker`` section (see :func:`reranker_config`) makes this a two-stage
model: the bi-encoder retrieves the ``max(candidates, TOP_K)`` best products by dot product, a
cross-encoder (the section's ``onnx_file``: ``reranker.onnx``, or ``reranker.int8.onnx`` for an
INT8 export; ``reranker_tokenizer.json``; titles from ``products.npz``) rescores every (query,
title) pair of the batch, tokenised once and scored in length-sorted chunks of
:data:`RERANK_CHUNK_PAIRS`, and the TOP_K best by cross-encoder are returned. SCORES are then
the cross-encoder's raw logits (``sigmoid(score)`` is the predicted relevance probability; >= 0
means "relevant"), not cosines.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import random
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

REQUIRED_FILES = ("encoder.onnx", "tokenizer.json", "products.npz", "manifest.json")
RERANK_CHUNK_PAIRS = 32
"""Cross-encoder pairs per ONNX call: a batch's pairs are sorted by token length and scored in
chunks of this many, each padded to its own longest pair (one call over all of a dynamic batch's
pairs pads every pair to the longest one and ran 2-3x slower per pair on CPU)."""
DEFAULT_ONNX_FILE = "encoder.onnx"


def served_onnx_file(manifest: dict[str, Any]) -> str:
    """The encoder file to serve: the manifest's ``onnx_file``, a plain ``*.onnx`` name in the
    version folder (never a path: a manifest must not point the server at other files)."""
    return _plain_file_name(manifest.get("onnx_file") or DEFAULT_ONNX_FILE, ".onnx", "onnx_file")


def _plain_file_name(name: Any, suffix: str, what: str) -> str:
    if (
        not isinstance(name, str)
        or not name.endswith(suffix)
        or name.startswith(".")
        or "/" in name
        or "\\" in name
    ):
        raise ValueError(f"manifest {what} {name!r} is not a plain *{suffix} file name")
    return name


def reranker_config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``reranker`` section, validated, or ``None`` for a bi-encoder-only model.

    ``{"onnx_file": "reranker.onnx", "tokenizer_file": "reranker_tokenizer.json",
    "candidates": 20, "max_length": 96, "onnx_inputs": [...]}``: file names are plain names in
    the version folder (never paths), ``candidates`` and ``max_length`` positive integers."""
    section = manifest.get("reranker")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"manifest reranker must be an object, got {section!r}")
    numbers = {}
    for key, default in (("candidates", 20), ("max_length", 96)):
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"manifest reranker {key} must be a positive integer, got {value!r}")
        numbers[key] = value
    inputs = section.get("onnx_inputs")
    if inputs is not None and (
        not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs)
    ):
        raise ValueError(f"manifest reranker onnx_inputs must be a list of names, got {inputs!r}")
    return {
        "onnx_file": _plain_file_name(section.get("onnx_file"), ".onnx", "reranker onnx_file"),
        "tokenizer_file": _plain_file_name(
            section.get("tokenizer_file"), ".json", "reranker tokenizer_file"
        ),
        "onnx_inputs": inputs,
        **numbers,
    }


def onnx_providers(setting: str | None, available: list[str]) -> list[str]:
    """ONNX Runtime's execution providers for ``RECSYS_ORT_DEVICE`` (``cpu``, the default;
    ``cuda``; ``auto``). ``cuda`` without the CUDA provider is an error naming what this
    onnxruntime has, not a silent CPU fallback: a GPU host that serves on the CPU must be
    noticed, not discovered from latency graphs."""
    choice = (setting or "cpu").strip().lower()
    cuda = "CUDAExecutionProvider"
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if cuda not in available:
            raise RuntimeError(
                f"RECSYS_ORT_DEVICE=cuda but this onnxruntime offers only {available} "
                "(install onnxruntime-gpu)"
            )
        return [cuda, "CPUExecutionProvider"]
    if choice == "auto":
        return [cuda, "CPUExecutionProvider"] if cuda in available else ["CPUExecutionProvider"]
    raise ValueError(f"RECSYS_ORT_DEVICE must be cpu, cuda or auto, got {setting!r}")


def load_hybrid_module(version_dir: Path, version: str) -> Any:
    """The version folder's own ``hybrid.py`` (never the platform's), under a module name of
    its own per version so two loaded versions never share one."""
    path = version_dir / "hybrid.py"
    if not path.is_file():
        raise FileNotFoundError(f"{version_dir} lacks hybrid.py (manifest hybrid)")
    name = f"recsys_served_hybrid_v{version}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _padded_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """A fast tokenizer truncating to ``max_length`` and padding each batch to its longest."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    pad_token = (tokenizer.padding or {}).get("pad_token") or "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    return tokenizer


def _onnx_feed(encodings: list[Any], names: list[str]) -> dict[str, np.ndarray]:
    """The int64 arrays the graph's ``names`` inputs take; only those are built (per request)."""
    columns = {
        "input_ids": lambda: [e.ids for e in encodings],
        "attention_mask": lambda: [e.attention_mask for e in encodings],
        "token_type_ids": lambda: [e.type_ids for e in encodings],
    }
    return {name: np.asarray(columns[name](), dtype=np.int64) for name in names}


def _pad_id(path: Path) -> int:
    """The tokenizer's padding id (``[PAD]``'s, else 0), as :func:`_padded_tokenizer` pads."""
    tokenizer = Tokenizer.from_file(str(path))
    pad_token = (tokenizer.padding or {}).get("pad_token") or "[PAD]"
    return tokenizer.token_to_id(pad_token) or 0


def _padded_feed(encodings: list[Any], names: list[str], pad_id: int) -> dict[str, np.ndarray]:
    """:func:`_onnx_feed` for unpadded encodings: right-padded to the longest of them, with
    ``pad_id`` / mask 0 / segment 0, exactly as the padding tokenizer pads a batch."""
    width = max(len(e.ids) for e in encodings)
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    field = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    feed = {}
    for name in names:
        array = np.full((len(encodings), width), fill[name], dtype=np.int64)
        for row, encoding in enumerate(encodings):
            values = getattr(encoding, field[name])
            array[row, : len(values)] = values
        feed[name] = array
    return feed


def _best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's ``k`` highest scores, best first."""
    if k < scores.shape[1]:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to that client only.
    ``reason`` is its ``reason`` label in :data:`ERROR_METRIC`."""

    reason = "invalid_argument"


class OversizedRequestError(RequestError):
    """A request over a size limit, refused before its text is decoded or tokenised."""

    reason = "oversized"


ERROR_METRIC = "recsys_request_errors_total"
ERROR_REASONS = (RequestError.reason, OversizedRequestError.reason)
"""The ``reason`` label's values (a small fixed set: one series per reason and instance)."""

MAX_QUERY_BYTES_ENV = "RECSYS_MAX_QUERY_BYTES"
MAX_REQUEST_BYTES_ENV = "RECSYS_MAX_REQUEST_BYTES"
DEFAULT_MAX_QUERY_BYTES = 2048
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024


def size_limits(
    parameters: dict[str, Any] | None = None, environ: Any = None, log: Any = None
) -> tuple[int, int]:
    """``(max_query_bytes, max_request_bytes)``: each from the model config's ``parameters``
    (``{"max_query_bytes": {"string_value": "4096"}}``), else ``RECSYS_MAX_*_BYTES`` in
    ``environ``, else its default. A value that is not a positive integer is logged and the
    default used instead."""
    environ = os.environ if environ is None else environ
    parameters = parameters or {}
    limits = []
    for key, env, default in (
        ("max_query_bytes", MAX_QUERY_BYTES_ENV, DEFAULT_MAX_QUERY_BYTES),
        ("max_request_bytes", MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES),
    ):
        entry = parameters.get(key)
        raw = entry.get("string_value") if isinstance(entry, dict) else entry
        source = f"model config parameter {key}"
        if raw in (None, ""):
            raw, source = environ.get(env), env
        value = default
        if raw not in (None, ""):
            try:
                value = int(str(raw).strip())
                if value < 1:
                    raise ValueError
            except ValueError:
                value = default
                if log is not None:
                    log(f"{source}={raw!r} is not a positive integer; using {default} bytes")
        limits.append(value)
    return limits[0], limits[1]


def check_query_sizes(raw: np.ndarray, max_query_bytes: int, max_request_bytes: int) -> None:
    """Raise :class:`OversizedRequestError` when a QUERY row is over ``max_query_bytes`` or the
    rows together are over ``max_request_bytes``. Only ``len()`` of each element: nothing is
    decoded or copied, so an oversized request costs next to nothing to refuse."""
    total = 0
    for row, item in enumerate(raw):
        size = len(item) if isinstance(item, bytes | str) else 0
        if size > max_query_bytes:
            where = f"QUERY row {row}" if len(raw) > 1 else "QUERY"
            raise OversizedRequestError(
                f"{where} is {size} bytes, over the limit of {max_query_bytes} bytes per query "
                f"(max_query_bytes / {MAX_QUERY_BYTES_ENV}); send a shorter search text"
            )
        total += size
    if total > max_request_bytes:
        raise OversizedRequestError(
            f"the request's {len(raw)} QUERY rows are {total} bytes together, over the limit "
            f"of {max_request_bytes} bytes per request (max_request_bytes / "
            f"{MAX_REQUEST_BYTES_ENV}); send fewer or shorter queries"
        )


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
            and sleep_ms >= 0
            and isinstance(after, int)
            and after >= 0
        )
        if valid:
            return str(mode), float(sleep_ms) / 1000.0, int(after)
    raise ValueError(f"unsupported fault_injection in manifest: {value!r}")


def _decode_query(raw: Any) -> str:
    if isinstance(raw, bytes | np.bytes_):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                f"QUERY is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise RequestError(f"QUERY must be a UTF-8 string, got {type(raw).__name__}")
    if not text.strip():
        raise RequestError("QUERY is empty; send the search text")
    return text


def _error_response(message: str) -> Any:
    """An error response for one request; INVALID_ARG where this stub version supports codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


SAMPLE_DIR_ENV = "RECSYS_QUERY_SAMPLE_DIR"
SAMPLE_RATE_ENV = "RECSYS_QUERY_SAMPLE_RATE"
SAMPLE_MAX_BYTES_ENV = "RECSYS_QUERY_SAMPLE_MAX_BYTES"
SAMPLE_RETRY_ENV = "RECSYS_QUERY_SAMPLE_RETRY_S"
DEFAULT_SAMPLE_RATE = 0.1
DEFAULT_SAMPLE_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_SAMPLE_RETRY_S = 30.0
MAX_SAMPLE_RETRY_S = 900.0
SAMPLE_SEGMENTS_KEPT = 4
MAX_SAMPLED_QUERY_CHARS = 2000


def _error_key(exc: OSError) -> str:
    """A short name for an ``OSError`` in log lines: its errno name (``EACCES``, ``ENOSPC``,
    ``EEXIST``, ...), else its class name."""
    return errno.errorcode.get(exc.errno or 0) or type(exc).__name__


def _writer_tag() -> str:
    """``<host>-<pid>``: names this process's sample files. Several Triton replicas write into
    one shared folder, and every container numbers its processes from 1, so the pid alone
    would let two replicas append to the same file."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}"


class QuerySampler:
    """Appends a random share of the served queries to JSON-lines files for the drift check.

    Files are ``<dir>/<model>/<version>/queries-<host>-<pid>-<n>.jsonl`` holding one
    ``{"ts": ..., "query": ...}`` per line: one writer per file (each model instance is its own
    process), append-only, so the reader can keep a byte offset per file. A file that reaches
    ``max_bytes`` is closed and the next segment started; only the newest
    :data:`SAMPLE_SEGMENTS_KEPT` segments of a process are kept, which caps the disk a busy
    server can fill. The files hold raw query text: they stay on the serving host, under the
    platform's home.

    Sampling must never fail or slow down a request, so a write error (disk full, folder gone
    or not writable) is not raised. It is not hidden either: it is logged once per error (and
    once when writes work again, with the queries dropped meanwhile), the drift check notices
    the missing samples (see the module docstring), and the sampler retries after a backoff
    (``retry_s``, doubling up to :data:`MAX_SAMPLE_RETRY_S`) instead of staying off until a
    restart; the first good write clears the failure. An open file whose name was removed (the
    folder deleted under it) is noticed before each write and reopened, since writing on would
    lose every query silently.
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
        """Error label of the failing write (``None`` while writes succeed)."""
        self._failures = 0
        self._retry_at = 0.0
        self.dropped = 0
        """Sampled queries lost to write errors since the last good write (for the log)."""
        self._log = log
        self._random = random.Random()
        self._handle: Any = None
        self._segment = -1

    @classmethod
    def from_environment(
        cls,
        model_name: str,
        version: str,
        environ: Any = None,
        log: Any = None,
    ) -> QuerySampler | None:
        """The sampler ``RECSYS_QUERY_SAMPLE_*`` ask for, or ``None`` when no folder is set (a
        rate of 0 gives one that writes nothing). A malformed rate, size or retry delay disables
        sampling (logged) rather than the model; the drift check then sees a served version
        whose samples never arrive."""
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
                    f"query sampling off: bad {SAMPLE_RATE_ENV}/{SAMPLE_MAX_BYTES_ENV}/"
                    f"{SAMPLE_RETRY_ENV}: {exc}"
                )
            return None
        directory = Path(root) / model_name / str(version)
        return cls(directory, rate, max_bytes, log, retry_s=retry_s)

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
            self.close()  # deleted (the folder with it?): writes would go nowhere
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

    def sample(self, texts: list[str]) -> None:
        """Write a random ``rate`` share of ``texts``. A write error is recorded (log, backoff;
        see the class docstring), never raised; while backing off, the chosen queries are
        counted as dropped without touching the disk."""
        if not self.enabled or not texts:
            return
        chosen = [text for text in texts if self._random.random() < self.rate]
        if not chosen:
            return
        if self.failure is not None and time.monotonic() < self._retry_at:
            self._count_dropped(self.failure, len(chosen))
            return
        now = round(time.time(), 3)
        data = "".join(
            json.dumps({"ts": now, "query": text[:MAX_SAMPLED_QUERY_CHARS]}, ensure_ascii=False)
            + "\n"
            for text in chosen
        ).encode("utf-8", errors="replace")
        try:
            handle = self._writable(len(data))
            handle.write(data)  # one write per batch: a reader never sees half a line for long
            handle.flush()
        except OSError as exc:
            self.close()
            self._failed(exc)
            self._count_dropped(self.failure or _error_key(exc), len(chosen))
            return
        if self.failure is not None:
            self._recovered()

    def _failed(self, exc: OSError) -> None:
        """Enter (or stay in) the failing state: the log changes only when the error does, so
        a lasting outage is one log line, not one per batch."""
        error = _error_key(exc)
        self._failures += 1
        delay = min(self.retry_s * 2 ** (self._failures - 1), max(self.retry_s, MAX_SAMPLE_RETRY_S))
        self._retry_at = time.monotonic() + delay
        if error == self.failure:
            return
        self.failure = error
        if self._log is not None:
            self._log(
                f"query sampling to {self.directory} failed ({error}: {exc}); sampled queries "
                f"are dropped, retrying in {delay:g} s with backoff"
            )

    def _recovered(self) -> None:
        if self._log is not None:
            self._log(
                f"query sampling to {self.directory} works again after {self._failures} failed "
                f"attempt(s) ({self.failure}); {self.dropped} sampled queries were dropped"
            )
        self.failure, self._failures, self._retry_at, self.dropped = None, 0, 0.0, 0

    def _count_dropped(self, error: str, count: int) -> None:
        self.dropped += count

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
    """Bi-encoder search over a catalogue embedded at export time, optionally reranked by a
    cross-encoder (manifest ``reranker``)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load everything once per instance: requests then cost one ONNX call and a matmul."""
        version_dir = Path(args["model_repository"]) / args["model_version"]
        missing = [name for name in REQUIRED_FILES if not (version_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{version_dir} lacks {', '.join(missing)}")
        self.version_dir = version_dir
        self.manifest = json.loads((version_dir / "manifest.json").read_text())
        self.onnx_file = served_onnx_file(self.manifest)
        if not (version_dir / self.onnx_file).is_file():
            raise FileNotFoundError(f"{version_dir} lacks {self.onnx_file} (manifest onnx_file)")
        config = json.loads(args.get("model_config") or "{}")
        parameters = config.get("parameters") or {}
        threads = int((parameters.get("intra_op_threads") or {}).get("string_value") or 1)
        self.max_query_bytes, self.max_request_bytes = size_limits(
            parameters, log=pb_utils.Logger.log_warn
        )

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = onnx_providers(
            os.environ.get("RECSYS_ORT_DEVICE"), ort.get_available_providers()
        )
        self.session = ort.InferenceSession(
            str(version_dir / self.onnx_file), options, providers=self.providers
        )
        self.onnx_inputs = list(
            self.manifest.get("onnx_inputs") or [i.name for i in self.session.get_inputs()]
        )
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if not set(self.onnx_inputs) <= graph_inputs:
            raise ValueError(
                f"manifest onnx_inputs {self.onnx_inputs} not all in the graph {graph_inputs}"
            )

        self.tokenizer = _padded_tokenizer(
            version_dir / "tokenizer.json", int(self.manifest.get("max_query_tokens", 64))
        )

        with np.load(version_dir / "products.npz", allow_pickle=False) as products:
            ids = products["ids"]
            embeddings = products["embeddings"]
            titles = products["titles"] if "titles" in products.files else None
        self.product_ids = np.array([str(i).encode("utf-8") for i in ids], dtype=np.object_)
        self.product_embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        n_products, dim = self.product_embeddings.shape
        if len(self.product_ids) != n_products or n_products == 0:
            raise ValueError(
                f"products.npz has {len(self.product_ids)} ids for {n_products} embeddings"
            )
        expected_dim = self.manifest.get("embedding_dim")
        if expected_dim is not None and int(expected_dim) != dim:
            raise ValueError(f"products.npz dim {dim} != manifest embedding_dim {expected_dim}")
        self.max_top_k = min(int(self.manifest.get("max_top_k", 100)), n_products)
        self._load_hybrid(version_dir, str(args["model_version"]), n_products)
        self._load_reranker(version_dir, options, titles)

        self.fault_mode, self.fault_sleep_s, self.fault_after = parse_fault_injection(
            self.manifest.get("fault_injection")
        )
        self.answered = 0
        model_name = str(args.get("model_name") or self.manifest.get("model_name") or "model")
        self.query_sampler = QuerySampler.from_environment(
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
            f"{args.get('model_name')} v{args['model_version']} ({args.get('model_instance_name')})"
            f": {n_products} products, dim {dim}, encoder {self.onnx_file}, pid {os.getpid()}, "
            f"limits {self.max_query_bytes} B/query {self.max_request_bytes} B/request, "
            f"fault_injection={self.manifest.get('fault_injection')!r}, "
            f"onnx providers {self.providers}"
            + (
                f", hybrid retrieval ({self.fusion.method}, depth {self.fusion.depth})"
                if self.lexical is not None
                else ""
            )
            + (
                f", reranker {self.reranker_file} over {self.rerank_candidates} candidates"
                if self.reranker is not None
                else ""
            )
        )

    def _load_hybrid(self, version_dir: Path, version: str, n_products: int) -> None:
        """The BM25 index and fusion settings, or ``self.lexical = None`` (dense retrieval)."""
        self.lexical = None
        section = self.manifest.get("hybrid")
        if section is None:
            return
        if not isinstance(section, dict):
            raise ValueError(f"manifest hybrid must be an object, got {section!r}")
        module = load_hybrid_module(version_dir, version)
        self.fusion = module.FusionConfig.from_dict(section)
        self.lexical = module.LexicalIndex.load(version_dir, products=n_products)
        # The top-k path (BM25 hits of the queries' terms only, fusion over the union of the
        # two candidate lists); a folder exported before it existed fuses full arrays.
        self.sparse_fusion = hasattr(module, "fuse_sparse") and hasattr(
            self.lexical, "sparse_scores"
        )
        self.fuse = module.fuse_sparse if self.sparse_fusion else module.fuse

    def _load_reranker(self, version_dir: Path, options: Any, titles: Any) -> None:
        """The cross-encoder session, its pair tokenizer and the titles it reads, or
        ``self.reranker = None`` when the manifest has no ``reranker`` section."""
        self.reranker = None
        config = reranker_config(self.manifest)
        if config is None:
            return
        for key in ("onnx_file", "tokenizer_file"):
            if not (version_dir / config[key]).is_file():
                raise FileNotFoundError(f"{version_dir} lacks {config[key]} (manifest reranker)")
        if titles is None or len(titles) != len(self.product_ids):
            raise ValueError(
                "manifest has a reranker but products.npz holds "
                f"{'no' if titles is None else len(titles)} titles for "
                f"{len(self.product_ids)} products"
            )
        session = ort.InferenceSession(
            str(version_dir / config["onnx_file"]), options, providers=self.providers
        )
        graph_inputs = [i.name for i in session.get_inputs()]
        inputs = list(config["onnx_inputs"] or graph_inputs)
        if not set(inputs) <= set(graph_inputs) or not set(inputs) <= {
            "input_ids",
            "attention_mask",
            "token_type_ids",
        }:
            raise ValueError(f"manifest reranker onnx_inputs {inputs} do not fit {graph_inputs}")
        self.reranker = session
        self.reranker_file = config["onnx_file"]
        self.reranker_inputs = inputs
        self.reranker_tokenizer = _padded_tokenizer(
            version_dir / config["tokenizer_file"], config["max_length"]
        )
        self.reranker_tokenizer.no_padding()  # each chunk is padded to its own longest pair
        self.reranker_pad_id = _pad_id(version_dir / config["tokenizer_file"])
        self.rerank_candidates = config["candidates"]
        self.product_titles = [str(title) for title in titles]

    def _parse(self, request: Any) -> tuple[list[str], int]:
        query_tensor = pb_utils.get_input_tensor_by_name(request, "QUERY")
        top_k_tensor = pb_utils.get_input_tensor_by_name(request, "TOP_K")
        if query_tensor is None or top_k_tensor is None:
            raise RequestError("both QUERY and TOP_K inputs are required")
        raw_queries = query_tensor.as_numpy().reshape(-1)
        check_query_sizes(raw_queries, self.max_query_bytes, self.max_request_bytes)
        queries = [_decode_query(raw) for raw in raw_queries]
        top_ks = top_k_tensor.as_numpy().reshape(-1)
        if len(top_ks) != len(queries):
            raise RequestError(f"{len(queries)} QUERY rows but {len(top_ks)} TOP_K rows")
        if len(set(top_ks.tolist())) != 1:
            raise RequestError("all rows of one request must ask for the same TOP_K")
        top_k = int(top_ks[0])
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"TOP_K must be between 1 and {self.max_top_k}, got {top_k}")
        return queries, top_k

    def _embed(self, texts: list[str]) -> np.ndarray:
        feed = _onnx_feed(self.tokenizer.encode_batch(texts), self.onnx_inputs)
        return self.session.run(["embeddings"], feed)[0].astype(np.float32, copy=False)

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
        """Answer a dynamic batch: per-request validation, one encoder call, one matmul (and
        one cross-encoder call for the batch's candidates when the version has a reranker)."""
        self._inject_fault()
        self.answered += len(requests)
        responses: list[Any] = [None] * len(requests)
        parsed: list[tuple[int, list[str], int]] = []
        errors: dict[str, int] = {}
        for index, request in enumerate(requests):
            try:
                queries, top_k = self._parse(request)
            except RequestError as exc:
                responses[index] = _error_response(str(exc))
                errors[exc.reason] = errors.get(exc.reason, 0) + 1
            else:
                parsed.append((index, queries, top_k))
        if errors:
            self.error_counters.count(errors)
        if not parsed:
            return responses

        texts = [text for _, queries, _ in parsed for text in queries]
        if self.query_sampler is not None:
            self._sample(texts)
        scores = self._embed(texts) @ self.product_embeddings.T
        lexical = None
        if self.lexical is not None:
            lexical = (
                self.lexical.sparse_scores(texts)
                if self.sparse_fusion
                else self.lexical.scores(texts)
            )
        ranked = []
        row = 0
        for index, queries, top_k in parsed:
            rows = slice(row, row + len(queries))
            row += len(queries)
            depth = top_k if self.reranker is None else max(top_k, self.rerank_candidates)
            depth = min(depth, scores.shape[1])
            if lexical is None:
                top = _best(scores[rows], depth)
            else:
                lexical_rows = lexical.rows(rows) if self.sparse_fusion else lexical[rows]
                top = self.fuse(scores[rows], lexical_rows, self.fusion, depth)
            ranked.append((index, queries, top_k, *top))
        if self.reranker is not None:
            ranked = self._rerank(ranked)
        for index, _, top_k, top, top_scores in ranked:
            top, top_scores = top[:, :top_k], top_scores[:, :top_k]
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("PRODUCT_IDS", self.product_ids[top]),
                    pb_utils.Tensor("SCORES", top_scores.astype(np.float32)),
                ]
            )
        return responses

    def _rerank(self, ranked: list[tuple]) -> list[tuple]:
        """Rescore every retrieved (query, title) pair of the batch with the cross-encoder and
        re-sort each row by its logits (ties keep the first stage's order). The pairs are
        tokenised once, in one call, then scored in length-sorted chunks of
        :data:`RERANK_CHUNK_PAIRS`, each padded only to its own longest pair."""
        pairs = [
            (query, self.product_titles[column])
            for _, queries, _, top, _ in ranked
            for query, columns in zip(queries, top.tolist(), strict=True)
            for column in columns
        ]
        encodings = self.reranker_tokenizer.encode_batch(pairs)
        logits = np.empty(len(pairs), dtype=np.float32)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), RERANK_CHUNK_PAIRS):
            chunk = order[start : start + RERANK_CHUNK_PAIRS]
            feed = _padded_feed(
                [encodings[i] for i in chunk], self.reranker_inputs, self.reranker_pad_id
            )
            logits[chunk] = self.reranker.run(None, feed)[0].reshape(-1)
        reranked = []
        start = 0
        for index, queries, top_k, top, _ in ranked:
            block = logits[start : start + top.size].reshape(top.shape)
            start += top.size
            order = np.argsort(-block, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            reranked.append((index, queries, top_k, top, np.take_along_axis(block, order, axis=1)))
        return reranked

    def _sample(self, texts: list[str]) -> None:
        """Hand the valid queries to the drift sampler; nothing it does may fail the batch."""
        try:
            self.query_sampler.sample(texts)
        except Exception as exc:  # sampling is best effort, serving is not
            pb_utils.Logger.log_warn(f"query sampling failed: {exc}")

    def finalize(self) -> None:
        """Drop the session and catalogue so an unloaded version frees its memory at once."""
        self.session = None
        self.product_embeddings = None
        self.reranker = None
        self.lexical = None
        if self.query_sampler is not None:
            self.query_sampler.shutdown()
        counters = getattr(self, "error_counters", None)
        if counters is not None:
            counters.close()  # now, while the server answers the destructors (see the class)
            self.error_counters = None
