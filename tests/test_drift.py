"""Online query drift against the real components: a real Triton whose model samples the queries
it serves, the reference written by the exporter's encoder and tokenizer, the check, the
``query_drift`` DAG under ``dag.test()`` posting to a real local webhook and emitting its Asset
event into Airflow's database, and ``recsys drift``.

Traffic is real gRPC queries; "in distribution" means short queries made of the catalogue's
words like the test model's training queries, and the "no drift" traffic is the held-out third
of them that the reference never saw; "shifted" means long queries in a script the tiny
WordPiece vocabulary cannot spell. The blind-check tests break the sampler for real (its
folder replaced by a file while traffic flows) and read its health from Triton's metrics.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.config import Settings
from recsys.families.search.client import search
from recsys.families.search.drift_policy import DriftThresholds, psi
from recsys.families.search.drift_reference import (
    QUERY_REFERENCE_FILE,
    QueryReference,
    QueryReferenceError,
    quantile_histogram,
    write_query_reference,
)
from recsys.monitoring.config import MonitorConfigError, load_drift_thresholds
from recsys.monitoring.drift import MIN_EXPECTED_SAMPLES, check_query_drift
from recsys.monitoring.query_samples import (
    SamplerHealth,
    parse_sampler_metrics,
    read_new_samples,
)
from tests.triton_testing import (
    TritonHarness,
    build_test_serving_artifacts,
    held_out_queries,
    training_queries,
)
from tests.webhook_receiver import Receiver

SHIFTED_WORDS = ["дрель", "аккумуляторная", "краска", "белая", "смеситель", "кухонный", "ламинат"]


def in_distribution_queries(n: int = 80, seed: int = 0) -> list[str]:
    """Queries drawn from the test model's training queries (traffic whose content does not
    matter to a test, e.g. the sampler's file rotation)."""
    return random.Random(seed).choices(training_queries(), k=n)


def new_ordinary_queries(seed: int = 0) -> list[str]:
    """Each held-out query once, in a seeded order: new traffic from the training distribution
    that the reference never saw. Once each, because drawing repeatedly from a small held-out
    set would judge that set's own quirks, not the distribution's."""
    queries = held_out_queries()
    random.Random(seed).shuffle(queries)
    return queries


def wait_for(read: Callable[[], SamplerHealth], done: Callable[[SamplerHealth], bool]):
    """``read()`` once ``done`` says so; fails with the last value after 20 s. Triton updates
    its metrics as the model reports them, so a scrape may trail the request it follows."""
    deadline = time.monotonic() + 20.0
    value = read()
    while not done(value):
        assert time.monotonic() < deadline, f"condition not met; last value {value}"
        time.sleep(0.05)
        value = read()
    return value


def health_of(settings: Settings, model: str | None = None, version: int = 1) -> SamplerHealth:
    """The sampler health of ``model`` ``version`` as the drift check reads it."""
    import requests

    text = requests.get(settings.triton_metrics_url, timeout=5).text
    return parse_sampler_metrics(text, model or settings.model_name, version)


