"""Per-model thresholds from ``RECSYS_MONITOR_CONFIG`` and the p99 / success-rate parts of the
verdict. Pure functions and real files; no services needed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from recsys.monitoring.config import CONFIG_ENV, MonitorConfigError, load_thresholds
from recsys.monitoring.policy import Thresholds, evaluate
from recsys.monitoring.window import WindowStats
from tests.test_monitoring import window_stats


def stats(requests: float, failures: float, mean_ms: float, p99_ms: float | None) -> WindowStats:
    return window_stats(requests, failures, mean_ms, p99_ms)


def test_precedence_builtin_file_defaults_model_entry_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "defaults:\n  max_error_rate: 0.1\n  min_requests: 20\n"
        "models:\n  search:\n    max_p99_latency_ms: 250\n    min_requests: 50\n"
    )
    assert load_thresholds("other", path) == Thresholds(max_error_rate=0.1, min_requests=20)
    assert load_thresholds("search", path) == Thresholds(
        max_error_rate=0.1, min_requests=50, max_p99_latency_ms=250
    )
    overridden = load_thresholds("search", path, {"min_requests": 3, "max_error_rate": None})
    assert overridden.min_requests == 3 and overridden.max_error_rate == 0.1


def test_json_file_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps({"models": {"search": {"consecutive_windows": 3}}}))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_thresholds("search").consecutive_windows == 3
    monkeypatch.delenv(CONFIG_ENV)
    assert load_thresholds("search") == Thresholds()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {search: {max_error_rte: 0.1}}", "unknown threshold"),
        ("defaults: {max_error_rate: 2}", "max_error_rate must be within"),
        ("thresholds: {}", "unknown top-level"),
        ("defaults: [1, 2]", "must be a mapping"),
        ("defaults: {max_error_rate: 0.1", "not valid YAML"),
        ("defaults: {max_cpu_utilization: 1.5}", "max_cpu_utilization must be within"),
    ],
)
def test_bad_files_fail_loudly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    with pytest.raises(MonitorConfigError, match=message):
        load_thresholds("search", path)


def test_missing_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(MonitorConfigError, match="cannot read"):
        load_thresholds("search", tmp_path / "absent.yaml")


def test_p99_breach_with_a_healthy_mean_and_success_rate_in_the_verdict() -> None:
    thresholds = Thresholds(max_p99_latency_ms=200)
    verdict = evaluate(stats(100, 0, mean_ms=40, p99_ms=450), thresholds, 0)
    assert verdict.should_rollback
    assert any("p99 latency 450.0 ms > max 200.0 ms" in r for r in verdict.reasons)
    payload = verdict.to_dict()
    assert payload["success_rate"] == 1.0 and payload["p99_latency_ms"] == 450
    healthy = evaluate(stats(100, 2, mean_ms=40, p99_ms=150), thresholds, 0)
    assert not healthy.breached and healthy.to_dict()["success_rate"] == 0.98
    assert "success rate 98.0%" in healthy.reasons[-1]


def test_no_traffic_is_neither_breach_nor_recovery_even_with_a_p99_limit() -> None:
    thresholds = Thresholds(min_requests=10, consecutive_windows=2, max_p99_latency_ms=100)
    first = evaluate(stats(50, 0, mean_ms=40, p99_ms=500), thresholds, 0)
    assert first.breached and not first.should_rollback and first.consecutive == 1
    quiet = evaluate(stats(3, 0, mean_ms=40, p99_ms=500), thresholds, first.consecutive)
    assert not quiet.breached and not quiet.should_rollback and quiet.consecutive == 1
    assert quiet.success_rate == 1.0
    empty = evaluate(stats(0, 0, mean_ms=40, p99_ms=None), thresholds, 1)
    assert empty.success_rate is None and empty.consecutive == 1
    second = evaluate(stats(50, 0, mean_ms=40, p99_ms=500), thresholds, quiet.consecutive)
    assert second.should_rollback


def test_host_cpu_and_memory_limits_from_the_file_with_hysteresis(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "models:\n  search: {max_cpu_utilization: 0.9, max_memory_utilization: 0.8,"
        " consecutive_windows: 2}\n"
    )
    thresholds = load_thresholds("search", path)
    assert load_thresholds("other", path).max_cpu_utilization is None  # off by default
    gib = 2**30
    busy = replace(
        stats(50, 0, mean_ms=40, p99_ms=60),
        cpu_utilization=0.95,
        memory_used_bytes=7 * gib,
        memory_total_bytes=8 * gib,
    )
    first = evaluate(busy, thresholds, 0)
    assert first.breached and not first.should_rollback and first.consecutive == 1
    assert "host CPU utilisation 95.0% > max 90.0%" in first.reasons[0]
    assert "host memory in use 87.5% (7168 MiB) > max 80.0%" in first.reasons[1]
    assert evaluate(busy, thresholds, first.consecutive).should_rollback
    calm = replace(busy, cpu_utilization=0.5, memory_used_bytes=2 * gib)
    assert evaluate(calm, thresholds, first.consecutive).consecutive == 0
    unknown = replace(busy, cpu_utilization=None, memory_used_bytes=None)
    assert not evaluate(unknown, thresholds, 0).breached  # not measured never breaches
    quiet = replace(busy, requests=2, failures=0)
    assert not evaluate(quiet, Thresholds(max_cpu_utilization=0.9), 0).breached  # no traffic
