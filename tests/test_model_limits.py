"""The served model's size limits and its own error counter, against a real tritonserver.

* Oversized requests are refused before any decoding or tokenising, each with an INVALID_ARG
  error naming the limit, and never fail or stall the normal queries beside them.
* Errors the model answers itself are successes to Triton, so the model counts them in the
  custom metric ``recsys_request_errors_total``; the monitor judges a version that refuses most
  of its traffic by it (``Thresholds.max_rejected_rate``).
* Python-backend custom metrics once made a replaced version hang in UNLOADING for good; the
  swap test proves every replaced version leaves within a timeout, swap after swap, with traffic
  counting errors on both versions and two instances per version.

One server runs for the module; tests put version 1 (default limits) back when they change it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from recsys.families.search.client import SearchError, search
from recsys.monitoring.metrics import MODEL_ERRORS, scrape
from recsys.monitoring.policy import Thresholds, check_once
from recsys.triton.control import TritonControl
from recsys.triton.repository import list_versions, publish_version, serving_config
from tests.triton_testing import (
    CATALOG,
    TritonHarness,
    build_test_serving_artifacts,
    metric_value,
    running_triton,
    settled_value,
)

MODEL = "product_search"
DEFAULT_MAX_QUERY_BYTES = (
    2048  # recsys.families.search.serving_model's defaults (it imports only in Triton)
)
DRILL = CATALOG["100001"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_serving_artifacts(tmp_path_factory.mktemp("artifacts") / "healthy")


@pytest.fixture(scope="module")
def published(triton: TritonHarness, artifacts: Path) -> Path:
    """Versions 1 and 2 of the same artifacts (what a swap needs)."""
    for version in (1, 2):
        if version not in list_versions(triton.repo, MODEL):
            publish_version(triton.repo, MODEL, version, artifacts)
    return triton.repo / MODEL


@pytest.fixture()
def serving_v1(triton: TritonHarness, control: TritonControl, published: Path) -> None:
    """Version 1 with the default config (default limits) is the only version serving."""
    control.load_version(MODEL, 1, triton.repo)


def with_limits(version_config: dict, **limits: int) -> dict:
    """``version_config`` with size limits as model config ``parameters``."""
    parameters = dict(version_config.get("parameters") or {})
    parameters.update({key: {"string_value": str(value)} for key, value in limits.items()})
    return {**version_config, "parameters": parameters}


def infer_rows(url: str, rows: list[bytes], top_k: int = 3, timeout_s: float = 60.0) -> np.ndarray:
    """One request of ``len(rows)`` QUERY rows; the PRODUCT_IDS, or SearchError with the
    server's message."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    query = grpcclient.InferInput("QUERY", [len(rows), 1], "BYTES")
    query.set_data_from_numpy(np.array([[row] for row in rows], dtype=np.object_))
    top_k_input = grpcclient.InferInput("TOP_K", [len(rows), 1], "INT32")
    top_k_input.set_data_from_numpy(np.full((len(rows), 1), top_k, dtype=np.int32))
    with grpcclient.InferenceServerClient(url) as client:
        try:
            result = client.infer(MODEL, [query, top_k_input], client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise SearchError(f"[{exc.status()}] {exc.message()}") from exc
    return result.as_numpy("PRODUCT_IDS")


def rejected(triton: TritonHarness, version: str) -> float:
    return metric_value(triton.metrics_url, "rejected", MODEL, version)


def error_series(triton: TritonHarness) -> list[str]:
    """The raw ``recsys_request_errors_total`` lines of Triton's /metrics."""
    with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line.startswith(MODEL_ERRORS + "{")]


