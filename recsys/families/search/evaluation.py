"""Offline evaluation of a bi-encoder on held-out queries.

Ranking metrics come from ranx (a maintained IR metrics library) so NDCG/Recall/MRR follow the
standard TREC definitions; classification metrics from scikit-learn. Human relevance (1-3,
averaged over raters) becomes an integer gain 0-6 so that NDCG rewards exact matches more than
partial ones, and the binary metrics count a product as relevant at ``positive_threshold``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

RANKING_DEPTH = 100


def relevance_grade(relevance: float) -> int:
    """Map a 1-3 rater average to a 0-6 integer gain (1 -> 0, 1.33 -> 1, ..., 3 -> 6)."""
    return round((float(relevance) - 1.0) * 3.0)


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, float]
    queries: int
    products: int

    def summary(self) -> str:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.metrics.items()))
        return f"{self.queries} queries over {self.products} products: {shown}"


EmbedFn = Callable[[list[str]], np.ndarray]
"""Texts in, L2-normalised float32 embeddings out (one row per text). Torch, ONNX fp32 and ONNX
INT8 encoders all reduce to this, so every precision is scored by exactly the same metric code."""

RunDict = dict[str, dict[str, float]]
"""A ranx run: query -> {product id: score} for the products the system retrieved."""

RetrieveFn = Callable[[list[str], np.ndarray, list[str], np.ndarray, int], RunDict]
"""(queries, their embeddings, product ids, product embeddings, depth) -> run: how a served
configuration retrieves (:func:`dense_run`, or :func:`hybrid_retriever`'s fused lists)."""


def judged_queries(test_frame: pd.DataFrame) -> list[str]:
    """The held-out queries in a fixed order (the row order of every query matrix)."""
    return sorted(test_frame["search_term"].astype(str).unique())


def _qrels(test_frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    qrels_dict: dict[str, dict[str, int]] = {}
    for query, pid, rel in zip(
        test_frame["search_term"].astype(str),
        test_frame["product_uid"].astype(str),
        test_frame["relevance"],
        strict=True,
    ):
        grade = relevance_grade(rel)
        if grade > 0:
            qrels_dict.setdefault(query, {})[pid] = max(
                grade, qrels_dict.get(query, {}).get(pid, 0)
            )
    return qrels_dict


def dense_run(
    query_texts: list[str],
    query_emb: np.ndarray,
    product_ids: list[str],
    product_emb: np.ndarray,
    depth: int = RANKING_DEPTH,
    block: int = 512,
) -> RunDict:
    """Top-``depth`` products per query by dot product, in query blocks so a full catalogue
    never needs the whole queries x products score matrix in memory."""
    depth = min(depth, len(product_ids))
    run: RunDict = {}
    for start in range(0, len(query_texts), block):
        scores = query_emb[start : start + block] @ product_emb.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        for offset, row in enumerate(top):
            run[query_texts[start + offset]] = {
                product_ids[i]: float(scores[offset, i]) for i in row
            }
    return run


def hybrid_retriever(
    index: Any,
    fusion: Any,
    block: int = 256,
    fuse: Callable[..., Any] | None = None,
    sparse: bool | None = None,
) -> RetrieveFn:
    """A :data:`RetrieveFn` fusing the dense scores with ``index``'s BM25 scores exactly as the
    served model does (:func:`.hybrid.fuse`, the same code a version folder carries).

    The run's scores encode the fused order (``depth`` for the best, then ``depth - 1``...):
    ranx and :func:`.reranker.rerank_run` break score ties by product id, the served model by
    the dense score, so handing them the order keeps offline and served rankings identical.
    ``fuse`` defaults to the platform's :func:`.hybrid.fuse_sparse` (the top-k path the served
    model runs: BM25 hits only, fusion over the candidate union); the gate passes a version
    folder's own copy. ``sparse`` says whether ``fuse`` takes ``index.sparse_scores`` (the
    ``fuse_sparse`` of a folder that has it) or a full ``index.scores`` array (``fuse``)."""
    if fuse is None:
        from recsys.families.search.hybrid import fuse_sparse as fuse

        sparse = True
    if sparse is None:
        sparse = getattr(fuse, "__name__", "") == "fuse_sparse"

    def retrieve(
        query_texts: list[str],
        query_emb: np.ndarray,
        product_ids: list[str],
        product_emb: np.ndarray,
        depth: int,
    ) -> RunDict:
        depth = min(depth, len(product_ids))
        run: RunDict = {}
        for start in range(0, len(query_texts), block):
            queries = query_texts[start : start + block]
            dense = query_emb[start : start + block] @ product_emb.T
            lexical = index.sparse_scores(queries) if sparse else index.scores(queries)
            indices, _ = fuse(dense, lexical, fusion, depth)
            for query, row in zip(queries, indices, strict=True):
                run[query] = {product_ids[i]: float(depth - rank) for rank, i in enumerate(row)}
        return run

    return retrieve


def catalog_hybrid_retriever(
    titles: list[str],
    lexical: dict[str, Any] | None,
    fusion: dict[str, Any] | None,
    module: Any = None,
) -> RetrieveFn:
    """:func:`hybrid_retriever` over a BM25 index of ``titles`` built with the ``lexical``
    settings, fused by ``fusion``; ``module`` is the hybrid code to run (default the platform's
    :mod:`.hybrid`; the gate passes a version folder's own copy)."""
    if module is None:
        from recsys.families.search import hybrid as module
    index = module.LexicalIndex.build(titles, module.LexicalConfig.from_dict(lexical or {}))
    sparse = hasattr(module, "fuse_sparse") and hasattr(index, "sparse_scores")
    return hybrid_retriever(
        index,
        module.FusionConfig.from_dict(fusion or {}),
        fuse=module.fuse_sparse if sparse else module.fuse,
        sparse=sparse,
    )


def ranking_metrics(
    test_frame: pd.DataFrame,
    run: RunDict,
    positive_grade: int,
    k_values: tuple[int, ...] = (10, 100),
) -> dict[str, float]:
    """NDCG@k (graded), MRR and Recall@k (relevant = grade >= ``positive_grade``) with ranx.

    Any system that produces a run (dense encoder, BM25, ...) is scored here, so the comparison
    table's rows are comparable by construction. Judged queries the run misses score zero.
    """
    from ranx import Qrels, Run, evaluate

    qrels_dict = _qrels(test_frame)
    qrels = Qrels(qrels_dict)
    run_obj = Run({q: r for q, r in run.items() if q in qrels_dict and r})
    names = [f"ndcg@{k_values[0]}", "mrr"] + [f"recall@{k}" for k in k_values]
    names = [f"{n}-l{positive_grade}" if not n.startswith("ndcg") else n for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = evaluate(qrels, run_obj, names, make_comparable=True)
    return {name.split("-l")[0].replace("@", "_at_"): float(v) for name, v in values.items()}


def _ranx_metrics(
    test_frame: pd.DataFrame,
    query_texts: list[str],
    query_emb: np.ndarray,
    product_ids: list[str],
    product_emb: np.ndarray,
    positive_grade: int,
    k_values: tuple[int, ...],
    retrieve: RetrieveFn | None = None,
) -> dict[str, float]:
    run = (retrieve or dense_run)(query_texts, query_emb, product_ids, product_emb, RANKING_DEPTH)
    return ranking_metrics(test_frame, run, positive_grade, k_values)


def pair_classification_metrics(
    relevance: np.ndarray,
    scores: np.ndarray,
    positive_threshold: float,
    score_threshold: float | None = None,
    *,
    train_relevance: np.ndarray | None = None,
    train_scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of judged pairs, beside the majority class's.

    Predicted relevant when ``score >= score_threshold``, actually relevant when ``relevance >=
    positive_threshold``. The threshold is ``score_threshold`` when given, else the F1-best
    threshold on ``train_relevance``/``train_scores`` (training or validation pairs, never the
    reported ones: :func:`.calibration.choose_threshold`); it is returned as
    ``score_threshold``. ``majority_precision``/``majority_recall``/``majority_f1``/
    ``majority_accuracy`` are the constant majority-class classifier's on the same pairs and
    ``positive_rate`` their share of relevant pairs (:func:`.calibration.majority_baseline`):
    on data that is mostly relevant, "always relevant" already has a high F1, so a model's F1
    means something only next to ``majority_f1``."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from recsys.families.search.calibration import (
        CLASSIFICATION_KEYS,
        choose_threshold,
        majority_baseline,
    )

    if score_threshold is None:
        if train_relevance is None or train_scores is None:
            raise ValueError(
                "pass score_threshold, or train_relevance and train_scores to choose it on "
                "training pairs (choosing it on the reported pairs would overstate the metrics)"
            )
        score_threshold = choose_threshold(train_relevance, train_scores, positive_threshold)
    labels = np.asarray(relevance) >= positive_threshold
    predicted = np.asarray(scores) >= score_threshold
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, average="binary", zero_division=0
    )
    majority = majority_baseline(relevance, positive_threshold)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": float(accuracy_score(labels, predicted)),
        "score_threshold": float(score_threshold),
        "positive_rate": majority["positive_rate"],
        **{f"majority_{k}": majority[f"majority_{k}"] for k in CLASSIFICATION_KEYS},
    }


def calibration_sample(train_frame: pd.DataFrame, pairs: int = 10_000, seed: int = 13) -> Any:
    """A seeded sample of training pairs to choose classification thresholds on (never the
    held-out pairs the metrics report)."""
    if len(train_frame) <= pairs:
        return train_frame
    return train_frame.sample(n=pairs, random_state=seed)


def torch_embedder(model_dir: Path, max_length: int = 64, device: Any = None) -> EmbedFn:
    """An :data:`EmbedFn` over the PyTorch checkpoint in ``model_dir``."""
    from recsys.families.search.encoder import BiEncoder, encode_texts, load_tokenizer
    from recsys.families.search.training import pick_device

    model = BiEncoder.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    device = device or pick_device()

    def embed(texts: list[str]) -> np.ndarray:
        return encode_texts(model, tokenizer, texts, max_length=max_length, device=device).numpy()

    return embed


class OnnxTokenizedSession:
    """An ONNX graph on CPU and ``tokenizer.json`` set up as the Triton model sets them up
    (truncation to ``max_length``, padding each batch to its longest), so what is scored
    offline is what serves. Shared by the bi-encoder and cross-encoder scorers."""

    def __init__(self, onnx_path: Path, tokenizer_path: Path, max_length: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length)
        pad_token = (self.tokenizer.padding or {}).get("pad_token") or "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad_token) or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)

    def run(self, texts: list[str] | list[tuple[str, str]]) -> np.ndarray:
        """The graph's first output for one batch of texts (or (query, title) pairs)."""
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": lambda: [e.ids for e in encodings],
            "attention_mask": lambda: [e.attention_mask for e in encodings],
            "token_type_ids": lambda: [e.type_ids for e in encodings],
        }
        feed = {name: np.asarray(columns[name](), dtype=np.int64) for name in self.inputs}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


