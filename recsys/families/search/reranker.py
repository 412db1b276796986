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
Mined hard negatives (``extra_negatives``: unjudged products the bi-encoder ranks high for a
query) join the training pairs with target 0, teaching the harder lesson of which plausible
products are still wrong.

Training shares the bi-encoder's input pipeline (:mod:`.training`): every pair is tokenised
once, up front, exactly as serving tokenises it (query and title as one pair, longest-first
truncation at ``max_length``); batches are length-bucketed; on CUDA they go from pinned memory
under bf16 autocast. In-batch negatives are drawn while the whole run's batches are planned, so
the distinct negative pairs are tokenised in one more call rather than at every step.

Evaluation and serving use the same model in the same way (:func:`rerank_run` offline, the Triton
model with a ``reranker`` manifest section online); ONNX export is verified against PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
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
    RetrieveFn,
    RunDict,
    dense_run,
    judged_queries,
    pair_classification_metrics,
    ranking_metrics,
    relevance_grade,
)
from recsys.families.search.training import (
    Batch,
    TokenTable,
    TrainingResult,
    bucketed_batches,
    compiled,
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
    compile: bool = False
    """Run the cross-encoder through ``torch.compile`` (worth it on long GPU runs only)."""

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


def _in_batch_negatives(
    batch: Sequence[int],
    queries: Sequence[str],
    titles: Sequence[str],
    judged: dict[str, set[str]],
    rng: random.Random,
) -> list[tuple[str, str]]:
    """One other title of ``batch`` (row indices) per query, shifted by a random offset, as
    (query, title) negatives; titles judged for the query are skipped."""
    if len(batch) < 2:
        return []
    shift = rng.randrange(1, len(batch))
    negatives = []
    for i, row in enumerate(batch):
        query, title = queries[row], titles[batch[(i + shift) % len(batch)]]
        if title not in judged.get(query, ()):
            negatives.append((query, title))
    return negatives


def usable_hard_negatives(
    extra_negatives: Sequence[tuple[str, str]], judged: dict[str, set[str]]
) -> tuple[list[tuple[str, str]], int]:
    """The distinct mined (query, title) negatives whose title is not judged for the query (a
    judged pair keeps its graded target), and how many were dropped as judged or repeated."""
    kept: dict[tuple[str, str], None] = {}
    for query, title in extra_negatives:
        pair = (str(query), str(title))
        if pair[1] not in judged.get(pair[0], ()):
            kept.setdefault(pair)
    return list(kept), len(extra_negatives) - len(kept)


@dataclass(frozen=True)
class _RerankerData:
    """A run's tokenised pairs and its planned batches: ``table`` holds the training rows
    (judged pairs, then hard negatives) followed by the distinct in-batch negatives, ``pairs``
    the (query, title) of each row and ``targets`` its BCE target; ``epochs[e][b]`` lists the
    table rows of batch ``b`` of epoch ``e``."""

    table: TokenTable
    pairs: list[tuple[str, str]]
    targets: torch.Tensor
    epochs: list[list[list[int]]]
    in_batch_negatives: int

    def batch(self, rows: list[int]) -> Batch:
        index = torch.as_tensor(rows, dtype=torch.int64)
        tensors, tokens, padded = self.table.gather(index)
        tensors["targets"] = self.targets[index]
        return Batch(tensors, len(rows), tokens, padded)


def _tokenised_run(
    rows: Sequence[tuple[str, str, float]],
    judged: dict[str, set[str]],
    tokenizer: Any,
    params: RerankerParams,
    total_steps: int,
    rng: random.Random,
) -> _RerankerData:
    """Tokenise ``rows`` (query, title, target) once, plan every batch of the run up to
    ``total_steps`` (length-bucketed by title then query tokens, so a batch's pairs and the
    negatives crossed from them all have similar lengths), and tokenise the distinct in-batch
    negatives those batches draw in one more call."""
    queries = [query for query, _, _ in rows]
    titles = [title for _, title, _ in rows]
    table = TokenTable.encode(tokenizer, queries, titles, max_length=params.max_length)
    title_tokens = table.second_segment_lengths()
    keys = [title_tokens, table.lengths - title_tokens]
    negative_rows: dict[tuple[str, str], int] = {}
    epochs: list[list[list[int]]] = []
    steps = 0
    while steps < total_steps and len(epochs) < params.epochs:
        batches = bucketed_batches(keys, params.batch_size, rng)[: total_steps - steps]
        steps += len(batches)
        planned = []
        for batch in batches:
            negatives = []
            if params.in_batch_negatives:
                for pair in _in_batch_negatives(batch, queries, titles, judged, rng):
                    negatives.append(len(rows) + negative_rows.setdefault(pair, len(negative_rows)))
            planned.append(batch + negatives)
        epochs.append(planned)
    negatives = TokenTable.encode(
        tokenizer,
        [query for query, _ in negative_rows],
        [title for _, title in negative_rows],
        max_length=params.max_length,
    )
    targets = torch.tensor(
        [target for _, _, target in rows] + [0.0] * len(negative_rows), dtype=torch.float32
    )
    return _RerankerData(
        TokenTable.concat(table, negatives),
        list(zip(queries, titles, strict=True)) + list(negative_rows),
        targets,
        epochs,
        len(negative_rows),
    )


def fine_tune_reranker(
    train_frame: pd.DataFrame,
    base_model_dir: Path,
    output_dir: Path,
    params: RerankerParams,
    *,
    on_epoch_end: Callable[[int, float], None] | None = None,
    extra_negatives: Sequence[tuple[str, str]] = (),
    device: str | torch.device | None = None,
) -> TrainingResult:
    """Fine-tune a cross-encoder initialised from ``base_model_dir`` on the judged pairs of
    ``train_frame`` and save weights + tokenizer to ``output_dir``. ``on_epoch_end(epoch,
    mean_loss)`` lets the caller log to MLflow; ``device`` overrides the automatic choice.

    ``extra_negatives`` are mined hard negatives (query, product title): each distinct one whose
    title is not judged for its query trains with target 0 alongside the judged pairs (so it
    also counts towards the steps of an epoch). ``TrainingResult.pairs`` counts judged pairs,
    ``TrainingResult.hard_negatives`` the mined negatives used."""
    from recsys.families.search.encoder import load_tokenizer

    pairs = training_pairs(train_frame)
    if not pairs:
        raise ValueError("no judged (query, product) pairs to train the reranker on")
    judged: dict[str, set[str]] = {}
    for query, title, _ in pairs:
        judged.setdefault(query, set()).add(title)
    hard, dropped = usable_hard_negatives(extra_negatives, judged)
    rows = pairs + [(query, title, 0.0) for query, title in hard]
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = pick_device(device)
    tokenizer = load_tokenizer(base_model_dir)
    model = load_cross_encoder(base_model_dir).to(device).train()
    forward = compiled(model, params.compile)
    input_names = _pair_inputs(model)
    loss_fn = nn.BCEWithLogitsLoss()
    total_steps = planned_steps(len(rows), params.batch_size, params.epochs, params.max_steps)

    prepare_started = time.perf_counter()
    data = _tokenised_run(rows, judged, tokenizer, params, total_steps, rng)
    prepare_seconds = time.perf_counter() - prepare_started
    log.info(
        "fine-tune reranker: %d judged pairs, %d hard negatives (%d judged or repeated skipped), "
        "%d distinct in-batch negatives; tokenised in %.1f s",
        len(pairs),
        len(hard),
        dropped,
        data.in_batch_negatives,
        prepare_seconds,
    )

    def batch_loss(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = forward(**{name: tensors[name] for name in input_names}).logits
        return loss_fn(logits.squeeze(-1).float(), tensors["targets"])

    planned_epochs = iter(data.epochs)
    outcome = optimise(
        model,
        lambda: (data.batch(batch) for batch in next(planned_epochs)),
        batch_loss,
        epochs=len(data.epochs),
        total_steps=total_steps,
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
    return training_result(
        output_dir,
        len(pairs),
        outcome,
        prepare_seconds=prepare_seconds,
        hard_negatives=len(hard),
    )


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
    retrieve: RetrieveFn | None = None,
    calibration_frame: pd.DataFrame | None = None,
) -> EvaluationResult:
    """Retrieve over the whole ``catalog`` with the bi-encoder, rerank each query's
    ``candidates`` best with the cross-encoder and score the run with the same ranx metrics as
    :func:`.evaluation.evaluate_embeddings`. Precision/recall/F1 judge the held-out pairs
    by ``sigmoid(logit) >= score_threshold`` against ``relevance >= positive_threshold``.
    ``retrieve`` (default :func:`.evaluation.dense_run`) is the first stage the served
    configuration uses, e.g. :func:`.evaluation.hybrid_retriever`. With ``calibration_frame``
    (training pairs) the probability threshold is the F1-best one on those pairs."""
    query_texts = judged_queries(test_frame)
    product_ids = catalog["product_uid"].astype(str).tolist()
    product_titles = catalog["product_title"].astype(str).tolist()
    query_emb = query_embed(query_texts)
    product_emb = (product_embed or query_embed)(product_titles)
    run = (retrieve or dense_run)(
        query_texts, query_emb, product_ids, product_emb, max(RANKING_DEPTH, candidates)
    )
    titles = dict(zip(product_ids, product_titles, strict=True))
    run = rerank_run(run, titles, score_pairs, candidates)
    metrics = ranking_metrics(test_frame, run, relevance_grade(positive_threshold), k_values)

    def probabilities(frame: pd.DataFrame) -> np.ndarray:
        pair_titles = [
            titles.get(pid, str(own))
            for pid, own in zip(
                frame["product_uid"].astype(str), frame["product_title"], strict=True
            )
        ]
        queries = frame["search_term"].astype(str).tolist()
        logits = np.asarray(score_pairs(queries, pair_titles), dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

    calibration: dict[str, Any] = {"score_threshold": score_threshold}
    if calibration_frame is not None:
        calibration = {
            "train_relevance": calibration_frame["relevance"].to_numpy(),
            "train_scores": probabilities(calibration_frame),
        }
    metrics.update(
        pair_classification_metrics(
            test_frame["relevance"].to_numpy(),
            probabilities(test_frame),
            positive_threshold,
            **calibration,
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
