"""Online query drift against the real components: a real Triton whose model samples the queries
it serves, the reference written by the exporter's encoder and tokenizer, the check, the
``query_drift`` DAG under ``dag.test()`` posting to a real local webhook and emitting its Asset
event into Airflow's database, and ``recsys drift``.

Traffic is real gRPC queries; "in distribution" means short queries made of the catalogue's
words like the test model's training queries, "shifted" means long queries in a script the
tiny WordPiece vocabulary cannot spell.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.config import Settings
from recsys.monitoring.config import MonitorConfigError, load_drift_thresholds
from recsys.monitoring.drift import check_query_drift
from recsys.monitoring.drift_policy import DriftThresholds, psi
from recsys.monitoring.drift_reference import (
    QUERY_REFERENCE_FILE,
    QueryReference,
    QueryReferenceError,
    quantile_histogram,
    write_query_reference,
)
from recsys.monitoring.query_samples import read_new_samples
from tests.triton_testing import (
    TritonHarness,
    build_test_serving_artifacts,
    training_queries,
)
from tests.webhook_receiver import Receiver

SHIFTED_WORDS = ["дрель", "аккумуляторная", "краска", "белая", "смеситель", "кухонный", "ламинат"]


def in_distribution_queries(n: int = 80, seed: int = 0) -> list[str]:
    """Queries drawn from the test model's training queries (what in distribution means)."""
    return random.Random(seed).choices(training_queries(), k=n)


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
                assert control.search(self.settings.model_name, query, top_k=3)


@pytest.fixture
def sampling_platform(monkeypatch, tmp_path, artifacts) -> Iterator[SamplingPlatform]:
    """A platform whose Triton samples every served query (rate 1.0) into the settings' sample
    folder, serving the test model as v1 (published and loaded as a deploy does)."""
    from recsys.config import load_settings
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, version_serving_config
    from tests.triton_testing import running_triton

    home = tmp_path / "home"
    samples = home / "query_samples"
    with running_triton(
        tmp_path / "triton", query_sample_dir=samples, query_sample_rate=1.0
    ) as triton:
        server = triton.server
        monkeypatch.setenv("RECSYS_HOME", str(home))
        monkeypatch.setenv("RECSYS_TRITON_REPO", str(triton.repo))
        monkeypatch.setenv("RECSYS_TRITON_HTTP_PORT", str(server.http_port))
        monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(server.grpc_port))
        monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(server.metrics_port))
        monkeypatch.setenv("RECSYS_MODEL_NAME", f"product_search_{uuid.uuid4().hex[:8]}")
        monkeypatch.setenv("RECSYS_QUERY_SAMPLE_DIR", str(samples))
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


def test_sampler_rotates_its_files_and_never_fails_a_request(
    monkeypatch, tmp_path, artifacts
) -> None:
    """With 1 KiB segments, a busy instance keeps only its newest segments (every one a set of
    whole JSON lines); where the sample folder cannot be created, queries are answered anyway
    and the model logs that sampling is off."""
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, serving_config
    from tests.triton_testing import running_triton

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "unwritable").write_text("a file where the model's sample folder would go")
    monkeypatch.setenv("RECSYS_QUERY_SAMPLE_MAX_BYTES", "1024")
    with running_triton(tmp_path / "triton", query_sample_dir=samples, query_sample_rate=1) as t:
        with TritonControl(t.grpc_url) as control:
            for name in ("sampled", "unwritable"):
                publish_version(t.repo, name, 1, artifacts)
                control.load_version(name, 1, t.repo, config=serving_config(name))
            queries = in_distribution_queries(120)
            for query in queries:
                assert control.search("sampled", query, top_k=3)
                assert control.search("unwritable", query, top_k=3)
        log_text = Path(t.server.log_path).read_text(errors="replace")
    assert "query sampling to" in log_text and "turned off" in log_text

    files = sorted((samples / "sampled" / "1").glob("queries-*.jsonl"))
    assert 1 < len(files) <= 4  # SAMPLE_SEGMENTS_KEPT: the oldest segments were removed
    assert all(path.stat().st_size <= 1024 for path in files)
    read = read_new_samples(samples / "sampled" / "1", {})
    assert read.bad_lines == 0 and 0 < len(read.queries) < len(queries)
    assert read.queries == queries[-len(read.queries) :]  # the newest, in order


THRESHOLDS = DriftThresholds(min_queries=30)


def test_served_queries_are_sampled_and_judged(sampling_platform: SamplingPlatform) -> None:
    platform, settings = sampling_platform, sampling_platform.settings
    model = settings.model_name

    quiet = check_query_drift(settings, thresholds=THRESHOLDS)
    assert not quiet["judged"] and quiet["version"] == 1 and "too few" in quiet["reasons"][0]

    normal = in_distribution_queries()
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
    assert verdict["queries"] == 80 and verdict["stats"]["unk_rate"] == 0.0
    assert not check_query_drift(settings, thresholds=THRESHOLDS)["judged"]  # consumed

    platform.send(shifted_queries(40))
    drifted = check_query_drift(settings, thresholds=THRESHOLDS)
    assert drifted["judged"] and drifted["drift"] and drifted["retrain_due"]
    reasons = " | ".join(drifted["reasons"])
    assert "[UNK] token rate" in reasons and "OOV rate" in reasons
    assert "token-length PSI" in reasons
    assert drifted["stats"]["unk_rate"] > 0.5


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
    shifted traffic within the cooldown: alerted again, but no second retraining request."""
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
        platform.send(in_distribution_queries(seed=3))
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
        run_id, states = run_dag()
        assert states["alert_and_audit"] == "success", states
        assert states["request_retraining"] == "skipped", states  # within the cooldown
        assert "cooldown" in receiver.next()["reason"]
        assert _asset_events(run_id) == []
    finally:
        _set_paused("search_model_pipeline", True)

    actions = [r["action"] for r in read_records(settings.audit_log, settings.model_name)]
    assert actions.count("query_drift") == 2 and actions.count("retraining_requested") == 1


# -- the Asset between the drift DAG and the pipeline -------------------------------------------


def test_drift_dag_feeds_the_pipeline_through_the_retraining_asset(dagbag) -> None:
    from recsys.assets import RETRAINING_REQUEST

    drift = dagbag.get_dag("query_drift")
    assert drift.get_task("request_retraining").outlets == [RETRAINING_REQUEST]
    assert not [t.task_id for t in drift.tasks if t.outlets and t.task_id != "request_retraining"]
    assert dagbag.get_dag("search_model_pipeline").timetable.asset_condition == RETRAINING_REQUEST


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
