"""The fast training input pipeline on the tiny offline BERT: tokenised once, length-bucketed
batches, seeded reproducibility, and the reranker's mined hard negatives.

Everything runs the real tokenizer and model; nothing is timed (speed is the benchmark's job,
``benchmarks/train_throughput.py``), only the properties the speed must not cost."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys.data import read_relevance_csv, split_by_query
from recsys.families.search.encoder import load_tokenizer
from recsys.families.search.reranker import (
    RerankerParams,
    _encode_pairs,
    _tokenised_run,
    fine_tune_reranker,
    training_pairs,
    usable_hard_negatives,
)
from recsys.families.search.training import (
    PairTokens,
    TrainingParams,
    _batches,
    bucketed_batches,
    fine_tune,
    positive_pairs,
)


@pytest.fixture(scope="module")
def train_frame(homedepot_sample: Path) -> pd.DataFrame:
    return split_by_query(read_relevance_csv(homedepot_sample), test_fraction=0.2, seed=13).train


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path):
    return load_tokenizer(tiny_bert_dir)


@pytest.fixture(scope="module")
def shared_title_pairs(train_frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Positive pairs where most titles serve several queries (as popular products do), so a
    random batch would often hold one title twice."""
    pairs = positive_pairs(train_frame, 2.33)
    queries = sorted({query for query, _ in pairs})
    titles = sorted({title for _, title in pairs})[:40]
    rng = random.Random(0)
    return [(rng.choice(queries), title) for title in titles for _ in range(rng.randint(1, 5))]


def judged_sets(frame: pd.DataFrame) -> dict[str, set[str]]:
    judged: dict[str, set[str]] = {}
    for query, title, _ in training_pairs(frame):
        judged.setdefault(query, set()).add(title)
    return judged


def test_bucketing_keeps_every_pair_once_and_no_title_twice(shared_title_pairs, tokenizer):
    data = PairTokens.build(shared_title_pairs, tokenizer, max_length=64)
    rng = random.Random(5)
    for batch_size in (4, 8, 16):
        for _ in range(3):  # a new shuffle every epoch
            batches = _batches(data, batch_size, rng)
            assert sorted(i for batch in batches for i in batch) == list(range(len(data)))
            for batch in batches:
                titles = [shared_title_pairs[i][1] for i in batch]
                assert 2 <= len(batch) <= batch_size
                assert len(set(titles)) == len(titles), "a title repeats in a batch"


def test_bucketed_batches_pad_less_than_random_batches(train_frame, tokenizer):
    pairs = positive_pairs(train_frame, 2.33)
    data = PairTokens.build(pairs, tokenizer, max_length=64)
    bucketed = [data.batch(rows) for rows in _batches(data, 16, random.Random(1))]
    order = list(range(len(data)))
    random.Random(1).shuffle(order)
    shuffled = [data.batch(order[i : i + 16]) for i in range(0, len(order), 16)]
    assert sum(b.tokens for b in bucketed) == sum(b.tokens for b in shuffled)
    assert sum(b.padded_tokens for b in bucketed) < sum(b.padded_tokens for b in shuffled)


def test_bucketed_batches_follow_the_seed_and_shuffle_between_epochs():
    lengths = torch.tensor([random.Random(3).randint(3, 30) for _ in range(200)])
    first = bucketed_batches([lengths], 16, random.Random(7))
    assert first == bucketed_batches([lengths], 16, random.Random(7))
    rng = random.Random(7)
    assert bucketed_batches([lengths], 16, rng) != bucketed_batches([lengths], 16, rng)
    for batch in first:  # bucketed: a batch spans a narrow band of lengths
        assert int(lengths[batch].max() - lengths[batch].min()) <= 2


def test_batches_are_the_tokens_serving_would_feed(train_frame, tokenizer):
    """A gathered batch equals tokenising its texts on the spot, padding to its longest row."""
    pairs = positive_pairs(train_frame, 2.33)
    data = PairTokens.build(pairs, tokenizer, max_length=12)
    for rows in _batches(data, 16, random.Random(2))[:5]:
        batch = data.batch(rows)
        for side, column in (("query", 0), ("title", 1)):
            texts = [pairs[i][column] for i in rows]
            expected = tokenizer(
                texts, padding=True, truncation=True, max_length=12, return_tensors="pt"
            )
            assert torch.equal(batch.tensors[f"{side}_input_ids"], expected["input_ids"])
            assert torch.equal(batch.tensors[f"{side}_attention_mask"], expected["attention_mask"])