def shifted_queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(SHIFTED_WORDS, k=rng.randint(6, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return build_test_serving_artifacts(tmp_path_factory.mktemp("drift") / "serving")


# -- reference and policy, no server ------------------------------------------------------------


def test_reference_describes_the_training_queries(artifacts: Path) -> None:
    reference = QueryReference.load(artifacts / QUERY_REFERENCE_FILE)
    assert reference.queries == len(set(training_queries()))
    assert {"cordless", "drill", "galvanized"} <= reference.vocabulary
    assert reference.unk_rate == 0.0  # the tokenizer was trained on these words
    assert 0.0 <= reference.oov_rate < 0.5  # held-out estimate, not 0 by construction
    assert abs(float(reference.centroid @ reference.centroid) - 1.0) < 1e-6
    assert 0.0 < reference.spread < 1.0
    assert reference.token_length.counts[-1] == 0  # the overflow bin past the longest query
    assert sum(reference.token_length.counts) == reference.queries
    reference.check_encoder(artifacts)

    with pytest.raises(QueryReferenceError, match="too few"):
        write_query_reference(artifacts, ["cordless drill"] * 50)


def test_length_bins_and_psi() -> None:
    histogram = quantile_histogram([1, 2, 2, 3, 3, 3, 4, 4, 5, 9], max_bins=4)
    assert histogram.edges[0] == 0 and histogram.edges[-1] == 10
    assert sum(histogram.counts) == 10 and histogram.counts[-1] == 0
    assert histogram.bin_counts([0, 10, 400])[-1] == 2
    assert psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert psi([10, 20, 30, 0], [0, 0, 0, 60]) > 3.0


def test_drift_thresholds_come_from_the_monitor_config(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text(
        "defaults: {max_error_rate: 0.1}\n"
        "drift:\n"
        "  defaults: {min_queries: 100, max_centroid_shift: 0.8}\n"
        "  models: {search: {min_queries: 40}}\n"
    )
    monkeypatch.setenv("RECSYS_MONITOR_CONFIG", str(config))
    thresholds = load_drift_thresholds("search", overrides={"max_length_psi": 0.5})
    assert (thresholds.min_queries, thresholds.max_centroid_shift) == (40, 0.8)
    assert thresholds.max_length_psi == 0.5
    assert load_drift_thresholds("other").min_queries == 100
    config.write_text("drift: {models: {search: {min_querys: 40}}}\n")
    with pytest.raises(MonitorConfigError, match="unknown threshold"):
        load_drift_thresholds("search")
    with pytest.raises(MonitorConfigError, match="max_queries"):
        load_drift_thresholds("x", overrides={"max_queries": 1})  # < min_queries 100


def test_sample_reader_resumes_at_its_offsets_and_skips_partial_lines(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    first = folder / "queries-10-0.jsonl"
    first.write_text(
        json.dumps({"ts": 1.0, "query": "angle bracket"}) + "\nnot json\n"
        + json.dumps({"ts": 2.0, "query": "wood screws"}) + "\n"
        + '{"ts": 3.0, "query": "half a li'
    )  # fmt: skip
    read = read_new_samples(folder, {})
    assert read.queries == ["angle bracket", "wood screws"]
    assert (read.bad_lines, read.first_ts, read.last_ts) == (1, 1.0, 2.0)
    with first.open("a") as handle:
        handle.write('ne"}\n')
    again = read_new_samples(folder, read.offsets)
    assert again.queries == ["half a line"]
    assert read_new_samples(folder, again.offsets).queries == []
    first.unlink()
    assert read_new_samples(folder, again.offsets).offsets == {}


# -- against a real Triton that samples what it serves ------------------------------------------


@dataclass
class SamplingPlatform:
    settings: Settings
    triton: TritonHarness
    version: int = 1

    def send(self, queries: list[str]) -> None:
        from recsys.triton.control import TritonControl

        with TritonControl(self.settings.triton_grpc_url) as control:
            for query in queries:
                assert search(control, self.settings.model_name, query, top_k=3)


@contextlib.contextmanager
def serving_with_sampling(
    monkeypatch, tmp_path: Path, artifacts: Path, served_rate: float | None
) -> Iterator[SamplingPlatform]:
    """A platform serving the test model as v1 (published and loaded as a deploy does) on a
    Triton whose model samples ``served_rate`` of the queries into the settings' sample folder
    (``None``: tritonserver gets no ``RECSYS_QUERY_SAMPLE_*`` at all). The drift side expects
    rate 1.0. A failed sample write is retried after 50 ms (doubling), so a test sees the
    sampler recover within seconds."""
    from recsys.config import load_settings
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, version_serving_config
    from tests.triton_testing import running_triton

    home = tmp_path / "home"
    samples = home / "query_samples"
    monkeypatch.setenv("RECSYS_QUERY_SAMPLE_RETRY_S", "0.05")
    for name in ("RECSYS_QUERY_SAMPLE_DIR", "RECSYS_QUERY_SAMPLE_RATE"):
        monkeypatch.delenv(name, raising=False)  # the server gets only what it is told
    sampling = {} if served_rate is None else {"query_sample_dir": samples}
    if served_rate is not None:
        sampling["query_sample_rate"] = served_rate
    with running_triton(tmp_path / "triton", **sampling) as triton:
        server = triton.server
        monkeypatch.setenv("RECSYS_HOME", str(home))
        monkeypatch.setenv("RECSYS_TRITON_REPO", str(triton.repo))
        monkeypatch.setenv("RECSYS_TRITON_HTTP_PORT", str(server.http_port))
        monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(server.grpc_port))
        monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(server.metrics_port))
        monkeypatch.setenv("RECSYS_MODEL_NAME", f"product_search_{uuid.uuid4().hex[:8]}")
        monkeypatch.setenv("RECSYS_QUERY_SAMPLE_DIR", str(samples))
        monkeypatch.setenv("RECSYS_QUERY_SAMPLE_RATE", "1.0")
        monkeypatch.delenv("RECSYS_ALERT_WEBHOOK", raising=False)
        monkeypatch.delenv("RECSYS_MONITOR_CONFIG", raising=False)
        settings = load_settings()
        model = settings.model_name
        folder = publish_version(settings.triton_repo, model, 1, artifacts)
        assert (folder / QUERY_REFERENCE_FILE).is_file()  # published with the version
        with TritonControl(settings.triton_grpc_url) as control:
            control.load_version(
                model, 1, settings.triton_repo, config=version_serving_config(triton.repo, model, 1)
            )
        yield SamplingPlatform(settings=settings, triton=triton)


@pytest.fixture
def sampling_platform(monkeypatch, tmp_path, artifacts) -> Iterator[SamplingPlatform]:
    """:func:`serving_with_sampling` with every served query sampled (rate 1.0)."""
    with serving_with_sampling(monkeypatch, tmp_path, artifacts, 1.0) as platform:
        yield platform


def test_sampler_rotates_its_files_and_never_fails_a_request(
    monkeypatch, tmp_path, artifacts
) -> None:
    """With 1 KiB segments, a busy instance keeps only its newest segments (every one a set of
    whole JSON lines); where the sample folder cannot be created, queries are answered anyway
    and the failure is in Triton's log, once, with its error name and the retry."""
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, serving_config
    from tests.triton_testing import running_triton

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "unwritable").write_text("a file where the model's sample folder would go")
    monkeypatch.setenv("RECSYS_QUERY_SAMPLE_MAX_BYTES", "1024")
    monkeypatch.setenv("RECSYS_QUERY_SAMPLE_RETRY_S", "0.05")
    with running_triton(tmp_path / "triton", query_sample_dir=samples, query_sample_rate=1) as t:
        with TritonControl(t.grpc_url) as control:
            for name in ("sampled", "unwritable"):
                publish_version(t.repo, name, 1, artifacts)
                control.load_version(name, 1, t.repo, config=serving_config(name))
            queries = in_distribution_queries(120)
            for query in queries:
                assert search(control, "sampled", query, top_k=3)
                assert search(control, "unwritable", query, top_k=3)
        log_text = Path(t.server.log_path).read_text(errors="replace")
    failures = [line for line in log_text.splitlines() if "query sampling to" in line]
    assert len(failures) == 1, failures  # one line per error, not one per batch
    assert "(ENOTDIR: " in failures[0] and "retrying" in failures[0]

    files = sorted((samples / "sampled" / "1").glob("queries-*.jsonl"))
    assert 1 < len(files) <= 4  # SAMPLE_SEGMENTS_KEPT: the oldest segments were removed
    assert all(path.stat().st_size <= 1024 for path in files)
    read = read_new_samples(samples / "sampled" / "1", {})
    assert read.bad_lines == 0 and 0 < len(read.queries) < len(queries)
    assert read.queries == queries[-len(read.queries) :]  # the newest, in order


def test_a_sampling_version_retires_promptly_when_another_replaces_it(tmp_path, artifacts) -> None:
    """Deploy/rollback swaps under traffic with query sampling on: every replaced version
    leaves Triton within seconds. (With Triton custom metrics in the sampler, the replaced
    version's stub hung in UNLOADING for good on the second swap, and every rollback after it
    failed; the model now exports none.)"""
    import threading

    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, serving_config
    from tests.triton_testing import copy_artifacts, running_triton

    samples = tmp_path / "samples"
    with running_triton(tmp_path / "triton", query_sample_dir=samples, query_sample_rate=1) as t:
        control = TritonControl(t.grpc_url, retire_timeout_s=20)
        stop = threading.Event()

        def traffic() -> None:
            with TritonControl(t.grpc_url) as client:
                for query in in_distribution_queries(100000):
                    if stop.is_set():
                        return
                    with contextlib.suppress(Exception):  # the failing versions fail on purpose
                        search(client, "swapped", query, top_k=3)

        publish_version(t.repo, "swapped", 1, artifacts)
        control.load_version("swapped", 1, t.repo, config=serving_config("swapped"))
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            for version in (2, 3, 4):
                faulty = copy_artifacts(
                    artifacts,
                    tmp_path / f"v{version}",
                    fault_injection={"mode": "raise", "after_requests": 20},
                )
                publish_version(t.repo, "swapped", version, faulty)
                control.load_version("swapped", version, t.repo, config=serving_config("swapped"))
                wait_for(  # sampled, then failing, as a bad deploy under traffic does
                    lambda v=version: list((samples / "swapped" / str(v)).glob("*.jsonl")),
                    bool,
                )
                # The rollback: raises VersionsNotRetiredError if the faulty one hangs.
                control.load_version("swapped", 1, t.repo, config=serving_config("swapped"))
                states = control.version_states("swapped")
                assert {v: s for v, s in states.items() if s != "UNAVAILABLE"} == {1: "READY"}
        finally:
            stop.set()
            thread.join(10)


THRESHOLDS = DriftThresholds(min_queries=30)


def test_served_queries_are_sampled_and_judged(
    sampling_platform: SamplingPlatform, monkeypatch, tmp_path
) -> None:
    """New ordinary queries (held out from the reference) are sampled and judged no drift;
    shifted ones drift; and a check reading another folder than the one Triton writes is
    blind, which Triton's own inference count reveals, rather than "too few" forever."""
    from recsys.config import load_settings

    platform, settings = sampling_platform, sampling_platform.settings
    model = settings.model_name

    quiet = check_query_drift(settings, thresholds=THRESHOLDS)
    assert not quiet["judged"] and quiet["version"] == 1 and "too few" in quiet["reasons"][0]
    assert quiet["sampling"]["status"] == "quiet" and not quiet["blind"]

    normal = new_ordinary_queries()
    assert not set(normal) & set(training_queries())  # the reference never saw them
    platform.send(normal)
    files = sorted((settings.query_sample_dir / model / "1").glob("queries-*.jsonl"))
    assert files, "the model sampled nothing"
    lines = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert sorted(line["query"] for line in lines) == sorted(normal)  # rate 1.0: every query
    assert all(isinstance(line["ts"], float) for line in lines)

    peek = check_query_drift(settings, thresholds=THRESHOLDS, commit=False)
    verdict = check_query_drift(settings, thresholds=THRESHOLDS)
    assert peek["stats"] == verdict["stats"]  # looking did not consume
    assert verdict["judged"] and not verdict["drift"], verdict["reasons"]
    assert verdict["queries"] == len(normal) and verdict["stats"]["unk_rate"] == 0.0
    assert verdict["sampling"]["status"] == "ok"
    assert not check_query_drift(settings, thresholds=THRESHOLDS)["judged"]  # consumed

    platform.send(shifted_queries(40))
    drifted = check_query_drift(settings, thresholds=THRESHOLDS)
    assert drifted["judged"] and drifted["drift"] and drifted["retrain_due"]
    reasons = " | ".join(drifted["reasons"])
    assert "[UNK] token rate" in reasons and "OOV rate" in reasons
    assert "token-length PSI" in reasons
    assert drifted["stats"]["unk_rate"] > 0.5

    # Airflow reading another folder than Triton writes: queries are written, none arrive.
    monkeypatch.setenv("RECSYS_QUERY_SAMPLE_DIR", str(tmp_path / "elsewhere"))
    elsewhere = load_settings()
    platform.send(new_ordinary_queries(seed=1)[:MIN_EXPECTED_SAMPLES])
    served = len(normal) + 40 + MIN_EXPECTED_SAMPLES
    wait_for(lambda: health_of(settings), lambda h: h.inference_count >= served)
    blind = check_query_drift(elsewhere, thresholds=THRESHOLDS, commit=False)
    assert blind["blind"] and blind["blind_alert_due"] and not blind["judged"]
    assert blind["reasons"][0].startswith(
        f"drift check blind: Triton ran {MIN_EXPECTED_SAMPLES} inferences of {model} v1"
    )
    assert f"none arrived in {elsewhere.query_sample_dir / model / '1'}" in blind["reasons"][0]
    assert "agree on RECSYS_QUERY_SAMPLE_DIR" in blind["reasons"][0]
    assert not any("too few" in reason for reason in blind["reasons"])


def _asset_events(run_id: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from recsys.assets import RETRAINING_REQUEST_URI

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == RETRAINING_REQUEST_URI, AssetEvent.source_run_id == run_id)
        ).all()
        return [(row.source_dag_id, row.source_task_id, dict(row.extra)) for row in rows]


