"""INT8 export of the query encoder, and the gate that decides whether INT8 may serve.

Only the query encoder runs per request (product embeddings are precomputed in fp32 at export
time), so dynamic INT8 quantisation of its weights buys request latency and a smaller file.
Per-channel weight scales keep the attention/FFN projections close to fp32. The quantised file
``encoder.int8.onnx`` is written beside ``encoder.onnx`` in the same serving-artifacts folder:
one folder, one tokenizer, one ``products.npz``; the manifest's ``onnx_file`` names the encoder
Triton loads. INT8 is served only if it keeps retrieval quality: :func:`quantization_gate`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from recsys.families.search.evaluation import onnx_embedder

log = logging.getLogger(__name__)

FP32_ONNX_FILE = "encoder.onnx"
INT8_ONNX_FILE = "encoder.int8.onnx"
ONNX_FILES = {"fp32": FP32_ONNX_FILE, "int8": INT8_ONNX_FILE}
PRECISIONS = ("fp32", "int8", "auto")


class QuantizationRejectedError(ValueError):
    """INT8 loses more retrieval quality than allowed; serve fp32 (or relax ``max_drop``)."""


def quantize_encoder(fp32_path: Path, int8_path: Path | None = None) -> Path:
    """Dynamic per-channel INT8 quantisation of an exported encoder; returns the new file.

    Dynamic quantisation needs no calibration data (activations are scaled per batch at run
    time), so it can run inside the export task with nothing but the fp32 graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = Path(fp32_path)
    int8_path = Path(int8_path) if int8_path else fp32_path.with_name(INT8_ONNX_FILE)
    quantize_dynamic(str(fp32_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    log.info(
        "quantised %s (%d bytes) -> %s (%d bytes)",
        fp32_path.name,
        fp32_path.stat().st_size,
        int8_path.name,
        int8_path.stat().st_size,
    )
    return int8_path


def embedding_agreement(
    fp32_path: Path, int8_path: Path, tokenizer_path: Path, probes: list[str], max_length: int = 64
) -> dict[str, float]:
    """Mean and worst cosine between fp32 and INT8 embeddings of ``probes`` (both are
    L2-normalised in the graph, so the row-wise dot product is the cosine)."""
    fp32 = onnx_embedder(fp32_path, tokenizer_path, max_length)(probes)
    int8 = onnx_embedder(int8_path, tokenizer_path, max_length)(probes)
    norms = np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1)
    cosines = np.sum(fp32 * int8, axis=1) / np.maximum(norms, 1e-12)
    return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines))}


def quantization_gate(fp32_ndcg: float, int8_ndcg: float, max_drop: float) -> float:
    """Return the NDCG drop of INT8 vs fp32; raise :class:`QuantizationRejectedError` if it is
    larger than ``max_drop`` (absolute NDCG points, e.g. 0.01). A gain counts as no drop."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    drop = float(fp32_ndcg) - float(int8_ndcg)
    if drop > max_drop:
        raise QuantizationRejectedError(
            f"INT8 encoder rejected: NDCG@10 {int8_ndcg:.4f} vs fp32 {fp32_ndcg:.4f} "
            f"drops {drop:.4f} > allowed {max_drop:.4f}; serve fp32 or raise max_drop"
        )
    return drop


def choose_precision(
    precision: str, fp32_ndcg: float, int8_ndcg: float | None, max_drop: float
) -> tuple[str, str]:
    """Decide what serves: ``(precision, reason)``.

    ``"fp32"`` always serves fp32; ``"int8"`` serves INT8 or raises when the gate refuses it
    (an explicit request must not silently turn into something else); ``"auto"`` serves INT8
    when the gate accepts it and fp32 otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32", "fp32 requested"
    if int8_ndcg is None:
        raise ValueError(f"precision {precision!r} needs the INT8 encoder's NDCG")
    try:
        drop = quantization_gate(fp32_ndcg, int8_ndcg, max_drop)
    except QuantizationRejectedError as exc:
        if precision == "int8":
            raise
        return "fp32", str(exc)
    return "int8", f"INT8 accepted: NDCG@10 drop {drop:.4f} <= {max_drop:.4f}"


def set_served_encoder(artifacts_dir: Path, precision: str, quantization: dict[str, Any]) -> None:
    """Point the manifest's ``onnx_file`` at the chosen encoder and record the check's numbers
    (both NDCGs, cosines, the gate's margin and reason) for the registry and the audit trail."""
    path = Path(artifacts_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(
        {"onnx_file": ONNX_FILES[precision], "precision": precision, "quantization": quantization}
    )
    path.write_text(json.dumps(manifest, indent=2, default=str))
