"""Export a fine-tuned bi-encoder into the self-contained folder the Triton model serves.

The folder holds the ONNX encoder (pooling and normalisation inside the graph), the fast
tokenizer's ``tokenizer.json``, the product catalogue's embeddings and a manifest. Product
embeddings are computed here once, at export time, so a served query costs one encoder call and
one matrix product. The export is checked against PyTorch before anyone can deploy it.
The manifest's ``onnx_file`` names the encoder Triton loads (``encoder.onnx`` here;
:mod:`recsys.quantization` may add ``encoder.int8.onnx`` beside it and point there instead).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys.encoder import BiEncoder, encode_texts, load_tokenizer

log = logging.getLogger(__name__)

ONNX_INPUTS = ["input_ids", "attention_mask"]
ONNX_FILE = "encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
PRODUCTS_FILE = "products.npz"
MANIFEST_FILE = "manifest.json"


class ExportVerificationError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch embeddings; deploying it would serve
    different results from the ones that were evaluated."""


def export_onnx(model: BiEncoder, tokenizer, path: Path, opset: int = 17) -> Path:
    """Trace the encoder to ONNX with dynamic batch and sequence axes."""
    model = model.cpu().eval()
    sample = tokenizer(["sample query for tracing"], return_tensors="pt")
    args = tuple(sample[name] for name in ONNX_INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in ONNX_INPUTS}
    axes["embeddings"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=ONNX_INPUTS,
            output_names=["embeddings"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def verify_onnx(
    model: BiEncoder, tokenizer, onnx_path: Path, probes: list[str], min_cosine: float = 0.999
) -> float:
    """Compare ONNX and PyTorch embeddings on ``probes``; return the worst cosine."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    encoded = tokenizer(probes, padding=True, truncation=True, max_length=64, return_tensors="np")
    got = session.run(None, {k: encoded[k].astype(np.int64) for k in ONNX_INPUTS})[0]
    want = encode_texts(model, tokenizer, probes).numpy()
    worst = float(np.min(np.sum(got * want, axis=1)))
    if worst < min_cosine:
        raise ExportVerificationError(
            f"ONNX export of {onnx_path.name} deviates from PyTorch: "
            f"worst cosine {worst:.5f} < {min_cosine}"
        )
    return worst


def build_serving_artifacts(
    model_dir: Path,
    catalog: pd.DataFrame,
    output_dir: Path,
    *,
    model_name: str,
    max_query_tokens: int = 64,
    max_top_k: int = 100,
    fault_injection: Any = None,
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Write encoder.onnx, tokenizer.json, products.npz and manifest.json into ``output_dir``.

    ``fault_injection`` (``"raise"`` or ``{"sleep_ms": n}``) is recorded in the manifest for
    rehearsing rollbacks: the served model then fails or slows down on purpose.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    model = BiEncoder.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    onnx_path = export_onnx(model, tokenizer, output_dir / ONNX_FILE)
    titles = catalog["product_title"].astype(str).tolist()
    worst_cosine = verify_onnx(model, tokenizer, onnx_path, [*titles[:16], "", "a" * 500])
    tokenizer.backend_tokenizer.save(str(output_dir / TOKENIZER_FILE))

    embeddings = (
        encode_texts(model, tokenizer, titles, max_length=max_query_tokens)
        .numpy()
        .astype(np.float32)
    )
    ids = np.array(catalog["product_uid"].astype(str).tolist(), dtype=np.str_)
    np.savez(output_dir / PRODUCTS_FILE, ids=ids, embeddings=embeddings)
    manifest = {
        "model_name": model_name,
        "version": None,
        "max_query_tokens": max_query_tokens,
        "max_top_k": int(min(max_top_k, len(ids))),
        "onnx_inputs": ONNX_INPUTS,
        "onnx_file": ONNX_FILE,
        "precision": "fp32",
        "embedding_dim": int(embeddings.shape[1]),
        "products": len(ids),
        "onnx_worst_cosine": worst_cosine,
        "fault_injection": fault_injection,
        **(lineage or {}),
    }
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    log.info(
        "serving artifacts for %s: %d products, dim %d", model_name, len(ids), embeddings.shape[1]
    )
    return output_dir
