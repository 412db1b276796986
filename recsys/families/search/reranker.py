"""A cross-encoder reranker over the bi-encoder's top-K: the second stage of product search.

The bi-encoder embeds queries and titles separately, so it can search the whole catalogue with
one matrix product but never sees a query and a title together. The cross-encoder reads
``[CLS] query [SEP] title [SEP]`` through one transformer and outputs one relevance logit, which
is far more precise and far too slow for a whole catalogue; it therefore only rescores the
``candidates`` best products the bi-encoder retrieved.

Training is pointwise: every judged (query, title) pair is a soft target ``(relevance - 1) / 2``
in [0, 1] under binary cross-entropy with logits, so ``sigmoid(logit)`` reads as a relevance
probability and a logit >= 0 as "relevant". Judged pairs are mostly plausible products, so each
batch also pairs every query with another query's title as a cheap negative (target 0) unless
that title was judged for it: the reranker then also learns what an unrelated product looks like.

Evaluation and serving use the same model in the same way (:func:`rerank_run` offline, the Triton
model with a ``reranker`` manifest section online); ONNX export is verified against PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys.families.search.evaluation import (
    RANKING_DEPTH,
    EmbedFn,
    EvaluationResult,
    RunDict,
    dense_run,
    judged_queries,
    pair_classification_metrics,
    ranking_metrics,
    relevance_grade,
)
from recsys.families.search.training import (
    TrainingResult,
    optimise,
    pick_device,
    planned_steps,
    training_result,
)
from recsys.progress import progress_bar

log = logging.getLogger(__name__)

PairScoreFn = Callable[[list[str], list[str]], np.ndarray]
"""(queries, titles) in, one float32 cross-encoder logit per pair out. PyTorch and ONNX
rerankers both reduce to this, so offline evaluation scores what serves."""

REQUIRED_PAIR_INPUTS = ["input_ids", "attention_mask"]
DEFAULT_PROBES: list[tuple[str, str]] = [
    ("cordless drill", "cordless drill driver kit with two batteries"),
    ("white paint", "interior latex paint eggshell white"),
    ("garden hose", "ceramic floor tile gray"),
    ("", "empty query against a title"),
    ("a" * 400, "a very long query that has to be truncated " * 20),
]


WARMUP_FRACTION = 0.1
"""Share of the steps spent warming the learning rate up (as the bi-encoder's default)."""


@dataclass(frozen=True)
class RerankerParams:
    """Every knob of a reranker run; all are DAG params and MLflow run params."""

    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-5
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = run all epochs); keeps smoke runs short."""
    max_length: int = 96
    """Tokens of one query + title pair (longest-first truncation, as in serving)."""
    candidates: int = 20
    """How many of the bi-encoder's best products the cross-encoder rescores per query."""
    positive_threshold: float = 2.33
    """Relevance (1-3) at which a judged pair counts as a positive in precision/recall/F1."""
    in_batch_negatives: bool = True
    """Also train on one other query's title per query (target 0); doubles the pairs a step."""
    seed: int = 13

    def to_dict(self) -> dict:
        return asdict(self)