def onnx_embedder(
    onnx_path: Path, tokenizer_path: Path, max_length: int = 64, batch_size: int = 128
) -> EmbedFn:
    """An :data:`EmbedFn` over an exported ONNX encoder, tokenised exactly as the Triton model
    tokenises (``tokenizer.json`` with truncation and padding), so what is scored is what
    serves."""
    encoder = OnnxTokenizedSession(onnx_path, tokenizer_path, max_length)

    def embed(texts: list[str]) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), batch_size):
            chunks.append(encoder.run(texts[start : start + batch_size]))
        return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)

    return embed


def evaluate_embeddings(
    query_embed: EmbedFn,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    product_embed: EmbedFn | None = None,
    k_values: tuple[int, ...] = (10, 100),
    positive_threshold: float = 2.33,
    score_threshold: float = 0.5,
    retrieve: RetrieveFn | None = None,
    calibration_frame: pd.DataFrame | None = None,
) -> EvaluationResult:
    """Rank the whole ``catalog`` for every held-out query and score the judged pairs.

    ``product_embed`` defaults to ``query_embed``; pass a different one to score a served
    configuration where products were embedded offline by another encoder (e.g. INT8 queries
    against fp32 product embeddings). ``retrieve`` (default :func:`dense_run`) is how the
    configuration retrieves, e.g. :func:`hybrid_retriever`. With ``calibration_frame``
    (training pairs, see :func:`calibration_sample`) the cosine threshold of precision/recall/F1
    is the F1-best one on those pairs instead of ``score_threshold``.
    """
    query_texts = judged_queries(test_frame)
    product_ids = catalog["product_uid"].astype(str).tolist()
    query_emb = query_embed(query_texts)
    product_emb = (product_embed or query_embed)(catalog["product_title"].astype(str).tolist())

    positive_grade = relevance_grade(positive_threshold)
    metrics = _ranx_metrics(
        test_frame,
        query_texts,
        query_emb,
        product_ids,
        product_emb,
        positive_grade,
        k_values,
        retrieve,
    )

    product_row = {p: i for i, p in enumerate(product_ids)}

    def cosines(frame: pd.DataFrame, queries: list[str], embeddings: np.ndarray) -> np.ndarray:
        query_row = {q: i for i, q in enumerate(queries)}
        q_idx = frame["search_term"].astype(str).map(query_row).to_numpy()
        p_idx = frame["product_uid"].astype(str).map(product_row).to_numpy()
        return np.einsum("ij,ij->i", embeddings[q_idx], product_emb[p_idx])

    calibration: dict[str, Any] = {"score_threshold": score_threshold}
    if calibration_frame is not None:
        frame = calibration_frame[calibration_frame["product_uid"].astype(str).isin(product_row)]
        queries = judged_queries(frame)
        calibration = {
            "train_relevance": frame["relevance"].to_numpy(),
            "train_scores": cosines(frame, queries, query_embed(queries)),
        }
    metrics.update(
        pair_classification_metrics(
            test_frame["relevance"].to_numpy(),
            cosines(test_frame, query_texts, query_emb),
            positive_threshold,
            **calibration,
        )
    )
    result = EvaluationResult(metrics=metrics, queries=len(query_texts), products=len(product_ids))
    log.info("evaluation: %s", result.summary())
    return result


def evaluate_encoder(
    model_dir: Path,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    k_values: tuple[int, ...] = (10, 100),
    positive_threshold: float = 2.33,
    score_threshold: float = 0.5,
    max_length: int = 64,
    calibration_frame: pd.DataFrame | None = None,
) -> EvaluationResult:
    """Evaluate the PyTorch checkpoint in ``model_dir`` (see :func:`evaluate_embeddings`).

    ``catalog`` should hold every product the shop would serve (train and test), so the held-out
    queries compete against distractors exactly as in production.
    """
    return evaluate_embeddings(
        torch_embedder(Path(model_dir), max_length=max_length),
        test_frame,
        catalog,
        k_values=k_values,
        positive_threshold=positive_threshold,
        score_threshold=score_threshold,
        calibration_frame=calibration_frame,
    )
