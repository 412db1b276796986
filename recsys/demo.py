"""The end-to-end demo on the running stack, driven the way an operator would drive it.

1. trigger ``search_model_pipeline`` through Airflow's REST API (real MiniLM, a data slice),
   printing where to watch the run in the Airflow UI and each task as it finishes;
2. answer a real query over Triton gRPC;
3. deploy a deliberately faulty version (it passes its smoke query, then fails under load);
4. send traffic and let the ``triton_monitor`` DAG (watching Triton's metrics from the
   triggerer) notice and roll back;
5. show the registry aliases, the audit trail and the restored answers;
5b. train and deploy the recommender through ``recommend_model_pipeline`` (a slice of the
   Amazon Grocery shoppers) and ask Triton for a user, a session and an unknown user;
6. draw what Triton reported from the faulty deploy to the rollback as a PNG
   (``$RECSYS_HOME/reports/demo-dashboard.png``, the Grafana dashboard's panels over time).
"""

from __future__ import annotations

import os
import time
from typing import Any

from recsys.config import Settings
from recsys.families.search.client import search
from recsys.reporting import MetricsRecorder

PIPELINE_RUN_TIMEOUT_S = 1800.0
"""How long one demo pipeline run may take (about 14 minutes on 2 CPU cores)."""


class ScheduledRunsWouldStartError(ValueError):
    """Unpausing the pipeline for the demo would also let its time schedule start runs."""


QUERIES = [
    "angle bracket",
    "cordless drill",
    "deck paint",
    "led light bulb",
    "toilet seat",
    "garden hose",
]


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _product_titles(settings: Settings) -> dict[str, str]:
    from recsys.data import product_catalog, read_relevance_csv

    catalog = product_catalog(read_relevance_csv(settings.data_path))
    return dict(zip(catalog["product_uid"], catalog["product_title"], strict=True))


def _show_answer(
    settings: Settings, query: str, titles: dict[str, str], model: str | None = None
) -> None:
    from recsys.triton.control import TritonControl

    model = model or settings.model_name
    hits = search(TritonControl(settings.triton_grpc_url), model, query, top_k=5)
    print(f"query {query!r} -> ({model})")
    for rank, (product_id, score) in enumerate(hits, 1):
        print(f"  {rank}. {score:.3f}  {product_id}  {titles.get(product_id, '?')[:70]}")


def _unpause_pipeline(airflow: Any, dag_id: str) -> None:
    """Unpause ``dag_id`` so the demo's triggered runs start, unless that would also start
    scheduled ones.

    A paused DAG with a time schedule (``RECSYS_PIPELINE_SCHEDULE=@weekly`` on a stack started
    before the demo) stays unpaused after the demo and from then on starts its scheduled runs,
    each a retrain on the full data that keeps a CPU machine busy for hours. That is the
    operator's call, not the demo's, so the demo stops and says how to proceed. Manual and
    drift-triggered DAGs, and DAGs someone already unpaused, are fine.
    """
    dag = airflow.wait_for_dag(dag_id)
    if dag.get("is_paused") and dag.get("timetable_periodic"):
        raise ScheduledRunsWouldStartError(
            f"{dag_id} is paused and has a time schedule ({dag.get('timetable_summary')}); "
            "unpausing it for the demo would also start its scheduled runs. Restart the stack "
            "with RECSYS_PIPELINE_SCHEDULE=none (`recsys stack down`, then "
            "`RECSYS_PIPELINE_SCHEDULE=none recsys demo`), or unpause the DAG yourself if "
            "you want those runs"
        )
    if dag.get("is_paused"):
        airflow.set_paused(dag_id, False)


def _follow_pipeline_run(
    airflow: Any,
    run_id: str,
    timeout_s: float = PIPELINE_RUN_TIMEOUT_S,
    dag_id: str | None = None,
) -> str:
    """Follow a pipeline run to its end: where to watch it, then one line per finished task
    with the time since the run started. A run takes minutes; silence looks like a hang.
    Raises :class:`~recsys.operations.TrainingRunFailedError` (naming the task) on failure."""
    from recsys.airflow_client import task_progress_line
    from recsys.operations import PIPELINE_DAG, follow_run

    dag_id = dag_id or PIPELINE_DAG
    print(f"watch it in the Airflow UI: {airflow.ui_run_url(dag_id, run_id)}", flush=True)
    print("  [ elapsed] task                             state", flush=True)

    def on_task_finished(task: Any, elapsed_s: float | None) -> None:
        print(task_progress_line(task, elapsed_s), flush=True)

    outcome = follow_run(
        airflow,
        run_id,
        dag_id=dag_id,
        timeout_s=timeout_s,
        on_task_finished=on_task_finished,
    )
    return outcome.state