def _pipeline_queued() -> bool:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return bool(
            session.scalars(
                select(AssetDagRunQueue).where(
                    AssetDagRunQueue.target_dag_id == "search_model_pipeline"
                )
            ).all()
        )


def _set_paused(dag_id: str, paused: bool) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.get(DagModel, dag_id).is_paused = paused


def test_drift_dag_alerts_audits_and_requests_retraining(
    sampling_platform: SamplingPlatform, webhook: Receiver, dagbag, monkeypatch, capsys
) -> None:
    """In-distribution traffic: the DAG judges and stops. Shifted traffic: alert on the webhook,
    audit record, an event on the retraining Asset that queues ``search_model_pipeline``. More
    shifted traffic within the cooldown, after the drift state file got corrupted: alerted
    again, saying the state was corrupt, but no second retraining request (the cooldown comes
    from the audit log, which the corruption did not touch)."""
    from recsys.audit import read_records
    from recsys.cli import main

    platform, settings = sampling_platform, sampling_platform.settings
    dag = dagbag.get_dag("query_drift")
    receiver = webhook
    config = settings.home.parent / "monitor.yaml"  # what `recsys drift` goes by
    config.write_text("drift: {defaults: {min_queries: 30}}\n")
    monkeypatch.setenv("RECSYS_MONITOR_CONFIG", str(config))
    conf = {"min_queries": 30, "retrain_on_drift": True}

    def run_dag() -> tuple[str, dict[str, str]]:
        run = dag.test(run_conf=conf)
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert run.state == "success", states
        return run.run_id, states

    try:
        platform.send(new_ordinary_queries(seed=3))
        run_id, states = run_dag()
        assert states["check_drift"] == "success", states
        assert states["alert_and_audit"] == "skipped", states
        assert states["request_retraining"] == "skipped", states
        assert _asset_events(run_id) == []
        assert receiver.all() == []

        # dag.test() synced every DAG to the DB; unpaused, the pipeline gets queued by the Asset.
        _set_paused("search_model_pipeline", False)
        platform.send(shifted_queries(40, seed=5))
        assert main(["drift"]) == 0  # the CLI looks without consuming the DAG's sample
        out = capsys.readouterr().out
        assert "DRIFT" in out and "[UNK] token rate" in out
        run_id, states = run_dag()
        assert states["alert_and_audit"] == "success", states
        assert states["request_retraining"] == "success", states
        alert = receiver.next()
        assert alert["model"] == settings.model_name and alert["kind"] == "query_drift"
        assert alert["version"] == 1 and "[UNK]" in alert["reason"]
        assert alert["title"].endswith("served queries drifted from the training data")
        events = _asset_events(run_id)
        assert len(events) == 1, events
        source_dag, source_task, extra = events[0]
        assert (source_dag, source_task) == ("query_drift", "request_retraining")
        assert extra["model"] == settings.model_name and extra["version"] == 1
        assert _pipeline_queued()  # the retraining request schedules the training pipeline

        platform.send(shifted_queries(40, seed=6))
        settings.drift_state.write_text('{"format": 1, "models": {"' + settings.model_name)
        run_id, states = run_dag()
        assert states["alert_and_audit"] == "success", states
        assert states["request_retraining"] == "skipped", states  # within the cooldown
        reason = receiver.next()["reason"]
        assert "cooldown 24 h, from the audit log" in reason
        assert f"drift state {settings.drift_state} was corrupt (JSONDecodeError" in reason
        assert _asset_events(run_id) == []
        assert json.loads(settings.drift_state.read_text())["format"] == 1  # whole again
    finally:
        _set_paused("search_model_pipeline", True)

    actions = [r["action"] for r in read_records(settings.audit_log, settings.model_name)]
    assert actions.count("query_drift") == 2 and actions.count("retraining_requested") == 1


