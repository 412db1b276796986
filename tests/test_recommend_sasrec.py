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
from recsys.families.recommend.data import read_interactions, read_item_meta
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


# --- loss, early stopping and item relations ---------------------------------------------


def test_both_losses_train_and_the_default_is_cross_entropy(split, model):
    assert SASRecParams().loss == "ce" and model.params.loss == "ce"
    bce = SASRec(replace(SMALL, loss="bce", eval_every=0)).fit(split)
    assert len(bce.loss_history) == SMALL.epochs and all(np.isfinite(bce.loss_history))
    assert np.mean(bce.loss_history[-2:]) < bce.loss_history[0] - 0.05
    # cross-entropy over the catalogue starts near log(n_items) and goes down
    assert abs(model.loss_history[0] - np.log(split.n_items)) < 1.0
    with pytest.raises(ValueError, match="loss"):
        SASRecParams(loss="mse")  # type: ignore[arg-type]


def test_early_stopping_keeps_the_best_validation_epoch(split):
    params = replace(SMALL, epochs=40, eval_every=2, patience=3)
    fitted = SASRec(params).fit(split)
    curve = fitted.validation_curve
    summary = fitted.describe()
    assert [epoch for epoch, _ in curve] == list(range(2, 2 * len(curve) + 1, 2))
    best_epoch, best_score = max(curve, key=lambda point: (point[1], -point[0]))
    assert fitted.best_epoch == summary["best_epoch"] == best_epoch
    assert summary["validation_curve"] == [list(point) for point in curve]
    # it stopped `patience` checks after the best one, and kept that epoch's weights
    assert len(fitted.loss_history) == summary["epochs_run"] < params.epochs
    assert curve[-1][0] == best_epoch + params.eval_every * params.patience
    assert round(fitted._validation_score(*fitted._validation_probe(split)), 5) == best_score
    # the test frame plays no part in the fit (not even in the validation negatives)
    shuffled_test = split.test.assign(**{ITEM_IDX: np.roll(split.test[ITEM_IDX].to_numpy(), 1)})
    blind = SASRec(params).fit(replace(split, test=shuffled_test))
    assert blind.validation_curve == curve and blind.loss_history == fitted.loss_history
    # the kept weights are the ones a run of exactly best_epoch epochs ends with
    exact = SASRec(replace(params, epochs=best_epoch, eval_every=0)).fit(split)
    users = np.arange(split.n_users)
    np.testing.assert_allclose(
        fitted.scores(users, "test"), exact.scores(users, "test"), atol=1e-5, rtol=0
    )


def _related_chain(n_users=240, n_items=140, seed=3):
    """The chain data, and item metadata whose also-bought list of every item holds its
    successor among 4 random items: the relation alone predicts the next item."""
    frame = _chain_data(n_users, n_items, seed)
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)  # the same permutation _chain_data draws first
    rows = []
    for item in range(n_items):
        related = [int(successor[item]), *rng.choice(n_items, 4, replace=False).tolist()]
        rng.shuffle(related)
        rows.append((f"i{item}", "0", tuple(f"i{r}" for r in related), ()))
    meta = pd.DataFrame(rows, columns=["item_id", "i_category", "r_complement", "r_substitute"])
    return frame, meta


def test_relations_are_learned_and_optional():
    frame, meta = _related_chain()
    chain = leave_one_out(frame)
    params = SASRecParams(dim=8, blocks=1, max_len=12, epochs=3, batch_size=32, lr=3e-2)
    with_relations = SASRec(params, meta).fit(chain)
    without = SASRec(params).fit(chain)
    assert without.describe()["relations"] is None and without.net.window == 0
    summary = with_relations.describe()
    assert summary["relations"][0] == 1  # r_substitute is empty: one relation kept
    assert summary["relations"][1] == chain.n_items + 1
    weight = np.array(summary["relation_weight"])
    assert weight.shape == (1, params.relation_window) and weight[0, 0] > 0
    assert weight[0, 0] > abs(weight[0, 1:]).max()  # the latest item's relations count most
    cases = build_cases(chain, "test")
    negatives = sample_negatives(cases, seed=7)
    related = evaluate_sampled(with_relations.scorer("test"), cases, negatives)
    plain = evaluate_sampled(without.scorer("test"), cases, negatives)
    assert related["NDCG@5"] > plain["NDCG@5"] + 0.1, (related, plain)
    # no related item is the item itself or padding; relation_window 0 switches them off
    table = with_relations.relations.numpy()
    tokens = np.arange(chain.n_items + 1)[:, None]
    assert not (table[0, 1:] == tokens[1:]).any() and not table[0, PAD].any()
    assert SASRec(replace(params, relation_window=0, epochs=0), meta).fit(chain).net.window == 0


def test_onnx_export_with_relations_matches_torch(split, tmp_path):
    import onnxruntime as ort

    meta = read_item_meta(SAMPLE / "item_meta.tsv")
    fitted = SASRec(replace(SMALL, epochs=2), meta).fit(split)
    assert fitted.net.window == SMALL.relation_window
    with torch.no_grad():
        fitted.net.relation_weight.add_(0.5)  # make the bonus matter in the comparison
    session = ort.InferenceSession(
        str(export_onnx(fitted, tmp_path / "related.onnx")), providers=["CPUExecutionProvider"]
    )
    users = np.arange(split.n_users)
    tokens = fitted.histories(users, "test")
    (onnx_scores,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: tokens})
    with torch.no_grad():
        torch_scores = fitted.net(torch.from_numpy(tokens)).numpy()
        plain = fitted.net.item_vectors() @ fitted.net.hidden(torch.from_numpy(tokens))[:, -1].T
    assert np.abs(torch_scores - plain.T.numpy()).max() > 0.4  # the relations are in the graph
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(fitted.scores(users, "test"), torch_scores, atol=1e-5, rtol=0)


def test_refit_trains_the_best_epoch_count_on_train_plus_validation(split):
    params = replace(SMALL, epochs=20, eval_every=2, patience=2, refit=True)
    fitted = SASRec(params).fit(split)
    summary = fitted.describe()
    first = summary["first_fit"]
    assert summary["refitted"] and fitted.best_epoch == summary["best_epoch"]
    assert len(fitted.loss_history) == fitted.best_epoch <= len(first["loss_history"])
    # same seed, more targets (the validation items): another loss curve
    assert fitted.loss_history != first["loss_history"][: fitted.best_epoch]
    again = SASRec(params).fit(split)
    assert again.loss_history == fitted.loss_history
    # histories are the same as without refit: the test item stays out
    users = split.test[USER_IDX].to_numpy()
    plain = SASRec(replace(params, refit=False, epochs=0)).fit(split)
    np.testing.assert_array_equal(fitted.histories(users, "test"), plain.histories(users, "test"))