def soft_target(relevance: float) -> float:
    """The BCE target of a judged pair: relevance 1 -> 0.0, 2 -> 0.5, 3 -> 1.0."""
    return min(1.0, max(0.0, (float(relevance) - 1.0) / 2.0))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Load checkpoints without the weight-loading bar and the 'newly initialised classifier'
    report: a fresh head on a base encoder is expected here, and logged once by the caller."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_cross_encoder(path: Path | str) -> nn.Module:
    """A single-logit ``AutoModelForSequenceClassification`` from a local folder (never a hub
    id). A base encoder folder such as MiniLM's gets a freshly initialised head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path), num_labels=1)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config)
    archs = AutoConfig.from_pretrained(str(path)).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        log.info("cross-encoder from base model %s: classification head initialised fresh", path)
    return model


def _pair_inputs(model: nn.Module) -> list[str]:
    """Model inputs of a pair: segment ids too when the model has segment embeddings (BERT,
    MiniLM), so it can tell the query from the title. Decided by the model, not the tokenizer
    class (a bare ``tokenizer.json`` wrapper omits them by default, yet its pair template
    assigns them), and always requested from the tokenizer: see :func:`_encode_pairs`."""
    uses_segments = getattr(model.config, "type_vocab_size", 0) > 1
    return REQUIRED_PAIR_INPUTS + (["token_type_ids"] if uses_segments else [])


def _encode_pairs(
    tokenizer: Any, queries: list[str], titles: list[str], max_length: int | None
) -> Any:
    """Tokenise pairs as serving does: longest-first truncation, padding to the longest."""
    return tokenizer(
        list(queries),
        list(titles),
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_token_type_ids=True,
        return_tensors="pt",
    )


def training_pairs(frame: pd.DataFrame) -> list[tuple[str, str, float]]:
    """Every judged pair of ``frame`` as (search_term, product_title, soft target)."""
    return [
        (str(q), str(t), soft_target(r))
        for q, t, r in zip(
            frame["search_term"], frame["product_title"], frame["relevance"], strict=True
        )
    ]


def _with_negatives(
    batch: list[tuple[str, str, float]], judged: dict[str, set[str]], rng: random.Random
) -> list[tuple[str, str, float]]:
    """``batch`` plus one other title per query (target 0), skipping titles judged for it."""
    if len(batch) < 2:
        return batch
    shift = rng.randrange(1, len(batch))
    negatives = []
    for i, (query, _, _) in enumerate(batch):
        title = batch[(i + shift) % len(batch)][1]
        if title not in judged.get(query, ()):
            negatives.append((query, title, 0.0))
    return batch + negatives


def fine_tune_reranker(
    train_frame: pd.DataFrame,
    base_model_dir: Path,
    output_dir: Path,
    params: RerankerParams,
    *,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Fine-tune a cross-encoder initialised from ``base_model_dir`` on the judged pairs of
    ``train_frame`` and save weights + tokenizer to ``output_dir``. ``on_epoch_end(epoch,
    mean_loss)`` lets the caller log to MLflow. ``TrainingResult.pairs`` counts judged pairs."""
    from recsys.families.search.encoder import load_tokenizer

    pairs = training_pairs(train_frame)
    if not pairs:
        raise ValueError("no judged (query, product) pairs to train the reranker on")
    judged: dict[str, set[str]] = {}
    for query, title, _ in pairs:
        judged.setdefault(query, set()).add(title)
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = pick_device()
    tokenizer = load_tokenizer(base_model_dir)
    model = load_cross_encoder(base_model_dir).to(device).train()
    input_names = _pair_inputs(model)
    loss_fn = nn.BCEWithLogitsLoss()

    def epoch_batches() -> Iterator[list[tuple[str, str, float]]]:
        order = pairs[:]
        rng.shuffle(order)
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            yield _with_negatives(batch, judged, rng) if params.in_batch_negatives else batch

    def batch_loss(batch: list[tuple[str, str, float]]) -> torch.Tensor:
        queries, titles, targets = zip(*batch, strict=True)
        encoded = _encode_pairs(tokenizer, queries, titles, params.max_length)
        logits = model(**{name: encoded[name].to(device) for name in input_names}).logits
        target = torch.tensor(targets, dtype=torch.float32, device=device)
        return loss_fn(logits.squeeze(-1).float(), target)

    outcome = optimise(
        model,
        epoch_batches,
        batch_loss,
        epochs=params.epochs,
        total_steps=planned_steps(len(pairs), params.batch_size, params.epochs, params.max_steps),
        learning_rate=params.learning_rate,
        warmup_fraction=WARMUP_FRACTION,
        device=device,
        desc="fine-tune reranker",
        on_epoch_end=on_epoch_end,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.cpu().eval().save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return training_result(output_dir, len(pairs), outcome)


def _score_by_length(
    queries: list[str],
    titles: list[str],
    batch_size: int,
    score_batch: Callable[[list[str], list[str]], np.ndarray],
) -> np.ndarray:
    """Score pairs in batches of similar length (a batch pads to its longest pair, so sorting
    saves most of the padding) and return the scores in the caller's order."""
    if len(queries) != len(titles):
        raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]) + len(titles[i]))
    scores = np.empty(len(order), dtype=np.float32)
    bar = progress_bar(total=len(order), desc="rerank", unit="pair", leave=False)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        scores[rows] = score_batch([queries[i] for i in rows], [titles[i] for i in rows])
        bar.update(len(rows))
    bar.close()
    return scores


