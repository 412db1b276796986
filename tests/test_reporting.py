"""The metrics recorder and the dashboard PNG against a real Triton.

A healthy v1 serves, a v2 that raises after two requests is deployed, traffic fails, v1 is loaded
back (the rollback) and serves again, all while :class:`MetricsRecorder` scrapes in the
background. The samples must show the failures and both versions, and the rendered PNG must be a
real image a person can open.
"""

from __future__ import annotations

import struct
import time
from datetime import datetime
from pathlib import Path

import pytest

from recsys.audit import append_record, read_records
from recsys.families.search.client import SearchError, search
from recsys.monitoring.metrics import parse_metrics
from recsys.reporting import (
    FOCUS_MARGIN_S,
    MetricsRecorder,
    Sample,
    fault_window,
    render_dashboard_png,
    sample_between,
)
from recsys.triton.control import TritonControl
from recsys.triton.repository import publish_version
from tests.triton_testing import build_test_serving_artifacts, copy_artifacts, running_triton

MODEL = "product_search"
FIXTURES = Path(__file__).parent / "fixtures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR", "PNG without IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _png_window(path: Path) -> tuple[float, float]:
    """The time window the dashboard says it drew (its ``Window`` PNG text chunk)."""
    from PIL import Image

    with Image.open(path) as image:
        start, end = image.text["Window"].split("/")
    return datetime.fromisoformat(start).timestamp(), datetime.fromisoformat(end).timestamp()


def _idle_minutes(before: Sample, minutes: int, interval_s: float = 5.0) -> list[Sample]:
    """What a recorder started before a pipeline run holds for the training minutes: scrapes
    with no request at all, ending where ``before``'s window starts."""
    end = before.ts - before.seconds
    n = int(minutes * 60 / interval_s)
    return [
        Sample(end - (n - i) * interval_s, interval_s, 0.0, 0.0, 0.0, 0.0, None, None, None)
        for i in range(1, n + 1)
    ]


def _await_scrapes(recorder: MetricsRecorder, n: int = 2, timeout_s: float = 20.0) -> None:
    """Block until the recorder has taken ``n`` more samples. A fixed sleep would let a starved
    recorder thread on a busy machine miss a phase (say v2's failures before v2 is unloaded);
    the second new sample is also at least one interval after the traffic, which gives Triton
    time to record the last request."""
    target = len(recorder.samples) + n
    deadline = time.monotonic() + timeout_s
    while len(recorder.samples) < target and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(recorder.samples) >= target, f"recorder took no {n} samples in {timeout_s}s"


def _send(control: TritonControl, n: int) -> tuple[int, int]:
    ok = failed = 0
    for i in range(n):
        try:
            search(control, MODEL, f"cordless drill {i % 3}", top_k=3)
            ok += 1
        except SearchError:
            failed += 1
    return ok, failed


def test_sample_between_real_scrapes() -> None:
    """The window between two committed real scrapes: 6 more successes, 3 more failures."""
    before = parse_metrics((FIXTURES / "triton_metrics_before.txt").read_text(), 100.0)
    after = parse_metrics((FIXTURES / "triton_metrics_after.txt").read_text(), 110.0)
    model = next(iter(after.models))[0]
    sample = sample_between(before, after, model)
    assert sample.seconds == 10.0
    assert (sample.requests, sample.failures) == (9, 3)
    assert sample.request_rate == pytest.approx(0.9)
    assert sample.error_rate == pytest.approx(1 / 3)
    assert sample.versions == ("1",)
    assert sample_between(before, after, "no_such_model").requests == 0


def test_render_refuses_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no samples"):
        render_dashboard_png([], [], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_record_faulty_deploy_and_rollback_then_render(tmp_path: Path) -> None:
    healthy = build_test_serving_artifacts(tmp_path / "healthy")
    faulty = copy_artifacts(
        healthy, tmp_path / "faulty", fault_injection={"mode": "raise", "after_requests": 2}
    )
    audit_log = tmp_path / "audit" / "audit.jsonl"
    with (
        running_triton(tmp_path / "triton") as triton,
        TritonControl(triton.grpc_url, timeout_s=30) as control,
    ):
        publish_version(triton.repo, MODEL, 1, healthy)
        publish_version(triton.repo, MODEL, 2, faulty)
        control.load_version(MODEL, 1, triton.repo)
        append_record(audit_log, "deploy", MODEL, version=1, replaced=None)

        recorder = MetricsRecorder(triton.metrics_url, MODEL, interval_s=0.3)
        with recorder:
            assert _send(control, 12) == (12, 0)
            _await_scrapes(recorder)
            control.load_version(MODEL, 2, triton.repo)
            append_record(audit_log, "deploy", MODEL, version=2, replaced=1)
            ok, failed = _send(control, 14)
            assert (ok, failed) == (2, 12)  # the fault: two answers, then errors
            _await_scrapes(recorder)
            control.load_version(MODEL, 1, triton.repo)
            append_record(audit_log, "rollback", MODEL, from_version=2, to_version=1, reason="test")
            assert _send(control, 12) == (12, 0)
            _await_scrapes(recorder)
        samples = recorder.samples

    assert recorder.scrape_errors == 0
    assert len(samples) >= 6, samples
    assert all(isinstance(s, Sample) for s in samples)
    assert [s.ts for s in samples] == sorted(s.ts for s in samples)
    assert sum(s.failures for s in samples) == 12
    assert sum(s.requests for s in samples) == 38
    assert max(s.error_rate for s in samples) > 0.5
    served = [s.versions for s in samples if s.versions]
    assert {v for versions in served for v in versions} == {"1", "2"}
    assert served[0] == ("1",) and served[-1] == ("1",), served  # v1 before and after
    assert any(s.mean_latency_ms is not None and s.mean_latency_ms > 0 for s in samples)
    assert any(s.p99_latency_ms is not None for s in samples)
    assert samples[-1].error_rate == 0.0  # the rollback restored a healthy model

    records = read_records(audit_log, MODEL)
    png = render_dashboard_png(samples, records, tmp_path / "reports" / "dashboard.png")
    width, height = _png_size(png)
    assert (width, height) == (1400, 1000)
    assert png.stat().st_size > 30_000  # six drawn panels, not a blank canvas

    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn

    # The demo's recorder also holds the idle training minutes before the faulty deploy: the
    # picture must show the fault (deploy v2 -> failures -> rollback -> recovery), not them.
    idle = _idle_minutes(samples[0], minutes=10)
    recording = idle + samples
    when = {(r["action"], r.get("version")): datetime.fromisoformat(r["ts"]) for r in records}
    deploy_v2, rollback = when[("deploy", 2)].timestamp(), when[("rollback", None)].timestamp()
    start, end = fault_window(recording, records)
    assert start == pytest.approx(deploy_v2 - FOCUS_MARGIN_S)  # shortly before the deploy
    assert rollback < end <= recording[-1].ts  # past the rollback, within the recording
    assert start > idle[0].ts + 9 * 60  # at most the margin's worth of idle time
    failing = [s for s in recording if s.failures > 0]
    assert start <= failing[0].ts - failing[0].seconds and failing[-1].ts <= end

    focused = render_dashboard_png(recording, records, tmp_path / "reports" / "focused.png")
    assert _png_window(focused) == pytest.approx((start, end), abs=1e-3)
    whole = render_dashboard_png(recording, records, tmp_path / "whole.png", margin_s=None)
    assert _png_window(whole) == pytest.approx((idle[0].ts - 5.0, recording[-1].ts), abs=1e-3)