def test_seeded_runs_reproduce_the_same_losses(train_frame, tiny_bert_dir, tmp_path):
    params = TrainingParams(batch_size=16, learning_rate=1e-3, max_steps=5, seed=4)
    first = fine_tune(train_frame, tiny_bert_dir, tmp_path / "a", params)
    again = fine_tune(train_frame, tiny_bert_dir, tmp_path / "b", params)
    other = fine_tune(
        train_frame,
        tiny_bert_dir,
        tmp_path / "c",
        TrainingParams(**{**params.to_dict(), "seed": 5}),
    )
    assert first.steps == 5 and len(first.step_losses) == 5
    assert first.step_losses == again.step_losses
    assert first.step_losses != other.step_losses
    assert first.tokens > 0 and first.padded_tokens >= first.tokens
    assert first.samples == again.samples <= 5 * 16  # an epoch's short last batch may be in
    assert first.prepare_seconds >= 0


def test_hard_negatives_skip_judged_pairs_and_repeats(train_frame):
    judged = judged_sets(train_frame)
    query, title = next(iter(training_pairs(train_frame)))[:2]
    unjudged = next(t for t in train_frame["product_title"] if t not in judged[query])
    kept, dropped = usable_hard_negatives(
        [(query, title), (query, unjudged), (query, unjudged)], judged
    )
    assert kept == [(query, unjudged)] and dropped == 2


def test_planned_run_trains_hard_negatives_at_target_zero(train_frame, tokenizer):
    """Every training row (judged and mined) is in each epoch once; mined and in-batch
    negatives have target 0 and are never judged for their query; every batch holds exactly
    the tokens serving's pair tokenisation (longest-first truncation) would produce."""
    judged = judged_sets(train_frame)
    pairs = training_pairs(train_frame)
    titles = sorted({title for _, title, _ in pairs})
    mined = [
        (query, next(t for t in titles if t not in judged[query])) for query in sorted(judged)[:20]
    ]
    rows = pairs + [(query, title, 0.0) for query, title in mined]
    params = RerankerParams(batch_size=16, max_length=24, epochs=2)
    data = _tokenised_run(rows, judged, tokenizer, params, 10**6, random.Random(3))
    assert len(data.epochs) == 2
    for epoch in data.epochs:
        trained = Counter(row for batch in epoch for row in batch if row < len(rows))
        assert trained == Counter(range(len(rows)))
        for batch in epoch:
            tensors = data.batch(batch).tensors
            texts = [data.pairs[row] for row in batch]
            expected = _encode_pairs(tokenizer, [q for q, _ in texts], [t for _, t in texts], 24)
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                assert torch.equal(tensors[name], expected[name]), name
    for row, (query, title) in enumerate(data.pairs):
        if row >= len(pairs):
            assert data.targets[row] == 0.0 and title not in judged[query]
    assert data.in_batch_negatives > 0


def test_reranker_uses_hard_negatives_and_lowers_its_loss(train_frame, tiny_bert_dir, tmp_path):
    judged = judged_sets(train_frame)
    titles = sorted(set(train_frame["product_title"]))
    query = sorted(judged)[0]
    mined = [(q, next(t for t in titles if t not in judged[q])) for q in sorted(judged)[:30]]
    mined.append((query, next(iter(judged[query]))))  # judged: must be skipped
    params = RerankerParams(batch_size=16, learning_rate=1e-3, epochs=3, max_length=48)
    result = fine_tune_reranker(
        train_frame, tiny_bert_dir, tmp_path / "reranker", params, extra_negatives=mined
    )
    assert result.pairs == len(train_frame)
    assert result.hard_negatives == 30
    assert result.steps == 3 * -(-(len(train_frame) + 30) // 16)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
