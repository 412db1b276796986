"""The training-query reference the online drift check compares served queries with.

Written at export time into the serving-artifacts folder as ``query_reference.json``, so it
travels with the version it describes (MLflow logs it with the other artifacts, the Triton
repository publishes it into the version folder) and a rolled-back version is judged against
its own training data. It is measured with that folder's own ``tokenizer.json`` and fp32
``encoder.onnx`` (:mod:`recsys.families.search.query_features`), so the served encoder defines the
space. It holds:

* the query length distributions (tokens and words) over bins cut at the training quantiles,
  plus an open-ended bin above the longest training query;
* the vocabulary of training-query words and the OOV rate expected of *new* in-distribution
  queries (estimated by 5-fold hold-out: judged against a vocabulary built from all training
  queries, the training queries themselves would have an OOV rate of 0, and every real sample
  would look drifted);
* the rate of the tokenizer's unknown token;
* the normalised centroid of the training-query embeddings, its length, and the spread (mean
  cosine distance of a training query to the centroid), the yardstick a centroid shift is
  measured in.

Training queries are de-duplicated first: the relevance data repeats a query once per judged
product, which says how many products were judged, not how often people search for it.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from recsys.families.search.query_features import (
    QueryFeaturizer,
    normalised_centroid,
    query_embeddings,
)
from recsys.triton.repository import file_sha256

log = logging.getLogger(__name__)

QUERY_REFERENCE_FILE = "query_reference.json"
REFERENCE_FORMAT = 1
MAX_LENGTH_BINS = 8
MAX_VOCABULARY = 100_000
MAX_EMBEDDED_QUERIES = 2000
OOV_FOLDS = 5


class QueryReferenceError(ValueError):
    """No usable reference: too few training queries, or an unreadable or foreign file."""


@dataclass(frozen=True)
class LengthHistogram:
    """Counts over integer-length bins: bin ``i`` holds lengths in ``[edges[i], edges[i+1])``,
    the last bin everything from ``edges[-1]`` up."""

    edges: list[int]
    counts: list[int]

    def bin_counts(self, lengths: Sequence[int]) -> list[int]:
        """``lengths`` counted over these bins."""
        index = np.searchsorted(np.asarray(self.edges), np.asarray(lengths, dtype=int), "right")
        return np.bincount(index - 1, minlength=len(self.edges)).astype(int).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LengthHistogram:
        edges, counts = [int(e) for e in data["edges"]], [int(c) for c in data["counts"]]
        if not edges or len(edges) != len(counts) or edges != sorted(set(edges)):
            raise ValueError("length histogram needs increasing edges, one count per edge")
        return cls(edges=edges, counts=counts)


def quantile_histogram(lengths: Sequence[int], max_bins: int = MAX_LENGTH_BINS) -> LengthHistogram:
    """Bins holding about equal shares of ``lengths`` (integer lengths cannot always be split
    evenly), starting at 0, plus an empty open-ended bin past the longest one: equal-mass bins
    keep the PSI sensitive where the training queries are, and the overflow bin catches
    queries longer than any seen in training."""
    values = np.sort(np.asarray(lengths, dtype=int))
    edges = [0]
    target = len(values) / max_bins
    unique, counts = np.unique(values, return_counts=True)
    mass = 0
    for value, count in zip(unique[:-1], counts[:-1], strict=True):
        mass += int(count)
        if mass >= target * len(edges):
            edges.append(int(value) + 1)
    edges.append(int(values[-1]) + 1)
    histogram = LengthHistogram(edges=edges, counts=[0] * len(edges))
    return LengthHistogram(edges=edges, counts=histogram.bin_counts(values.tolist()))


def _fold(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) % OOV_FOLDS


def held_out_oov_rate(queries: Sequence[str], words: Sequence[Sequence[str]]) -> float:
    """Share of words of unseen in-distribution queries missing from the vocabulary: each query
    is judged against the words of the folds it is not in (folds by a stable hash)."""
    per_fold = [Counter() for _ in range(OOV_FOLDS)]
    for text, query_words in zip(queries, words, strict=True):
        per_fold[_fold(text)].update(set(query_words))
    total = sum(per_fold, Counter())
    missing = seen = 0
    for text, query_words in zip(queries, words, strict=True):
        own = per_fold[_fold(text)]
        for word in query_words:
            seen += 1
            missing += total[word] - own[word] == 0
    return missing / seen if seen else 0.0


def write_query_reference(
    artifacts_dir: Path,
    train_queries: list[str],
    *,
    min_queries: int = 20,
    seed: int = 13,
) -> Path:
    """Measure ``train_queries`` with the folder's tokenizer and fp32 encoder and write
    ``<artifacts_dir>/query_reference.json``; return its path.

    Raises :class:`QueryReferenceError` with fewer than ``min_queries`` distinct non-empty
    queries: a reference from a handful of queries would make every sample look drifted. At
    most :data:`MAX_EMBEDDED_QUERIES` queries (a seeded sample) are embedded, which bounds the
    export time; lengths, vocabulary and rates use them all.
    """
    artifacts_dir = Path(artifacts_dir)
    queries = list(dict.fromkeys(q.strip() for q in train_queries if q and q.strip()))
    if len(queries) < min_queries:
        raise QueryReferenceError(
            f"{len(queries)} distinct training queries (< {min_queries}): too few for a drift "
            "reference"
        )
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    max_length = int(manifest.get("max_query_tokens", 64))
    featurizer = QueryFeaturizer(artifacts_dir / "tokenizer.json")
    features = featurizer.features(queries)
    vocabulary = Counter(word for words in features.words for word in set(words))
    embedded = queries
    if len(queries) > MAX_EMBEDDED_QUERIES:
        embedded = random.Random(seed).sample(queries, MAX_EMBEDDED_QUERIES)
    embeddings = query_embeddings(artifacts_dir, embedded, max_length)
    centroid, centroid_norm = normalised_centroid(embeddings)
    cosines = embeddings @ centroid
    reference = {
        "format": REFERENCE_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "queries": len(queries),
        "embedded_queries": len(embedded),
        "encoder_file": "encoder.onnx",
        "encoder_sha256": file_sha256(artifacts_dir / "encoder.onnx"),
        "max_query_tokens": max_length,
        "token_length": quantile_histogram(features.token_lengths).to_dict(),
        "word_length": quantile_histogram(features.word_lengths).to_dict(),
        "vocabulary": sorted(w for w, _ in vocabulary.most_common(MAX_VOCABULARY)),
        "oov_rate": held_out_oov_rate(queries, features.words),
        "unk_rate": features.unk_rate,
        "centroid": [round(float(x), 7) for x in centroid],
        "centroid_norm": centroid_norm,
        "mean_cosine_to_centroid": float(cosines.mean()),
        "std_cosine_to_centroid": float(cosines.std()),
        "spread": float(max(1.0 - cosines.mean(), 1e-6)),
    }
    path = artifacts_dir / QUERY_REFERENCE_FILE
    path.write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")
    log.info(
        "query reference for %s: %d queries, %d words, held-out OOV %.3f, UNK %.4f, spread %.3f",
        artifacts_dir,
        len(queries),
        len(reference["vocabulary"]),
        reference["oov_rate"],
        reference["unk_rate"],
        reference["spread"],
    )
    return path


@dataclass(frozen=True)
class QueryReference:
    """A parsed ``query_reference.json`` (see the module docstring for what each part is)."""

    queries: int
    encoder_sha256: str
    max_query_tokens: int
    token_length: LengthHistogram
    word_length: LengthHistogram
    vocabulary: frozenset[str]
    oov_rate: float
    unk_rate: float
    centroid: np.ndarray
    centroid_norm: float
    spread: float

    @classmethod
    def load(cls, path: Path) -> QueryReference:
        """Read and check a reference; :class:`QueryReferenceError` names the file when it is
        unreadable, of another format, or inconsistent."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != REFERENCE_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(
                queries=int(data["queries"]),
                encoder_sha256=str(data["encoder_sha256"]),
                max_query_tokens=int(data["max_query_tokens"]),
                token_length=LengthHistogram.from_dict(data["token_length"]),
                word_length=LengthHistogram.from_dict(data["word_length"]),
                vocabulary=frozenset(map(str, data["vocabulary"])),
                oov_rate=float(data["oov_rate"]),
                unk_rate=float(data["unk_rate"]),
                centroid=np.asarray(data["centroid"], dtype=np.float64),
                centroid_norm=float(data["centroid_norm"]),
                spread=float(data["spread"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QueryReferenceError(f"unusable query reference {path}: {exc}") from exc

    def check_encoder(self, version_dir: Path) -> None:
        """Refuse a folder whose ``encoder.onnx`` is not the one the reference was built with:
        its embeddings would live in another space and every centroid would look moved."""
        actual = file_sha256(Path(version_dir) / "encoder.onnx")
        if actual != self.encoder_sha256:
            raise QueryReferenceError(
                f"{version_dir}/encoder.onnx is not the encoder its query reference was built "
                f"with (sha256 {actual[:12]} != {self.encoder_sha256[:12]})"
            )
