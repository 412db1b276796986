"""Groundwork of the recommendation family (issue #11): reader, suite, split, evaluation,
baselines, on the committed Amazon Grocery sample and on hand-made cases with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.families.recommend.baselines import BPR, ItemKNN, Popularity, RandomScorer
from recsys.families.recommend.data import (
    BAD_LIST,
    NOT_A_TIME,
    NOT_A_TOKEN,
    NULL_WORD,
    READ_REJECTS,
    TIME_TOO_LARGE,
    DataFormatError,
    catalogue_items,
    read_interactions,
    read_item_meta,
)
from recsys.families.recommend.evaluate import (
    build_cases,
    evaluate_full,
    evaluate_sampled,
    full_ranks,
    ndcg,
    sample_negatives,
    sampled_ranks,
)
from recsys.families.recommend.split import UNSEEN, leave_one_out
from recsys.families.recommend.suite import (
    DERIVED_COLUMNS,
    SUITE_NAME,
    InteractionRules,
    validate_interactions,
)
from recsys.quality import DataQualityError, load_suite

SAMPLE = Path(__file__).parent / "fixtures" / "amazon_grocery_sample"
SAMPLE_ROWS = 720
NOW = 1_700_000_000  # fixed "latest time" so the suite does not depend on the clock


@pytest.fixture(scope="module")
def interactions() -> pd.DataFrame:
    return read_interactions(SAMPLE / "train.tsv")


@pytest.fixture(scope="module")
def catalogue() -> frozenset[str]:
    return catalogue_items(read_item_meta(SAMPLE / "item_meta.tsv"))


@pytest.fixture(scope="module")
def split(interactions):
    return leave_one_out(interactions)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- reader -----------------------------------------------------------------------------


def test_reader_keeps_every_row_and_records_each_bad_cell(tmp_path):
    lines = (SAMPLE / "train.tsv").read_text().splitlines()[:6]
    hostile = [
        " 7\t3\t1208908800",  # whitespace: " 7" and "7" must not become two users
        "\u0663\t3\t1208908800",  # Arabic-Indic digit three
        "=cmd|x\t3\t1208908800",  # spreadsheet formula
        "NA\t3\t1208908800",  # missing-value word
        "7\t3\t1.2e9",  # exponent
        "7\t3\t-5",  # sign
        "7\t3\t0012",  # leading zero
        "7\t3\t99999999999999999999",  # beyond int64
        "7\t\t1208908800",  # empty item
    ]
    frame = read_interactions(_write(tmp_path / "x.tsv", lines + hostile))
    assert len(frame) == 5 + len(hostile)
    rejects = frame.attrs[READ_REJECTS]
    assert rejects == {
        5: {"user_id": [NOT_A_TOKEN, " 7"]},
        6: {"user_id": [NOT_A_TOKEN, "\u0663"]},
        7: {"user_id": [NOT_A_TOKEN, "=cmd|x"]},
        8: {"user_id": [NULL_WORD, "NA"]},
        9: {"time": [NOT_A_TIME, "1.2e9"]},
        10: {"time": [NOT_A_TIME, "-5"]},
        11: {"time": [NOT_A_TIME, "0012"]},
        12: {"time": [TIME_TOO_LARGE, "99999999999999999999"]},
    }
    assert frame.loc[list(rejects)].isna().sum().sum() == len(rejects)  # missing, not cast
    assert pd.isna(frame.loc[13, "item_id"]) and 13 not in rejects  # empty is only missing
    # ids are the file's text (tokens, never numbers); good times are exact int64
    first = lines[1].split("\t")
    assert frame.loc[0, "user_id"] == first[0] and isinstance(frame.loc[0, "user_id"], str)
    assert frame.loc[0, "time"] == int(first[2])


def test_reader_detects_commas_and_refuses_what_is_not_interactions(tmp_path):
    frame = read_interactions(_write(tmp_path / "c.csv", ["user_id,item_id,time", "A1,B000E1,5"]))
    assert frame.to_dict("records") == [{"user_id": "A1", "item_id": "B000E1", "time": 5}]
    with pytest.raises(DataFormatError, match=r"lacks column\(s\) \['time'\]"):
        read_interactions(_write(tmp_path / "m.tsv", ["user_id\titem_id", "1\t2"]))
    (tmp_path / "u16.tsv").write_bytes("user_id\titem_id\ttime\n1\t2\t3\n".encode("utf-16"))
    with pytest.raises(DataFormatError, match="NUL bytes"):
        read_interactions(tmp_path / "u16.tsv")
    with pytest.raises(DataFormatError, match="not found"):
        read_interactions(tmp_path / "absent.tsv")


def test_item_meta_reader_parses_lists_and_rejects_malformed_ones(tmp_path, catalogue):
    meta = read_item_meta(SAMPLE / "item_meta.tsv")
    assert len(meta) == len(catalogue) == 330 and not meta.attrs[READ_REJECTS]
    assert all(isinstance(v, tuple) for v in meta["r_complement"])
    header, first = (SAMPLE / "item_meta.tsv").read_text().splitlines()[:2]
    assert meta.loc[0, "r_substitute"] == tuple(first.split("\t")[3].strip("[]").split(", "))
    bad = _write(tmp_path / "meta.tsv", [header, "1\t0\t[]\t[2, x y]", "2\t0\t[3,4]\t1, 2"])
    frame = read_item_meta(bad)
    assert frame.loc[0, "r_complement"] == () and frame.loc[1, "r_complement"] == ("3", "4")
    assert frame.attrs[READ_REJECTS] == {
        0: {"r_substitute": [BAD_LIST, "[2, x y]"]},
        1: {"r_substitute": [BAD_LIST, "1, 2"]},
    }


# --- quality suite ----------------------------------------------------------------------


def test_suite_passes_the_sample_whole(interactions, catalogue, tmp_path):
    rules = InteractionRules(latest_time=NOW)
    report = validate_interactions(interactions, tmp_path, rules=rules, catalogue=catalogue)
    assert report.success and len(report.clean) == SAMPLE_ROWS and report.quarantined.empty
    assert list(report.clean.columns) == ["user_id", "item_id", "time"]
    suite = load_suite(tmp_path / "suite" / f"{SUITE_NAME}.json")  # the platform loads it
    assert suite.name == SUITE_NAME and len(suite.expectations) == 10


def test_suite_quarantines_hostile_rows_with_a_reason_each(catalogue, tmp_path):
    lines = (SAMPLE / "train.tsv").read_text().splitlines()
    user, item, when = lines[1].split("\t")
    hostile = {
        f"{user}\t{item}\t{when}": "expect_column_values_to_be_in_set(duplicate_rank)",
        f"bad user\t{item}\t{when}": "read:user_id(not a plain id token)",
        f"{user}\tNOT-IN-CATALOGUE\t{when}": "expect_column_values_to_be_in_set(item_in_catalogue)",
        f"{user}\t{item}\t1.5e9": "read:time(not a plain decimal integer)",
        f"{user}\t{item}\t86400": "expect_column_values_to_be_between(time)",  # 1970
        f"{user}\t{item}\t{NOW + 1}": "expect_column_values_to_be_between(time)",  # future
        f"\t{item}\t{when}": "expect_column_values_to_not_be_null(user_id)",
        f"lonely\t{item}\t{when}": "expect_column_values_to_be_between(user_interactions)",
    }
    frame = read_interactions(_write(tmp_path / "h.tsv", lines + list(hostile)))
    rules = InteractionRules(latest_time=NOW)
    report = validate_interactions(
        frame, tmp_path / "gate", rules=rules, catalogue=catalogue, raise_on_failure=False
    )
    assert len(report.clean) + len(report.quarantined) == len(frame) == SAMPLE_ROWS + 8
    assert len(report.quarantined) == 8  # only the repeat, not the first copy of the row
    reasons = report.quarantined["quarantine_reasons"].tolist()
    for expected, got in zip(hostile.values(), reasons, strict=True):
        assert expected in got, (expected, got)
    assert report.quarantined.loc[SAMPLE_ROWS + 1, "user_id"] == "bad user"  # raw text back
    assert not set(DERIVED_COLUMNS) & set(report.quarantined.columns)
    # within the 1 % budget: critical rules pass, the two warning rules are reported as such
    (outcome,) = report.outcomes
    assert outcome.success and not outcome.critical_failures
    assert [w.split(":")[0] for w in outcome.warnings] == [
        "expect_column_values_to_be_in_set(duplicate_rank)",
        "expect_column_values_to_be_between(user_interactions)",
    ]
    summary = json.loads((tmp_path / "gate" / "report" / "summary.json").read_text())
    assert summary["rows"] == {"input": 728, "clean": 720, "quarantined": 8}

    # with no budget the critical rules fail, per expectation, and the run stops
    strict = InteractionRules(latest_time=NOW, max_bad_fraction=0.0)
    with pytest.raises(DataQualityError) as caught:
        validate_interactions(frame, tmp_path / "strict", rules=strict, catalogue=catalogue)
    failures = caught.value.report.outcomes[0].critical_failures
    assert sorted(f.split(":")[0] for f in failures) == [
        "expect_column_values_to_be_between(time)",
        "expect_column_values_to_be_in_set(item_in_catalogue)",
        "expect_column_values_to_not_be_null(time)",
        "expect_column_values_to_not_be_null(user_id)",
    ]
    assert len(caught.value.report.clean) == SAMPLE_ROWS


def test_user_count_rule_counts_only_usable_rows(catalogue, tmp_path):
    """Three rows, one of them out of range: two usable rows are too few for leave-one-out."""
    lines = ["user_id\titem_id\ttime"] + [
        f"u1\t{item}\t1300000000" for item in sorted(catalogue)[:2]
    ]
    lines.append(f"u1\t{sorted(catalogue)[2]}\t5")
    frame = read_interactions(_write(tmp_path / "few.tsv", lines))
    report = validate_interactions(
        frame, tmp_path / "g", rules=InteractionRules(latest_time=NOW), raise_on_failure=False
    )
    assert report.clean.empty and len(report.quarantined) == 3


# --- split ------------------------------------------------------------------------------


def test_split_invariants_on_the_sample(interactions, split):
    users = interactions["user_id"].unique()
    assert len(split.test) == len(split.validation) == len(users) == 60
    assert split.test["user_id"].is_unique and split.validation["user_id"].is_unique
    assert len(split.train) + 2 * len(users) == SAMPLE_ROWS
    for user, rows in split.train.groupby("user_id"):
        validation = split.validation.set_index("user_id").loc[user]
        test = split.test.set_index("user_id").loc[user]
        assert test["time"] >= validation["time"] >= rows["time"].max()
    # every row lands in exactly one part
    parts = pd.concat([split.train, split.validation, split.test])[["user_id", "item_id", "time"]]
    key = ["user_id", "item_id", "time"]
    assert (
        parts.sort_values(key)
        .reset_index(drop=True)
        .equals(interactions[key].sort_values(key).reset_index(drop=True))
    )
    # indices come from train only; held-out items unknown to train are marked, not indexed
    assert set(split.item_index) == set(split.train["item_id"])
    for part in (split.validation, split.test):
        unseen = ~part["item_id"].isin(split.item_index)
        assert (part.loc[unseen, "item_idx"] == UNSEEN).all()
        assert (
            part.loc[~unseen, "item_idx"] == part.loc[~unseen, "item_id"].map(split.item_index)
        ).all()
    assert split.train_matrix().shape == (60, split.n_items)


def test_split_breaks_time_ties_by_row_order_and_keeps_small_users_in_train():
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b"],
            "item_id": ["x", "y", "z", "w", "x", "y"],
            "time": [5, 9, 9, 1, 3, 4],
        }
    )
    split = leave_one_out(frame)
    assert split.test["item_id"].tolist() == ["z"]  # same time as y, but a later row
    assert split.validation["item_id"].tolist() == ["y"]
    assert split.train["item_id"].tolist() == ["w", "x", "x", "y"]  # by user, then time
    assert split.train_only_users.tolist() == ["b"]
    assert leave_one_out(frame.iloc[::-1]).test["item_id"].tolist() == ["y"]  # order matters
    with pytest.raises(ValueError, match="missing values"):
        leave_one_out(frame.assign(time=[5, None, 9, 1, 3, 4]))


# --- evaluation on a hand-made case -------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    """Items i1..i6 in train, i7 only in a test row.

    u1: i1, i2 | val i3 | test i4   -> full test candidates {i4, i5, i6}
    u2: i2     | val i5 | test i1   -> full test candidates {i1, i3, i4, i6}
    u3: i3, i4 (too few: train only); u5: i5 (train only)
    u4: i6     | val i1 | test i7 (never in train: a miss for every system)
    """
    rows = [
        ("u1", "i1", 10), ("u1", "i2", 20), ("u1", "i3", 30), ("u1", "i4", 40),
        ("u2", "i2", 10), ("u2", "i5", 20), ("u2", "i1", 50),
        ("u3", "i3", 5), ("u3", "i4", 6),
        ("u4", "i6", 1), ("u4", "i1", 2), ("u4", "i7", 3),
        ("u5", "i5", 7),
    ]  # fmt: skip
    split = leave_one_out(pd.DataFrame(rows, columns=["user_id", "item_id", "time"]))
    assert split.item_ids.tolist() == ["i1", "i2", "i3", "i4", "i5", "i6"]
    return split


def _oracle(cases):
    """Scores the held-out item 1, every excluded (already seen) item 100, the rest 0."""
    target = dict(zip(cases.users.tolist(), cases.targets.tolist(), strict=True))
    dense = cases.exclude.toarray()
    row_of = {user: row for row, user in enumerate(cases.users.tolist())}

    def score(users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), cases.n_items), dtype=np.float32)
        for k, user in enumerate(users.tolist()):
            out[k, dense[row_of[user]] > 0] = 100.0
            if target[user] >= 0:
                out[k, target[user]] = 1.0
        return out

    return score


def _constant(n_items: int):
    return lambda users: np.ones((len(users), n_items), dtype=np.float32)


def test_full_ranking_known_answers(toy):
    cases = build_cases(toy, "test")
    assert cases.users.tolist() == [0, 1, 3] and cases.targets.tolist() == [3, 0, UNSEEN]
    oracle = evaluate_full(_oracle(cases), cases, ks=(1, 20), batch_size=2)
    assert oracle["Recall@1"] == oracle["NDCG@1"] == pytest.approx(2 / 3)  # the unseen miss
    assert oracle["n_unseen_targets"] == 1
    # everything tied: pessimistic rank = number of candidates (3 and 4), unseen = inf
    ranks = full_ranks(_constant(6), cases)
    assert ranks.tolist() == [3.0, 4.0, math.inf]
    tied = evaluate_full(_constant(6), cases, ks=(2, 3, 20))
    assert tied["Recall@2"] == 0.0 and tied["Recall@3"] == pytest.approx(1 / 3)
    assert tied["NDCG@20"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / 3)
    # validation: only train items are excluded, so the later test item is a candidate
    assert full_ranks(_constant(6), build_cases(toy, "validation")).tolist() == [4.0, 5.0, 5.0]


def test_sampled_protocol_known_answers_and_negatives(toy):
    cases = build_cases(toy, "test")
    negatives = sample_negatives(cases, n_negatives=2, seed=3)
    assert sorted(negatives[0].tolist()) == [4, 5]  # u1 has interacted with i1..i4
    assert set(negatives[1].tolist()) <= {2, 3, 5}  # u2: never i1, i2, i5
    assert sampled_ranks(_constant(6), cases, negatives).tolist() == [3.0, 3.0, math.inf]
    oracle = evaluate_sampled(_oracle(cases), cases, negatives, ks=(1,))
    assert oracle["HR@1"] == oracle["NDCG@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="fewer than n_negatives=3"):
        sample_negatives(cases, n_negatives=3)
    with pytest.raises(ValueError, match="NaN"):
        sampled_ranks(lambda u: np.full((len(u), 6), np.nan), cases, negatives)


def test_sampled_negatives_are_reproducible_and_never_seen(split):
    cases = build_cases(split, "test")
    first = sample_negatives(cases, 99, seed=7)
    assert np.array_equal(first, sample_negatives(cases, 99, seed=7))
    assert not np.array_equal(first, sample_negatives(cases, 99, seed=8))
    interacted = cases.interacted.toarray() > 0
    assert not np.take_along_axis(interacted, first, axis=1).any()
    assert all(len(set(row)) == 99 for row in first.tolist())
    assert ndcg(np.array([1.0, 3.0, 30.0]), 10) == pytest.approx((1 + 0.5 + 0) / 3)


# --- baselines ----------------------------------------------------------------------------


def test_baselines_beat_random_on_the_sample(split):
    cases = build_cases(split, "test")
    negatives = sample_negatives(cases, 99, seed=2024)
    train = split.train_matrix()
    random = evaluate_sampled(RandomScorer(split.n_items, seed=0), cases, negatives)
    popularity = evaluate_sampled(Popularity().fit(train), cases, negatives)
    knn = ItemKNN(neighbours=None).fit(train)
    assert popularity["HR@10"] > random["HR@10"]
    assert evaluate_sampled(knn, cases, negatives)["HR@10"] > random["HR@10"]
    assert knn.similarity.diagonal().sum() == 0
    full = evaluate_full(Popularity().fit(train), cases)
    assert full["Recall@20"] > evaluate_full(RandomScorer(split.n_items), cases)["Recall@20"]


def test_bpr_trains_deterministically_and_its_loss_decreases(split):
    train = split.train_matrix()
    model = BPR(dim=8, epochs=12, lr=0.02, batch_size=128, seed=5).fit(train)
    losses = model.loss_history
    assert len(losses) == 12 and losses[-1] < losses[0] < math.log(2) + 0.01
    again = BPR(dim=8, epochs=12, lr=0.02, batch_size=128, seed=5).fit(train)
    users = np.arange(5)
    assert np.array_equal(model(users), again(users))
    assert model(users).shape == (5, split.n_items)
