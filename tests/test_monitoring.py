"""Tests for the metrics side of monitoring: parsing, windows, the rollback policy and its state.

The ``tests/fixtures/triton_metrics_*.txt`` files are verbatim ``/metrics`` scrapes of a real
tritonserver 2.51 (the one bundled with nvidia-pytriton, ``summary_latencies=true``) serving a
python-backend model ``echo`` whose ``execute`` raises on negative input, in this order:

* ``before``: v1 after 4 successful and 1 failing request;
* ``after``: 6 more successful and 3 more failing requests;
* ``unloaded``: ``echo`` unloaded (only its failure counters remain on the server);
* ``reloaded``: versions 1 and 2 loaded, then v1 got 2 ok + 1 failing, v2 3 ok + 1 failing.

Expected values below are computed by hand from the numbers in those files. No mocks: HTTP
behaviour is exercised against a real local HTTP server, and one test runs a real Triton.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from recsys.monitoring.metrics import (
    MetricsSnapshot,
    MetricsUnavailableError,
    ModelVersionCounters,
    parse_metrics,
    scrape,
)
from recsys.monitoring.policy import (
    MonitorState,
    Thresholds,
    check_once,
    evaluate,
    reset_model,
)
from recsys.monitoring.window import WindowStats, aggregate_model, compute_window

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ECHO_V1 = ("echo", "1")
ECHO_V2 = ("echo", "2")


def fixture_text(name: str) -> str:
    return (FIXTURES / f"triton_metrics_{name}.txt").read_text()


def snapshot(name: str, taken_at: float) -> MetricsSnapshot:
    return parse_metrics(fixture_text(name), taken_at)


def window_stats(
    requests: float,
    failures: float,
    latency_ms: float | None = 10.0,
    p99_ms: float | None = -1.0,
) -> WindowStats:
    """A hand-made window for policy tests that do not care where the numbers came from
    (``p99_ms`` defaults to the mean latency)."""
    return WindowStats(
        model="search",
        version="1",
        seconds=60.0,
        requests=requests,
        failures=failures,
        error_rate=failures / requests if requests else 0.0,
        mean_latency_ms=latency_ms,
        mean_queue_ms=0.1,
        throughput_rps=requests / 60.0,
        p99_latency_ms=latency_ms if p99_ms == -1.0 else p99_ms,
    )


# --------------------------------------------------------------------------- parsing


def test_parse_real_scrape_keeps_per_version_counters() -> None:
    snap = snapshot("after", 1000.0)
    assert snap.taken_at == 1000.0
    # Server-wide metrics (nv_cpu_*, nv_pinned_memory_*) carry no model label: never a "model".
    assert set(snap.models) == {ECHO_V1}
    v1 = snap.models[ECHO_V1]
    assert (v1.model, v1.version) == ECHO_V1
    assert v1.success == 10
    # Four reason-labelled failure samples (OTHER/CANCELED/BACKEND/REJECTED) summed: 0+0+4+0.
    assert v1.failure == 4
    assert v1.inference_count == 10
    assert v1.request_duration_us == 133846
    assert v1.queue_duration_us == 432
    assert v1.compute_infer_duration_us == 131949
    assert v1.pending == 0
    assert v1.p99_request_us == 10645  # quantile="0.99" of nv_inference_request_summary_us


def test_parse_real_scrape_with_two_versions_and_unloaded_model() -> None:
    reloaded = snapshot("reloaded", 0.0)
    assert set(reloaded.models) == {ECHO_V1, ECHO_V2}
    assert reloaded.models[ECHO_V2].success == 3
    assert reloaded.models[ECHO_V2].p99_request_us == 10767
    # Unloaded: only the failure counter survives on the server, everything else is gone.
    unloaded = snapshot("unloaded", 0.0).models[ECHO_V1]
    assert unloaded.failure == 4
    assert unloaded.success == 0 and unloaded.request_duration_us == 0
    assert unloaded.p99_request_us is None


def test_parse_keeps_the_host_cpu_and_memory_gauges() -> None:
    after = snapshot("after", 0.0)
    assert after.cpu_utilization == pytest.approx(0.0606, abs=1e-4)
    assert (after.memory_used_bytes, after.memory_total_bytes) == (754294784, 25276514304)
    assert after.for_model("echo").cpu_utilization == after.cpu_utilization
    # Before Triton's first host sample every gauge reads 0: unknown, not an idle machine.
    before = snapshot("before", 0.0)
    assert (before.cpu_utilization, before.memory_used_bytes, before.memory_total_bytes) == (
        None,
        None,
        None,
    )
    # A state file written before the gauges were kept still loads.
    old = {k: v for k, v in after.to_dict().items() if not k.startswith(("cpu_", "memory_"))}
    assert MetricsSnapshot.from_dict(old).cpu_utilization is None


def test_snapshot_json_round_trip() -> None:
    snap = snapshot("reloaded", 1234.5)
    restored = MetricsSnapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert restored == snap
    assert restored.for_model("other").models == {}


@pytest.mark.parametrize(
    "text",
    [
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
        "Not Found",
        '{"status": "ok"}',
        'nv_inference_request_success{model="echo",version="1"} lots',
    ],
)
def test_garbage_text_raises_metrics_unavailable(text: str) -> None:
    with pytest.raises(MetricsUnavailableError, match="unparseable"):
        parse_metrics(text, 0.0)


@pytest.mark.parametrize("text", ["", "# HELP only a comment\n", "process_cpu_seconds_total 1.5\n"])
def test_text_without_triton_metrics_raises(text: str) -> None:
    # Empty or foreign-exporter text must not pass for "Triton with no traffic".
    with pytest.raises(MetricsUnavailableError, match="no Triton"):
        parse_metrics(text, 0.0)


# --------------------------------------------------------------------------- scraping over HTTP


@dataclass
class MetricsEndpoint:
    """A real local HTTP server whose /metrics answer tests can change between scrapes."""

    url: str
    status: int = 200
    body: str = ""


@pytest.fixture
def metrics_endpoint() -> Iterator[MetricsEndpoint]:
    endpoint = MetricsEndpoint(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = endpoint.body.encode()
            self.send_response(endpoint.status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_parses_served_metrics(metrics_endpoint: MetricsEndpoint) -> None:
    metrics_endpoint.body = fixture_text("before")
    start = time.time()
    snap = scrape(metrics_endpoint.url, timeout_s=5)
    assert start <= snap.taken_at <= time.time()
    assert snap.models == snapshot("before", 0.0).models


def test_scrape_http_error_names_url_and_status(metrics_endpoint: MetricsEndpoint) -> None:
    metrics_endpoint.status, metrics_endpoint.body = 503, "service unavailable"
    with pytest.raises(MetricsUnavailableError) as info:
        scrape(metrics_endpoint.url, timeout_s=5)
    assert metrics_endpoint.url in str(info.value)
    assert "HTTP 503" in str(info.value)


def test_scrape_garbage_body_names_url(metrics_endpoint: MetricsEndpoint) -> None:
    metrics_endpoint.body = "<html>login required</html>"
    with pytest.raises(MetricsUnavailableError) as info:
        scrape(metrics_endpoint.url, timeout_s=5)
    assert metrics_endpoint.url in str(info.value)
    assert "unparseable" in str(info.value)


def test_scrape_connection_refused_names_url() -> None:
    with socket.socket() as sock:  # reserve a port, then close it: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(MetricsUnavailableError) as info:
        scrape(url, timeout_s=2)
    assert url in str(info.value)
    assert "unreachable" in str(info.value)


# --------------------------------------------------------------------------- windows


def test_window_between_real_scrapes_matches_hand_computation() -> None:
    stats = compute_window(snapshot("before", 100.0), snapshot("after", 130.0))
    v1 = stats[ECHO_V1]
    # success 10-4 = 6, failure 4-1 = 3 -> 9 requests, error rate 3/9.
    assert v1.requests == 9
    assert v1.failures == 3
    assert v1.error_rate == pytest.approx(1 / 3)
    # Triton times successful requests only: (133846 - 70797) us / 6 successes.
    assert v1.mean_latency_ms == pytest.approx((133846 - 70797) / 6 / 1000)
    assert v1.mean_queue_ms == pytest.approx((432 - 191) / 6 / 1000)
    assert v1.seconds == 30.0
    assert v1.throughput_rps == pytest.approx(9 / 30)
    assert v1.p99_latency_ms == pytest.approx(10.645)
    # The failures were the model raising (Triton's reason BACKEND), none queued or cancelled.
    assert v1.failures_by_reason == {"BACKEND": 3.0}
    assert v1.mean_compute_ms == pytest.approx((131949 - 69806) / 6 / 1000)
    assert v1.pending == 0.0
    model = aggregate_model(stats, "echo")
    assert model.failures_by_reason == {"BACKEND": 3.0}
    assert model.to_dict()["failures_by_reason"] == {"BACKEND": 3.0}


def test_counter_reset_on_reload_counts_from_zero_per_counter() -> None:
    stats = compute_window(snapshot("after", 100.0), snapshot("reloaded", 160.0))
    v1 = stats[ECHO_V1]
    # Success and duration reset on reload (10 -> 2, 133846 -> 41631): the current values are
    # the window. Failures did NOT reset (4 -> 5): one new failure, not five.
    assert v1.requests == 2 + 1
    assert v1.failures == 1
    assert v1.mean_latency_ms == pytest.approx(41631 / 2 / 1000)
    # Version 2 did not exist before: everything it reports is new.
    v2 = stats[ECHO_V2]
    assert (v2.requests, v2.failures) == (3 + 1, 1)
    assert v2.mean_latency_ms == pytest.approx(52699 / 3 / 1000)


def test_window_through_unload_adds_up_to_direct_window() -> None:
    after, unloaded, reloaded = (
        snapshot("after", 100.0),
        snapshot("unloaded", 130.0),
        snapshot("reloaded", 160.0),
    )
    first = aggregate_model(compute_window(after, unloaded), "echo")
    second = aggregate_model(compute_window(unloaded, reloaded), "echo")
    direct = aggregate_model(compute_window(after, reloaded), "echo")
    assert first is not None and second is not None and direct is not None
    assert (first.requests, first.failures) == (0, 0)
    assert first.mean_latency_ms is None  # no successful request, no latency to report
    assert second.requests + first.requests == direct.requests == 7
    assert second.failures + first.failures == direct.failures == 2


def test_synthetic_full_reset_and_zero_length_window() -> None:
    old = MetricsSnapshot(
        10.0,
        {
            ("m", "1"): ModelVersionCounters(
                "m", "1", success=500, failure=20, request_duration_us=9e6
            )
        },
    )
    new = MetricsSnapshot(
        10.0,
        {("m", "1"): ModelVersionCounters("m", "1", success=8, failure=2, request_duration_us=4e4)},
    )
    stats = compute_window(old, new)[("m", "1")]
    assert (stats.requests, stats.failures) == (10, 2)
    assert stats.mean_latency_ms == pytest.approx(5.0)
    assert stats.throughput_rps == 0.0  # no time elapsed: no rate, and no division by zero


def test_aggregate_model_weights_versions_by_traffic() -> None:
    stats = compute_window(snapshot("after", 100.0), snapshot("reloaded", 160.0))
    model = aggregate_model(stats, "echo")
    assert model is not None
    assert model.version == "1,2"
    assert model.requests == 7
    assert model.failures == 2
    assert model.error_rate == pytest.approx(2 / 7)
    # (41631 + 52699) us over 2 + 3 successful requests.
    assert model.mean_latency_ms == pytest.approx((41631 + 52699) / 5 / 1000)
    assert model.throughput_rps == pytest.approx(7 / 60)
    assert model.p99_latency_ms == pytest.approx(10.767)  # the worse version's p99
    assert aggregate_model(stats, "not_served") is None


MODEL_ERROR_HEADER = (
    "# HELP recsys_request_errors_total Requests the model answered with an error of its own "
    "(counted as successes by nv_inference_request_success), by reason\n"
    "# TYPE recsys_request_errors_total counter\n"
)
"""The model's own error counter as tritonserver 2.51 exposes it (header and sample lines as in
a real scrape of the served model, here for two instances of ``echo`` v1)."""


def model_error_line(instance: str, reason: str, value: float) -> str:
    labels = f'instance="{instance}",model="echo",reason="{reason}",version="1"'
    return f"recsys_request_errors_total{{{labels}}} {value:g}\n"


def with_model_errors(name: str, taken_at: float, a: int, b: int, c: int) -> MetricsSnapshot:
    """A fixture scrape plus the model's error counter (oversized ``a``, invalid_argument ``b``
    on instance 0 and ``c`` on instance 1)."""
    lines = (
        model_error_line("echo_0_0", "oversized", a)
        + model_error_line("echo_0_0", "invalid_argument", b)
        + model_error_line("echo_0_1", "invalid_argument", c)
    )
    return parse_metrics(fixture_text(name) + MODEL_ERROR_HEADER + lines, taken_at)


def test_parse_keeps_the_models_own_errors_apart_from_tritons_counters() -> None:
    plain = snapshot("after", 0.0).models[ECHO_V1]
    v1 = with_model_errors("after", 0.0, 1, 2, 3).models[ECHO_V1]
    # Summed over instances and reasons, split by reason; Triton's counters untouched.
    assert v1.rejected == 6
    assert v1.rejected_by_reason == {"oversized": 1, "invalid_argument": 5}
    assert (v1.success, v1.failure, v1.failure_by_reason) == (
        plain.success,
        plain.failure,
        plain.failure_by_reason,
    )
    assert plain.rejected == 0 and plain.rejected_by_reason == {}
    snap = with_model_errors("after", 5.0, 1, 2, 3)
    assert MetricsSnapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap
    # A state file written before the counter was kept still loads, with nothing rejected.
    old = snap.to_dict()
    for record in old["models"]:
        del record["rejected"], record["rejected_by_reason"]
    assert MetricsSnapshot.from_dict(old).models[ECHO_V1].rejected == 0


def test_window_counts_rejected_requests_as_part_of_the_successes() -> None:
    before = with_model_errors("before", 100.0, 0, 1, 0)
    after = with_model_errors("after", 130.0, 2, 3, 1)
    v1 = compute_window(before, after)[ECHO_V1]
    # 9 requests (6 successes + 3 failures); the model refused 5 of the successes itself.
    assert (v1.requests, v1.failures, v1.rejected) == (9, 3, 5)
    assert v1.rejected_rate == pytest.approx(5 / 9)
    assert v1.rejected_by_reason == {"invalid_argument": 3.0, "oversized": 2.0}
    assert aggregate_model({ECHO_V1: v1}, "echo").rejected_by_reason == v1.rejected_by_reason
    # The counter leaves with its version and restarts from zero on a reload.
    reloaded = compute_window(after, with_model_errors("reloaded", 160.0, 0, 1, 0))[ECHO_V1]
    assert reloaded.rejected == 1 and reloaded.rejected_by_reason == {"invalid_argument": 1.0}
    # Triton counts a request just after the model counted its refusal: never above 100%.
    racing = compute_window(snapshot("after", 100.0), with_model_errors("after", 101.0, 9, 9, 9))
    assert racing[ECHO_V1].requests == 0 and racing[ECHO_V1].rejected_rate == 0.0
    early = compute_window(before, with_model_errors("after", 101.0, 9, 9, 9))[ECHO_V1]
    assert early.rejected > early.requests and early.rejected_rate == 1.0


# --------------------------------------------------------------------------- policy


def test_thresholds_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_error_rate"):
        Thresholds(max_error_rate=1.5)
    with pytest.raises(ValueError, match="min_requests"):
        Thresholds(min_requests=0)
    with pytest.raises(ValueError, match="consecutive_windows"):
        Thresholds(consecutive_windows=0)
    with pytest.raises(ValueError, match="max_rejected_rate"):
        Thresholds(max_rejected_rate=1.5)


def test_a_version_refusing_most_requests_breaches_a_few_bad_requests_do_not() -> None:
    """Refusals are successes to Triton (error rate 0), so only the rejected rate sees them."""
    rejecting = replace(
        window_stats(requests=40, failures=0),
        rejected=38,
        rejected_rate=0.95,
        rejected_by_reason={"invalid_argument": 8.0, "oversized": 30.0},
    )
    verdict = evaluate(rejecting, Thresholds(), previous_consecutive=0)
    assert verdict.breached and verdict.should_rollback
    assert verdict.reasons[0] == (
        "rejected rate 95.0% (38 of 40 requests refused by the model in 60s; invalid_argument 8, "
        "oversized 30; Triton counts them as successes) > max 50.0%"
    )
    assert json.loads(json.dumps(verdict.to_dict()))["stats"]["rejected_rate"] == 0.95
    assert not evaluate(rejecting, Thresholds(max_rejected_rate=None), 0).breached

    clients_mistakes = replace(window_stats(40, 0), rejected=3, rejected_rate=0.075)
    healthy = evaluate(clients_mistakes, Thresholds(), 0)
    assert healthy.judged and not healthy.breached
    assert "rejected rate 7.5%" in healthy.reasons[-1]
    # Too little traffic is still no decision, whatever it was refused for.
    few = replace(window_stats(3, 0), rejected=3, rejected_rate=1.0)
    assert not evaluate(few, Thresholds(), 0).judged


def test_error_rate_breach_rolls_back_at_once_by_default() -> None:
    verdict = evaluate(window_stats(requests=20, failures=3), Thresholds(), previous_consecutive=0)
    assert verdict.breached and verdict.should_rollback
    assert verdict.consecutive == 1
    assert "error rate 15.0%" in verdict.reasons[0]
    payload = json.loads(json.dumps(verdict.to_dict()))  # must survive XCom
    assert payload["stats"]["failures"] == 3
    assert payload["should_rollback"] is True


def test_latency_breach_is_reported_separately() -> None:
    verdict = evaluate(window_stats(20, 0, latency_ms=1500.0), Thresholds(), 0)
    assert verdict.breached
    assert any("mean latency 1500.0 ms" in reason for reason in verdict.reasons)
    assert not any("error rate" in reason for reason in verdict.reasons)


def test_hysteresis_needs_consecutive_breaching_windows() -> None:
    thresholds = Thresholds(consecutive_windows=2)
    bad = window_stats(requests=20, failures=10)
    first = evaluate(bad, thresholds, previous_consecutive=0)
    assert first.breached and not first.should_rollback and first.consecutive == 1
    second = evaluate(bad, thresholds, previous_consecutive=first.consecutive)
    assert second.breached and second.should_rollback and second.consecutive == 2
    # A healthy window in between starts the count again.
    healthy = evaluate(window_stats(requests=20, failures=0), thresholds, first.consecutive)
    assert not healthy.breached and healthy.consecutive == 0
    again = evaluate(bad, thresholds, healthy.consecutive)
    assert not again.should_rollback and again.consecutive == 1


def test_no_traffic_never_rolls_back_and_keeps_the_count() -> None:
    thresholds = Thresholds(min_requests=5, consecutive_windows=1)
    # Even a window where everything failed is not judged below min_requests...
    quiet = evaluate(window_stats(requests=4, failures=4, latency_ms=None), thresholds, 3)
    assert not quiet.breached and not quiet.should_rollback
    assert quiet.consecutive == 3  # ...and is neither an outage nor a recovery
    assert "no decision" in quiet.reasons[0] and "no traffic is not an error" in quiet.reasons[0]
    empty = evaluate(window_stats(requests=0, failures=0, latency_ms=None), thresholds, 0)
    assert not empty.should_rollback and empty.consecutive == 0
    missing = evaluate(None, thresholds, 2)
    assert not missing.should_rollback and missing.consecutive == 2 and missing.stats is None


# --------------------------------------------------------------------------- state file


def test_state_round_trip_is_atomic_json(tmp_path: Path) -> None:
    path = tmp_path / "monitor" / "state.json"
    state = MonitorState(
        snapshots={"echo": snapshot("reloaded", 50.0).for_model("echo")},
        consecutive={"echo": 2, "other": 0},
    )
    state.save(path)
    assert json.loads(path.read_text())["consecutive"] == {"echo": 2, "other": 0}
    assert MonitorState.load(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left
    assert MonitorState.load(tmp_path / "missing.json") == MonitorState()


@pytest.mark.parametrize(
    "content", ["{not json", '{"format": 1, "snapshots": {"echo": {"taken_at": "x"}}}', "[]"]
)
def test_corrupt_state_is_reported_and_reset(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="recsys.monitoring.policy"):
        state = MonitorState.load(path)
    assert state == MonitorState()
    assert state.recovered_from
    assert any("corrupt" in record.getMessage() for record in caplog.records)


def test_check_once_recovers_from_corrupt_state(
    tmp_path: Path, metrics_endpoint: MetricsEndpoint
) -> None:
    path = tmp_path / "state.json"
    path.write_text("\x00\x00 truncated")
    metrics_endpoint.body = fixture_text("before")
    verdict = check_once(metrics_endpoint.url, "echo", path, Thresholds())
    assert not verdict.breached and verdict.stats is None
    assert "corrupt" in verdict.reasons[0]
    assert "echo" in MonitorState.load(path).snapshots  # a valid baseline replaced the junk


def test_check_once_hysteresis_and_reset_across_runs(
    tmp_path: Path, metrics_endpoint: MetricsEndpoint
) -> None:
    path = tmp_path / "state.json"
    thresholds = Thresholds(max_error_rate=0.05, min_requests=3, consecutive_windows=2)

    metrics_endpoint.body = fixture_text("before")
    baseline = check_once(metrics_endpoint.url, "echo", path, thresholds)
    assert not baseline.breached and baseline.stats is None and baseline.consecutive == 0
    assert "baseline" in baseline.reasons[-1]

    metrics_endpoint.body = fixture_text("after")  # 3 of 9 failed
    first = check_once(metrics_endpoint.url, "echo", path, thresholds)
    assert first.breached and not first.should_rollback and first.consecutive == 1
    assert first.stats is not None and (first.stats.requests, first.stats.failures) == (9, 3)

    second_same = check_once(metrics_endpoint.url, "echo", path, thresholds)  # no new traffic
    assert not second_same.should_rollback and second_same.consecutive == 1

    metrics_endpoint.body = fixture_text("reloaded")  # 2 of 7 failed, across a reload
    second = check_once(metrics_endpoint.url, "echo", path, thresholds)
    assert second.breached and second.should_rollback and second.consecutive == 2
    assert second.stats is not None and (second.stats.requests, second.stats.failures) == (7, 2)

    reset_model(path, "echo")
    state = MonitorState.load(path)
    assert "echo" not in state.snapshots and "echo" not in state.consecutive
    after_reset = check_once(metrics_endpoint.url, "echo", path, thresholds)
    assert not after_reset.breached and after_reset.stats is None  # re-baselined


def test_a_quiet_window_grows_until_it_holds_min_requests_or_max_window_s(
    tmp_path: Path, metrics_endpoint: MetricsEndpoint
) -> None:
    """Checks come every few seconds: a window of a quiet model keeps its baseline and grows
    instead of being thrown away as "too little traffic" at every check."""
    path = tmp_path / "state.json"
    metrics_endpoint.body = fixture_text("before")
    check_once(metrics_endpoint.url, "echo", path, Thresholds())  # baseline

    metrics_endpoint.body = fixture_text("after")  # 9 requests since the baseline
    growing = check_once(metrics_endpoint.url, "echo", path, Thresholds(min_requests=12))
    assert not growing.judged and not growing.breached and "window growing" in growing.reasons[0]
    assert growing.stats is not None and growing.stats.requests == 9

    # Same counters, a lower bar: the window still starts at the kept baseline (9, not 0).
    judged = check_once(metrics_endpoint.url, "echo", path, Thresholds(min_requests=9))
    assert judged.judged and judged.stats is not None and judged.stats.requests == 9
    assert judged.breached  # 3 of 9 failed

    # A window older than max_window_s with too few requests is "too little traffic" and the
    # baseline moves on, so a quiet model is still judged over at most max_window_s.
    old = check_once(
        metrics_endpoint.url, "echo", path, Thresholds(min_requests=5, max_window_s=1e-6)
    )
    assert not old.judged and "too little traffic" in old.reasons[0]
    state = MonitorState.load(path)
    assert state.last_verdicts["echo"]["reasons"] == old.reasons
    assert state.consecutive["echo"] == 1  # no traffic is no recovery


def test_an_outage_is_due_for_its_alert_once_after_the_grace_period(tmp_path: Path) -> None:
    from recsys.monitoring.policy import note_unavailable

    path = tmp_path / "state.json"
    assert note_unavailable(path, "echo", "refused", 60, now=1000.0) is None
    assert note_unavailable(path, "echo", "refused", 60, now=1059.0) is None
    due = note_unavailable(path, "echo", "timed out", 60, now=1060.0)
    assert due is not None and due["since"] == 1000.0 and due["error"] == "timed out"
    assert note_unavailable(path, "echo", "refused", 60, now=5000.0) is None  # alerted once
    assert note_unavailable(path, "other", "refused", 0, now=5000.0) is not None  # per model
    assert MonitorState.load(path).outages["echo"]["alerted_at"] == 1060.0


def test_check_once_judges_host_cpu_at_the_end_of_the_window(
    tmp_path: Path, metrics_endpoint: MetricsEndpoint
) -> None:
    """``reloaded`` ends with the host CPU at 46.7%: healthy requests (2 of 7 failed is under
    the 50% error limit) still breach a 40% CPU limit, and the verdict carries the gauges."""
    path = tmp_path / "state.json"
    thresholds = Thresholds(max_error_rate=0.5, min_requests=3, max_cpu_utilization=0.4)
    metrics_endpoint.body = fixture_text("unloaded")
    check_once(metrics_endpoint.url, "echo", path, thresholds)  # baseline
    metrics_endpoint.body = fixture_text("reloaded")
    verdict = check_once(metrics_endpoint.url, "echo", path, thresholds)
    assert verdict.should_rollback and verdict.reasons[0].startswith("host CPU utilisation 46.7%")
    stats = verdict.to_dict()["stats"]
    assert stats["cpu_utilization"] == pytest.approx(0.467, abs=1e-3)
    assert stats["memory_utilization"] == pytest.approx(821215232 / 25276514304)
    relaxed = Thresholds(max_error_rate=0.5, min_requests=3, max_cpu_utilization=0.5)
    reset_model(path, "echo")
    metrics_endpoint.body = fixture_text("unloaded")
    check_once(metrics_endpoint.url, "echo", path, relaxed)
    metrics_endpoint.body = fixture_text("reloaded")
    assert not check_once(metrics_endpoint.url, "echo", path, relaxed).breached


def test_check_once_leaves_state_alone_when_triton_is_down(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    MonitorState(consecutive={"echo": 1}).save(path)
    before = path.read_text()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MetricsUnavailableError):
        check_once(f"http://127.0.0.1:{port}/metrics", "echo", path, Thresholds(), timeout_s=2)
    assert path.read_text() == before


# --------------------------------------------------------------------------- real Triton


def test_check_once_detects_breach_on_real_triton(flaky_triton, tmp_path: Path) -> None:
    from tests.triton_testing import infer_flaky, metric_value, settled_value

    harness, client = flaky_triton
    counted = ("success", "failure")
    # A live server without models still exposes nv_* metrics, and no model entries.
    assert scrape(harness.metrics_url, timeout_s=5).models == {}
    client.load_model("flaky", headers=harness.admin_headers, client_timeout=60)

    def infer(value: float) -> bool:
        return infer_flaky(client, value)

    state = tmp_path / "state.json"
    thresholds = Thresholds(max_error_rate=0.05, min_requests=5, consecutive_windows=1)
    baseline = check_once(harness.metrics_url, "flaky", state, thresholds)
    assert not baseline.breached and baseline.stats is None

    outcomes = [infer(1.0) for _ in range(3)] + [infer(-1.0) for _ in range(5)]
    assert outcomes == [True] * 3 + [False] * 5
    settled_value(  # Triton counts a request just after answering it
        lambda: sum(metric_value(harness.metrics_url, f, "flaky", "1") for f in counted), 8
    )

    verdict = check_once(harness.metrics_url, "flaky", state, thresholds)
    assert verdict.stats is not None
    assert (verdict.stats.requests, verdict.stats.failures) == (8, 5)
    assert verdict.stats.error_rate == pytest.approx(5 / 8)
    assert verdict.stats.mean_latency_ms is not None and verdict.stats.mean_latency_ms > 0
    assert verdict.breached and verdict.should_rollback
    assert "error rate 62.5%" in verdict.reasons[0]
    # An exception in the model's execute is Triton's BACKEND failure reason, said in the verdict.
    assert verdict.stats.failures_by_reason == {"BACKEND": 5.0}
    assert "BACKEND 5" in verdict.reasons[0]

    quiet = check_once(harness.metrics_url, "flaky", state, thresholds)
    assert not quiet.should_rollback  # the failures are not counted twice; no traffic, no call
    assert quiet.stats is not None and quiet.stats.requests == 0
