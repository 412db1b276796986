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
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

REQUIRED_FILES = ("encoder.onnx", "tokenizer.json", "products.npz", "manifest.json")
DEFAULT_ONNX_FILE = "encoder.onnx"


def served_onnx_file(manifest: dict[str, Any]) -> str:
    """The encoder file to serve: the manifest's ``onnx_file``, a plain ``*.onnx`` name in the
    version folder (never a path: a manifest must not point the server at other files)."""
    name = manifest.get("onnx_file") or DEFAULT_ONNX_FILE
    if (
        not isinstance(name, str)
        or not name.endswith(".onnx")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
    ):
        raise ValueError(f"manifest onnx_file {name!r} is not a plain *.onnx file name")
    return name


class RequestError(ValueError):
    """A request the model cannot answer; its message goes back to that client only."""


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


class TritonPythonModel:
    """Bi-encoder search over a catalogue embedded at export time."""

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

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(version_dir / self.onnx_file), options, providers=["CPUExecutionProvider"]
        )
        self.onnx_inputs = list(
            self.manifest.get("onnx_inputs") or [i.name for i in self.session.get_inputs()]
        )
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if not set(self.onnx_inputs) <= graph_inputs:
            raise ValueError(
                f"manifest onnx_inputs {self.onnx_inputs} not all in the graph {graph_inputs}"
            )

        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(self.manifest.get("max_query_tokens", 64)))
        padding = self.tokenizer.padding or {}
        pad_token = padding.get("pad_token") or "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad_token)
        self.tokenizer.enable_padding(pad_id=pad_id or 0, pad_token=pad_token)

        with np.load(version_dir / "products.npz", allow_pickle=False) as products:
            ids = products["ids"]
            embeddings = products["embeddings"]
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

        self.fault_mode, self.fault_sleep_s, self.fault_after = parse_fault_injection(
            self.manifest.get("fault_injection")
        )
        self.answered = 0
        pb_utils.Logger.log_info(
            f"{args.get('model_name')} v{args['model_version']} ({args.get('model_instance_name')})"
            f": {n_products} products, dim {dim}, encoder {self.onnx_file}, pid {os.getpid()}, "
            f"fault_injection={self.manifest.get('fault_injection')!r}"
        )

    def _parse(self, request: Any) -> tuple[list[str], int]:
        query_tensor = pb_utils.get_input_tensor_by_name(request, "QUERY")
        top_k_tensor = pb_utils.get_input_tensor_by_name(request, "TOP_K")
        if query_tensor is None or top_k_tensor is None:
            raise RequestError("both QUERY and TOP_K inputs are required")
        queries = [_decode_query(raw) for raw in query_tensor.as_numpy().reshape(-1)]
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
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feed = {name: np.asarray(columns[name], dtype=np.int64) for name in self.onnx_inputs}
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
        """Answer a dynamic batch: per-request validation, one encoder call, one matmul."""
        self._inject_fault()
        self.answered += len(requests)
        responses: list[Any] = [None] * len(requests)
        parsed: list[tuple[int, list[str], int]] = []
        for index, request in enumerate(requests):
            try:
                queries, top_k = self._parse(request)
            except RequestError as exc:
                responses[index] = _error_response(str(exc))
            else:
                parsed.append((index, queries, top_k))
        if not parsed:
            return responses

        texts = [text for _, queries, _ in parsed for text in queries]
        scores = self._embed(texts) @ self.product_embeddings.T
        row = 0
        for index, queries, top_k in parsed:
            block = scores[row : row + len(queries)]
            row += len(queries)
            if top_k < block.shape[1]:
                top = np.argpartition(-block, top_k - 1, axis=1)[:, :top_k]
            else:
                top = np.tile(np.arange(block.shape[1]), (block.shape[0], 1))
            top_scores = np.take_along_axis(block, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            top_scores = np.take_along_axis(top_scores, order, axis=1)
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("PRODUCT_IDS", self.product_ids[top]),
                    pb_utils.Tensor("SCORES", top_scores.astype(np.float32)),
                ]
            )
        return responses

    def finalize(self) -> None:
        """Drop the session and catalogue so an unloaded version frees its memory at once."""
        self.session = None
        self.product_embeddings = None
