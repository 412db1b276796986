"""Hybrid retrieval: BM25 over product titles fused with the dense encoder's scores.

Lexical and dense retrieval fail on different queries: BM25 finds the exact model numbers,
sizes and brand names a bi-encoder blurs, the encoder finds the products a shopper describes in
other words. Fusing both lists (reciprocal-rank fusion, or a weighted sum of per-query
normalised scores) beats either alone on the Home Depot data, and a cross-encoder reranking
the fused top-N beats reranking the dense top-N.

This one module is both the offline and the served implementation: the export copies it into
every version folder that serves hybrid retrieval (as ``hybrid.py``, beside ``model.py``) and
the python-backend model loads it from there, so the gate scores exactly the code that serves
and a version folder keeps working whatever happens to the platform code later. That is why it
imports only the standard library, numpy, ``bm25s`` and (for stemming) ``PyStemmer``, never
``recsys``.

Layout in a version folder: the ``bm25.*`` files (:data:`LEXICAL_FILES`: the ``bm25s`` index of
the catalogue's titles, in the order of ``products.npz``, and ``bm25.lexical.json``: how titles
and queries are tokenised and the BM25 parameters), and the manifest's ``hybrid`` section
(:class:`FusionConfig`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

BM25S_FILES = {
    "data_name": "bm25.data.npy",
    "indices_name": "bm25.indices.npy",
    "indptr_name": "bm25.indptr.npy",
    "vocab_name": "bm25.vocab.json",
    "params_name": "bm25.params.json",
}
"""The ``bm25s`` index files, flat in the version folder (a version folder holds plain files
only, so that every one is checksummed and copied like the encoder)."""
LEXICAL_CONFIG_FILE = "bm25.lexical.json"
LEXICAL_FILES = (*BM25S_FILES.values(), LEXICAL_CONFIG_FILE)
HYBRID_FILE = "hybrid.py"
"""This module's name inside a version folder."""
FUSION_METHODS = ("rrf", "weighted")
RETRIEVAL_MODES = ("dense", "hybrid")


@dataclass(frozen=True)
class LexicalConfig:
    """How titles and queries become BM25 terms, and BM25's own parameters.

    ``stemmer`` is a Snowball language (``"english"``) or ``None``; ``stopwords`` a ``bm25s``
    stopword list name (``"en"``) or ``None``. ``k1`` (term-frequency saturation) and ``b``
    (length normalisation) are tuned on the training queries by the pipeline: product titles
    are short, so the usual ``b=0.75`` over-penalises the long ones."""

    k1: float = 1.2
    b: float = 0.75
    stemmer: str | None = "english"
    stopwords: str | None = "en"

    def __post_init__(self) -> None:
        if not self.k1 > 0 or not 0.0 <= self.b <= 1.0:
            raise ValueError(f"BM25 needs k1 > 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LexicalConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown lexical settings {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class FusionConfig:
    """How the dense and the lexical lists become one ranking.

    ``depth`` products are taken from each list (their union is the candidate set);
    ``rrf`` scores a candidate ``sum(1 / (rrf_k + rank))`` over the lists it is in, ``weighted``
    scores ``dense_weight * dense + (1 - dense_weight) * bm25`` with both min-max normalised over
    the query's candidates. RRF needs no tuning and ignores score scales; the weighted sum can
    use how far apart scores are, and its weight is a pipeline param."""

    method: str = "rrf"
    depth: int = 100
    rrf_k: int = 60
    dense_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method must be one of {FUSION_METHODS}, got {self.method!r}")
        if self.depth < 1 or self.rrf_k < 0 or not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(
                "fusion needs depth >= 1, rrf_k >= 0 and 0 <= dense_weight <= 1, got "
                f"depth={self.depth}, rrf_k={self.rrf_k}, dense_weight={self.dense_weight}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        """Known keys only (a manifest section may carry more); ``None`` means the default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})