def torch_pair_scorer(
    model_dir: Path, max_length: int = 96, batch_size: int = 64, device: Any = None
) -> PairScoreFn:
    """A :data:`PairScoreFn` over the PyTorch cross-encoder checkpoint in ``model_dir``."""
    from recsys.families.search.encoder import load_tokenizer

    model = load_cross_encoder(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    device = device or pick_device()
    model.to(device)
    input_names = _pair_inputs(model)

    @torch.no_grad()
    def score_batch(queries: list[str], titles: list[str]) -> np.ndarray:
        encoded = _encode_pairs(tokenizer, queries, titles, max_length)
        feed = {name: encoded[name].to(device) for name in input_names}
        return model(**feed).logits.float().reshape(-1).cpu().numpy()

    def score(queries: list[str], titles: list[str]) -> np.ndarray:
        return _score_by_length(queries, titles, batch_size, score_batch)

    return score


def onnx_pair_scorer(
    onnx_path: Path, tokenizer_path: Path, max_length: int = 96, batch_size: int = 64
) -> PairScoreFn:
    """A :data:`PairScoreFn` over an exported cross-encoder, tokenised exactly as the Triton
    model tokenises pairs (``tokenizer.json``, longest-first truncation, padding)."""
    from recsys.families.search.evaluation import OnnxTokenizedSession

    cross_encoder = OnnxTokenizedSession(onnx_path, tokenizer_path, max_length)

    def score_batch(queries: list[str], titles: list[str]) -> np.ndarray:
        return cross_encoder.run(list(zip(queries, titles, strict=True))).reshape(-1)

    def score(queries: list[str], titles: list[str]) -> np.ndarray:
        return _score_by_length(queries, titles, batch_size, score_batch)

    return score


def rerank_run(
    run: RunDict, titles: dict[str, str], score_pairs: PairScoreFn, candidates: int
) -> RunDict:
    """Rescore each query's ``candidates`` best products with the cross-encoder.

    The reranked products get their cross-encoder logits and rank above every other product
    of the query; the rest keep the bi-encoder's order below them (their scores shifted under
    the lowest logit), so the run holds the same products and Recall@100 stays comparable with
    the bi-encoder's. All pairs go to ``score_pairs`` in one call (it batches itself).
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    ranked = {
        query: sorted(products.items(), key=lambda item: (-item[1], item[0]))
        for query, products in run.items()
    }
    pair_queries: list[str] = []
    pair_titles: list[str] = []
    for query, items in ranked.items():
        for pid, _ in items[:candidates]:
            if pid not in titles:
                raise KeyError(f"no title for product {pid!r} retrieved for {query!r}")
            pair_queries.append(query)
            pair_titles.append(titles[pid])
    logits = np.asarray(score_pairs(pair_queries, pair_titles), dtype=np.float64).reshape(-1)
    if len(logits) != len(pair_queries):
        raise ValueError(f"score_pairs returned {len(logits)} scores for {len(pair_queries)} pairs")

    reranked: RunDict = {}
    offset = 0
    for query, items in ranked.items():
        head, tail = items[:candidates], items[candidates:]
        head_scores = logits[offset : offset + len(head)]
        offset += len(head)
        scores = {pid: float(s) for (pid, _), s in zip(head, head_scores, strict=True)}
        if tail:
            shift = float(head_scores.min()) - 1.0 - tail[0][1]
            scores.update({pid: score + shift for pid, score in tail})
        reranked[query] = scores
    return reranked


def evaluate_reranked(
    query_embed: EmbedFn,
    score_pairs: PairScoreFn,
    test_frame: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    candidates: int = 20,
    positive_threshold: float = 2.33,
    k_values: tuple[int, ...] = (10, 100),
    product_embed: EmbedFn | None = None,
    score_threshold: float = 0.5,
) -> EvaluationResult:
    """Retrieve over the whole ``catalog`` with the bi-encoder, rerank each query's
    ``candidates`` best with the cross-encoder and score the run with the same ranx metrics as
    :func:`.evaluation.evaluate_embeddings`. Precision/recall/F1 judge the held-out pairs
    by ``sigmoid(logit) >= score_threshold`` against ``relevance >= positive_threshold``."""
    query_texts = judged_queries(test_frame)
    product_ids = catalog["product_uid"].astype(str).tolist()
    product_titles = catalog["product_title"].astype(str).tolist()
    query_emb = query_embed(query_texts)
    product_emb = (product_embed or query_embed)(product_titles)
    run = dense_run(
        query_texts, query_emb, product_ids, product_emb, depth=max(RANKING_DEPTH, candidates)
    )
    titles = dict(zip(product_ids, product_titles, strict=True))
    run = rerank_run(run, titles, score_pairs, candidates)
    metrics = ranking_metrics(test_frame, run, relevance_grade(positive_threshold), k_values)

    pair_titles = [
        titles.get(pid, str(own))
        for pid, own in zip(
            test_frame["product_uid"].astype(str), test_frame["product_title"], strict=True
        )
    ]
    logits = np.asarray(
        score_pairs(test_frame["search_term"].astype(str).tolist(), pair_titles), dtype=np.float64
    )
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    metrics.update(
        pair_classification_metrics(
            test_frame["relevance"].to_numpy(), probabilities, positive_threshold, score_threshold
        )
    )
    result = EvaluationResult(metrics=metrics, queries=len(query_texts), products=len(product_ids))
    log.info("reranked evaluation (%d candidates): %s", candidates, result.summary())
    return result


class _LogitsOnly(nn.Module):
    """The classifier with one tensor out (``logits`` [batch, 1]), as the ONNX graph returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).logits


