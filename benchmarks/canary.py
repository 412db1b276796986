"""Benchmark: progressive delivery through the product's real path: a faulty canary against
today's all-at-once deploy, a good canary promoted on its own, A/B and A/A experiments judged
from simulated shoppers' clicks, and what the router costs per request.

Everything runs as a user runs it. The embedded stack is started as ``recsys stack up`` starts
it (Triton, MLflow, and Airflow's api-server, scheduler, dag-processor and triggerer on
LocalExecutor), on its own state folder (``--work``, fresh each run) and free ports. It serves
the real all-MiniLM-L6-v2 over the full Home Depot catalogue (the export cached by
``time_to_rollback_airflow.py``) and a MiniLM fine-tuned with the pipeline's own training loop
on the training queries (``--train-steps`` x ``--train-batch-size``, exported over the same
catalogue and cached under ``--work`` by its parameters). Registered versions:

* v1: off-the-shelf MiniLM, deployed with ``recsys deploy``; the router
  (``product_search_router``) is put in front of it;
* faulty versions, one per episode: the same export with ``fault_injection {"mode": "raise",
  "after_requests": K}``: each of its 2 instances answers K requests, then every request fails.
  Only how long it looks healthy first differs between the two kinds of deploy. All at once,
  Triton switches every request to the new version as soon as it is loaded, before the
  deploy's smoke test, so it needs K = ``--fault-after-all-at-once`` (100, as in
  ``time_to_rollback_airflow.py``) to pass that smoke test at 20 requests/s. A canary gets only
  its 5% (about 1 request/s), so K = ``--fault-after`` (10) makes it fail within its first
  20 s, i.e. at the first step (with 20 or more per instance it can pass the first step's two
  10 s windows and show its fault only at 25%);
* v3: off-the-shelf again (a good canary), v4: the fine-tuned MiniLM (A/B), v5: off-the-shelf
  again (the A/A twin of what serves then).

Traffic: ``ShopperTraffic`` (``recsys.delivery.traffic``), held-out Home Depot queries (split by
query, 80/20, seed 13) as simulated shoppers sending requests through the router at ``--rps``,
each with a sticky visitor key, clicking by relevance grade; the same stream for every scenario.
Every outcome (time, ok, arm, version) is kept, so failures are counted as clients saw them.

1. **All at once** (today): ``recsys deploy --version <faulty>``; the scheduled
   ``triton_monitor`` DAG rolls it back. Failed requests: from the deploy until clients are
   served again (the first success after the last failure).
2. **Faulty canary**: ``recsys deploy --version <faulty> --canary --analysis '{"window_s": 10,
   "check_interval_s": 2, "min_requests": 5}'`` (steps 5,25,50,100); the ``rollout`` DAG's
   analysis in the triggerer cuts the candidate's weight to 0 on the breach and ``finish``
   aborts. Per episode: failed requests; exposed share (requests answered by or failed on the
   candidate / all requests, from the rollout's start to the weight-0 entry of the routing
   history); seconds from the first failed request to that entry and to the ``rollout_abort``
   audit record; that the stable version never failed. One episode's exposure ends with the
   candidate's fault budget (about 20 requests), so its share is 20 / the requests it took to
   get there, noisy around the share of visitors the rollout's hash puts on the candidate
   (``candidate_visitor_share``, about 5%); the result is the share pooled over the episodes,
   with its Wilson interval.
3. **Good canary**: ``recsys deploy --version 3 --canary --analysis '{"window_s": 10,
   "windows_per_step": 1, "check_interval_s": 2}'``; promoted when v3 is champion and the
   only loaded version after ``rollout_promote``, with no failed request.
4. **A/B**: ``recsys experiment start --version 4 --split 50 --sample-size S``, shoppers'
   impressions and clicks logged to the feedback log; the analysis compares the arms'
   click-through when S impressions are in. The offline NDCG@10 of both exports on the same
   held-out queries, and the click-through the shoppers' click model expects for each, are
   computed beside it.
5. **A/A**: the same with v5, a copy of what serves: no significant difference expected.
6. **Router overhead**: closed loop (``serving_throughput.closed_loop``) with 1/8/32 client
   threads, straight to the model vs through its router (no rollout: the router pins the stable
   version), alternating which goes first; p50/p99 per level; shopper traffic stopped.

Results (``benchmarks/results/canary.json``): ``faulty_canary_exposed_share``,
``failed_requests_canary`` and ``failed_requests_all_at_once`` (mean per faulty deploy, same
traffic), ``seconds_to_abort`` (p95 over episodes, first failure -> weight 0),
``good_canary_promoted``, ``ab_detects_difference``, ``aa_false_positive``,
``router_p99_overhead_ms`` (8 clients), per-episode details and a markdown table.

    python benchmarks/canary.py [--episodes 3] [--rps 20] [--sample-size 6000]
    python benchmarks/canary.py --prepare-only   # build/cache the exports and score them offline
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving_throughput import (  # noqa: E402
    Caller,
    LevelResult,
    closed_loop,
    machine_info,
)
from benchmarks.time_to_rollback_airflow import (  # noqa: E402
    build_artifacts,
    cli,
    parse_ts,
    percentile,
    say,
)

RESULTS = ROOT / "benchmarks" / "results" / "canary.json"
PLATFORM_CODE = (
    "recsys/delivery/*.py",
    "dags/rollout.py",
    "dags/triton_monitor*.py",
    "recsys/deploy.py",
    "recsys/rollback.py",
    "recsys/operations.py",
    "recsys/monitoring/*.py",
)
FAMILY = "search"
ROLLOUT_DAG = "rollout"
MONITOR = "triton_monitor"
SMOKE_QUERY = "angle bracket"
FAULTY_ANALYSIS = {"window_s": 10, "check_interval_s": 2, "min_requests": 5}
GOOD_ANALYSIS = {"window_s": 10, "windows_per_step": 1, "check_interval_s": 2}
EXPERIMENT_ANALYSIS = {"window_s": 10, "check_interval_s": 2}
POSITIVE_THRESHOLD = 2.33
TOP_K = 10
ROLLOUT_ENDS = ("rollout_abort", "rollout_promote", "rollout_end")


# -- artifacts and offline quality ---------------------------------------------------------


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = 60.0) -> Iterator[None]:
    """Say that ``what`` is still under way every ``every_s`` seconds (long one-off steps)."""
    done = threading.Event()
    began = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            say(f"  ... {what}: {time.monotonic() - began:.0f} s so far")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def code_fingerprint() -> dict[str, str]:
    """The platform code the numbers come from (the files progressive delivery runs on):
    sha256 prefix per file, and the git commit they sit on."""
    files = sorted({p for pattern in PLATFORM_CODE for p in ROOT.glob(pattern)})
    prints = {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in files
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        prints["git_head"] = head.stdout.strip()
    return prints


def data_key(path: Path) -> list[Any]:
    path = path.resolve()
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def fine_tuned_artifacts(
    work: Path, data: Path, train: Any, catalog: Any, args: argparse.Namespace
) -> tuple[Path, dict[str, Any]]:
    """MiniLM fine-tuned with the pipeline's training loop on the training queries, exported
    over the full catalogue (the products of the off-the-shelf export) with its drift reference;
    cached in ``work`` by data file and training parameters."""
    from recsys.families.search.drift_reference import write_query_reference
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.export import build_serving_artifacts
    from recsys.families.search.training import TrainingParams, fine_tune

    params = TrainingParams(
        epochs=1,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.train_steps,
        positive_threshold=POSITIVE_THRESHOLD,
        seed=13,
    )
    base = resolve_base_model("minilm")
    key = {"data": data_key(data), "base_model": str(base), "params": params.to_dict()}
    folder = work / "artifacts" / f"minilm_ft_{args.train_steps}x{args.train_batch_size}"
    stamp = folder / "stamp.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(stamp.read_text())
        if recorded["key"] == json.loads(json.dumps(key)):
            say(f"reusing the fine-tuned export in {folder}")
            return folder / "serving", recorded["info"]
    shutil.rmtree(folder, ignore_errors=True)
    say(
        f"fine-tuning MiniLM: {args.train_steps} steps x {args.train_batch_size} pairs "
        f"(one-off, cached in {folder})"
    )
    started = time.perf_counter()
    with heartbeat("fine-tuning"):
        result = fine_tune(train, base, folder / "checkpoint", params)
    trained = time.perf_counter()
    say(
        f"fine-tuned in {trained - started:.0f} s ({result.samples_per_second:.1f} pairs/s); "
        f"exporting over {len(catalog):,} products"
    )
    with heartbeat("exporting"):
        serving = build_serving_artifacts(
            folder / "checkpoint", catalog, folder / "serving", model_name="product_search"
        )
    write_query_reference(serving, train["search_term"].astype(str).tolist())
    info = {
        "params": params.to_dict(),
        "steps": result.steps,
        "pairs_seen": result.steps * args.train_batch_size,
        "positive_pairs": result.pairs,
        "train_s": round(trained - started, 1),
        "export_s": round(time.perf_counter() - trained, 1),
        "samples_per_second": round(result.samples_per_second, 2),
        "epoch_losses": result.epoch_losses,
        "device": result.device,
    }
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # the export is what serves
    stamp.write_text(json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return serving, info


def offline_quality(folder: Path, test: Any, shoppers: Any) -> dict[str, Any]:
    """What ``folder`` serves, scored offline on the held-out queries: the pipeline's ranking
    metrics (ranx NDCG@10, MRR, Recall@10/100 over the whole catalogue) and the click-through
    that the simulated shoppers' click model expects on its top 10 (their mean
    ``expected_ctr``, each shopper equally often as in the traffic)."""
    import numpy as np

    from recsys.families.search.evaluation import (
        dense_run,
        judged_queries,
        onnx_embedder,
        ranking_metrics,
        relevance_grade,
    )

    manifest = json.loads((folder / "manifest.json").read_text())
    embed = onnx_embedder(
        folder / manifest.get("onnx_file", "encoder.onnx"),
        folder / "tokenizer.json",
        int(manifest.get("max_query_tokens", 64)),
    )
    products = np.load(folder / "products.npz")
    ids = [str(i) for i in products["ids"]]
    embeddings = products["embeddings"]
    queries = judged_queries(test)
    metrics = ranking_metrics(
        test,
        dense_run(queries, embed(queries), ids, embeddings),
        relevance_grade(POSITIVE_THRESHOLD),
        (10, 100),
    )
    shopper_queries = [s.query for s in shoppers.shoppers]
    scores = embed(shopper_queries) @ embeddings.T
    top = np.argsort(-scores, axis=1)[:, :TOP_K]
    ctrs = [
        shopper.expected_ctr([ids[i] for i in row])
        for shopper, row in zip(shoppers.shoppers, top, strict=True)
    ]
    return {
        **{k: round(v, 4) for k, v in metrics.items()},
        "expected_ctr": round(float(np.mean(ctrs)), 4),
        "queries": len(queries),
        "shoppers": len(ctrs),
    }


def power(p1: float, p2: float, per_arm: int, alpha: float = 0.05) -> float:
    """Probability that a two-sided two-proportion test at ``alpha`` with ``per_arm``
    impressions per arm finds true rates ``p1`` vs ``p2`` different (normal approximation)."""
    from scipy.stats import norm

    mean = (p1 + p2) / 2
    null_se = math.sqrt(2 * mean * (1 - mean) / per_arm)
    se = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / per_arm)
    return float(norm.cdf((abs(p2 - p1) - norm.ppf(1 - alpha / 2) * null_se) / se))


def per_arm_sample(p1: float, p2: float, alpha: float = 0.05, power: float = 0.9) -> int | None:
    """Impressions per arm a two-sided two-proportion test needs to find ``p1`` vs ``p2`` at
    ``alpha`` with ``power`` (the usual normal approximation)."""
    from scipy.stats import norm

    if p1 == p2:
        return None
    mean = (p1 + p2) / 2
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    root = z_a * math.sqrt(2 * mean * (1 - mean)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root**2 / (p1 - p2) ** 2)


# -- the running platform ------------------------------------------------------------------


class Platform:
    """The stack under test, as the benchmark drives it: CLI calls as a user makes them, and
    what the platform recorded (audit log, routing file, analysis state, Airflow's runs)."""

    def __init__(self, settings: Any, airflow: Any, traffic: Any = None) -> None:
        from recsys.triton.control import TritonControl

        self.settings = settings
        self.model = settings.model_name
        self.airflow = airflow
        self.control = TritonControl(settings.triton_grpc_url)
        self.traffic = traffic
        self.env = {**os.environ}
        self.commands: list[str] = []

    def cli(self, *args: str) -> str:
        """``recsys ARGS`` in its own process; its stdout (raises with stderr on failure)."""
        self.commands.append("recsys " + " ".join(args))
        result = cli(*args, env=self.env)
        if result.returncode != 0:
            raise RuntimeError(f"recsys {' '.join(args)} failed: {result.stderr[-3000:]}")
        return result.stdout

    def register(self, folder: Path, name: str) -> int:
        from recsys import registry
        from recsys.deploy import register_model

        uri = self.settings.mlflow_tracking_uri
        run_id = registry.start_training_run(uri, "canary-benchmark", name, {}, {})
        version = int(register_model(self.settings, run_id, str(folder), {})["version"])
        say(f"registered {name} as v{version}")
        return version

    def records_after(self, t: float, actions: tuple[str, ...]) -> list[dict[str, Any]]:
        from recsys.audit import read_records

        return [
            r
            for r in read_records(self.settings.audit_log, self.model)
            if r["action"] in actions and parse_ts(r["ts"]) >= t
        ]

    def routing(self) -> Any:
        from recsys.delivery.routing import read_routing

        return read_routing(self.settings.triton_repo, self.model)

    def champion(self) -> int | None:
        from recsys import registry

        return registry.alias_version(
            self.settings.mlflow_tracking_uri, self.model, registry.CHAMPION
        )

    def check_traffic(self) -> None:
        if self.traffic is not None and (self.traffic.error or not self.traffic.is_alive()):
            raise RuntimeError(f"the shopper traffic stopped: {self.traffic.error!r}")

    def quiet(self, stable: int, seconds: float = 5.0) -> float:
        """Wait until ``stable`` serves alone with no rollout, no rollout DAG run in flight, and
        ``seconds`` of traffic without a failure; returns when that began."""
        from tests.stack_testing import wait_for

        wait_for(
            f"v{stable} serving alone",
            lambda: self.control.loaded_versions(self.model) == [stable],
            300,
        )
        wait_for(
            "no rollout under way", lambda: not (self.routing() and self.routing().active), 300
        )
        wait_for(
            "no rollout DAG run in flight",
            lambda: all(
                r["state"] in ("success", "failed") for r in self.airflow.runs(ROLLOUT_DAG, 5)
            ),
            300,
        )
        settle = time.time()

        def healthy() -> bool:
            self.check_traffic()
            seen = [o for o in list(self.traffic.outcomes) if o.at >= settle]
            if any(not o.ok for o in seen):
                raise RuntimeError(f"requests failed while v{stable} served alone: {seen[-1]}")
            return bool(seen) and seen[-1].at - settle >= seconds

        wait_for(f"{seconds:g} s of healthy traffic", healthy, seconds + 60, poll_s=0.5)
        return settle

    def wait_rollout_end(self, invoked_at: float, version: int, run_id: str, timeout_s: float):
        """The audit record that ended the rollout of ``version``; fails fast when its DAG run
        failed."""
        from tests.stack_testing import wait_for

        def ended() -> dict[str, Any] | None:
            self.check_traffic()
            for record in self.records_after(invoked_at, ROLLOUT_ENDS):
                if int(record.get("version", -1)) == version:
                    return record
            if self.airflow.run_state(ROLLOUT_DAG, run_id) == "failed":
                states = self.airflow.task_states(ROLLOUT_DAG, run_id)
                raise RuntimeError(f"rollout DAG run {run_id} failed: {states}")
            return None

        return wait_for(f"the end of the rollout of v{version}", ended, timeout_s, poll_s=0.5)

    def wait_run_done(self, run_id: str) -> str:
        from tests.stack_testing import wait_for

        return wait_for(
            f"rollout DAG run {run_id} done",
            lambda: (
                (s := self.airflow.run_state(ROLLOUT_DAG, run_id)) in ("success", "failed") and s
            ),
            180,
        )

    def served_again(self, after: float, seconds: float = 3.0) -> None:
        """Wait until clients had ``seconds`` of successful traffic after ``after`` (and after
        the last failure since then)."""
        from tests.stack_testing import wait_for

        def ok_since() -> bool:
            self.check_traffic()
            seen = [o for o in list(self.traffic.outcomes) if o.at >= after]
            failed = [o.at for o in seen if not o.ok]
            return bool(seen) and seen[-1].at - (failed[-1] if failed else after) >= seconds

        wait_for("traffic after the switch", ok_since, seconds + 60, poll_s=0.5)

    def mlflow_run(self, rollout_id: str) -> str | None:
        from recsys import registry

        client = registry.client(self.settings.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name("rollouts")
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.rollout_id = '{rollout_id}'"
        )
        return runs[0].info.run_id if runs else None


def analysis_run_id(stdout: str) -> str:
    """The rollout DAG run the CLI triggered (its ``analysis: rollout run <id>: <url>`` line)."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(f"analysis: {ROLLOUT_DAG} run "):
            return line.removeprefix(f"analysis: {ROLLOUT_DAG} run ").rsplit(": http", 1)[0]
    raise RuntimeError(f"no analysis run in the CLI's output: {stdout!r}")


def fault_version(error: str | None) -> int | None:
    """The version whose injected fault failed a request (None: some other error)."""
    found = re.search(r"injected fault \(manifest fault_injection\) in (\d+)\b", error or "")
    return int(found.group(1)) if found else None


def window(outcomes: list[Any], start: float, end: float) -> list[Any]:
    return [o for o in outcomes if start <= o.at < end]


def answered_by(outcomes: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.arm}:v{o.version}" if o.ok else "failed"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- scenarios -----------------------------------------------------------------------------


def all_at_once_episode(bench: Platform, version: int, stable: int) -> dict[str, Any]:
    """Deploy the faulty ``version`` all at once; the scheduled monitor rolls it back."""
    from tests.stack_testing import wait_for

    def watching() -> bool:
        for run in bench.airflow.runs(MONITOR, limit=3):
            if run["state"] == "running":
                states = bench.airflow.task_states(MONITOR, run["dag_run_id"])
                return states.get("watch_metrics") == "deferred"
        return False

    bench.quiet(stable)
    wait_for("the monitor's watch in the triggerer", watching, 300)
    deployed_at = time.time()
    bench.cli("deploy", "--version", str(version), "--smoke-query", SMOKE_QUERY, "--top-k", "5")
    deploy_done = time.time()

    def rolled_back() -> dict[str, Any] | None:
        bench.check_traffic()
        for record in bench.records_after(deployed_at, ("rollback",)):
            if int(record.get("from_version", -1)) == version:
                return record
        return None

    record = wait_for(f"the monitor's rollback of v{version}", rolled_back, 600, poll_s=0.5)
    recorded_at = parse_ts(record["ts"])
    bench.served_again(recorded_at)
    outcomes = list(bench.traffic.outcomes)
    first_fail = bench.traffic.first_failure_at(deployed_at)
    last_fail = bench.traffic.last_failure_at(deployed_at)
    if first_fail is None or last_fail is None:
        raise RuntimeError(f"v{version} was rolled back but no client request ever failed")
    recovered = next(o.at for o in outcomes if o.at > last_fail and o.ok)
    episode = window(outcomes, deployed_at, recovered)
    return {
        "version": version,
        "failed_requests": sum(not o.ok for o in episode),
        "requests": len(episode),
        "deploy_to_first_failure_s": round(first_fail - deployed_at, 3),
        "time_to_rollback_s": round(recovered - first_fail, 3),
        "first_failure_to_rollback_record_s": round(recorded_at - first_fail, 3),
        "deploy_command_s": round(deploy_done - deployed_at, 3),
        "answered_by": answered_by(episode),
        "rollback_to": record.get("to_version"),
    }


def canary_episode(bench: Platform, version: int, stable: int, visitors: int) -> dict[str, Any]:
    """``recsys deploy --canary`` of the faulty ``version``; the rollout DAG aborts it."""
    from recsys.delivery.analysis import read_state
    from recsys.delivery.routing import key_share
    from recsys.delivery.traffic import visitor_key

    bench.quiet(stable)
    invoked_at = time.time()
    out = bench.cli(
        "deploy", "--version", str(version), "--canary", "--analysis", json.dumps(FAULTY_ANALYSIS)
    )
    run_id = analysis_run_id(out)
    record = bench.wait_rollout_end(invoked_at, version, run_id, 600)
    if record["action"] != "rollout_abort":
        raise RuntimeError(f"the faulty canary v{version} was not aborted: {record}")
    abort_at = parse_ts(record["ts"])
    bench.served_again(abort_at)
    run_state = bench.wait_run_done(run_id)
    rollout_id = record["rollout_id"]
    history = bench.routing().history
    start_at = next(
        h["at"]
        for h in history
        if h.get("rollout_id") == rollout_id and h.get("candidate") == version
    )
    cut = next(
        h
        for h in history
        if h["at"] >= start_at and h.get("candidate_weight") == 0.0 and "candidate" not in h
    )
    cut_at = cut["at"]
    outcomes = list(bench.traffic.outcomes)
    exposed = window(outcomes, start_at, cut_at)
    on_candidate = [o for o in exposed if not o.ok or o.version == version]
    after_cut = [
        o for o in window(outcomes, cut_at, abort_at + 3) if not o.ok or o.version == version
    ]
    episode = window(outcomes, invoked_at, abort_at + 3)
    failures = [o for o in episode if not o.ok]
    first_fail = failures[0].at if failures else None
    not_candidate = [o for o in failures if fault_version(o.error) != version]
    weight = float(record.get("report", {}).get("step") or 5.0) / 100.0
    salt = rollout_id
    share_of_visitors = (
        sum(key_share(salt, visitor_key(v).encode()) < weight for v in range(visitors)) / visitors
    )
    state = read_state(bench.settings.home, bench.model)
    totals = (
        (state.result or {}).get("totals", {}) if state and state.rollout_id == rollout_id else {}
    )
    return {
        "version": version,
        "rollout_id": rollout_id,
        "analysis_run": run_id,
        "analysis_run_state": run_state,
        "failed_requests": len(failures),
        "requests": len(episode),
        "exposed_share": round(len(on_candidate) / max(len(exposed), 1), 4),
        "exposed_requests": len(on_candidate),
        "requests_start_to_cut": len(exposed),
        "candidate_requests_after_cut": len(after_cut),
        "candidate_visitor_share": round(share_of_visitors, 4),
        "step_weight": weight,
        "seconds_to_abort": None if first_fail is None else round(cut_at - first_fail, 3),
        "seconds_to_abort_record": None if first_fail is None else round(abort_at - first_fail, 3),
        "start_to_first_failure_s": None if first_fail is None else round(first_fail - start_at, 3),
        "start_to_cut_s": round(cut_at - start_at, 3),
        "cut_reason": cut.get("why"),
        "abort_reason": record.get("reason"),
        "failures_not_on_candidate": len(not_candidate),
        "stable_failures_in_triton": (totals.get("stable") or {}).get("failures"),
        "candidate_failures_in_triton": (totals.get("candidate") or {}).get("failures"),
        "answered_by": answered_by(episode),
        "candidate_timeline": [
            [round(o.at - start_at, 2), "ok" if o.ok else "failed"]
            for o in window(outcomes, start_at, abort_at + 3)
            if not o.ok or o.version == version
        ],
    }


def good_canary(bench: Platform, version: int, stable: int) -> dict[str, Any]:
    """``recsys deploy --canary`` of the good ``version``, promoted through every step."""
    bench.quiet(stable)
    invoked_at = time.time()
    out = bench.cli(
        "deploy", "--version", str(version), "--canary", "--analysis", json.dumps(GOOD_ANALYSIS)
    )
    run_id = analysis_run_id(out)
    record = bench.wait_rollout_end(invoked_at, version, run_id, 900)
    ended_at = parse_ts(record["ts"])
    bench.served_again(ended_at)
    run_state = bench.wait_run_done(run_id)
    routing = bench.routing()
    start_at = next(
        h["at"]
        for h in routing.history
        if h.get("rollout_id") == record["rollout_id"] and h.get("candidate") == version
    )
    steps = [
        {"after_s": round(h["at"] - start_at, 1), "weight": h["candidate_weight"], "why": h["why"]}
        for h in routing.history
        if h["at"] >= start_at and "candidate_weight" in h
    ]
    episode = window(list(bench.traffic.outcomes), invoked_at, ended_at + 3)
    loaded = bench.control.loaded_versions(bench.model)
    champion = bench.champion()
    promoted = (
        record["action"] == "rollout_promote"
        and loaded == [version]
        and champion == version
        and routing.stable == version
        and not routing.active
    )
    return {
        "version": version,
        "stable": stable,
        "promoted": promoted,
        "decision_record": record["action"],
        "reason": record.get("reason"),
        "analysis_run": run_id,
        "analysis_run_state": run_state,
        "loaded_after": loaded,
        "champion_after": champion,
        "seconds_start_to_promote": round(ended_at - start_at, 1),
        "weights": steps,
        "failed_requests": sum(not o.ok for o in episode),
        "requests": len(episode),
        "answered_by": answered_by(episode),
    }


def experiment(
    bench: Platform, version: int, stable: int, sample_size: int, rps: float
) -> dict[str, Any]:
    """``recsys experiment start`` of ``version`` against ``stable`` at a 50/50 split until
    ``sample_size`` impressions; the analysis compares the arms' click-through."""
    from recsys.delivery.analysis import read_state

    bench.quiet(stable)
    invoked_at = time.time()
    out = bench.cli(
        "experiment", "start", "--version", str(version), "--split", "50",
        "--sample-size", str(sample_size), "--analysis", json.dumps(EXPERIMENT_ANALYSIS),
    )  # fmt: skip
    run_id = analysis_run_id(out)
    timeout = 3 * sample_size / rps + 300
    record = bench.wait_rollout_end(invoked_at, version, run_id, timeout)
    ended_at = parse_ts(record["ts"])
    bench.served_again(ended_at)
    run_state = bench.wait_run_done(run_id)
    state = read_state(bench.settings.home, bench.model)
    if state is None or state.rollout_id != record["rollout_id"] or not state.result:
        raise RuntimeError(f"no analysis result for {record['rollout_id']}: {state}")
    result = state.result
    comparison = result.get("comparison")
    compared_by = "the rollout analysis"
    if comparison is None:
        # Ended on a health breach before its comparison: the arms as the feedback log has
        # them at that moment, for the record (the analysis itself decided nothing about CTR).
        from recsys.delivery.feedback import FeedbackLog, feedback_log_path
        from recsys.delivery.stats import compare_arms

        summary = FeedbackLog(feedback_log_path(bench.settings.home, bench.model)).arm_outcomes(
            record["rollout_id"]
        )
        comparison = compare_arms(summary.stable, summary.candidate, min_impressions=200).to_dict()
        compared_by = "the benchmark, from the feedback log when the analysis aborted"
    episode = window(list(bench.traffic.outcomes), invoked_at, ended_at + 3)
    arms = {
        arm: {k: comparison[arm][k] for k in ("versions", "impressions", "conversions", "rate",
                                              "ci_low", "ci_high")}
        for arm in ("stable", "candidate")
    }  # fmt: skip
    return {
        "stable": stable,
        "candidate": version,
        "sample_size": sample_size,
        "decision": result["decision"],
        "reasons": result.get("reasons"),
        "compared_by": compared_by,
        "comparison_decision": comparison["decision"],
        "significant": comparison["significant"],
        "p_value": comparison["p_value"],
        "difference": comparison["difference"],
        "difference_ci": [comparison["difference_ci_low"], comparison["difference_ci_high"]],
        "test": comparison["test"],
        "summary": comparison["summary"],
        "arms": arms,
        "record": record["action"],
        "rollout_id": record["rollout_id"],
        "mlflow_run_id": bench.mlflow_run(record["rollout_id"]),
        "analysis_run": run_id,
        "analysis_run_state": run_state,
        "seconds": round(ended_at - invoked_at, 1),
        "failed_requests": sum(not o.ok for o in episode),
        "requests": len(episode),
        "unattributed_answers": bench.traffic.unattributed,
    }


# -- router overhead -----------------------------------------------------------------------


def grpc_caller(url: str, model: str, routed: bool) -> tuple[Caller, Callable[[], None]]:
    """One client's search call straight to ``model`` or through its router (same inputs,
    plus a routing key and the routed outputs): its own gRPC connection."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from recsys.delivery.routing import ROUTED_ARM, ROUTED_VERSION, ROUTING_KEY, router_name
    from recsys.families.search.client import search_inputs

    client = grpcclient.InferenceServerClient(url)
    target = router_name(model) if routed else model
    names = ["PRODUCT_IDS", "SCORES"] + ([ROUTED_VERSION, ROUTED_ARM] if routed else [])
    outputs = [grpcclient.InferRequestedOutput(name) for name in names]
    counter = iter(range(10**9))

    def call(query: str) -> list[str]:
        inputs = search_inputs(query, TOP_K)
        if routed:
            key = grpcclient.InferInput(ROUTING_KEY, [1, 1], "BYTES")
            key.set_data_from_numpy(np.array([[f"bench-{next(counter)}".encode()]], np.object_))
            inputs.append(key)
        result = client.infer(target, inputs, outputs=outputs, client_timeout=30.0)
        ids = result.as_numpy("PRODUCT_IDS")
        if ids is None or ids.size != TOP_K:
            raise RuntimeError(f"expected {TOP_K} ids, got {None if ids is None else ids.size}")
        return [i.decode("utf-8") for i in ids.reshape(-1)]

    return call, client.close


def model_counts(control: Any, model: str, version: int) -> tuple[int, int]:
    """Triton's ``(inference_count, execution_count)`` of one version: their quotient over an
    interval is the mean batch the model ran."""
    stats = control.inference_statistics(model, version)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def router_overhead(
    control: Any,
    repo: Path,
    model: str,
    queries: list[str],
    levels: list[int],
    requests: int,
) -> dict[str, Any]:
    """p50/p99 straight to the model vs through the router at each client count: two rounds
    per level, the order swapped in the second, the same queries for both; also the mean
    batch the model ran in each (its dynamic batching needs requests in flight together)."""
    (version,) = control.loaded_versions(model)
    table: dict[str, dict[str, dict[str, Any]]] = {"direct": {}, "router": {}}
    overhead: dict[str, dict[str, float | None]] = {}
    half = max(requests // 2, 1)
    offset = 0
    for concurrency in levels:
        merged = {system: LevelResult(concurrency) for system in table}
        counts = {system: [0, 0] for system in table}
        warm = max(20, 2 * concurrency)
        for rnd in range(2):
            for system in ("direct", "router") if rnd == 0 else ("router", "direct"):
                pairs = [
                    grpc_caller(control.url, model, system == "router") for _ in range(concurrency)
                ]
                try:
                    callers = [call for call, _ in pairs]
                    closed_loop(callers, queries, offset + half, warm, 120.0)
                    before = model_counts(control, model, version)
                    measured = closed_loop(callers, queries, offset, half, 120.0)
                    after = model_counts(control, model, version)
                finally:
                    for _, close in pairs:
                        with contextlib.suppress(Exception):
                            close()
                merged[system].latencies_s += measured.latencies_s
                merged[system].errors += measured.errors
                merged[system].first_error = merged[system].first_error or measured.first_error
                merged[system].wall_s += measured.wall_s
                counts[system] = [
                    c + a - b for c, a, b in zip(counts[system], after, before, strict=True)
                ]
            offset += half + warm
        level = str(concurrency)
        for system in table:
            inferences, executions = counts[system]
            table[system][level] = {
                **merged[system].summary(),
                "model_mean_batch": round(inferences / executions, 2) if executions else None,
            }
        d, r = table["direct"][level], table["router"][level]
        overhead[level] = {
            q: None if d[q] is None or r[q] is None else round(r[q] - d[q], 2)
            for q in ("p50_ms", "p99_ms")
        }
        say(
            f"router overhead c={concurrency}: direct p50 {d['p50_ms']} / p99 {d['p99_ms']} ms "
            f"({d['throughput_rps']} req/s, model batch {d['model_mean_batch']}), router p50 "
            f"{r['p50_ms']} / p99 {r['p99_ms']} ms ({r['throughput_rps']} req/s, model batch "
            f"{r['model_mean_batch']})"
        )
    from recsys.delivery.routing import DEFAULT_ROUTER_INSTANCES
    from recsys.triton.repository import version_serving_config

    return {
        "levels": table,
        "overhead_ms": overhead,
        "served_version": version,
        "model_config": {
            k: v
            for k, v in version_serving_config(repo, model, version).items()
            if k in ("max_batch_size", "dynamic_batching", "instance_group", "response_cache")
        },
        "router_instances": DEFAULT_ROUTER_INSTANCES,
    }


# -- report --------------------------------------------------------------------------------


def ended(experiment: dict[str, Any]) -> str:
    """What stopped an experiment, when it was not its sample (a health breach)."""
    if experiment["decision"] in ("end", "promote"):
        return ""
    return f"{experiment['decision']} ({'; '.join(experiment.get('reasons') or [])}) - "


def markdown(result: dict[str, Any]) -> str:
    ab, aa, offline = result["ab"], result["aa"], result["offline_quality"]
    low, high = result["faulty_canary_exposed_share_ci95"]
    rows = [
        ("faulty deploy: failed client requests (mean per deploy)",
         f"{result['failed_requests_all_at_once']}", f"{result['failed_requests_canary']}"),
        ("faulty version: share of requests exposed", "100%",
         f"{100 * result['faulty_canary_exposed_share']:.1f}% "
         f"[{100 * low:.1f}, {100 * high:.1f}] (weight 5%)"),
        ("first failure -> exposure stopped (p95)",
         f"{result['all_at_once_time_to_rollback_p95_s']} s (clients served again)",
         f"{result['seconds_to_abort']} s (weight 0); "
         f"{result['seconds_to_abort_record_p95']} s (abort recorded)"),
    ]  # fmt: skip
    lines = [
        "| faulty version | all at once (today) | canary 5/25/50/100 |",
        "|---|---:|---:|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "| check | result |",
        "|---|---|",
        f"| good canary promoted automatically | {result['good_canary_promoted']} "
        f"({result['good_canary']['seconds_start_to_promote']} s, "
        f"{result['good_canary']['failed_requests']} failed requests) |",
        f"| A/B fine-tuned vs off-the-shelf MiniLM detects the difference | "
        f"{result['ab_detects_difference']}: {ended(ab)}{ab['summary']} |",
        f"| offline, same held-out queries: NDCG@10 / expected CTR | off the shelf "
        f"{offline['off_the_shelf']['ndcg_at_10']} / "
        f"{100 * offline['off_the_shelf']['expected_ctr']:.1f}%, fine-tuned "
        f"{offline['fine_tuned']['ndcg_at_10']} / "
        f"{100 * offline['fine_tuned']['expected_ctr']:.1f}% |",
        f"| A/A two copies: false positive | {result['aa_false_positive']}: "
        f"{ended(aa)}{aa['summary']} |",
        "",
        "| clients | direct p50 ms | router p50 ms | direct p99 ms | router p99 ms | "
        "p99 overhead ms | direct req/s | router req/s | model batch direct / router |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    router = result["router"]
    for level, d in router["levels"]["direct"].items():
        r = router["levels"]["router"][level]
        lines.append(
            f"| {level} | {d['p50_ms']} | {r['p50_ms']} | {d['p99_ms']} | {r['p99_ms']} | "
            f"{router['overhead_ms'][level]['p99_ms']} | {d['throughput_rps']} | "
            f"{r['throughput_rps']} | {d['model_mean_batch']} / {r['model_mean_batch']} |"
        )
    return "\n".join(lines)


def wilson(successes: int, trials: int) -> list[float | None]:
    """95% Wilson interval of a share (the exposure is a count of requests)."""
    from scipy.stats import binomtest

    if trials == 0:
        return [None, None]
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=3, help="faulty deploys of each kind")
    parser.add_argument("--rps", type=float, default=20.0, help="shopper requests per second")
    parser.add_argument(
        "--fault-after",
        type=int,
        default=10,
        help="requests each instance of a faulty canary answers before it fails",
    )
    parser.add_argument(
        "--fault-after-all-at-once",
        type=int,
        default=100,
        help="the same for a faulty version deployed all at once (it must pass its smoke test)",
    )
    parser.add_argument(
        "--sample-size",
        type=int,
        default=6000,
        help="impressions per A/B and A/A experiment (both arms together)",
    )
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=1000, help="measured requests per level and system"
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".bench_work" / "canary")
    parser.add_argument(
        "--export-work",
        type=Path,
        default=ROOT / ".bench_work" / "ttr_airflow",
        help="where the off-the-shelf export is cached (shared with time_to_rollback_airflow)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=7, help="shoppers' and clicks' seed")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build the exports, score them, stop"
    )
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Both exports (cached), the held-out shoppers and the offline scores."""
    from recsys.data import product_catalog, read_relevance_csv, split_by_query
    from recsys.families import get_family

    good, faulty, held_out, products = build_artifacts(
        args.export_work, args.data, args.fault_after
    )
    _, faulty_all, _, _ = build_artifacts(args.export_work, args.data, args.fault_after_all_at_once)
    frame = read_relevance_csv(args.data)
    split = split_by_query(frame, test_fraction=0.2, seed=13)
    args.work.mkdir(parents=True, exist_ok=True)
    held_out_csv = args.work / "held_out.csv"
    split.test.to_csv(held_out_csv, index=False)
    shoppers = get_family(FAMILY).simulated_shoppers(held_out_csv, seed=args.seed)
    tuned, training = fine_tuned_artifacts(
        args.work, args.data, split.train, product_catalog(frame), args
    )
    quality_path = tuned.parent / "offline_quality.json"
    quality_key = {"data": data_key(args.data), "seed": args.seed, "tuned": str(tuned)}
    quality = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(quality_path.read_text())
        if recorded["key"] == json.loads(json.dumps(quality_key)):
            quality = recorded["quality"]
    if quality is None:
        say("scoring both exports offline on the held-out queries")
        with heartbeat("offline scoring"):
            quality = {
                "off_the_shelf": offline_quality(good, split.test, shoppers),
                "fine_tuned": offline_quality(tuned, split.test, shoppers),
            }
        quality_path.write_text(json.dumps({"key": quality_key, "quality": quality}, indent=2))
    p_base = quality["off_the_shelf"]["expected_ctr"]
    p_tuned = quality["fine_tuned"]["expected_ctr"]
    needed = per_arm_sample(p_base, p_tuned)
    quality["ndcg_at_10_gain"] = round(
        quality["fine_tuned"]["ndcg_at_10"] / quality["off_the_shelf"]["ndcg_at_10"] - 1, 4
    )
    quality["impressions_per_arm_for_90pct_power"] = needed
    quality["power_at_sample_size"] = round(power(p_base, p_tuned, args.sample_size // 2), 3)
    say(
        f"offline: NDCG@10 {quality['off_the_shelf']['ndcg_at_10']} off the shelf vs "
        f"{quality['fine_tuned']['ndcg_at_10']} fine-tuned; expected CTR {p_base} vs {p_tuned} "
        f"({needed} impressions per arm for 90% power at alpha 0.05; "
        f"{quality['power_at_sample_size']:.0%} with --sample-size {args.sample_size})"
    )
    return {
        "good": good,
        "faulty": faulty,
        "faulty_all_at_once": faulty_all,
        "tuned": tuned,
        "training": training,
        "quality": quality,
        "queries": held_out,
        "products": products,
        "shoppers": shoppers,
        "held_out_csv": held_out_csv,
    }


def main() -> int:
    args = parse_args()
    from tests.stack_testing import benchmark_stack_environment, export_environment

    started = time.time()
    code_at_start = code_fingerprint()
    home = args.work / "home"
    shutil.rmtree(home, ignore_errors=True)  # a fresh platform; the export caches survive
    shutil.rmtree(args.work / "repo", ignore_errors=True)
    (args.work / "partial.json").unlink(missing_ok=True)
    export_environment(
        benchmark_stack_environment(args.work, RECSYS_DATA_PATH=str(args.data.resolve()))
    )
    prepared = prepare(args)
    if args.prepare_only:
        return 0

    from recsys import registry, stack
    from recsys.airflow_client import AirflowClient
    from recsys.config import load_settings
    from recsys.delivery.feedback import FeedbackLog, feedback_log_path
    from recsys.delivery.routing import ensure_router
    from recsys.delivery.traffic import ShopperTraffic
    from recsys.families import get_family
    from recsys.triton.control import TritonControl

    settings = load_settings()
    model = settings.model_name
    say(f"stack up (state in {home})")
    stack.up(settings, timeout_s=300, echo=lambda line: say(line.strip()))
    traffic: ShopperTraffic | None = None
    partial: dict[str, Any] = {"all_at_once": [], "faulty_canary": []}
    all_at_once, canary = partial["all_at_once"], partial["faulty_canary"]
    try:
        registry.ensure_credentials()
        airflow = AirflowClient(
            f"http://127.0.0.1:{settings.airflow_port}",
            stack.AIRFLOW_USER,
            stack.airflow_password(settings),
        )
        bench = Platform(settings, airflow)
        good, faulty, tuned = prepared["good"], prepared["faulty"], prepared["tuned"]
        faulty_all = prepared["faulty_all_at_once"]
        v1 = bench.register(good, "off-the-shelf MiniLM (stable)")
        faulty_versions = [bench.register(faulty_all, "faulty MiniLM copy (all at once 1)")]
        v3 = bench.register(good, "off-the-shelf MiniLM (good canary)")
        v4 = bench.register(tuned, "fine-tuned MiniLM (A/B)")
        v5 = bench.register(good, "off-the-shelf MiniLM (A/A twin)")
        for k in range(2 * args.episodes - 1):
            kind = "all at once" if k + 1 < args.episodes else "canary"
            number = k + 2 if k + 1 < args.episodes else k + 2 - args.episodes
            folder = faulty_all if kind == "all at once" else faulty
            faulty_versions.append(bench.register(folder, f"faulty MiniLM copy ({kind} {number})"))
        say(bench.cli("deploy", "--version", str(v1), "--smoke-query", SMOKE_QUERY).strip())
        router_version = ensure_router(bench.control, settings.triton_repo, model, FAMILY, v1)
        say(f"router {model}_router v{router_version} in front of v{v1}")
        for dag_id in (ROLLOUT_DAG, MONITOR):
            airflow.wait_for_dag(dag_id)

        family = get_family(FAMILY)
        traffic = ShopperTraffic(
            TritonControl(settings.triton_grpc_url, timeout_s=10),
            model,
            family,
            prepared["shoppers"],
            repo=settings.triton_repo,
            feedback=FeedbackLog(feedback_log_path(settings.home, model)),
            rate=args.rps,
            seed=args.seed,
        )
        bench.traffic = traffic
        traffic.start()
        say(f"{len(prepared['shoppers'])} held-out shoppers at {args.rps:g} requests/s")

        for k in range(args.episodes):
            episode = all_at_once_episode(bench, faulty_versions[k], v1)
            all_at_once.append(episode)
            say(
                f"all at once {k + 1}/{args.episodes} (v{episode['version']}): "
                f"{episode['failed_requests']} failed of {episode['requests']} requests, "
                f"served again {episode['time_to_rollback_s']} s after the first failure"
            )
        for k in range(args.episodes):
            version = faulty_versions[args.episodes + k]
            episode = canary_episode(bench, version, v1, traffic.visitors)
            canary.append(episode)
            say(
                f"faulty canary {k + 1}/{args.episodes} (v{version}): "
                f"{episode['failed_requests']} failed of {episode['requests']} requests, exposed "
                f"{episode['exposed_share']:.1%}, weight 0 {episode['seconds_to_abort']} s and "
                f"abort recorded {episode['seconds_to_abort_record']} s after the first failure"
            )
        partial["good_canary"] = promoted = good_canary(bench, v3, v1)
        say(
            f"good canary v{v3}: promoted={promoted['promoted']} after "
            f"{promoted['seconds_start_to_promote']} s, {promoted['failed_requests']} failed"
        )
        partial["ab"] = ab = experiment(bench, v4, v3, args.sample_size, args.rps)
        say(f"A/B v{v4} vs v{v3}: {ab['summary']}")
        partial["aa"] = aa = experiment(bench, v5, v3, args.sample_size, args.rps)
        say(f"A/A v{v5} vs v{v3}: {aa['summary']}")
        traffic.stop()
        bench.traffic = None
        traffic_counts = traffic.counts()

        serving = bench.control.loaded_versions(model)
        say(f"router overhead against v{serving}: {args.requests} requests per level and system")
        router = router_overhead(
            bench.control,
            settings.triton_repo,
            model,
            prepared["queries"],
            args.concurrency,
            args.requests,
        )
    except BaseException:
        path = args.work / "partial.json"
        path.write_text(json.dumps(partial, indent=2, default=str) + "\n")
        say(f"failed; what was measured so far is in {path}, the stack's logs in {home}")
        raise
    finally:
        if traffic is not None and traffic.is_alive():
            with contextlib.suppress(Exception):
                traffic.stop()
        if not args.keep_stack:
            say("stack down")
            stack.down(settings, echo=lambda line: None)

    failed_canary = [e["failed_requests"] for e in canary]
    failed_all = [e["failed_requests"] for e in all_at_once]
    exposed = sum(e["exposed_requests"] for e in canary)
    exposable = sum(e["requests_start_to_cut"] for e in canary)
    to_cut = [e["seconds_to_abort"] for e in canary if e["seconds_to_abort"] is not None]
    to_record = [
        e["seconds_to_abort_record"] for e in canary if e["seconds_to_abort_record"] is not None
    ]
    ttr_all = [e["time_to_rollback_s"] for e in all_at_once]
    overhead_8 = router["overhead_ms"].get("8", {}).get("p99_ms")
    result: dict[str, Any] = {
        "benchmark": "canary",
        "faulty_canary_exposed_share": round(exposed / max(exposable, 1), 4),
        "failed_requests_canary": mean(failed_canary),
        "failed_requests_all_at_once": mean(failed_all),
        "seconds_to_abort": percentile(to_cut, 95) if to_cut else None,
        "good_canary_promoted": bool(promoted["promoted"] and promoted["failed_requests"] == 0),
        "ab_detects_difference": ab["decision"] in ("end", "promote")
        and ab["comparison_decision"] == "candidate_better",
        "aa_false_positive": bool(aa["significant"]),
        "router_p99_overhead_ms": overhead_8,
        "targets": {
            "faulty_canary_exposed_share_max": 0.05,
            "seconds_to_abort_p95_max": 30.0,
            "failed_requests_reduction_min": 10.0,
        },
        "failed_requests_reduction": (
            round(mean(failed_all) / max(mean(failed_canary) or 0, 1e-9), 1)
            if failed_all and failed_canary
            else None
        ),
        "faulty_canary_exposed_share_ci95": wilson(exposed, exposable),
        "faulty_canary_exposed_share_per_episode": [e["exposed_share"] for e in canary],
        "faulty_canary_visitor_share_per_episode": [e["candidate_visitor_share"] for e in canary],
        "seconds_to_abort_per_episode": to_cut,
        "seconds_to_abort_record_per_episode": to_record,
        "seconds_to_abort_record_p95": percentile(to_record, 95) if to_record else None,
        "failed_requests_canary_per_episode": failed_canary,
        "failed_requests_all_at_once_per_episode": failed_all,
        "all_at_once_time_to_rollback_p95_s": percentile(ttr_all, 95) if ttr_all else None,
        "stable_never_failed": all(
            e["failures_not_on_candidate"] == 0 and not e["stable_failures_in_triton"]
            for e in canary
        ),
        "all_at_once": all_at_once,
        "faulty_canary": canary,
        "good_canary": promoted,
        "ab": ab,
        "aa": aa,
        "offline_quality": prepared["quality"],
        "fine_tuning": prepared["training"],
        "router": router,
        "traffic": {
            "rps_target": args.rps,
            "shoppers": len(prepared["shoppers"]),
            "visitors": traffic.visitors if traffic is not None else None,
            "totals": traffic_counts,
            "seed": args.seed,
        },
        "versions": {
            "stable_off_the_shelf": v1,
            "faulty": faulty_versions,
            "good_canary": v3,
            "fine_tuned": v4,
            "aa_twin": v5,
        },
        "fault": {
            "mode": "raise",
            "after_requests_per_instance": {
                "all_at_once": args.fault_after_all_at_once,
                "canary": args.fault_after,
            },
        },
        "analysis_params": {
            "faulty_canary": FAULTY_ANALYSIS,
            "good_canary": GOOD_ANALYSIS,
            "experiments": EXPERIMENT_ANALYSIS,
        },
        "catalogue_products": prepared["products"],
        "commands": {
            "benchmark": " ".join(["python", *sys.argv]),
            "platform": bench.commands,
        },
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            **machine_info(),
        },
        "wall_s": round(time.time() - started, 1),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    code_at_end = code_fingerprint()
    changed = sorted(k for k in code_at_end.keys() | code_at_start.keys()
                     if code_at_end.get(k) != code_at_start.get(k))  # fmt: skip
    result["platform_code"] = {"at_start": code_at_start, "changed_during_run": changed}
    if changed:
        say(f"warning: platform code changed while the benchmark ran: {changed}")
    result["markdown"] = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["markdown"], flush=True)
    say(
        "; ".join(
            f"{k} {result[k]}"
            for k in (
                "faulty_canary_exposed_share",
                "failed_requests_canary",
                "failed_requests_all_at_once",
                "seconds_to_abort",
                "good_canary_promoted",
                "ab_detects_difference",
                "aa_false_positive",
                "router_p99_overhead_ms",
            )
        )
        + f" -> {args.out}"
    )
    ok = (
        result["faulty_canary_exposed_share"] <= 0.05
        and result["seconds_to_abort"] is not None
        and result["seconds_to_abort"] <= 30.0
        and (result["failed_requests_reduction"] or 0) >= 10.0
        and result["good_canary_promoted"]
        and result["ab_detects_difference"]
        and not result["aa_false_positive"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