def load_folder_copy(folder: Path, name: str) -> Any:
    """The ``hybrid.py`` a version folder carries, imported as module ``name`` (registered in
    ``sys.modules``, which dataclasses need): the gate and the export check run the folder's
    own copy, as the served model does."""
    import importlib.util
    import sys

    path = Path(folder) / HYBRID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} lacks {HYBRID_FILE} (manifest hybrid)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _bm25s() -> Any:
    """``bm25s``, with its logger (DEBUG on import: a line per index built) at WARNING."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _stemmer(language: str | None) -> Callable[[list[str]], list[str]] | None:
    if language is None:
        return None
    import Stemmer  # PyStemmer: Snowball stemmers in C

    return Stemmer.Stemmer(language).stemWords


def tokenize(texts: Sequence[str], config: LexicalConfig) -> list[list[str]]:
    """The terms of each text, lower-cased, stopwords dropped, stemmed: the same function for
    titles at indexing time and for queries at serving time."""
    return _bm25s().tokenize(
        [str(t) for t in texts],
        stopwords=config.stopwords or [],
        stemmer=_stemmer(config.stemmer),
        return_ids=False,
        show_progress=False,
    )


def build_index(titles: Sequence[str], config: LexicalConfig) -> Any:
    """A ``bm25s`` index over ``titles`` (document ``i`` is product ``i`` of the catalogue)."""
    bm25s = _bm25s()
    retriever = bm25s.BM25(k1=config.k1, b=config.b)
    retriever.index(tokenize(titles, config), show_progress=False)
    return retriever


def save_index(retriever: Any, directory: Path, config: LexicalConfig) -> Path:
    """Write the index and its tokenisation settings (:data:`LEXICAL_FILES`) into
    ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    retriever.save(str(directory), show_progress=False, **BM25S_FILES)
    (directory / LEXICAL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    return directory


class LexicalIndex:
    """A loaded BM25 index: the scores of a batch of queries, as a full ``[queries, products]``
    array (:meth:`scores`) or as the queries' hits only (:meth:`sparse_scores`, what serves)."""

    def __init__(self, retriever: Any, config: LexicalConfig, products: int) -> None:
        self.retriever = retriever
        self.config = config
        self.products = products

    @classmethod
    def build(cls, titles: Sequence[str], config: LexicalConfig) -> LexicalIndex:
        return cls(build_index(titles, config), config, len(titles))

    def save(self, directory: Path) -> Path:
        return save_index(self.retriever, directory, self.config)

    @classmethod
    def load(cls, directory: Path, products: int | None = None) -> LexicalIndex:
        """Load ``directory``; with ``products``, refuse an index of another catalogue size
        (a version folder whose index and embeddings disagree must not load)."""
        bm25s = _bm25s()
        directory = Path(directory)
        config_path = directory / LEXICAL_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} lacks {LEXICAL_CONFIG_FILE}")
        config = LexicalConfig.from_dict(json.loads(config_path.read_text()))
        retriever = bm25s.BM25.load(str(directory), show_progress=False, **BM25S_FILES)
        indexed = int(retriever.scores["num_docs"])
        if products is not None and indexed != products:
            raise ValueError(f"BM25 index {directory} covers {indexed} products, not {products}")
        return cls(retriever, config, indexed)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 scores ``[len(queries), products]`` (0 where a product shares no term)."""
        out = np.zeros((len(queries), self.products), dtype=np.float32)
        for row, terms in enumerate(tokenize(queries, self.config)):
            if terms:
                out[row] = self.retriever.get_scores(terms)
        return out

    def sparse_scores(self, queries: Sequence[str]) -> LexicalHits:
        """The positive BM25 scores of a batch of queries, without a ``[queries, products]``
        array: only the postings of the queries' terms are read, all queries in one vectorised
        pass (no Python loop over products or postings). Values are exactly :meth:`scores`'
        (float32, each query's terms added in the same order), so the served top-k path ranks
        as the full-array one does; an index whose BM25 variant scores products that share
        no term (``bm25l``/``bm25+``) takes the full-array path."""
        retriever = self.retriever
        if getattr(retriever, "nonoccurrence_array", None) is not None:
            return LexicalHits.from_dense(self.scores(queries))
        postings = retriever.scores
        data, indices, indptr = postings["data"], postings["indices"], postings["indptr"]
        vocab = retriever.vocab_dict
        rows: list[int] = []
        tokens: list[int] = []
        for row, terms in enumerate(tokenize(queries, self.config)):
            ids = [vocab[t] for t in terms if t in vocab]
            rows.extend([row] * len(ids))
            tokens.extend(ids)
        n = len(queries)
        if not tokens:
            return LexicalHits.empty(n)
        tokens_arr = np.asarray(tokens, dtype=np.int64)
        starts, ends = indptr[tokens_arr].astype(np.int64), indptr[tokens_arr + 1].astype(np.int64)
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return LexicalHits.empty(n)
        # Position of every posting of every (query, term), in query then term order.
        offsets = np.cumsum(lengths) - lengths
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)
        keys = np.repeat(np.asarray(rows, dtype=np.int64), lengths) * self.products + indices[
            positions
        ].astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        values = np.zeros(len(unique), dtype=np.dtype(retriever.dtype))
        np.add.at(values, inverse, data[positions])  # in posting order, as get_scores adds
        keep = values > 0
        unique, values = unique[keep], values[keep]
        row_of = unique // self.products
        return LexicalHits(
            np.searchsorted(row_of, np.arange(n + 1)),
            (unique % self.products).astype(np.int64),
            values.astype(np.float32, copy=False),
        )


@dataclass(frozen=True)
class LexicalHits:
    """The positive BM25 scores of a batch of queries, row by row (CSR): query ``i``'s
    products are ``docs[indptr[i]:indptr[i + 1]]`` (ascending) with scores ``values[...]``."""

    indptr: np.ndarray
    docs: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, n: int) -> LexicalHits:
        return cls(np.zeros(n + 1, dtype=np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    @classmethod
    def from_dense(cls, scores: np.ndarray) -> LexicalHits:
        rows, docs = np.nonzero(scores > 0)
        indptr = np.searchsorted(rows, np.arange(scores.shape[0] + 1))
        return cls(indptr, docs.astype(np.int64), scores[rows, docs].astype(np.float32))

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[i], self.indptr[i + 1]
        return self.docs[start:end], self.values[start:end]

    def rows(self, selected: slice) -> LexicalHits:
        """The hits of the queries ``selected`` (a step-1 slice), as their own batch."""
        start, stop, _ = selected.indices(len(self))
        base = self.indptr[start]
        return LexicalHits(
            self.indptr[start : stop + 1] - base,
            self.docs[base : self.indptr[stop]],
            self.values[base : self.indptr[stop]],
        )


def top_indices(scores: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the ``depth`` best values of the 1-d ``scores``, best first. Ties go to the
    lower index, both in which tied values make the cut and in their order, so every caller
    (the served fusion, the BM25 baseline, hard-negative mining) ranks ties the same way."""
    depth = min(depth, scores.shape[0])
    if depth <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(scores, scores.shape[0] - depth)[scores.shape[0] - depth]  # depth-th best
    above = np.flatnonzero(scores > kth)
    chosen = np.concatenate([above, np.flatnonzero(scores == kth)[: depth - len(above)]])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


def positive_top_indices(scores: np.ndarray, depth: int) -> np.ndarray:
    """:func:`top_indices` among the positive scores only: a product BM25 scores 0 shares no
    term with the query, so BM25 did not retrieve it."""
    hits = np.flatnonzero(scores > 0)
    return hits[top_indices(scores[hits], depth)]


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high - low <= 0.0:
        return np.zeros_like(values, dtype=np.float64)
    return (values.astype(np.float64) - low) / (high - low)


def _ranked(
    candidates: np.ndarray, values: np.ndarray, dense_row: np.ndarray, products: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best ``candidates`` by fused ``values``, ties broken by the dense score, then by
    index (deterministic); when fewer than ``k`` were fused, padded with the best remaining
    products by dense score, scored below every fused one."""
    order = np.lexsort((candidates, -dense_row[candidates], -values))
    ranked, ranked_scores = candidates[order], values[order]
    if len(ranked) < k:
        taken = set(ranked.tolist())
        rest = [c for c in top_indices(dense_row, products) if c not in taken]
        floor = float(ranked_scores.min()) if len(ranked_scores) else 0.0
        ranked = np.concatenate([ranked, np.asarray(rest[: k - len(ranked)], dtype=np.int64)])
        ranked_scores = np.concatenate(
            [ranked_scores, np.full(k - len(ranked_scores), floor - 1.0)]
        )
    return ranked[:k], ranked_scores[:k]


def fuse(
    dense: np.ndarray, lexical: np.ndarray, config: FusionConfig, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best products per query by fused score: (indices ``[n, k]``, scores ``[n, k]``).

    ``dense`` and ``lexical`` are ``[n, products]`` score matrices. Products BM25 scores 0 share
    no term with the query and are not in the lexical list. Both lists are ``config.depth``
    deep whatever ``k`` is, so the first results are the same whether a client asks for 10 or
    the gate for 100 (deeper lists would add reciprocal ranks and reorder them). When the
    candidate set is smaller than ``k``, the remaining slots follow the dense order below it.
    """
    if dense.shape != lexical.shape:
        raise ValueError(f"dense scores {dense.shape} and BM25 scores {lexical.shape} differ")
    n, products = dense.shape
    k = min(k, products)
    depth = config.depth  # never k: the first results must not depend on how many are asked
    indices = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    for row in range(n):
        dense_top = top_indices(dense[row], depth)
        lexical_top = positive_top_indices(lexical[row], depth)
        candidates = np.union1d(dense_top, lexical_top)
        if config.method == "rrf":
            fused = np.zeros(products, dtype=np.float64)
            fused[dense_top] += 1.0 / (config.rrf_k + 1.0 + np.arange(len(dense_top)))
            fused[lexical_top] += 1.0 / (config.rrf_k + 1.0 + np.arange(len(lexical_top)))
            values = fused[candidates]
        else:
            values = config.dense_weight * _min_max(dense[row, candidates]) + (
                1.0 - config.dense_weight
            ) * _min_max(lexical[row, candidates])
        # Best fused first; ties broken by the dense score, then by index (deterministic).
        indices[row], scores[row] = _ranked(candidates, values, dense[row], products, k)
    return indices, scores


def fuse_sparse(
    dense: np.ndarray, lexical: LexicalHits, config: FusionConfig, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fuse` from the queries' BM25 hits (:meth:`LexicalIndex.sparse_scores`) instead of
    a full BM25 array: the same candidates (dense top-``depth`` and BM25 top-``depth``), the same
    fused scores and the same order, computed on the union of the two lists only. This is what
    the served model runs; :func:`fuse` stays as the reference it is tested against."""
    n, products = dense.shape
    if len(lexical) != n:
        raise ValueError(f"dense scores for {n} queries but BM25 hits for {len(lexical)}")
    k = min(k, products)
    depth = config.depth  # never k: the first results must not depend on how many are asked
    indices = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    for row in range(n):
        dense_row = dense[row]
        hit_docs, hit_values = lexical.row(row)
        dense_top = top_indices(dense_row, depth)
        lexical_top = hit_docs[top_indices(hit_values, depth)]  # docs ascend: ties to lower id
        candidates = np.union1d(dense_top, lexical_top)
        if config.method == "rrf":
            values = np.zeros(len(candidates), dtype=np.float64)
            for top in (dense_top, lexical_top):
                at = np.searchsorted(candidates, top)
                values[at] += 1.0 / (config.rrf_k + 1.0 + np.arange(len(top)))
        else:
            at = np.searchsorted(hit_docs, candidates)
            found = at < len(hit_docs)
            found[found] = hit_docs[at[found]] == candidates[found]
            bm25 = np.zeros(len(candidates), dtype=np.float32)
            bm25[found] = hit_values[at[found]]
            values = config.dense_weight * _min_max(dense_row[candidates]) + (
                1.0 - config.dense_weight
            ) * _min_max(bm25)
        indices[row], scores[row] = _ranked(candidates, values, dense_row, products, k)
    return indices, scores
