"""Export a fine-tuned bi-encoder into the self-contained folder the Triton model serves.

The folder holds the ONNX encoder (pooling and normalisation inside the graph), the fast
tokenizer's ``tokenizer.json``, the product catalogue's ids, titles and embeddings and a
manifest. Product
embeddings are computed here once, at export time, so a served query costs one encoder call and
one matrix product. The export is checked against PyTorch before anyone can deploy it.
The manifest's ``onnx_file`` names the encoder Triton loads (``encoder.onnx`` here;
:mod:`.quantization` may add ``encoder.int8.onnx`` beside it and point there instead).

With a cross-encoder (:mod:`.reranker`) the folder also holds ``reranker.onnx``, its
``reranker_tokenizer.json`` and the product titles (``titles`` in ``products.npz``), and the
manifest a ``reranker`` section; Triton then reranks the bi-encoder's top candidates with it.
Every folder carries the titles (``titles`` in ``products.npz``, aligned with ``ids``): the
reranker reads them, and ``recsys query`` shows them beside the ids of the version that answered.

With hybrid retrieval (:func:`add_hybrid`) the folder also holds a BM25 index of those titles
(the ``bm25.*`` files), the fusion code ``hybrid.py`` and the manifest's ``hybrid`` section:
Triton then fuses BM25 with the dense scores before answering or reranking.
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

from recsys.families.search.encoder import BiEncoder, encode_texts, load_tokenizer

log = logging.getLogger(__name__)

ONNX_INPUTS = ["input_ids", "attention_mask"]
ONNX_FILE = "encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
PRODUCTS_FILE = "products.npz"
MANIFEST_FILE = "manifest.json"
RERANKER_ONNX_FILE = "reranker.onnx"
RERANKER_INT8_ONNX_FILE = "reranker.int8.onnx"
RERANKER_PRECISIONS = ("fp32", "int8")
RERANKER_TOKENIZER_FILE = "reranker_tokenizer.json"


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
    reranker_dir: Path | None = None,
    rerank_candidates: int = 20,
    rerank_max_length: int = 96,
    rerank_precision: str = "fp32",
) -> Path:
    """Write encoder.onnx, tokenizer.json, products.npz (ids, embeddings, titles) and
    manifest.json into ``output_dir``.

    ``fault_injection`` (``"raise"`` or ``{"sleep_ms": n}``) is recorded in the manifest for
    rehearsing rollbacks: the served model then fails or slows down on purpose.

    ``reranker_dir`` (a cross-encoder checkpoint) makes it a reranker model's folder: see
    :func:`add_reranker`.
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
    # Titles travel with the version, so what it answers can be shown as products, not ids.
    np.savez(
        output_dir / PRODUCTS_FILE,
        ids=ids,
        embeddings=embeddings,
        titles=np.array(titles, dtype=np.str_),
    )
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
    if reranker_dir is not None:
        add_reranker(
            output_dir,
            Path(reranker_dir),
            catalog,
            candidates=rerank_candidates,
            max_length=rerank_max_length,
            precision=rerank_precision,
        )
    return output_dir


def copy_fp32_artifacts(source_dir: Path, output_dir: Path, *, model_name: str) -> Path:
    """The fp32 bi-encoder part of a serving folder (ONNX encoder, tokenizer, catalogue
    embeddings, drift reference, manifest) copied under another model name, so a second served
    model (the reranker model) reuses an export instead of embedding the catalogue again.

    The copy serves ``encoder.onnx`` whatever the source serves, and carries neither the
    source's quantization record nor its fault injection."""
    import shutil

    from recsys.families.search.family import SearchFamily
    from recsys.families.search.hybrid import HYBRID_FILE, LEXICAL_FILES

    output_dir.mkdir(parents=True, exist_ok=True)
    names = (ONNX_FILE, TOKENIZER_FILE, PRODUCTS_FILE, *SearchFamily.optional_artifacts)
    for name in (*names, *LEXICAL_FILES, HYBRID_FILE):
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, output_dir / name)
    manifest = json.loads((source_dir / MANIFEST_FILE).read_text())
    manifest.pop("quantization", None)
    manifest.update(
        model_name=model_name, onnx_file=ONNX_FILE, precision="fp32", fault_injection=None
    )
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return output_dir


