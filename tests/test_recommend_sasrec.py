"""SASRec of the recommendation family (issue #11): training, determinism, leakage-free
histories, quality on a sequence with a known answer, and the ONNX export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.families.recommend.baselines import Popularity, RandomScorer
from recsys.families.recommend.data import read_interactions
from recsys.families.recommend.evaluate import build_cases, evaluate_sampled, sample_negatives
from recsys.families.recommend.sasrec import (
    ONNX_INPUT,
    ONNX_OUTPUT,
    PAD,
    SASRec,
    SASRecParams,
    encode_histories,
    export_onnx,
)
from recsys.families.recommend.split import ITEM_IDX, USER_IDX, leave_one_out

SAMPLE = Path(__file__).parent / "fixtures" / "amazon_grocery_sample"
SMALL = SASRecParams(dim=16, blocks=2, heads=2, max_len=20, epochs=8, batch_size=16, lr=5e-3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a busy CI machine a second intra-op thread only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split():
    return leave_one_out(read_interactions(SAMPLE / "train.tsv"))


@pytest.fixture(scope="module")
def model(split):
    return SASRec(SMALL).fit(split)


def _sequences(split) -> dict[int, list[int]]:
    train = split.train
    return {
        int(user): group[ITEM_IDX].tolist() for user, group in train.groupby(USER_IDX, sort=True)
    }


def test_loss_decreases_and_one_line_per_epoch(split, model, caplog):
    assert len(model.loss_history) == SMALL.epochs == len(model.epoch_seconds)
    assert all(np.isfinite(model.loss_history))
    assert np.mean(model.loss_history[-2:]) < model.loss_history[0] - 0.05
    with caplog.at_level("INFO", logger="recsys.families.recommend.sasrec"):
        SASRec(replace(SMALL, epochs=2)).fit(split)
    lines = [r.getMessage() for r in caplog.records if "SASRec epoch" in r.getMessage()]
    assert len(lines) == 2 and lines[-1].startswith("SASRec epoch 2/2 loss ")
    assert lines[-1].endswith(" s")


def test_same_seed_same_model_other_seed_other_model(split, model):
    users = np.arange(split.n_users)
    again = SASRec(SMALL).fit(split)
    assert again.loss_history == model.loss_history
    np.testing.assert_array_equal(again.scores(users, "test"), model.scores(users, "test"))
    # nothing depends on the number of epochs, so a shorter run is a prefix of the longer one
    assert SASRec(replace(SMALL, epochs=2)).fit(split).loss_history == model.loss_history[:2]
    assert (
        SASRec(replace(SMALL, epochs=2, seed=1)).fit(split).loss_history != (model.loss_history[:2])
    )


def test_fit_leaves_the_global_torch_rng_alone(split):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SASRec(replace(SMALL, epochs=1)).fit(split)
    assert torch.equal(torch.rand(3), expected)


def test_histories_never_hold_held_out_items(split, model):
    """Validation scores from train only; test from train + the validation item; the test
    item is never appended (it may occur earlier in train: Amazon users re-buy)."""
    sequences = _sequences(split)
    validation = split.validation.set_index(USER_IDX)[ITEM_IDX]
    users = split.test[USER_IDX].to_numpy()
    for_validation = model.histories(users, "validation")
    for_test = model.histories(users, "test")
    max_len = SMALL.max_len
    for row, user in enumerate(users):
        train = sequences[int(user)]
        expected_validation = encode_histories([np.array(train)], max_len)[0]
        np.testing.assert_array_equal(for_validation[row], expected_validation)
        held = int(validation[user])
        expected_test = [*train, held] if held >= 0 else train
        np.testing.assert_array_equal(
            for_test[row], encode_histories([np.array(expected_test)], max_len)[0]
        )
    # the histories (and so the scores) do not depend on the test frame at all
    shuffled_test = split.test.assign(
        **{ITEM_IDX: np.roll(split.test[ITEM_IDX].to_numpy(), 1), "item_id": "0"}
    )
    changed = replace(split, test=shuffled_test)
    probe = SASRec(replace(SMALL, epochs=0)).fit(changed)
    np.testing.assert_array_equal(probe.histories(users, "test"), for_test)
    np.testing.assert_array_equal(probe.histories(users, "validation"), for_validation)
    with pytest.raises(ValueError, match="stage"):
        model.histories(users, "train")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not fitted"):
        SASRec(SMALL).scorer("test")(users)


def test_encode_histories_left_pads_cuts_and_shifts():
    tokens = encode_histories([np.array([4, 7]), np.arange(6), np.array([], dtype=int)], 4)
    assert tokens.tolist() == [[PAD, PAD, 5, 8], [3, 4, 5, 6], [PAD] * 4]
    with pytest.raises(ValueError, match="unseen"):
        encode_histories([np.array([3, -1])], 4)


def _chain_data(n_users=240, n_items=140, seed=3) -> pd.DataFrame:
    """Every user walks a fixed random permutation of the items: the next item is a
    deterministic function of the previous one, so the held-out item is fully predictable
    from the last one, and item popularity carries no signal."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)
    rows = []
    for user in range(n_users):
        item = int(rng.integers(n_items))
        for step in range(int(rng.integers(6, 11))):
            rows.append((f"u{user}", f"i{item}", 1_000_000 + step))
            item = int(successor[item])
    return pd.DataFrame(rows, columns=["user_id", "item_id", "time"])


def test_sasrec_learns_a_deterministic_sequence_and_beats_popularity():
    chain = leave_one_out(_chain_data())
    params = SASRecParams(
        dim=32, blocks=1, max_len=12, dropout=0.1, lr=1e-2, epochs=10, batch_size=32
    )
    fitted = SASRec(params).fit(chain)
    for stage in ("validation", "test"):
        cases = build_cases(chain, stage)
        negatives = sample_negatives(cases, seed=7)
        sasrec = evaluate_sampled(fitted.scorer(stage), cases, negatives)
        popularity = evaluate_sampled(Popularity().fit(chain.train_matrix()), cases, negatives)
        random = evaluate_sampled(RandomScorer(chain.n_items), cases, negatives)
        seen = 1 - sasrec["n_unseen_targets"] / sasrec["n_cases"]
        assert sasrec["HR@10"] >= 0.95 * seen, (stage, sasrec)
        assert sasrec["HR@10"] > popularity["HR@10"] + 0.5
        assert sasrec["HR@10"] > random["HR@10"] + 0.5


def test_onnx_export_matches_torch_for_batches_of_one_and_three(split, model, tmp_path):
    import onnxruntime as ort  # a requirement of the platform: its serving runs on it

    path = export_onnx(model, tmp_path / "sasrec.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [ONNX_INPUT]
    assert [o.name for o in session.get_outputs()] == [ONNX_OUTPUT]
    lengths = np.array([len(s) for s in model.train_sequences])
    users = np.array([int(np.argmax(lengths)), int(np.argmin(lengths)), 0])
    for batch in (users[:1], users):
        tokens = model.histories(batch, "test")
        (onnx_scores,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: tokens})
        with torch.no_grad():
            torch_scores = model.net(torch.from_numpy(tokens)).numpy()
        assert onnx_scores.shape == (len(batch), split.n_items)
        assert onnx_scores.dtype == np.float32
        np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4, rtol=0)
        # the evaluation path trims all-padding columns: same scores as the padded input
        np.testing.assert_allclose(model.scores(batch, "test"), torch_scores, atol=1e-5, rtol=0)