def _show_metrics(settings: Settings, version: int) -> None:
    """The held-out metrics recorded as lineage on the registered version."""
    import json

    from recsys import registry

    tags = (
        registry.client(settings.mlflow_tracking_uri)
        .get_model_version(settings.model_name, str(version))
        .tags
    )
    metrics = json.loads(tags.get("metrics", "{}"))
    print("held-out metrics: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))


def _show_reranker(settings: Settings, titles: dict[str, str]) -> None:
    """The reranker model's answer when its gate let it serve, otherwise why it did not."""
    from recsys import registry
    from recsys.families.search.pipeline_reranker import reranker_settings

    model = reranker_settings(settings).model_name
    uri = settings.mlflow_tracking_uri
    if registry.alias_version(uri, model, registry.CHAMPION) is not None:
        _show_answer(settings, "angle bracket", titles, model)
        return
    versions = registry.client(uri).search_model_versions(f"name = '{model}'")
    newest = max(versions, key=lambda v: int(v.version), default=None)
    reason = newest.tags.get("promotion", "?") if newest is not None else "not registered"
    print(f"{model} is not served: {reason}")


def _show_quality_table(settings: Settings, run_id: str) -> None:
    """The run's comparison of the fine-tuned model with BM25 and the base model (the same
    table and plot are artifacts of the run in MLflow)."""
    import json

    from recsys.model_pipeline import run_dir_for

    path = run_dir_for(settings, run_id) / "evaluation" / "baselines.json"
    if not path.is_file():
        print(f"no comparison table at {path}")
        return
    print(f"{'system':<12} {'ndcg@10':>8} {'mrr':>8} {'recall@10':>10} {'recall@100':>11}")
    for row in json.loads(path.read_text()):
        print(
            f"{row['system']:<12} {row['ndcg_at_10']:>8.3f} {row['mrr']:>8.3f} "
            f"{row['recall_at_10']:>10.3f} {row['recall_at_100']:>11.3f}"
        )


def _traffic_until_rollback(settings: Settings, bad_version: int, timeout_s: float) -> bool:
    """Send queries (some fail: that is the fault) until the champion alias leaves the bad
    version, i.e. the monitor DAG has rolled back."""
    from recsys import registry
    from recsys.triton.control import TritonControl

    control = TritonControl(settings.triton_grpc_url)
    deadline = time.monotonic() + timeout_s
    sent = failed = 0
    while time.monotonic() < deadline:
        for query in QUERIES:
            sent += 1
            try:
                search(control, settings.model_name, query, top_k=5)
            except Exception:
                failed += 1
        champion = registry.alias_version(
            settings.mlflow_tracking_uri, settings.model_name, "champion"
        )
        if champion != bad_version:
            print(f"sent {sent} queries, {failed} failed; champion is now v{champion}")
            return True
        time.sleep(1)
    print(f"sent {sent} queries, {failed} failed; no rollback within {timeout_s:.0f}s")
    return False


def _canary_rehearsal(settings: Settings, airflow: Any, bad: int, timeout_s: float) -> bool:
    """The faulty version once more, as a canary: it reaches 5% of shoppers through the
    router, and the rollout DAG's analysis aborts it. Shows how many requests fail compared
    with the all-at-once deploy above."""
    from recsys.audit import read_records
    from recsys.delivery.client import RoutedRequestError, ask
    from recsys.delivery.routing import router_name
    from recsys.families import get_family
    from recsys.operations import start_registered_rollout
    from recsys.triton.control import TritonControl

    model = settings.model_name
    started = start_registered_rollout(
        settings, bad, mode="canary", weight=0.05, smoke_request={"query": "angle bracket"},
        reason="demo: canary rehearsal of the faulty version",
    )  # fmt: skip
    run_id = airflow.trigger(
        "rollout", {"version": bad, "mode": "canary", "window_s": 10, "min_requests": 5}
    )
    print(f"canary {started['rollout_id']}: v{bad} gets 5% of shoppers via {router_name(model)}")
    print(f"rollout DAG run {run_id}: {airflow.ui_run_url('rollout', run_id)}")
    control, family = TritonControl(settings.triton_grpc_url), get_family("search")
    deadline = time.monotonic() + timeout_s
    sent = failed = 0
    while time.monotonic() < deadline:
        for query in QUERIES:
            sent += 1
            try:  # one shopper per request id: a realistic spread over the two arms
                ask(control, model, family, {"query": query, "top_k": 5},
                    routing_key=f"shopper-{sent % 1000}")  # fmt: skip
            except RoutedRequestError:
                failed += 1
        aborted = [
            r for r in read_records(settings.audit_log, model)
            if r["action"] == "rollout_abort" and r.get("rollout_id") == started["rollout_id"]
        ]  # fmt: skip
        if aborted:
            print(
                f"sent {sent} queries through the router, {failed} failed ({failed / sent:.1%}): "
                f"the rollout DAG aborted v{bad}: {aborted[-1]['reason']}"
            )
            return True
        time.sleep(0.5)
    print(f"sent {sent} queries, {failed} failed; the canary was not aborted in {timeout_s:.0f}s")
    return False


def _write_dashboard(settings: Settings, recorder: MetricsRecorder) -> None:
    """Stop ``recorder`` and draw its samples with the audit trail's deploys and rollbacks.

    Runs also when the demo fails half-way, since the picture is then the quickest way to see
    what happened; a drawing problem is reported but never hides the demo's own result.
    """
    from datetime import datetime

    from recsys.audit import read_records
    from recsys.reporting import fault_window, render_dashboard_png

    samples = recorder.stop()
    if not samples:
        print("dashboard: no metrics were recorded (was Triton reachable?)")
        return
    path = settings.home / "reports" / "demo-dashboard.png"
    try:
        records = read_records(settings.audit_log, settings.model_name)
        # The recording spans the idle training minutes; the picture shows the fault only.
        start, end = (datetime.fromtimestamp(ts) for ts in fault_window(samples, records))
        render_dashboard_png(samples, records, path, title=f"{settings.model_name} on Triton")
    except Exception as exc:  # the report must not turn a good demo into a failed one
        print(f"dashboard: could not draw {path}: {type(exc).__name__}: {exc}")
        return
    print(
        f"dashboard (request/error rate, latency, queue, served version, deploys and rollbacks, "
        f"{start:%H:%M:%S}-{end:%H:%M:%S}): {path}"
    )


RECOMMEND_DAG = "recommend_model_pipeline"


def _show_recommendations(model: str, answer: Any, asked: str) -> None:
    print(f"{asked} -> ({model} v{answer.version}, {answer.source})")
    for rank, (item, score, category) in enumerate(answer.items, 1):
        print(f"  {rank}. {score:8.3f}  item {item:<8} category {category or '-'}")


def run_recommender_demo(settings: Settings, airflow: Any, max_users: int) -> bool:
    """Train, gate, register and deploy the recommender through its pipeline DAG on a slice
    of users, then ask Triton for a known user, an anonymous session and an unknown user."""
    import json

    from recsys import registry
    from recsys.config import family_model_name
    from recsys.families.recommend.client import recommend
    from recsys.triton.control import TritonControl

    model = family_model_name("recommend")
    _unpause_pipeline(airflow, RECOMMEND_DAG)
    airflow.wait_for_dag("triton_monitor_recommend")
    airflow.set_paused("triton_monitor_recommend", False)
    _say(
        f"recommender pipeline: SASRec on the interactions of {max_users} shoppers, against "
        "popularity, item-kNN and BPR; register and deploy"
    )
    run_id = airflow.trigger(RECOMMEND_DAG, {"max_users": max_users})
    state = _follow_pipeline_run(airflow, run_id, dag_id=RECOMMEND_DAG)
    version = registry.alias_version(settings.mlflow_tracking_uri, model, "champion")
    print(f"run {run_id}: {state}; {model} champion: v{version}")
    if version is None:
        return False
    folder = settings.triton_repo / model / str(version)
    manifest = json.loads((folder / "manifest.json").read_text())
    user = manifest["smoke_request"]["user"]
    _say("recommendations answered by Triton over gRPC")
    with TritonControl(settings.triton_grpc_url) as control:
        answer = recommend(control, model, user=user, top_k=5)
        _show_recommendations(model, answer, f"user {user!r}")
        session = [item for item, _, _ in answer.items[:2]]
        _show_recommendations(
            model, recommend(control, model, history=session, top_k=5), f"session {session}"
        )
        _show_recommendations(
            model, recommend(control, model, user="new-shopper", top_k=5), "user 'new-shopper'"
        )
    print(f"the same from the command line: recsys recommend --user {user}")
    return True


def run_demo(
    settings: Settings, max_rows: int = 4000, max_steps: int = 40, max_users: int = 3000
) -> int:
    from recsys import registry, stack
    from recsys.airflow_client import AirflowClient
    from recsys.audit import read_records

    _say("stack up")
    # The weekly retrain on the full data would start as soon as the DAG is unpaused and keep a
    # CPU-only machine busy for hours; the demo triggers its own, smaller runs instead.
    os.environ.setdefault("RECSYS_PIPELINE_SCHEDULE", "none")
    stack.up(settings)
    airflow = AirflowClient(
        f"http://127.0.0.1:{settings.airflow_port}",
        stack.AIRFLOW_USER,
        stack.airflow_password(settings),
    )
    _unpause_pipeline(airflow, "search_model_pipeline")
    for dag_id in ("triton_monitor", "triton_monitor_reranker"):
        airflow.wait_for_dag(dag_id)
        airflow.set_paused(dag_id, False)

    conf = {
        "max_rows": max_rows,
        "max_steps": max_steps,
        "epochs": 1,
        "base_model": "minilm",
        "reranker_max_steps": max_steps,
    }
    _say(
        f"pipeline run: fine-tune MiniLM (bi-encoder and cross-encoder reranker) on {max_rows} "
        "rows, evaluate against BM25 and the base model, register, deploy"
    )
    run_id = airflow.trigger("search_model_pipeline", conf)
    state = _follow_pipeline_run(airflow, run_id)
    print(f"run {run_id}: {state}")
    good = registry.alias_version(settings.mlflow_tracking_uri, settings.model_name, "champion")
    print(f"champion: v{good}")
    _show_metrics(settings, good)
    _show_quality_table(settings, run_id)
    titles = _product_titles(settings)
    _say("a real query, answered by Triton over gRPC (bi-encoder, then with the reranker)")
    _show_answer(settings, "angle bracket", titles)
    _show_reranker(settings, titles)

    # Recording starts before the faulty deploy's run so the deploy itself is never missed; the
    # plot is cropped to the fault (from just before the deploy to just after the recovery).
    recorder = MetricsRecorder(settings.triton_metrics_url, settings.model_name, interval_s=5.0)
    recorder.start()
    try:
        _say("deploy a faulty version (passes its smoke query, then raises under traffic)")
        fault = {"mode": "raise", "after_requests": 3}
        # A rehearsal: the faulty challenger is as good offline as the champion, so the
        # champion gate would (rightly) keep it out; force_deploy lets it through.
        rehearsal = {"fault_injection": fault, "force_deploy": True, "train_reranker": False}
        run_id = airflow.trigger("search_model_pipeline", {**conf, **rehearsal})
        state = _follow_pipeline_run(airflow, run_id)
        bad = registry.alias_version(settings.mlflow_tracking_uri, settings.model_name, "champion")
        print(f"run {run_id}: {state}; champion: v{bad} (faulty)")
        if bad == good:
            print(f"the faulty version was not deployed: champion is still v{good}")
            return 1

        _say(
            "traffic: the triton_monitor DAG (watching every 5 s from the triggerer) should "
            "detect the breach and roll back"
        )
        if not _traffic_until_rollback(settings, bad, timeout_s=420):
            return 1
        # Traffic on the restored version, so the plot shows the recovery, not just the failures.
        from recsys.triton.control import TritonControl

        restored = TritonControl(settings.triton_grpc_url)
        for query in QUERIES:
            search(restored, settings.model_name, query, top_k=5)
        time.sleep(recorder.interval_s + 1)
    finally:
        _write_dashboard(settings, recorder)
    aliases = {
        alias: registry.alias_version(settings.mlflow_tracking_uri, settings.model_name, alias)
        for alias in ("champion", "previous")
    }
    print(f"aliases now: {aliases}")
    for record in read_records(settings.audit_log, settings.model_name)[-3:]:
        detail = (
            record.get("reason") or f"v{record.get('version')} replaced v{record.get('replaced')}"
        )
        print(f"audit: {record['ts']} {record['action']:<9} by {record['actor']}: {detail}")
    _say("served again by the good version")
    _show_answer(settings, "angle bracket", titles)
    _say("the same faulty version as a canary: 5% of shoppers, judged every 2 s")
    if not _canary_rehearsal(settings, airflow, bad, timeout_s=300):
        return 1
    if max_users and not run_recommender_demo(settings, airflow, max_users):
        return 1
    print(
        f"\nAirflow UI: http://127.0.0.1:{settings.airflow_port}  "
        f"({stack.airflow_login_hint(settings)}), "
        f"MLflow UI: http://127.0.0.1:{settings.mlflow_port}"
    )
    return 0 if aliases["champion"] == good else 1
