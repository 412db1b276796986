"""Lower bound: time from the first failed client request to a verified rollback, beside Airflow.

The product's real path (scheduler, triggerer, executor, the real MiniLM) is measured by
``benchmarks/time_to_rollback_airflow.py``; this loop calls the same check and rollback
functions directly, with a tiny model, so it bounds what any orchestration can add.

Starts a real MLflow server and a real Triton (as the tests do), deploys a good v1 and keeps
steady client traffic going in a thread. A monitor loop runs ``check_once`` every ``--interval``
seconds (the scrape interval) and calls ``rollback`` as soon as the verdict says so. Then, per
episode, it deploys a new faulty version (answers its pinned smoke query, raises once it has
answered 40 requests, about 2 s of the traffic) at a different phase of the check interval,
and waits for the rollback. Per episode:

* ``time_to_rollback_s``: first failed client request -> ``rollback`` returned (v1 loaded and
  its smoke query answered, aliases moved, monitor re-baselined);
* ``time_to_recovery_s``: first failed client request -> first successful client request after it;
* ``failed_requests``: client requests that failed in that episode.

A deploy stores a fresh monitor baseline, so the first check after it already judges the new
version: the worst case is about one interval plus the reload. Goal: under 30 s.

    python benchmarks/time_to_rollback.py [--interval 5] [--rps 20] [--episodes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from recsys.families.search.client import search

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "time_to_rollback.json"
QUERY = "angle bracket galvanized steel"


class Traffic(threading.Thread):
    """Steady client traffic: one query every ``1/rps`` seconds, each outcome timestamped."""

    def __init__(self, grpc_url: str, model: str, rps: float) -> None:
        super().__init__(daemon=True)
        from recsys.triton.control import TritonControl

        self.control = TritonControl(grpc_url)
        self.model = model
        self.period = 1.0 / rps
        self.outcomes: list[tuple[float, bool]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        i = 0
        while not self.stop_event.is_set():
            try:
                search(self.control, self.model, f"{QUERY} {i % 7}", top_k=5)
                ok = True
            except Exception:
                ok = False
            self.outcomes.append((time.monotonic(), ok))
            i += 1
            next_at += self.period
            time.sleep(max(0.0, next_at - time.monotonic()))


class Monitor(threading.Thread):
    """The monitor DAG's two tasks in a loop: ``check_once`` every ``interval`` seconds, then
    ``rollback`` when the verdict says so. Keeps running after a rollback, as the DAG does."""

    def __init__(self, settings: Any, interval: float) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.interval = interval
        self.started = time.monotonic()
        self.checks: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.error: str | None = None
        self.stop_event = threading.Event()

    def next_tick(self, after: float) -> float:
        """The first check time at or after ``after`` (checks run on a fixed grid)."""
        ticks = max(0, -(-(after - self.started) // self.interval))
        return self.started + ticks * self.interval

    def run(self) -> None:
        from recsys.monitoring.policy import Thresholds, check_once
        from recsys.rollback import rollback

        thresholds = Thresholds(min_requests=5, max_error_rate=0.05, consecutive_windows=1)
        next_at = self.started
        while not self.stop_event.is_set():
            try:
                verdict = check_once(
                    self.settings.triton_metrics_url,
                    self.settings.model_name,
                    self.settings.monitor_state,
                    thresholds,
                )
                self.checks.append(
                    {
                        "t": time.monotonic(),
                        "should_rollback": verdict.should_rollback,
                        "reasons": verdict.reasons,
                    }
                )
                if verdict.should_rollback:
                    started = time.monotonic()
                    record = rollback(
                        self.settings,
                        "; ".join(verdict.reasons),
                        verdict.to_dict(),
                        smoke_request={"query": QUERY},
                    )
                    self.rollbacks.append(
                        {"started": started, "done": time.monotonic(), "record": record}
                    )
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self.checks.append({"t": time.monotonic(), "error": self.error})
            next_at += self.interval
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))


def mlflow_server(home: Path):
    from recsys.stack import running_mlflow_server
    from tests.triton_testing import free_port

    return running_mlflow_server(home, free_port())


def deploy(settings: Any, artifacts: Path) -> int:
    from recsys import registry
    from recsys.deploy import deploy_model, register_model

    run_id = registry.start_training_run(
        settings.mlflow_tracking_uri, "time-to-rollback", "bench", {}, {}
    )
    version = register_model(settings, run_id, str(artifacts), {})["version"]
    deploy_model(settings, version, str(artifacts), {"query": QUERY, "top_k": 5})
    return version


def episode(
    outcomes: list[tuple[float, bool]], since: float, rollback_done: float | None
) -> dict[str, Any]:
    """Reduce the client's timeline after ``since`` (the faulty deploy) to the episode's numbers."""
    first_fail = next((t for t, ok in outcomes if not ok and t >= since), None)
    if first_fail is None:
        return {"time_to_rollback_s": None, "failed_requests": 0}
    recovered = next((t for t, ok in outcomes if ok and t > first_fail), None)
    end = recovered if recovered is not None else outcomes[-1][0]
    in_episode = [ok for t, ok in outcomes if first_fail <= t <= end]
    return {
        "time_to_rollback_s": None if rollback_done is None else rollback_done - first_fail,
        "time_to_recovery_s": None if recovered is None else recovered - first_fail,
        "failed_requests": sum(1 for ok in in_episode if not ok),
        "requests_in_episode": len(in_episode),
        "first_failure": first_fail,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=5.0, help="scrape interval, seconds")
    parser.add_argument("--rps", type=float, default=20.0, help="client requests per second")
    parser.add_argument(
        "--episodes",
        type=int,
        default=4,
        help="faulty deploys, spread evenly over the phase of the check interval",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ttr-bench-"))
    os.environ.update(
        {
            "RECSYS_HOME": str(work / "home"),
            "RECSYS_TRITON_ADMIN_KEY": secrets.token_urlsafe(32),
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RECSYS_MODEL_NAME": f"ttr_{uuid.uuid4().hex[:8]}",
        }
    )
    from recsys.config import load_settings
    from tests.triton_testing import build_test_serving_artifacts, running_triton

    good = build_test_serving_artifacts(work / "good")
    bad = build_test_serving_artifacts(work / "bad", {"mode": "raise", "after_requests": 40})
    with mlflow_server(work / "mlflow") as mlflow_uri, running_triton(work / "triton") as triton:
        os.environ.update(triton.platform_environment(mlflow_uri))
        settings = load_settings()
        v1 = deploy(settings, good)
        traffic = Traffic(settings.triton_grpc_url, settings.model_name, args.rps)
        monitor = Monitor(settings, args.interval)
        traffic.start()
        monitor.start()
        episodes = []
        for k in range(args.episodes):
            # Deploy the faulty version at a different point of the check interval each time:
            # how long detection takes depends on where in the interval the failures start.
            phase = args.interval * k / args.episodes
            start_at = monitor.next_tick(time.monotonic() + args.interval) + phase
            time.sleep(max(0.0, start_at - time.monotonic()))
            rollbacks_before = len(monitor.rollbacks)
            deploy_started = time.monotonic()
            bad_version = deploy(settings, bad)
            deadline = time.monotonic() + args.timeout
            while len(monitor.rollbacks) == rollbacks_before and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)  # let the client see the recovered service
            done = (
                monitor.rollbacks[-1]["done"] if len(monitor.rollbacks) > rollbacks_before else None
            )
            numbers = episode(traffic.outcomes, deploy_started, done)
            first_fail = numbers.pop("first_failure", None)
            episodes.append(
                {
                    "bad_version": bad_version,
                    "deploy_phase_s": round(phase, 3),
                    **{k2: round(v, 3) if isinstance(v, float) else v for k2, v in numbers.items()},
                    "rollback_duration_s": None
                    if done is None
                    else round(done - monitor.rollbacks[-1]["started"], 3),
                    "deploy_to_first_failure_s": None
                    if first_fail is None
                    else round(first_fail - deploy_started, 3),
                }
            )
            print(f"episode {k + 1}: {episodes[-1]}", flush=True)
        traffic.stop_event.set()
        monitor.stop_event.set()
        traffic.join(10)
        monitor.join(30)
        from recsys.triton.control import TritonControl

        serving = TritonControl(settings.triton_grpc_url).loaded_versions(settings.model_name)

    ttrs = [e["time_to_rollback_s"] for e in episodes if e["time_to_rollback_s"] is not None]
    failed = [e["failed_requests"] for e in episodes]
    result = {
        "benchmark": "time_to_rollback",
        "goal_s": 30.0,
        "scrape_interval_s": args.interval,
        "client_rps_target": args.rps,
        "episodes_run": len(episodes),
        "episodes_rolled_back": len(ttrs),
        "time_to_rollback_s": {
            "min": min(ttrs, default=None),
            "median": round(statistics.median(ttrs), 3) if ttrs else None,
            "max": max(ttrs, default=None),
        },
        "failed_requests": {"min": min(failed), "max": max(failed)},
        "v1": v1,
        "serving_after": serving,
        "episodes": episodes,
        "client_requests": len(traffic.outcomes),
        "monitor_error": monitor.error,
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = result["time_to_rollback_s"]
    print(
        f"time from first failed request to verified rollback over {len(ttrs)}/{len(episodes)} "
        f"episodes: min {summary['min']} s, median {summary['median']} s, max {summary['max']} s "
        f"(goal < 30 s); failed client requests per episode {min(failed)}-{max(failed)} at "
        f"~{args.rps:g} rps, scrape interval {args.interval:g} s; serving {serving}; -> {args.out}"
    )
    ok = len(ttrs) == len(episodes) and max(ttrs) < 30.0 and serving == [v1]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