def test_a_blind_check_alerts_once_and_audits_when_it_sees_again(
    sampling_platform: SamplingPlatform, webhook: Receiver, dagbag
) -> None:
    """The sample folder of the served version is deleted and a file takes its place while
    traffic flows: queries are still answered, no sample arrives although Triton served, and
    the DAG alerts once that the check is blind, naming the model and what is wrong with the
    folder (not "too few queries"). The next hourly run, the outage still on, stays quiet.
    Once the folder can be made again the sampler recovers by itself, and the next run records
    that the check sees again, without another alert."""
    from recsys.audit import read_records

    platform, settings = sampling_platform, sampling_platform.settings
    model = settings.model_name
    dag = dagbag.get_dag("query_drift")
    folder = settings.query_sample_dir / model / "1"
    traffic = iter(new_ordinary_queries(seed=7) * 20)
    verdicts: list[dict] = []

    def run_dag() -> dict[str, str]:
        run = dag.test(run_conf={"min_queries": 30})
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert run.state == "success", states
        verdicts.append(run.get_task_instance("check_drift").xcom_pull(task_ids="check_drift"))
        return states

    platform.send([next(traffic) for _ in range(10)])
    assert list(folder.glob("queries-*.jsonl"))  # sampling works before the fault
    states = run_dag()  # too few to judge; remembers what it saw and what Triton served
    assert states["alert_blind"] == "skipped" and verdicts[-1]["sampling"]["status"] == "ok"
    shutil.rmtree(folder)
    folder.write_text("not a folder: the sampler cannot recreate its version folder")
    platform.send([next(traffic) for _ in range(30)])  # every query still answered
    wait_for(lambda: health_of(settings), lambda h: h.inference_count >= 40)

    states = run_dag()
    assert states["alert_blind"] == "success", states
    assert states["alert_and_audit"] == "skipped", states  # blind is not drift
    assert states["audit_seeing_again"] == "skipped", states
    alert = webhook.next()
    assert alert["model"] == model and alert["kind"] == "query_drift_blind"
    assert alert["version"] == 1 and alert["title"].startswith(f"{model} v1: query drift check")
    assert f"none arrived in {folder}: {folder} is not a folder" in alert["reason"]
    assert "Triton ran 30 inferences" in alert["reason"] and "too few" not in alert["reason"]
    assert alert["sampling"]["status"] == "blind"

    platform.send([next(traffic) for _ in range(30)])
    states = run_dag()  # an hour later, still blind: no second alert
    assert states["check_drift"] == "success" and states["alert_blind"] == "skipped", states
    assert verdicts[-1]["blind"] and not verdicts[-1]["blind_alert_due"], verdicts[-1]
    assert "(alerted then): no new alert" in verdicts[-1]["reasons"][1]
    assert webhook.all() == []

    folder.unlink()  # fixed: the sampler may make its folder again
    deadline = time.monotonic() + 30.0
    while not list(folder.glob("queries-*.jsonl")):  # it retries after its backoff
        assert time.monotonic() < deadline, "the sampler never wrote again"
        platform.send([next(traffic)])

    states = run_dag()
    assert states["audit_seeing_again"] == "success", states
    assert states["alert_blind"] == "skipped", states
    assert verdicts[-1]["sampling"]["status"] == "ok" and verdicts[-1]["outage_over"]
    assert webhook.all() == []  # its end is recorded, not paged
    records = read_records(settings.audit_log, model)
    blind = [r for r in records if r["action"] == "query_drift_blind"]
    seeing = [r for r in records if r["action"] == "query_drift_seeing_again"]
    assert len(blind) == 1 and len(seeing) == 1, [r["action"] for r in records]
    assert seeing[0]["blind_since"] == blind[0]["ts"] and seeing[0]["version"] == 1
    assert "no longer blind" in seeing[0]["reason"]