def export_reranker_onnx(
    model_dir: Path,
    output_path: Path,
    opset: int = 17,
    *,
    max_length: int = 96,
    probes: list[tuple[str, str]] | None = None,
    atol: float = 1e-3,
) -> Path:
    """Export the cross-encoder in ``model_dir`` to ONNX (legacy TorchScript exporter, dynamic
    batch and sequence axes; inputs ``input_ids``, ``attention_mask`` and ``token_type_ids``
    when the model has segment embeddings; output ``logits`` [batch, 1]) and check its logits
    on ``probes`` against PyTorch; raises ``ExportVerificationError`` beyond ``atol`` (scaled
    by the logits' magnitude)."""
    import onnxruntime as ort

    from recsys.families.search.encoder import load_tokenizer
    from recsys.families.search.export import ExportVerificationError

    model = load_cross_encoder(model_dir).cpu().eval()
    tokenizer = load_tokenizer(model_dir)
    names = _pair_inputs(model)
    wrapped = _LogitsOnly(model).eval()
    sample = _encode_pairs(
        tokenizer,
        ["sample query", "another sample query for tracing"],
        ["a product title", "a second, longer product title for tracing"],
        None,
    )
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            tuple(sample[name] for name in names),
            str(output_path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )

    probes = probes or DEFAULT_PROBES
    encoded = _encode_pairs(tokenizer, [q for q, _ in probes], [t for _, t in probes], max_length)
    session = ort.InferenceSession(str(output_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: encoded[n].numpy().astype(np.int64) for n in names})[0]
    with torch.no_grad():
        want = wrapped(**{n: encoded[n] for n in names}).numpy()
    diff = float(np.max(np.abs(got - want)))
    if diff > atol * max(1.0, float(np.max(np.abs(want)))):
        raise ExportVerificationError(
            f"ONNX export of {output_path.name} deviates from PyTorch: max |logit diff| {diff:.5f}"
        )
    log.info("exported reranker %s (inputs %s, max |diff| %.2e)", output_path.name, names, diff)
    return output_path


def reranker_onnx_inputs(onnx_path: Path) -> list[str]:
    """The input names of an exported cross-encoder graph, in graph order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()]