def stub_processes(triton: TritonHarness) -> list[int]:
    """Pids of this server's python stubs (their command line names its shm region prefix)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        prefix = triton.server.shm_prefix.encode()
        if argv[0].endswith(b"triton_python_backend_stub") and any(prefix in a for a in argv):
            pids.append(int(proc.name))
    return pids


def test_a_query_over_the_limit_is_refused_and_one_at_it_is_answered(
    triton: TritonHarness, control: TritonControl, serving_v1: None
) -> None:
    before = rejected(triton, "1")
    at_limit = ("drill " * DEFAULT_MAX_QUERY_BYTES)[:DEFAULT_MAX_QUERY_BYTES]
    assert len(at_limit.encode()) == DEFAULT_MAX_QUERY_BYTES
    assert len(search(control, MODEL, at_limit, top_k=3)) == 3

    with pytest.raises(SearchError) as refused:
        search(control, MODEL, at_limit + "x", top_k=3)
    message = str(refused.value)
    assert f"QUERY is {DEFAULT_MAX_QUERY_BYTES + 1} bytes" in message
    assert f"over the limit of {DEFAULT_MAX_QUERY_BYTES} bytes per query" in message
    assert "RECSYS_MAX_QUERY_BYTES" in message
    # Refused before decoding: invalid UTF-8 over the limit is refused for its size.
    with pytest.raises(SearchError, match="over the limit of 2048 bytes per query"):
        search(control, MODEL, b"\xff" * 5000, top_k=3)
    with pytest.raises(SearchError, match="INVALID_ARG"):
        infer_rows(triton.grpc_url, [b"x" * 3000])

    assert settled_value(lambda: rejected(triton, "1"), before + 3) == before + 3
    assert search(control, MODEL, DRILL, top_k=1)[0][0] == "100001"


def test_request_limit_and_config_parameters(
    triton: TritonHarness, control: TritonControl, published: Path
) -> None:
    """Limits from the model config's ``parameters``; the per-request limit sums the rows."""
    config = with_limits(serving_config(MODEL), max_query_bytes=50, max_request_bytes=100)
    control.load_version(MODEL, 2, triton.repo, config=config)
    try:
        row = b"garden hose expandable fifty feet"  # 33 bytes
        assert infer_rows(triton.grpc_url, [row, row, row + b"!"]).shape == (3, 3)  # 100 bytes
        with pytest.raises(SearchError) as refused:
            infer_rows(triton.grpc_url, [row, row, row + b"!!"])
        assert "the request's 3 QUERY rows are 101 bytes together" in str(refused.value)
        assert "over the limit of 100 bytes per request" in str(refused.value)
        assert "RECSYS_MAX_REQUEST_BYTES" in str(refused.value)
        with pytest.raises(SearchError, match="QUERY row 1 is 51 bytes, over the limit of 50"):
            infer_rows(triton.grpc_url, [b"drill", b"d" * 51])
    finally:
        control.load_version(MODEL, 1, triton.repo)


def test_limits_from_tritonservers_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, artifacts: Path
) -> None:
    """The python stub inherits tritonserver's environment; a malformed limit is logged and
    the default used, so it never makes a load (a rollback's included) fail."""
    monkeypatch.setenv("RECSYS_MAX_QUERY_BYTES", "12")
    monkeypatch.setenv("RECSYS_MAX_REQUEST_BYTES", "lots")
    with running_triton(tmp_path / "triton") as other:
        publish_version(other.repo, MODEL, 1, artifacts)
        with TritonControl(other.grpc_url, timeout_s=30) as client:
            client.load_version(MODEL, 1, other.repo)
            assert search(client, MODEL, "drill", top_k=1)
            with pytest.raises(SearchError, match="is 14 bytes, over the limit of 12 bytes"):
                search(client, MODEL, "cordless drill", top_k=1)
            log_text = Path(other.server.log_path).read_text(errors="replace")
    assert "RECSYS_MAX_REQUEST_BYTES='lots' is not a positive integer; using 16384" in log_text
    assert "limits 12 B/query 16384 B/request" in log_text


