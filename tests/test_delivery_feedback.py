"""Feedback log, per-arm statistics and simulated shoppers of progressive delivery.

Real files, real processes and real scipy: the log is shared by several writing processes in
production, and the statistics decide whether a rollout goes on, so both are checked against
independent computations rather than mocks.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from recsys.data import read_relevance_csv, split_by_query
from recsys.delivery.feedback import ArmOutcome, FeedbackLog, feedback_log_path
from recsys.delivery.stats import compare_arms
from recsys.families.recommend.data import read_interactions
from recsys.families.recommend.simulated_users import RecommendShopper, RecommendShoppers
from recsys.families.recommend.split import leave_one_out
from recsys.families.search.simulated_users import SearchShoppers

FIXTURES = Path(__file__).parent / "fixtures"
RELEVANCE = FIXTURES / "homedepot_sample.csv"
INTERACTIONS = FIXTURES / "amazon_grocery_sample" / "train.tsv"
ROLLOUT = "r-1"


def impression(request_id: str, arm: str, items: list[str], **overrides) -> dict:
    record = {
        "request_id": request_id,
        "model": "product_search",
        "version": 1 if arm == "stable" else 2,
        "arm": arm,
        "items": items,
        "rollout_id": ROLLOUT,
        "ts": 1_700_000_000.0,
    }
    return {**record, **overrides}


# -- feedback log ---------------------------------------------------------------------------


def test_feedback_log_path_and_missing_log(tmp_path: Path) -> None:
    path = feedback_log_path(tmp_path, "product_search")
    assert path == tmp_path / "feedback" / "product_search.jsonl"
    with pytest.raises(ValueError):
        feedback_log_path(tmp_path, "../escape")
    summary = FeedbackLog(path).arm_outcomes(ROLLOUT)
    assert summary.stable == ArmOutcome("stable", [], 0, 0)
    assert summary.candidate == ArmOutcome("candidate", [], 0, 0)


def test_impressions_and_clicks_aggregate_per_arm(tmp_path: Path) -> None:
    log = FeedbackLog(feedback_log_path(tmp_path, "product_search"))
    log.record_impression(**impression("s1", "stable", ["a", "b"]))
    log.record_impression(**impression("s2", "stable", ["a", "b"]))
    log.record_impression(**impression("s3", "stable", ["c"], version=3))
    log.record_impression(**impression("c1", "candidate", ["a", "b"]))
    log.record_impression(**impression("c2", "candidate", ["b", "c"]))
    log.record_impression(**impression("x1", "candidate", ["a"], rollout_id="other"))
    log.record_event("s1", "click", "a")
    log.record_event("s1", "click", "b")  # a second click converts s1 only once
    log.record_event("c1", "click", "b")
    log.record_event("c2", "click", "c")
    log.record_event("c2", "purchase", "c")
    log.record_event("s2", "click", "zzz")  # not shown: does not convert s2
    log.record_event("x1", "click", "a")  # another rollout: neither counted nor an orphan
    log.record_event("nobody", "click", "a")  # orphans, reported in the summary
    log.record_event("nobody-either", "click", "a")
    assert log.path.parent.is_dir()

    clicks = log.arm_outcomes(ROLLOUT)
    assert clicks.stable == ArmOutcome("stable", [1, 3], impressions=3, conversions=1)
    assert clicks.candidate == ArmOutcome("candidate", [2], impressions=2, conversions=2)
    assert clicks.orphan_events == 2
    assert clicks.events_on_unshown_items == 1
    assert clicks.unreadable_lines == 0
    assert any("without any impression" in note for note in clicks.notes)

    purchases = log.arm_outcomes(ROLLOUT, "purchase")
    assert (purchases.stable.conversions, purchases.candidate.conversions) == (0, 1)
    assert purchases.orphan_events == 0
    json.dumps(clicks.to_dict())  # JSON-able for audit records


def test_batch_writes_and_event_before_impression(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "f.jsonl")
    # The click is logged before its impression (another process was faster): still joined.
    log.record_events([{"request_id": f"r{i}", "event": "click", "item": "a"} for i in range(3)])
    written = log.record_impressions(
        [impression(f"r{i}", "candidate", ["a"]) for i in range(5)]
        + [impression("r0", "candidate", ["a"])]  # duplicate request id: first one counts
    )
    assert len(written) == 6
    summary = log.arm_outcomes(ROLLOUT)
    assert summary.candidate == ArmOutcome("candidate", [2], impressions=5, conversions=3)
    assert summary.duplicate_impressions == 1
    assert summary.orphan_events == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda log: log.record_impression(**impression("", "stable", ["a"])), "request_id"),
        (lambda log: log.record_impression(**impression("r", "canary", ["a"])), "arm"),
        (lambda log: log.record_impression(**impression("r", "stable", ["a"], version=0)), ">= 1"),
        (lambda log: log.record_impression(**impression("r", "stable", ["a"], version=-2)), ">= 1"),
        (lambda log: log.record_impression(**impression("r", "stable", "ab")), "items"),
        (lambda log: log.record_impression(**impression("r", "stable", [""])), "item id"),
        (
            lambda log: log.record_impression(**impression("r", "stable", ["a"], rollout_id="")),
            "rollout_id",
        ),
        (lambda log: log.record_event("r", "view", "a"), "event must be one of"),
        (lambda log: log.record_event("", "click", "a"), "request_id"),
        (lambda log: log.record_event("r", "click", ""), "item id"),
        (lambda log: log.record_event("r", "click", "a", ts=float("nan")), "ts"),
        (lambda log: log.record_events([{"request_id": "r", "event": "click"}]), "event record"),
        (lambda log: log.arm_outcomes(ROLLOUT, "view"), "event must be one of"),
    ],
)
def test_bad_input_raises_value_error(tmp_path: Path, call, message: str) -> None:
    log = FeedbackLog(tmp_path / "f.jsonl")
    with pytest.raises(ValueError, match=message):
        call(log)
    assert not log.path.exists() or log.path.read_text() == ""


def test_one_bad_record_in_a_batch_writes_none(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "f.jsonl")
    with pytest.raises(ValueError, match="arm"):
        log.record_impressions([impression("a", "stable", ["x"]), impression("b", "both", ["x"])])
    assert not log.path.exists()


def test_truncated_last_line_is_counted_not_fatal(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "f.jsonl")
    log.record_impression(**impression("s1", "stable", ["a"]))
    log.record_event("s1", "click", "a")
    full = json.dumps({"kind": "event", "request_id": "s1", "event": "click", "item": "a"})
    with log.path.open("a") as handle:
        handle.write(full[:25])  # a writer crashed mid-line
    summary = log.arm_outcomes(ROLLOUT)
    assert summary.unreadable_lines == 1
    assert summary.stable == ArmOutcome("stable", [1], 1, 1)
    assert any("unreadable" in note for note in summary.notes)

    # The next append starts a fresh line, so the fragment cannot swallow a good record.
    log.record_impression(**impression("c1", "candidate", ["a"]))
    log.record_event("c1", "click", "a")
    after = log.arm_outcomes(ROLLOUT)
    assert after.unreadable_lines == 1
    assert after.candidate == ArmOutcome("candidate", [2], 1, 1)

    with log.path.open("a") as handle:  # valid JSON, but not a valid record
        handle.write('{"kind": "impression", "request_id": "z", "arm": "stable"}\n[1, 2]\n')
    assert log.arm_outcomes(ROLLOUT).unreadable_lines == 3


def _write_from_process(path: str, worker: int, singles: int, batch: int) -> None:
    log = FeedbackLog(path)
    for i in range(singles):
        arm = "stable" if i % 2 else "candidate"
        log.record_impression(**impression(f"w{worker}-s{i}", arm, ["a", "b"]))
        log.record_event(f"w{worker}-s{i}", "click", "a")
    log.record_impressions(
        [impression(f"w{worker}-b{i}", "stable", ["a"] * 20) for i in range(batch)]
    )


def test_concurrent_writers_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "feedback" / "shared.jsonl"
    workers, singles, batch = 6, 150, 400
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_write_from_process, args=(str(path), w, singles, batch))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a complete line
    records = [json.loads(line) for line in lines[:-1]]  # every line whole
    assert len(records) == workers * (2 * singles + batch)
    assert len({r["request_id"] for r in records if r["kind"] == "impression"}) == workers * (
        singles + batch
    )
    summary = FeedbackLog(path).arm_outcomes(ROLLOUT)
    assert summary.unreadable_lines == 0
    assert summary.candidate.impressions == workers * singles // 2
    assert summary.candidate.conversions == workers * singles // 2
    assert summary.stable.impressions == workers * (singles // 2 + batch)
    assert summary.stable.conversions == workers * singles // 2


# -- statistics -----------------------------------------------------------------------------


def outcome(arm: str, impressions: int, conversions: int) -> ArmOutcome:
    return ArmOutcome(arm, [1 if arm == "stable" else 2], impressions, conversions)


def test_compare_arms_matches_scipy() -> None:
    result = compare_arms(outcome("stable", 1000, 250), outcome("candidate", 1000, 312))
    for arm, (n, k) in ((result.stable, (1000, 250)), (result.candidate, (1000, 312))):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (arm.rate, arm.ci_low, arm.ci_high) == pytest.approx((k / n, ci.low, ci.high))
    assert result.difference == pytest.approx(0.062)
    # The pooled two-proportion z-test is Pearson's chi-square test without correction.
    chi2 = stats.chi2_contingency([[312, 688], [250, 750]], correction=False)
    assert result.test == "z_test_pooled"
    assert result.p_value == pytest.approx(chi2.pvalue, rel=1e-9)
    assert result.p_value_worse == pytest.approx(1 - chi2.pvalue / 2, rel=1e-9)
    # Newcombe's hybrid score interval, from the two Wilson intervals.
    s, c = result.stable, result.candidate
    low = 0.062 - np.hypot(c.rate - c.ci_low, s.ci_high - s.rate)
    high = 0.062 + np.hypot(c.ci_high - c.rate, s.rate - s.ci_low)
    assert (result.difference_ci_low, result.difference_ci_high) == pytest.approx((low, high))
    assert result.difference_ci_low > 0
    assert result.decision == "candidate_better"
    assert result.summary.startswith("CTR candidate 31.2% [")
    assert "+6.2 pts" in result.summary and result.summary.endswith("candidate better")
    assert json.loads(json.dumps(result.to_dict()))["decision"] == "candidate_better"
    assert result.metrics()["p_value"] == pytest.approx(result.p_value)


def test_compare_arms_sanity() -> None:
    better = compare_arms(outcome("stable", 1000, 200), outcome("candidate", 1000, 300))
    assert better.significant and better.decision == "candidate_better"
    assert not better.candidate_worse

    worse = compare_arms(outcome("stable", 1000, 300), outcome("candidate", 1000, 200))
    assert worse.significant and worse.candidate_worse and worse.decision == "candidate_worse"
    assert worse.p_value_worse < 1e-6

    same = compare_arms(outcome("stable", 1000, 250), outcome("candidate", 1000, 252))
    assert not same.significant and same.p_value > 0.5
    assert same.decision == "no_significant_difference"
    assert same.difference_ci_low < 0 < same.difference_ci_high

    few = compare_arms(outcome("stable", 40, 10), outcome("candidate", 40, 30))
    assert few.significant and not few.enough_data  # a big effect, but on 40 requests
    assert few.decision == "not_enough_data"
    assert "not enough data" in few.summary

    empty = compare_arms(outcome("stable", 0, 0), outcome("candidate", 500, 50))
    assert empty.decision == "not_enough_data"
    assert empty.stable.rate is None and empty.p_value is None and empty.difference is None
    json.dumps(empty.to_dict())


def test_small_cells_use_fisher_exact() -> None:
    result = compare_arms(
        outcome("stable", 200, 2), outcome("candidate", 200, 12), min_impressions=100
    )
    assert result.test == "fisher_exact"
    table = [[12, 188], [2, 198]]
    assert result.p_value == pytest.approx(stats.fisher_exact(table).pvalue)
    assert result.p_value_worse == pytest.approx(
        stats.fisher_exact(table, alternative="less").pvalue
    )
    assert result.decision == "candidate_better"


@pytest.mark.parametrize("alpha", [0, 0.5, 0.7, -0.1, True, "0.05"])
def test_compare_arms_validates_alpha(alpha) -> None:
    with pytest.raises(ValueError, match="alpha"):
        compare_arms(outcome("stable", 100, 1), outcome("candidate", 100, 2), alpha=alpha)


def test_compare_arms_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="conversions"):
        compare_arms(outcome("stable", 10, 11), outcome("candidate", 10, 1))
    with pytest.raises(ValueError, match="min_impressions"):
        compare_arms(outcome("stable", 10, 1), outcome("candidate", 10, 1), min_impressions=0)


def test_a_a_false_positive_rate_is_near_alpha() -> None:
    """Two arms with the same true CTR: the test must cry wolf about alpha of the time."""
    alpha, n, ctr = 0.05, 2000, 0.12
    significant = worse = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        k_stable, k_candidate = rng.binomial(n, ctr, size=2)
        result = compare_arms(
            outcome("stable", n, int(k_stable)),
            outcome("candidate", n, int(k_candidate)),
            alpha=alpha,
        )
        significant += result.significant
        worse += result.candidate_worse
    assert 0.01 <= significant / 200 <= 0.10
    assert 0.01 <= worse / 200 <= 0.10  # one-sided at alpha: also about alpha


# -- simulated shoppers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_search(tmp_path_factory: pytest.TempPathFactory) -> SearchShoppers:
    """Shoppers from the held-out queries, split as the search pipeline splits (by query)."""
    frame = read_relevance_csv(RELEVANCE)
    split = split_by_query(frame, test_fraction=0.2, seed=13)
    path = tmp_path_factory.mktemp("search") / "test.csv"
    split.test.to_csv(path, index=False)
    shoppers = SearchShoppers.from_csv(path)
    assert len(shoppers) == split.test["search_term"].nunique() == 14
    return shoppers


def test_search_shoppers_from_held_out_queries(held_out_search: SearchShoppers) -> None:
    shopper = held_out_search[0]
    assert shopper.request() == {"query": shopper.query, "top_k": 10}
    assert len(shopper.judged) >= 2
    assert all(1.0 <= grade <= 3.0 for grade in shopper.judged.values())
    drawn = held_out_search.sample(50, np.random.default_rng(1))
    assert len(drawn) == 50 and {s.query for s in drawn} <= {s.query for s in held_out_search}

    every = SearchShoppers.from_csv(RELEVANCE, min_judged=10)
    assert 0 < len(every) < 70  # only queries with 10+ judged products
    with pytest.raises(ValueError, match="no query"):
        SearchShoppers.from_csv(RELEVANCE, min_judged=100)


def test_search_shoppers_prefer_relevant_first(held_out_search: SearchShoppers) -> None:
    best = {s.query: s.ideal_ranking() for s in held_out_search}
    reverse = {query: ranking[::-1] for query, ranking in best.items()}
    expected_best = sum(s.expected_ctr(best[s.query]) for s in held_out_search)
    expected_reverse = sum(s.expected_ctr(reverse[s.query]) for s in held_out_search)
    assert expected_best > expected_reverse * 1.1

    rng = np.random.default_rng(7)
    sessions = held_out_search.sample(4000, rng)
    clicks_best = sum(bool(s.clicks(best[s.query], rng)) for s in sessions)
    clicks_reverse = sum(bool(s.clicks(reverse[s.query], rng)) for s in sessions)
    result = compare_arms(
        outcome("stable", 4000, clicks_reverse), outcome("candidate", 4000, clicks_best)
    )
    assert result.decision == "candidate_better", result.summary
    # The simulated rate agrees with the model's own probability.
    assert clicks_best / 4000 == pytest.approx(expected_best / len(held_out_search), abs=0.03)

    clicked = held_out_search[0].clicks(best[held_out_search[0].query], np.random.default_rng(0))
    assert len(clicked) <= 1  # the cascade stops at the first click


def test_search_identical_rankings_same_expected_ctr(held_out_search: SearchShoppers) -> None:
    for shopper in held_out_search:
        ranking = [*shopper.judged, "unjudged-1", "unjudged-2"]
        assert shopper.expected_ctr(ranking) == shopper.expected_ctr(list(ranking))
        assert 0 < shopper.expected_ctr(ranking) < 1
    # And an A/A run of one ranking is not called a difference.
    rng = np.random.default_rng(3)
    sessions = held_out_search.sample(3000, rng)
    a = sum(bool(s.clicks(s.ideal_ranking(), rng)) for s in sessions)
    b = sum(bool(s.clicks(s.ideal_ranking(), rng)) for s in sessions)
    result = compare_arms(outcome("stable", 3000, a), outcome("candidate", 3000, b))
    assert result.decision == "no_significant_difference", result.summary


def test_recommend_shoppers_click_the_held_out_item() -> None:
    shoppers = RecommendShoppers.from_interactions(INTERACTIONS)
    split = leave_one_out(read_interactions(INTERACTIONS))
    assert len(shoppers) == len(split.test) == 60
    assert {(s.user_id, s.next_item) for s in shoppers} == set(
        zip(split.test["user_id"], split.test["item_id"], strict=True)
    )
    assert len(RecommendShoppers.from_interactions(INTERACTIONS, max_users=10)) == 10

    shopper = shoppers[0]
    assert shopper.request() == {"user": shopper.user_id, "top_k": 10}
    others = [f"other-{i}" for i in range(9)]
    rng = np.random.default_rng(0)
    first = [shopper.clicks([shopper.next_item, *others], rng) for _ in range(3000)]
    last = [shopper.clicks([*others, shopper.next_item], rng) for _ in range(3000)]
    absent = [shopper.clicks([*others, "other-9"], rng) for _ in range(3000)]

    hits_first = sum(shopper.next_item in c for c in first) / 3000
    hits_last = sum(shopper.next_item in c for c in last) / 3000
    assert hits_first == pytest.approx(0.6, abs=0.03)  # rank 1: the held-out click rate
    assert hits_last == pytest.approx(0.6 / np.log2(11), abs=0.03)  # position-discounted
    assert not any(shopper.next_item in c for c in absent)
    noise = sum(bool(c) for c in absent) / 3000
    assert 0.005 < noise < 0.04  # only noise clicks, on items that were shown
    assert all(set(c) <= {*others, "other-9"} for c in absent)

    # Two copies of one ranking: the same expected CTR; showing the item beats not showing it.
    ranking = [shopper.next_item, *others]
    assert shopper.expected_ctr(ranking) == shopper.expected_ctr(list(ranking))
    assert shopper.expected_ctr(ranking) > shopper.expected_ctr([*others, "other-9"])
    assert RecommendShopper("u", "i").expected_ctr(["i"]) == pytest.approx(0.6)


def test_the_rollout_rules_abort_on_errors_at_once_and_on_latency_only_when_it_lasts():
    """The analysis's judgement of one window (pure): failures or refusals are an immediate
    breach; a latency breach is flagged as such (the analysis needs `latency_windows` closed
    windows of it); too few candidate requests is no judgement at all."""
    from recsys.delivery.analysis import RolloutPolicy, judge
    from recsys.monitoring.window import WindowStats

    def window(requests: float, failures: float = 0.0, mean_ms: float = 10.0) -> WindowStats:
        return WindowStats(
            model="m", version="1", seconds=10.0, requests=requests, failures=failures,
            error_rate=failures / requests if requests else 0.0, mean_latency_ms=mean_ms,
            mean_queue_ms=1.0, throughput_rps=requests / 10.0, p99_latency_ms=None,
        )  # fmt: skip

    policy = RolloutPolicy(min_requests=10, max_error_rate=0.02, max_latency_ratio=2.0)
    stable = window(200)
    assert judge(stable, window(5, failures=5), policy)[0] is None
    breached, reasons, errors = judge(stable, window(20, failures=2), policy)
    assert breached and errors and "error rate 10.0%" in reasons[0]
    breached, reasons, errors = judge(stable, window(20, mean_ms=45.0), policy)
    assert breached and not errors and "2 x stable" in reasons[0]
    breached, reasons, errors = judge(stable, window(20, mean_ms=15.0), policy)
    assert breached is False and reasons[0].startswith("healthy")
    with pytest.raises(ValueError, match="latency_windows"):
        RolloutPolicy(latency_windows=0)
