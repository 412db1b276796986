"""What the drift check measures on a set of queries, computed the way the served model sees them.

The served model tokenises with its version folder's ``tokenizer.json`` and embeds with its
encoder, so the features come from exactly those files: the training reference
(:mod:`recsys.families.search.drift_reference`) and the check on sampled traffic
(:mod:`recsys.monitoring.drift`) both go through :class:`QueryFeaturizer`, and differences
between them are differences in the queries, never in how they were measured.

Per query: its length in tokens (without special tokens and without truncation, so a 300-token
paste shows up as what it is) and in words, its words (the tokenizer's own normalizer and
pre-tokenizer split them, so casing and punctuation count as the model counts them), and how
many of its tokens are the unknown token (text the vocabulary cannot spell at all, e.g. another
script).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class QueryFeatures:
    """Token-level facts about a list of queries (one entry per query, in order)."""

    token_lengths: list[int] = field(default_factory=list)
    word_lengths: list[int] = field(default_factory=list)
    words: list[list[str]] = field(default_factory=list)
    unk_tokens: int = 0
    tokens: int = 0

    @property
    def unk_rate(self) -> float:
        """Share of all tokens that are the unknown token (0 without tokens)."""
        return self.unk_tokens / self.tokens if self.tokens else 0.0


class QueryFeaturizer:
    """Tokenizer-side features of queries, from a serving version's ``tokenizer.json``."""

    def __init__(self, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        unk_token = getattr(self.tokenizer.model, "unk_token", None) or "[UNK]"
        self.unk_id = self.tokenizer.token_to_id(unk_token)

    def words(self, text: str) -> list[str]:
        """The words of ``text`` as the tokenizer splits them (punctuation-only pieces dropped:
        they say nothing about the vocabulary)."""
        normalizer = self.tokenizer.normalizer
        pre_tokenizer = self.tokenizer.pre_tokenizer
        normalized = normalizer.normalize_str(text) if normalizer is not None else text.lower()
        if pre_tokenizer is not None:
            pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalized)]
        else:
            pieces = normalized.split()
        return [piece for piece in pieces if any(ch.isalnum() for ch in piece)]

    def features(self, queries: Sequence[str]) -> QueryFeatures:
        result = QueryFeatures()
        encodings = self.tokenizer.encode_batch(list(queries), add_special_tokens=False)
        for text, encoding in zip(queries, encodings, strict=True):
            ids = encoding.ids
            words = self.words(text)
            result.token_lengths.append(len(ids))
            result.word_lengths.append(len(words))
            result.words.append(words)
            result.tokens += len(ids)
            if self.unk_id is not None:
                result.unk_tokens += sum(1 for token in ids if token == self.unk_id)
        return result


def query_embeddings(version_dir: Path, queries: Sequence[str], max_length: int) -> np.ndarray:
    """L2-normalised embeddings of ``queries`` by the version's fp32 ``encoder.onnx``.

    Always the fp32 graph, even where the manifest serves an INT8 one: the reference and every
    check must share one embedding space, and fp32 is the one every version has.
    """
    from recsys.families.search.evaluation import onnx_embedder

    embed = onnx_embedder(
        version_dir / "encoder.onnx", version_dir / "tokenizer.json", max_length=max_length
    )
    vectors = embed(list(queries)).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def normalised_centroid(embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit vector along the mean of ``embeddings`` and the mean's length (its "r": 1 when
    all queries embed alike, near 0 when they point every way)."""
    mean = embeddings.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean), norm