def add_hybrid(
    artifacts_dir: Path, lexical: dict[str, Any] | None, fusion: dict[str, Any] | None
) -> Path:
    """Make a serving folder answer with hybrid retrieval, in place: a BM25 index of its
    ``products.npz`` titles (``lexical``: :class:`.hybrid.LexicalConfig` settings, e.g. the ones
    the pipeline tuned on the training queries), ``hybrid.py`` (the fusion code the served model
    runs) and the manifest's ``hybrid`` section (``fusion``: :class:`.hybrid.FusionConfig`).

    The index is checked before anyone can deploy it: it must cover every product, and the
    copied ``hybrid.py`` must score a probe query exactly as the platform's module does."""
    import shutil

    from recsys.families.search import hybrid

    lexical_config = hybrid.LexicalConfig.from_dict(lexical or {})
    fusion_config = hybrid.FusionConfig.from_dict(fusion or {})
    with np.load(artifacts_dir / PRODUCTS_FILE, allow_pickle=False) as stored:
        titles = [str(t) for t in stored["titles"]]
    index = hybrid.LexicalIndex.build(titles, lexical_config)
    index.save(artifacts_dir)
    shutil.copyfile(hybrid.__file__, artifacts_dir / hybrid.HYBRID_FILE)

    served = hybrid.load_folder_copy(artifacts_dir, "recsys_export_hybrid_check")
    probe = [" ".join(t.split()[:3]) or "query" for t in titles[:8]]
    loaded = served.LexicalIndex.load(artifacts_dir, products=len(titles))
    if not np.allclose(loaded.scores(probe), index.scores(probe), atol=1e-5):
        raise ExportVerificationError(
            f"the BM25 index saved in {artifacts_dir} scores differently once loaded"
        )
    manifest = json.loads((artifacts_dir / MANIFEST_FILE).read_text())
    manifest["hybrid"] = fusion_config.to_dict()
    manifest["lexical"] = lexical_config.to_dict()
    (artifacts_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    log.info(
        "hybrid retrieval for %s: BM25 (%s) over %d titles fused by %s",
        artifacts_dir,
        ", ".join(f"{k}={v}" for k, v in lexical_config.to_dict().items()),
        len(titles),
        fusion_config.method,
    )
    return artifacts_dir


def add_reranker(
    artifacts_dir: Path,
    reranker_dir: Path,
    catalog: pd.DataFrame,
    *,
    candidates: int = 20,
    max_length: int = 96,
    precision: str = "fp32",
) -> Path:
    """Turn a bi-encoder serving folder into a reranker model's, in place: ``reranker.onnx``
    and ``reranker_tokenizer.json`` (a cross-encoder checkpoint from
    :func:`.reranker.fine_tune_reranker`), the product titles in ``products.npz`` and the
    manifest's ``reranker`` section. Triton then reranks the bi-encoder's best
    ``max(candidates, TOP_K)`` products per query, pairs truncated to ``max_length`` tokens.

    ``precision="int8"`` also writes ``reranker.int8.onnx`` (dynamic per-channel INT8, as the
    bi-encoder's ``encoder.int8.onnx``) and the section's ``onnx_file`` names it, so Triton
    serves it and the gate scores it; ``reranker.onnx`` stays beside it (``fp32_onnx_file``)
    for comparisons. The cross-encoder is the served path's dominant cost (every candidate is
    a full transformer pass over query + title), which INT8 cuts by about 2x on CPU."""
    if precision not in RERANKER_PRECISIONS:
        raise ValueError(
            f"rerank precision must be one of {RERANKER_PRECISIONS}, got {precision!r}"
        )
    with np.load(artifacts_dir / PRODUCTS_FILE, allow_pickle=False) as stored:
        products = {name: stored[name] for name in stored.files}
    title_of = dict(
        zip(
            catalog["product_uid"].astype(str),
            catalog["product_title"].astype(str),
            strict=True,
        )
    )
    unknown = [str(i) for i in products["ids"] if str(i) not in title_of]
    if unknown:
        raise ValueError(
            f"{len(unknown)} product(s) of {artifacts_dir / PRODUCTS_FILE} are not in the "
            f"catalogue given for the reranker, e.g. {unknown[:3]}"
        )
    titles = [title_of[str(i)] for i in products["ids"]]
    section = _export_reranker(
        reranker_dir, artifacts_dir, titles, candidates, max_length, precision
    )
    products["titles"] = np.array(titles, dtype=np.str_)
    np.savez(artifacts_dir / PRODUCTS_FILE, **products)
    manifest = json.loads((artifacts_dir / MANIFEST_FILE).read_text())
    manifest["reranker"] = section
    (artifacts_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return artifacts_dir


def _export_reranker(
    reranker_dir: Path,
    output_dir: Path,
    titles: list[str],
    candidates: int,
    max_length: int,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Export and verify the cross-encoder; return the manifest's ``reranker`` section.

    Besides the export's own check against PyTorch (HF tokenizer), the served path is checked
    end to end: ``reranker_tokenizer.json`` + ONNX must give PyTorch's logits on catalogue pairs.
    """
    from recsys.families.search.reranker import (
        export_reranker_onnx,
        onnx_pair_scorer,
        reranker_onnx_inputs,
        torch_pair_scorer,
    )

    if precision not in RERANKER_PRECISIONS:
        raise ValueError(
            f"rerank precision must be one of {RERANKER_PRECISIONS}, got {precision!r}"
        )
    if candidates < 1 or max_length < 8:
        raise ValueError(
            f"rerank_candidates must be >= 1 and rerank_max_length >= 8, "
            f"got {candidates} and {max_length}"
        )
    onnx_path = export_reranker_onnx(
        reranker_dir, output_dir / RERANKER_ONNX_FILE, max_length=max_length
    )
    tokenizer_path = output_dir / RERANKER_TOKENIZER_FILE
    load_tokenizer(reranker_dir).backend_tokenizer.save(str(tokenizer_path))
    probe_titles = [*titles[:16], "", "a " * 300]
    probe_queries = [" ".join(t.split()[:3]) or "query" for t in probe_titles]
    served = onnx_pair_scorer(onnx_path, tokenizer_path, max_length)(probe_queries, probe_titles)
    reference = torch_pair_scorer(reranker_dir, max_length, device="cpu")(
        probe_queries, probe_titles
    )
    diff = float(np.max(np.abs(served - reference)))
    if diff > 1e-3 * max(1.0, float(np.max(np.abs(reference)))):
        raise ExportVerificationError(
            f"served reranker ({RERANKER_TOKENIZER_FILE} + {RERANKER_ONNX_FILE}) deviates from "
            f"PyTorch: max |logit diff| {diff:.5f}"
        )
    section = {
        "onnx_file": RERANKER_ONNX_FILE,
        "tokenizer_file": RERANKER_TOKENIZER_FILE,
        "candidates": int(min(candidates, len(titles))),
        "max_length": int(max_length),
        "onnx_inputs": reranker_onnx_inputs(onnx_path),
        "scores": "logits",
        "onnx_max_abs_diff": diff,
    }
    if precision == "int8":
        section.update(
            _quantize_reranker(onnx_path, tokenizer_path, max_length, probe_queries, probe_titles)
        )
    return section


def _quantize_reranker(
    onnx_path: Path,
    tokenizer_path: Path,
    max_length: int,
    probe_queries: list[str],
    probe_titles: list[str],
) -> dict[str, Any]:
    """``reranker.int8.onnx`` beside ``onnx_path`` and the manifest keys that serve it, with
    how far its logits are from fp32's on the probe pairs (recorded, for the audit trail; the
    ranking quality is the gate's business, which scores the file the manifest serves)."""
    from recsys.families.search.quantization import quantize_encoder
    from recsys.families.search.reranker import onnx_pair_scorer

    int8_path = quantize_encoder(onnx_path, onnx_path.with_name(RERANKER_INT8_ONNX_FILE))
    fp32 = onnx_pair_scorer(onnx_path, tokenizer_path, max_length)(probe_queries, probe_titles)
    int8 = onnx_pair_scorer(int8_path, tokenizer_path, max_length)(probe_queries, probe_titles)
    return {
        "onnx_file": RERANKER_INT8_ONNX_FILE,
        "fp32_onnx_file": RERANKER_ONNX_FILE,
        "precision": "int8",
        "int8_max_abs_diff": float(np.max(np.abs(int8 - fp32))),
        "int8_onnx_bytes": int8_path.stat().st_size,
        "fp32_onnx_bytes": onnx_path.stat().st_size,
    }