@pytest.mark.parametrize("served_rate", [0.0, None], ids=["server-rate-0", "server-no-sampler"])
def test_sampling_off_on_purpose_is_no_outage_but_a_server_that_samples_nothing_is(
    monkeypatch, tmp_path, artifacts, served_rate: float | None
) -> None:
    """A drift side that expects samples (rate 1.0) from a server that writes none (rate 0
    there, or no sampling configured at all) cannot see: Triton's own inference count against
    the expected rate shows it, and the check says the two sides disagree. A drift side
    configured with rate 0, sampling off on purpose, is never blind."""
    from recsys.config import load_settings

    with serving_with_sampling(monkeypatch, tmp_path, artifacts, served_rate) as platform:
        settings = platform.settings
        first = check_query_drift(settings, thresholds=THRESHOLDS)
        assert not first["blind"] and not first["judged"]
        platform.send(new_ordinary_queries()[: MIN_EXPECTED_SAMPLES + 10])
        served = MIN_EXPECTED_SAMPLES + 10
        wait_for(lambda: health_of(settings), lambda h: h.inference_count >= served)
        verdict = check_query_drift(settings, thresholds=THRESHOLDS)
        assert not (settings.query_sample_dir / settings.model_name).exists()  # nothing sampled
        monkeypatch.setenv("RECSYS_QUERY_SAMPLE_RATE", "0")
        off = check_query_drift(load_settings(), version=1, thresholds=THRESHOLDS)
    assert not verdict["judged"]
    assert verdict["blind"] and verdict["blind_alert_due"], verdict["reasons"]
    assert verdict["reasons"][0].startswith(
        f"drift check blind: Triton ran {served} inferences of {settings.model_name} v1"
    )
    assert "agree on RECSYS_QUERY_SAMPLE_DIR and RECSYS_QUERY_SAMPLE_RATE" in verdict["reasons"][0]
    assert off["sampling"]["status"] == "off" and not off["blind"]
    assert not off["blind_alert_due"] and "RECSYS_QUERY_SAMPLE_RATE=0" in off["reasons"][0]