def test_huge_queries_are_refused_without_stalling_normal_traffic(
    triton: TritonHarness, control: TritonControl, serving_v1: None
) -> None:
    """Four 5 MB queries (one used to take seconds to tokenise, and every query batched or
    queued behind it waited) are refused, while normal queries sent at the same time all get
    their right answer."""
    huge = ("drill " * 900_000).encode()[: 5 * 1024 * 1024]
    stop = threading.Event()

    def normal() -> list[bool]:
        answers = []
        with TritonControl(triton.grpc_url, timeout_s=30) as client:
            while not stop.is_set() or len(answers) < 10:
                answers.append(search(client, MODEL, DRILL, top_k=1)[0][0] == "100001")
        return answers

    def oversized() -> tuple[str, float]:
        started = time.monotonic()
        try:
            infer_rows(triton.grpc_url, [huge], timeout_s=60)
        except SearchError as exc:
            return str(exc), time.monotonic() - started
        return "answered", time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        normal_runs = [pool.submit(normal) for _ in range(2)]
        refusals = [f.result(timeout=90) for f in [pool.submit(oversized) for _ in range(4)]]
        stop.set()
        answers = [answer for run in normal_runs for answer in run.result(timeout=60)]

    for message, seconds in refusals:
        assert f"QUERY is {len(huge)} bytes, over the limit of 2048 bytes per query" in message
        print(f"5 MB query refused in {seconds:.2f}s")
    assert len(answers) >= 20 and all(answers)


def test_rejected_requests_are_counted_per_reason_and_version(
    triton: TritonHarness, control: TritonControl, serving_v1: None
) -> None:
    """Bad requests batched with good ones fail alone, and each is counted once under its
    reason; Triton itself counts all of them as successes."""
    snapshot = scrape(triton.metrics_url).models.get((MODEL, "1"))
    invalid_before = snapshot.rejected_by_reason.get("invalid_argument", 0.0) if snapshot else 0
    oversized_before = snapshot.rejected_by_reason.get("oversized", 0.0) if snapshot else 0
    success_before = snapshot.success if snapshot else 0.0

    def one(i: int) -> object:
        query, top_k = {0: (DRILL, 0), 1: ("q" * 3000, 3)}.get(i % 4, (DRILL, 2))
        try:
            return search(control, MODEL, query, top_k=top_k)
        except SearchError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(40)))
    for i, answer in enumerate(answers):
        if i % 4 in (0, 1):
            assert isinstance(answer, SearchError)
        else:
            assert answer[0][0] == "100001"

    settled_value(
        lambda: metric_value(triton.metrics_url, "success", MODEL, "1"), success_before + 40
    )
    counters = scrape(triton.metrics_url).models[(MODEL, "1")]
    assert counters.rejected_by_reason["invalid_argument"] - invalid_before == 10
    assert counters.rejected_by_reason["oversized"] - oversized_before == 10
    assert counters.success - success_before == 40  # all 40, the 20 refusals included
    series = [line for line in error_series(triton) if 'version="1"' in line]
    assert {line.split('reason="')[1].split('"')[0] for line in series} == {
        "invalid_argument",
        "oversized",
    }
    assert all(f'model="{MODEL}"' in line and "instance=" in line for line in series)


