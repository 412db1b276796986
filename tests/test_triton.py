"""Triton serving against a real tritonserver: atomic publishing, pinned loads and rollbacks,
input validation, fault injection and what the server reports about it.

One server runs for the whole module (it starts in well under a second; each load starts a
python stub). Tests that change what serves put version 1 back before they finish, so every
test begins with v1 serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from recsys.families.search.client import SearchError, search
from recsys.families.search.family import smoke_check
from recsys.triton.control import ModelLoadError, TritonControl, TritonUnavailableError
from recsys.triton.repository import (
    COMPLETE_MARKER,
    IncompleteArtifactsError,
    InvalidModelNameError,
    VersionExistsError,
    list_versions,
    publish_version,
    serving_config,
    verify_version_dir,
)
from recsys.triton.server import SHM_DIR, TritonServer, TritonStartError
from tests.triton_testing import (
    CATALOG,
    TritonHarness,
    build_test_serving_artifacts,
    copy_artifacts,
    free_port,
    metric_value,
    settled_value,
)

MODEL = "product_search"
N_PRODUCTS = len(CATALOG)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_serving_artifacts(tmp_path_factory.mktemp("artifacts") / "healthy")


@pytest.fixture()
def serving_v1(triton: TritonHarness, control: TritonControl, artifacts: Path) -> Path:
    """Version 1 published and the only version serving."""
    if 1 not in list_versions(triton.repo, MODEL):
        publish_version(triton.repo, MODEL, 1, artifacts)
    if control.loaded_versions(MODEL) != [1]:
        control.load_version(MODEL, 1, triton.repo)
    return triton.repo / MODEL / "1"


def test_publish_is_atomic_and_version_loads(
    triton: TritonHarness, control: TritonControl, artifacts: Path, tmp_path: Path
) -> None:
    version_dir = publish_version(triton.repo, MODEL, 1, artifacts)

    assert version_dir == triton.repo / MODEL / "1"
    assert {p.name for p in version_dir.iterdir()} == {
        "encoder.onnx", "tokenizer.json", "products.npz", "manifest.json", "model.py",
        "query_reference.json", COMPLETE_MARKER,
    }  # fmt: skip
    assert json.loads((version_dir / "manifest.json").read_text())["version"] == 1
    seal = json.loads((version_dir / COMPLETE_MARKER).read_text())
    assert set(seal["sha256"]) == {p.name for p in version_dir.iterdir()} - {COMPLETE_MARKER}
    assert not (triton.repo / ".staging").exists(), "staging debris left behind"
    assert (triton.repo / MODEL / "config.pbtxt").read_text().count('backend: "python"') == 1
    assert list_versions(triton.repo, MODEL) == [1]
    # Publishing the same artifacts again (a retried deploy) is a no-op; other artifacts under
    # the same version number are refused: versions are immutable.
    assert publish_version(triton.repo, MODEL, 1, artifacts) == version_dir
    other = copy_artifacts(artifacts, tmp_path / "other")
    products = dict(np.load(other / "products.npz"))
    np.savez(other / "products.npz", ids=products["ids"], embeddings=-products["embeddings"])
    with pytest.raises(VersionExistsError, match=r"different artifacts.*immutable"):
        publish_version(triton.repo, MODEL, 1, other)

    control.load_version(MODEL, 1, triton.repo)
    assert control.loaded_versions(MODEL) == [1]


def test_search_ranks_catalogue_products(serving_v1: Path, control: TritonControl) -> None:
    with np.load(serving_v1 / "products.npz") as products:
        known_ids = {str(i) for i in products["ids"]}

    hits = search(control, MODEL, CATALOG["100003"], top_k=5)

    assert len(hits) == 5
    assert {pid for pid, _ in hits} <= known_ids
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)
    assert hits[0][0] == "100003"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert hits[1][1] < hits[0][1] - 1e-3

    everything = search(control, MODEL, "cordless battery", top_k=N_PRODUCTS)
    assert sorted(pid for pid, _ in everything) == sorted(known_ids)
    assert len(smoke_check(control, MODEL, "garden hose", top_k=3)) == 3


def test_pinned_version_and_rollback(
    triton: TritonHarness, control: TritonControl, artifacts: Path, serving_v1: Path
) -> None:
    publish_version(triton.repo, MODEL, 2, artifacts)

    control.load_version(MODEL, 2, triton.repo)
    assert control.loaded_versions(MODEL) == [2]
    assert search(control, MODEL, "wood stain", top_k=3, version=2)
    with pytest.raises(SearchError, match="version 1"):
        search(control, MODEL, "wood stain", top_k=3, version=1)

    control.load_version(MODEL, 1, triton.repo)  # rollback
    assert control.loaded_versions(MODEL) == [1]
    assert smoke_check(control, MODEL, "wood stain", top_k=3, version=1)


def test_half_written_version_is_refused_and_current_keeps_serving(
    triton: TritonHarness, control: TritonControl, artifacts: Path, serving_v1: Path
) -> None:
    half = triton.repo / MODEL / "7"
    half.mkdir()
    for name in ("encoder.onnx", "manifest.json"):
        shutil.copy(artifacts / name, half / name)

    assert 7 not in list_versions(triton.repo, MODEL)
    with pytest.raises(IncompleteArtifactsError, match=COMPLETE_MARKER):
        verify_version_dir(half)
    with pytest.raises(IncompleteArtifactsError, match=COMPLETE_MARKER):
        control.load_version(MODEL, 7, triton.repo)
    with pytest.raises(VersionExistsError, match="INCOMPLETE"):
        publish_version(triton.repo, MODEL, 7, artifacts)

    assert control.loaded_versions(MODEL) == [1]
    assert search(control, MODEL, CATALOG["100009"], top_k=2)[0][0] == "100009"


def test_incomplete_artifacts_are_not_published(
    triton: TritonHarness, artifacts: Path, tmp_path: Path
) -> None:
    broken = copy_artifacts(artifacts, tmp_path / "broken")
    (broken / "products.npz").unlink()

    with pytest.raises(IncompleteArtifactsError, match=r"missing products\.npz"):
        publish_version(triton.repo, MODEL, 8, broken)
    assert not (triton.repo / MODEL / "8").exists()

    (broken / "manifest.json").write_text("{not json")
    shutil.copy(artifacts / "products.npz", broken / "products.npz")
    with pytest.raises(IncompleteArtifactsError, match=r"manifest\.json"):
        publish_version(triton.repo, MODEL, 8, broken)
    assert not (triton.repo / MODEL / "8").exists()
    assert not (triton.repo / ".staging").exists()


def test_failed_load_reports_server_message_and_keeps_current(
    triton: TritonHarness, control: TritonControl, artifacts: Path, serving_v1: Path, tmp_path: Path
) -> None:
    broken = copy_artifacts(artifacts, tmp_path / "bad-fault", fault_injection="explode")
    publish_version(triton.repo, MODEL, 4, broken)

    with pytest.raises(ModelLoadError, match="unsupported fault_injection"):
        control.load_version(MODEL, 4, triton.repo)

    assert control.loaded_versions(MODEL) == [1]
    assert search(control, MODEL, CATALOG["100015"], top_k=1)[0][0] == "100015"


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "two words", "..", "x\x00y"])
def test_invalid_model_names_are_refused(
    triton: TritonHarness, control: TritonControl, artifacts: Path, name: str
) -> None:
    before = sorted(p.name for p in triton.repo.parent.iterdir())
    with pytest.raises(InvalidModelNameError):
        publish_version(triton.repo, name, 1, artifacts)
    with pytest.raises(InvalidModelNameError):
        control.load_version(name, 1, triton.repo)
    with pytest.raises(InvalidModelNameError):
        serving_config(name)
    assert sorted(p.name for p in triton.repo.parent.iterdir()) == before


def test_bad_inputs_get_clear_errors_and_server_keeps_serving(
    control: TritonControl, serving_v1: Path
) -> None:
    cases = [
        ("", 5, "QUERY is empty"),
        ("   ", 5, "QUERY is empty"),
        ("drill", 0, f"TOP_K must be between 1 and {N_PRODUCTS}, got 0"),
        ("drill", N_PRODUCTS + 1, f"TOP_K must be between 1 and {N_PRODUCTS}"),
        ("drill", -3, "TOP_K must be between"),
        (b"\xff\xfe drill", 5, "not valid UTF-8"),
    ]
    for query, top_k, message in cases:
        with pytest.raises(SearchError, match=message):
            search(control, MODEL, query, top_k=top_k)

    # Bad requests batched together with good ones fail alone.
    def one(i: int) -> object:
        query, top_k = ("", 5) if i % 3 == 0 else (CATALOG["100010"], 2)
        try:
            return search(control, MODEL, query, top_k=top_k)
        except SearchError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(24)))
    for i, answer in enumerate(answers):
        if i % 3 == 0:
            assert isinstance(answer, SearchError)
        else:
            assert isinstance(answer, list)
            assert answer[0][0] == "100010"
    assert smoke_check(control, MODEL, "kitchen faucet", top_k=5)


def test_raise_fault_counts_as_inference_failures(
    triton: TritonHarness, control: TritonControl, serving_v1: Path, tmp_path: Path
) -> None:
    faulty = build_test_serving_artifacts(tmp_path / "faulty", fault_injection="raise")
    publish_version(triton.repo, MODEL, 3, faulty)
    control.load_version(MODEL, 3, triton.repo)  # loading works; answering does not
    before = metric_value(triton.metrics_url, "failure", MODEL, "3")

    with pytest.raises(ModelLoadError, match="injected fault"):
        smoke_check(control, MODEL, "drill")
    for _ in range(3):
        with pytest.raises(SearchError, match="injected fault"):
            search(control, MODEL, "drill", top_k=3)

    after = settled_value(
        lambda: metric_value(triton.metrics_url, "failure", MODEL, "3"), before + 4
    )
    assert after - before == 4
    assert metric_value(triton.metrics_url, "success", MODEL, "3") == 0

    control.load_version(MODEL, 1, triton.repo)  # rollback restores service
    assert search(control, MODEL, "drill", top_k=3)


def test_delayed_and_slow_faults(
    triton: TritonHarness, control: TritonControl, artifacts: Path, serving_v1: Path, tmp_path: Path
) -> None:
    late = copy_artifacts(
        artifacts, tmp_path / "late", fault_injection={"mode": "raise", "after_requests": 2}
    )
    publish_version(triton.repo, MODEL, 5, late)
    control.load_version(MODEL, 5, triton.repo)
    assert smoke_check(control, MODEL, "drill", top_k=2)
    assert search(control, MODEL, "drill", top_k=2)
    with pytest.raises(SearchError, match="injected fault"):
        search(control, MODEL, "drill", top_k=2)

    slow = copy_artifacts(artifacts, tmp_path / "slow", fault_injection={"sleep_ms": 400})
    publish_version(triton.repo, MODEL, 6, slow)
    control.load_version(MODEL, 6, triton.repo)
    started = time.monotonic()
    assert search(control, MODEL, "drill", top_k=2)
    assert time.monotonic() - started >= 0.4

    control.load_version(MODEL, 1, triton.repo)
    assert control.loaded_versions(MODEL) == [1]


def test_unreachable_server_raises_unavailable(triton: TritonHarness) -> None:
    url = f"127.0.0.1:{free_port()}"
    client = TritonControl(url, timeout_s=3)

    assert client.is_live() is False
    with pytest.raises(TritonUnavailableError, match=url):
        search(client, MODEL, "drill")
    with pytest.raises(TritonUnavailableError, match=url):
        client.loaded_versions(MODEL)
    with pytest.raises(TritonUnavailableError, match=url):
        client.load_version(MODEL, 1, triton.repo)
    with pytest.raises(TritonUnavailableError, match=url):
        client.wait_live(timeout_s=1)


def test_start_refuses_busy_port_and_stop_cleans_only_own_shm(
    triton: TritonHarness, serving_v1: Path, tmp_path: Path
) -> None:
    busy = TritonServer(
        triton.repo,
        http_port=triton.server.http_port,
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=tmp_path / "busy",
    )
    with pytest.raises(TritonStartError, match="already in use"):
        busy.start(timeout_s=10)

    assert list(SHM_DIR.glob(f"{triton.server.shm_prefix}*")), "module server's stub region"
    second = TritonServer(
        triton.repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=tmp_path / "second",
    )
    with second:
        assert second.is_live()
        TritonControl(second.grpc_url, timeout_s=30).load_version(MODEL, 1, triton.repo)
        assert list(SHM_DIR.glob(f"{second.shm_prefix}*"))
    assert not second.is_live()
    assert not list(SHM_DIR.glob(f"{second.shm_prefix}*"))
    # The module server lost nothing: its stub's region is there and it still answers.
    assert list(SHM_DIR.glob(f"{triton.server.shm_prefix}*"))
    assert search(TritonControl(triton.grpc_url), MODEL, CATALOG["100016"], 1)[0][0] == "100016"


def test_response_cache_answers_repeated_query_from_cache(
    triton: TritonHarness, control: TritonControl, artifacts: Path, serving_v1: Path
) -> None:
    """The server starts with a local response cache; a version published with
    ``response_cache`` serves a repeated (query, top_k) from it, which Triton 2.51 reports as
    ``nv_cache_num_hits_per_model`` (and the model runs only for the first request)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from recsys.triton.repository import version_serving_config

    assert triton.server.response_cache_bytes > 0
    assert any(arg.startswith("--cache-config=local,size=") for arg in triton.server.command())

    def samples(name: str, version: str) -> float:
        with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
            text = response.read().decode()
        # The parser gives counter samples a synthesized ``_total``; Triton exposes none.
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == name
            for sample in family.samples
            if sample.name in (name, f"{name}_total")
            and sample.labels.get("model") == MODEL
            and sample.labels.get("version") == version
        )

    publish_version(triton.repo, MODEL, 9, artifacts, serving={"response_cache": True})
    config = version_serving_config(triton.repo, MODEL, 9)
    assert config["response_cache"] == {"enable": True}
    control.load_version(MODEL, 9, triton.repo, config=config)
    try:
        first = search(control, MODEL, CATALOG["100021"], top_k=3)
        second = search(control, MODEL, CATALOG["100021"], top_k=3)
        assert first == second and first[0][0] == "100021"
        assert settled_value(lambda: samples("nv_cache_num_misses_per_model", "9"), 1) == 1
        assert settled_value(lambda: samples("nv_cache_num_hits_per_model", "9"), 1) == 1
        # The hit never reached the model.
        assert settled_value(lambda: samples("nv_inference_exec_count", "9"), 1) == 1
        # Another top_k is another cache key: a miss, and the model runs again.
        assert len(search(control, MODEL, CATALOG["100021"], top_k=2)) == 2
        assert settled_value(lambda: samples("nv_cache_num_misses_per_model", "9"), 2) == 2
        assert samples("nv_cache_num_hits_per_model", "9") == 1
    finally:
        control.load_version(MODEL, 1, triton.repo)
    assert control.loaded_versions(MODEL) == [1]