# -- the Asset between the drift DAG and the pipeline -------------------------------------------


def test_drift_dag_feeds_the_pipeline_through_the_retraining_asset(dagbag) -> None:
    from recsys.assets import RETRAINING_REQUEST

    drift = dagbag.get_dag("query_drift")
    assert drift.get_task("request_retraining").outlets == [RETRAINING_REQUEST]
    assert not [t.task_id for t in drift.tasks if t.outlets and t.task_id != "request_retraining"]
    assert dagbag.get_dag("search_model_pipeline").timetable.asset_condition == RETRAINING_REQUEST


def test_each_family_retrains_on_its_own_asset(dagbag) -> None:
    """The recommender's drift DAG asks for a recommender retrain, never a search one."""
    from recsys.assets import RETRAINING_REQUEST, retraining_request

    asset = retraining_request("recommend")
    assert asset.uri == "recsys://recommend/retraining-request" and asset != RETRAINING_REQUEST
    drift = dagbag.get_dag("input_drift_recommend")
    assert drift.get_task("request_retraining").outlets == [asset]
    assert dagbag.get_dag("recommend_model_pipeline").timetable.asset_condition == asset
    assert set(drift.params) >= {"max_unknown_user_share", "max_popularity_psi"}


def test_drift_dag_runs_unpaused_in_its_pool_and_alerts_once_per_failure(dagbag) -> None:
    """The drift DAG's tasks share the default pool at the drift priority (absolute weights, so
    a long pipeline never outranks it), only tasks alert on failure (a DAG-level callback would
    repeat each task failure as an ``error: null`` alert), and it starts unpaused: on a fresh
    stack nobody unpauses a monitor, and it does nothing until samples arrive anyway."""
    from recsys.alerts import task_failure_alert
    from recsys.scheduling import DEFAULT_POOL, DRIFT_PRIORITY, WEIGHT_RULE

    dag = dagbag.get_dag("query_drift")
    assert dag.is_paused_upon_creation is False and dag.catchup is False
    assert not dag.on_failure_callback
    for task in dag.tasks:
        assert (task.pool, task.priority_weight) == (DEFAULT_POOL, DRIFT_PRIORITY), task.task_id
        assert task.weight_rule == WEIGHT_RULE, task.task_id
        assert task.retries == 1 and task_failure_alert in task.on_failure_callback


def test_pipeline_schedule_is_time_or_retraining_request(monkeypatch) -> None:
    from airflow.sdk import AssetOrTimeSchedule

    from recsys.assets import RETRAINING_REQUEST
    from recsys.config import pipeline_schedule

    monkeypatch.setenv("RECSYS_PIPELINE_SCHEDULE", "@daily")
    schedule = pipeline_schedule()
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert schedule.timetable.expression == "0 0 * * *"
    assert schedule.asset_condition == RETRAINING_REQUEST

    monkeypatch.setenv("RECSYS_PIPELINE_SCHEDULE", "none")  # no cron: requests still count
    assert pipeline_schedule() == RETRAINING_REQUEST

    monkeypatch.setenv("RECSYS_PIPELINE_SCHEDULE", "@once")
    with pytest.raises(ValueError, match="cannot be combined"):
        pipeline_schedule()