def test_swapping_versions_with_custom_metrics_never_hangs_an_unload(
    triton: TritonHarness, published: Path
) -> None:
    """v1 -> v2 -> v1 ... five swaps, two instances per version, under traffic that counts
    errors on whichever version serves: each load returns with the replaced version gone
    (``load_version`` raises ``VersionsNotRetiredError`` after 20 s otherwise), and each
    version's counter counts."""
    config = serving_config(MODEL, instance_count=2)
    control = TritonControl(triton.grpc_url, timeout_s=30, load_timeout_s=60, retire_timeout_s=20)
    stop = threading.Event()
    sent = {"bad": 0, "good": 0}

    def traffic() -> None:
        with TritonControl(triton.grpc_url, timeout_s=30) as client:
            while not stop.is_set():
                bad = (sent["good"] + sent["bad"]) % 3 == 0
                with contextlib.suppress(SearchError):  # the bad ones are refused on purpose
                    search(client, MODEL, DRILL, top_k=0 if bad else 2)
                sent["bad" if bad else "good"] += 1

    control.load_version(MODEL, 1, triton.repo, config=config)
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        for swap, version in enumerate((2, 1, 2, 1, 2, 1)):
            started = time.monotonic()
            control.load_version(MODEL, version, triton.repo, config=config)
            states = control.version_states(MODEL)
            assert {v: s for v, s in states.items() if s != "UNAVAILABLE"} == {version: "READY"}
            print(f"swap {swap} to v{version}: {time.monotonic() - started:.1f}s")
            # The newly serving version counts the errors it answers.
            assert settled_value(lambda v=version: float(rejected(triton, str(v)) > 0), 1.0) == 1
    finally:
        stop.set()
        thread.join(30)
        control.load_version(MODEL, 1, triton.repo)
        control.close()
    assert not thread.is_alive()
    assert sent["bad"] > 0 and sent["good"] > 0
    # A replaced version's series leave with it (its Metric objects were destroyed).
    assert not [line for line in error_series(triton) if 'version="2"' in line]
    # Nothing of the replaced versions lingers: only the stub of v1 (default config, one
    # instance) is left.
    assert settled_value(lambda: float(len(stub_processes(triton))), 1.0, timeout_s=20) == 1
    log_text = Path(triton.server.log_path).read_text(errors="replace")
    assert "deleted before" not in log_text and "Error when deleting" not in log_text


def test_the_monitor_judges_a_version_that_refuses_everything(
    triton: TritonHarness, control: TritonControl, published: Path, tmp_path: Path
) -> None:
    """A version whose limits refuse every normal query answers each request "successfully"
    to Triton; the monitor, on real scrapes, judges it a breach naming the rejected rate. The
    good version with a few bad requests among many good ones is healthy."""
    state = tmp_path / "monitor.json"
    thresholds = Thresholds(min_requests=10, max_window_s=600)
    config = with_limits(serving_config(MODEL), max_query_bytes=3)
    control.load_version(MODEL, 2, triton.repo, config=config)
    try:
        assert "baseline" in check_once(triton.metrics_url, MODEL, state, thresholds).reasons[-1]
        success = metric_value(triton.metrics_url, "success", MODEL, "2")
        for _ in range(12):
            with pytest.raises(SearchError, match="over the limit of 3 bytes per query"):
                search(control, MODEL, DRILL, top_k=3)
        settled_value(lambda: metric_value(triton.metrics_url, "success", MODEL, "2"), success + 12)
        verdict = check_once(triton.metrics_url, MODEL, state, thresholds)
    finally:
        control.load_version(MODEL, 1, triton.repo)
    assert verdict.judged and verdict.breached and verdict.should_rollback
    assert verdict.stats.failures == 0 and verdict.stats.error_rate == 0  # Triton: all fine
    assert verdict.stats.rejected == 12 and verdict.stats.rejected_rate == 1.0
    assert verdict.reasons[0].startswith("rejected rate 100.0% (12 of 12 requests refused")
    assert "oversized 12" in verdict.reasons[0] and "> max 50.0%" in verdict.reasons[0]

    check_once(triton.metrics_url, MODEL, state, thresholds)  # baseline on v1 alone
    success = metric_value(triton.metrics_url, "success", MODEL, "1")
    for i in range(22):
        if i % 11 == 0:
            with pytest.raises(SearchError, match="TOP_K must be between"):
                search(control, MODEL, DRILL, top_k=0)
        else:
            assert search(control, MODEL, DRILL, top_k=2)
    settled_value(lambda: metric_value(triton.metrics_url, "success", MODEL, "1"), success + 22)
    healthy = check_once(triton.metrics_url, MODEL, state, thresholds)
    assert healthy.judged and not healthy.breached
    assert healthy.stats.rejected == 2 and healthy.stats.rejected_by_reason == {
        "invalid_argument": 2
    }
    assert "rejected rate 9.1%" in healthy.reasons[-1]
