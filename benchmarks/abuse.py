"""Benchmark: replay the hardening issue's attacks against the running stack.

The embedded stack is started as `recsys stack up` starts it (Triton, MLflow, Airflow's
api-server, scheduler, dag-processor and triggerer), on its own state folder and free ports,
serving the real all-MiniLM-L6-v2 over the full Home Depot catalogue (the export cached by
``benchmarks/time_to_rollback_airflow.py``), deployed with ``recsys deploy``. A client thread
sends held-out queries over gRPC at ``--rps`` the whole time: that is the normal traffic.

First ``--quiet-s`` seconds of normal traffic alone give the quiet p99. Then each attack runs
for about ``--attack-s`` seconds, one try every ``--attack-interval-s`` (a try may itself be a
handful of requests at once; a flood of cheap requests is rate limiting, a proxy's job, and is
not what this measures), and for each the benchmark records:

* ``outcome``: ``refused`` (the server, CLI or gate said no: 4xx, INVALID_ARG, exit 2),
  ``contained`` (accepted without harm: e.g. rows quarantined with a reason, memory and latency
  bounded), or ``failed``;
* ``server_memory_peak_mb``: the peak resident memory of tritonserver and its python stubs
  during the attack (sampled every 10 ms; the quiet value is in ``quiet``);
* ``normal_p99_ratio``: normal traffic's p99 latency during the attack over its quiet p99
  (failed normal requests are counted separately and must be 0).

The normal clients run in a process of their own; the attacker's process (and the CLI and data
gate runs it spawns) runs at nice 19: on a 2-core host the attacker's own CPU (encoding 70 MB
bodies, starting interpreters) would otherwise compete with the server it attacks, which says
nothing about the server (a remote attacker's CPU is not the server's).

``rows_changed_without_reason`` compares the gate's ``clean.csv`` with the hostile file cell by
cell (ids and texts as exact strings, relevance as the number the file says) and counts rows
lost or changed.

    python benchmarks/abuse.py [--attack-s 8] [--rps 20]

Results: ``benchmarks/results/abuse.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.families.search.client import search

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "abuse.json"
SMOKE_QUERY = "angle bracket"
ADMIN_HEADER = "recsys-admin-key"


def say(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 2) if values else None


def run_normal_traffic(
    grpc_url: str, model: str, queries_file: Path, rps: float, log: Path
) -> None:
    """The normal clients, in a process of their own (``--traffic-log``): paced gRPC searches,
    one line ``wall time, latency ms, ok`` per request, flushed as it goes. A process apart
    from the attacker, so the attacker's work on the client side (building 70 MB bodies holds
    the GIL) is not mistaken for the server's latency."""
    from recsys.triton.control import TritonControl

    control = TritonControl(grpc_url, timeout_s=30, admin_key="")
    queries = json.loads(queries_file.read_text())
    rng = random.Random(7)
    period = 1.0 / rps
    next_at = time.monotonic()
    with log.open("a", buffering=1) as out:
        while True:
            started = time.perf_counter()
            try:
                ok = bool(search(control, model, rng.choice(queries), 10))
            except Exception:
                ok = False
            elapsed_ms = (time.perf_counter() - started) * 1000
            out.write(f"{time.time():.3f},{elapsed_ms:.2f},{int(ok)}\n")
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))


class NormalTraffic:
    """Starts :func:`run_normal_traffic` in a child process and reads its log by time window."""

    def __init__(self, work: Path, grpc_url: str, model: str, queries: list[str], rps: float):
        self.log = work / "normal_traffic.csv"
        self.log.unlink(missing_ok=True)
        queries_file = work / "normal_queries.json"
        queries_file.write_text(json.dumps(queries))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--traffic-log", str(self.log), "--grpc-url", grpc_url,
             "--model", model, "--queries", str(queries_file), "--rps", str(rps)],
            cwd=ROOT,
        )  # fmt: skip

    def window(self, start: float, end: float) -> tuple[list[float], int]:
        """Latencies of the successful requests sent in [start, end) and the failure count."""
        latencies, failures = [], 0
        if not self.log.exists():  # the clients' process has not sent its first request yet
            return latencies, failures
        for line in self.log.read_text().splitlines():
            wall, ms, ok = line.split(",")
            if start <= float(wall) < end:
                if ok == "1":
                    latencies.append(float(ms))
                else:
                    failures += 1
        return latencies, failures

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@dataclass
class Context:
    settings: Any
    env: dict[str, str]
    work: Path
    admin_key: str
    model: str
    tries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://{self.settings.triton_http_url}"


def cli(ctx: Context, *args: str) -> subprocess.CompletedProcess:
    """`recsys ARGS` as a local user runs it (nice 19, see the module docstring)."""
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=ctx.env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def grpc_infer(ctx: Context, queries: list[bytes], top_k: int = 5) -> tuple[bool, str]:
    """Send one raw search request; (answered, error message)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(ctx.settings.triton_grpc_url)
    try:
        query = grpcclient.InferInput("QUERY", [len(queries), 1], "BYTES")
        query.set_data_from_numpy(np.array([[q] for q in queries], dtype=np.object_))
        k = grpcclient.InferInput("TOP_K", [len(queries), 1], "INT32")
        k.set_data_from_numpy(np.full((len(queries), 1), top_k, dtype=np.int32))
        client.infer(ctx.model, [query, k], client_timeout=120)
        return True, ""
    except InferenceServerException as exc:
        return False, f"{exc.status()}: {(exc.message() or '')[:200]}"
    finally:
        client.close()


# -- the attacks ------------------------------------------------------------------------------
# Each returns (outcome, evidence) for one try; the runner repeats it for --attack-s seconds.


def oversized_query_grpc(ctx: Context) -> tuple[str, str]:
    answered, error = grpc_infer(ctx, [b"drill " * 12_000_000])  # 72 MB, one query
    return ("failed", "a 72 MB query was answered") if answered else ("refused", error)


def oversized_batches_grpc(ctx: Context) -> tuple[str, str]:
    """Eight clients at once, each sending a batch of 8 queries of 128 KB (1 MB a request)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: grpc_infer(ctx, [b"x" * 131_072] * 8), range(8)))
    answered = [r for r in results if r[0]]
    if answered:
        return "failed", f"{len(answered)} of 8 one-megabyte batches were answered"
    return "refused", results[0][1]


def oversized_query_http(ctx: Context) -> tuple[str, str]:
    import requests

    body = {
        "inputs": [
            {"name": "QUERY", "shape": [1, 1], "datatype": "BYTES", "data": ["y" * 70_000_000]},
            {"name": "TOP_K", "shape": [1, 1], "datatype": "INT32", "data": [5]},
        ]
    }
    answer = requests.post(f"{ctx.http}/v2/models/{ctx.model}/infer", json=body, timeout=300)
    if answer.status_code in (400, 401, 403, 413):
        return "refused", f"HTTP {answer.status_code}: {answer.text[:120]}"
    return "failed", f"HTTP {answer.status_code}"


def shape_bomb_http(ctx: Context) -> tuple[str, str]:
    """150 bytes declaring a billion rows, ten at once."""
    import requests

    body = (
        '{"inputs":[{"name":"QUERY","shape":[1000000000,1],"datatype":"BYTES","data":["x"]},'
        '{"name":"TOP_K","shape":[1,1],"datatype":"INT32","data":[1]}]}'
    )
    url = f"{ctx.http}/v2/models/{ctx.model}/infer"
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: requests.post(url, data=body, timeout=60), range(10)))
    statuses = sorted({c.status_code for c in codes})
    if all(c.status_code in (400, 403) for c in codes):
        return "refused", f"HTTP {statuses}: {codes[0].text[:100]}"
    return "failed", f"HTTP {statuses}"


def shape_bomb_grpc(ctx: Context) -> tuple[str, str]:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from tests.triton_testing import grpc_shape_bomb

    request = grpc_shape_bomb(ctx.model)
    with grpc.insecure_channel(ctx.settings.triton_grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return "refused", exc.details()[:160]
            return "failed", f"{exc.code()}: {exc.details()[:160]}"
    return "failed", "a billion-row request was answered"


def unauthenticated_operator_apis(ctx: Context) -> tuple[str, str]:
    """Model control, logging, trace, shared memory, statistics and configs, without the key,
    over HTTP and gRPC."""
    import requests
    import tritonclient.grpc as grpcclient

    prefix = "triton_python_backend_shm_region_"
    http_calls = [
        ("POST", "/v2/repository/index", {}),
        ("POST", f"/v2/repository/models/{ctx.model}/unload", {}),
        ("POST", f"/v2/repository/models/{ctx.model}/load", {}),
        ("POST", "/v2/logging", {"log_info": False}),
        ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("POST", f"/v2/systemsharedmemory/region/{prefix}x/register",
         {"key": f"/{prefix}x", "offset": 0, "byte_size": 64}),
        ("GET", "/v2/models/stats", None),
        ("GET", f"/v2/models/{ctx.model}/config", None),
    ]  # fmt: skip
    opened = []
    for method, path, body in http_calls:
        answer = requests.request(method, f"{ctx.http}{path}", json=body, timeout=30)
        if answer.status_code != 403:
            opened.append(f"HTTP {method} {path} -> {answer.status_code}")
    client = grpcclient.InferenceServerClient(ctx.settings.triton_grpc_url)
    try:
        for name, call in (
            ("unload_model", lambda: client.unload_model(ctx.model)),
            ("load_model", lambda: client.load_model(ctx.model)),
            ("update_log_settings", lambda: client.update_log_settings({"log_info": False})),
            ("update_trace_settings", lambda: client.update_trace_settings(
                settings={"trace_level": ["TIMESTAMPS"]})),
            ("register_system_shared_memory", lambda: client.register_system_shared_memory(
                f"{prefix}x", f"/{prefix}x", 64)),
            ("get_inference_statistics", lambda: client.get_inference_statistics(ctx.model)),
            ("get_model_config", lambda: client.get_model_config(ctx.model)),
        ):  # fmt: skip
            try:
                call()
                opened.append(f"gRPC {name} succeeded")
            except Exception as exc:
                if "restricted, expecting header" not in str(exc):
                    opened.append(f"gRPC {name}: {str(exc)[:80]}")
    finally:
        client.close()
    if opened:
        return "failed", "; ".join(opened)
    return "refused", f"{len(http_calls)} HTTP and 7 gRPC operator calls answered 403/restricted"


def admin_key_from_proc(ctx: Context) -> tuple[str, str]:
    """What every local user can read: each process's command line."""
    key = ctx.admin_key.encode()
    leaks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if key in (entry / "cmdline").read_bytes():
                    leaks.append(entry.name)
    if leaks:
        return "failed", f"the admin key is in the command line of pid(s) {leaks}"
    return "refused", "no process's /proc/<pid>/cmdline holds the admin key"


def anonymous_mlflow_and_airflow(ctx: Context) -> tuple[str, str]:
    import requests

    mlflow = requests.get(
        f"{ctx.settings.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/search", timeout=30
    )
    airflow = requests.get(f"http://127.0.0.1:{ctx.settings.airflow_port}/api/v2/dags", timeout=30)
    if mlflow.status_code == 401 and airflow.status_code in (401, 403):
        return "refused", f"MLflow {mlflow.status_code}, Airflow {airflow.status_code}"
    return "failed", f"MLflow {mlflow.status_code}, Airflow {airflow.status_code}"


def traversal_and_bad_versions(ctx: Context) -> tuple[str, str]:
    """Model names that climb out of the state folder and versions that are not versions."""
    from recsys.audit import read_records

    victim = ctx.work / "outside" / "victim.lock"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("precious\n")
    before = len(read_records(ctx.settings.audit_log))
    climb = os.path.relpath(victim.parent / "victim", ctx.settings.home)
    tries = [
        ("rollback", "--model", climb, "--reason", "abuse"),
        ("drift", "--model", "../.."),
        ("deploy", "--model", "a/b", "--version", "1"),
        ("rollback", "--to", "-5"),
        ("rollback", "--to", "0"),
    ]
    problems = []
    for args in tries:
        result = cli(ctx, *args)
        if result.returncode != 2:
            problems.append(f"`recsys {' '.join(args)}` exited {result.returncode}")
    if victim.read_text() != "precious\n" or len(list(victim.parent.iterdir())) != 1:
        problems.append("a file outside the state folder was written")
    if len(read_records(ctx.settings.audit_log)) != before:
        problems.append("an audit record was written")
    if problems:
        return "failed", "; ".join(problems)
    return "refused", f"{len(tries)} hostile CLI calls exited 2; nothing written"


def malformed_requests(ctx: Context) -> tuple[str, str]:
    bad = [
        ([b""], 5),
        ([b"\xff\xfe\xfd"], 5),
        ([b"drill"], 0),
        ([b"drill"], 10**6),
        ([b"drill"], -3),
    ]
    answered = [repr(q) for q, k in bad if grpc_infer(ctx, q, k)[0]]
    if answered:
        return "failed", f"answered: {answered}"
    return "refused", f"{len(bad)} malformed requests answered INVALID_ARG"


HOSTILE_ROWS = [
    # id, product_uid, product_title, search_term, relevance
    ("1.5", "100001", "Simpson Strong-Tie 12-Gauge Angle", "angle bracket", "3"),
    ("2", "100001.7", "Simpson Strong-Tie 12-Gauge Angle", "l bracket", "2.5"),
    ("9" * 30, "100002", "BEHR Premium Textured DeckOver", "deck over", "3"),
    ("4", "", "BEHR Premium Textured DeckOver", "rain shield", "2"),
    ("5", "100002", "BEHR Premium Textured DeckOver", "paint", "2.5abc"),
    ("6", "100003", "Delta Vero 1-Handle Shower", "<script>alert(1)</script>", "2.33"),
    ("7", "100003", "Delta Vero 1-Handle Shower", '=HYPERLINK("http://x","y")', "1.67"),
    ("8", "100003", "Delta Vero 1-Handle Shower", "=cmd|' /C calc'!A0", "2"),
    ("9", "100004", "<img src=x onerror=alert(1)>", "shower only faucet", "inf"),
    ("10", "100004", "Delta Vero 1-Handle Shower Only Faucet", "-20 degree freezer", "3"),
    ("1e3", "100005", "Whirlpool 1.9 cu. ft.", "microwave", "3"),
    (" 12", "100005", "Whirlpool 1.9 cu. ft.", "over the range microwave", "3"),
    ("13", "+100005", "Whirlpool 1.9 cu. ft.", "microwave oven", "2.67"),
    ("14", "100005", "Whirlpool 1.9 cu. ft.", "microwave", "7"),
]


def hostile_data_file(ctx: Context) -> tuple[str, str]:
    """A relevance CSV built like an attacker's (or a careless export's): the good rows must
    come out byte-for-byte, the bad ones quarantined with a reason, nothing lost."""
    folder = ctx.work / "hostile_data"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    header = ("id", "product_uid", "product_title", "search_term", "relevance")
    rng = random.Random(3)
    rows = list(HOSTILE_ROWS)
    for i in range(200):  # ordinary rows around the hostile ones
        uid = str(100010 + i % 40)
        rows.append((str(1000 + i), uid, f"Product {uid}", f"query {rng.randint(0, 60)}", "2.33"))
    source = folder / "hostile.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    out = folder / "report"
    result = cli(ctx, "data", "validate", str(source), "--out", str(out))
    clean_path, quarantine_path = out / "clean.csv", out / "quarantine.csv"
    if not clean_path.is_file() or not quarantine_path.is_file():
        ctx.tries.append({"rows_changed_without_reason": len(rows)})
        return "failed", f"no report (exit {result.returncode}): {result.stderr[-300:]}"
    changed, lost = compare_clean(rows, header, clean_path, quarantine_path)
    ctx.tries.append({"rows_changed_without_reason": changed + lost})
    docs = (out / "docs").rglob("*.html")
    live_tags = [p.name for p in docs if "<script>alert(1)" in p.read_text(errors="replace")]
    utf16 = folder / "utf16.csv"
    utf16.write_text(source.read_text(encoding="utf-8"), encoding="utf-16")
    utf16_result = cli(ctx, "data", "validate", str(utf16), "--out", str(folder / "report16"))
    said_utf16 = utf16_result.returncode == 2 and "UTF-16" in utf16_result.stderr
    problems = []
    if changed or lost:
        problems.append(f"{changed} clean rows differ from the file, {lost} rows lost")
    if live_tags:
        problems.append(f"live <script> in Data Docs {live_tags}")
    if not said_utf16:
        problems.append(
            f"UTF-16 file: exit {utf16_result.returncode}: {utf16_result.stderr[-200:]}"
        )
    if problems:
        return "failed", "; ".join(problems)
    return "contained", (
        f"{len(rows)} rows in; every clean row exactly as the file says, the hostile ones "
        "quarantined with reasons; Data Docs escaped; a UTF-16 file named as such (exit 2)"
    )


def compare_clean(
    rows: list[tuple[str, ...]], header: tuple[str, ...], clean: Path, quarantine: Path
) -> tuple[int, int]:
    """(clean rows that are not exactly a row of the file, rows neither clean nor quarantined).

    Ids and texts must be the same strings; relevance the same number."""
    import pandas as pd

    raw = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    clean_frame = pd.read_csv(clean, dtype=str, keep_default_na=False)
    quarantined = len(pd.read_csv(quarantine, dtype=str, keep_default_na=False))
    changed = 0
    for record in clean_frame.to_dict("records"):
        source = raw.get(record["id"])
        same = source is not None and all(
            record[column] == source[column] for column in header if column != "relevance"
        )
        try:
            same = same and float(record["relevance"]) == float(source["relevance"])
        except (TypeError, ValueError):
            same = False
        changed += 0 if same else 1
    lost = max(0, len(rows) - len(clean_frame) - quarantined)
    return changed, lost


ATTACKS: list[tuple[str, Callable[[Context], tuple[str, str]]]] = [
    ("oversized_query_grpc_72mb", oversized_query_grpc),
    ("oversized_batches_grpc_8x1mb", oversized_batches_grpc),
    ("oversized_query_http_70mb", oversized_query_http),
    ("shape_bomb_http", shape_bomb_http),
    ("shape_bomb_grpc", shape_bomb_grpc),
    ("unauthenticated_operator_apis", unauthenticated_operator_apis),
    ("admin_key_from_proc_cmdline", admin_key_from_proc),
    ("anonymous_mlflow_and_airflow", anonymous_mlflow_and_airflow),
    ("malformed_requests", malformed_requests),
    ("path_traversal_and_bad_versions", traversal_and_bad_versions),
    ("hostile_data_file", hostile_data_file),
]


@contextlib.contextmanager
def stack_serving_minilm(args: argparse.Namespace) -> Iterator[tuple[Any, list[str]]]:
    """The stack on a fresh state folder, serving the cached MiniLM export as v1."""
    from benchmarks.time_to_rollback_airflow import build_artifacts
    from tests.stack_testing import benchmark_stack_environment, export_environment

    shutil.rmtree(args.work / "home", ignore_errors=True)
    shutil.rmtree(args.work / "repo", ignore_errors=True)
    # The stack's own generated Triton key too: the attacks look for it in /proc.
    export_environment(benchmark_stack_environment(args.work, RECSYS_TRITON_ADMIN_KEY=None))
    from recsys import registry, stack
    from recsys.config import load_settings
    from recsys.deploy import register_model

    good, _, held_out, products = build_artifacts(args.cache, args.data, 100)
    settings = load_settings()
    say(f"stack up (state in {settings.home}); MiniLM over {products:,} products")
    stack.up(settings, timeout_s=300, echo=lambda line: say(line.strip()))
    try:
        registry.ensure_credentials()
        run_id = registry.start_training_run(
            settings.mlflow_tracking_uri, "abuse", "minilm", {}, {}
        )
        version = register_model(settings, run_id, str(good), {})["version"]
        deployed = subprocess.run(
            [sys.executable, "-m", "recsys.cli", "deploy", "--version", str(version),
             "--smoke-query", SMOKE_QUERY],
            env=dict(os.environ), capture_output=True, text=True, timeout=900, cwd=ROOT,
        )  # fmt: skip
        if deployed.returncode != 0:
            raise RuntimeError(f"recsys deploy failed: {deployed.stderr[-2000:]}")
        say(deployed.stdout.strip().splitlines()[0])
        yield settings, held_out
    finally:
        if not args.keep_stack:
            stack.down(settings, echo=lambda line: say(line.strip()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rps", type=float, default=20.0, help="normal requests per second")
    parser.add_argument("--quiet-s", type=float, default=30.0)
    parser.add_argument("--attack-s", type=float, default=8.0)
    parser.add_argument(
        "--attack-interval-s",
        type=float,
        default=1.0,
        help="one try (e.g. a handful of shape bombs at once) per interval; flooding with "
        "cheap requests is rate limiting's job (a proxy's), not measured here",
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
    )
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench_work" / "ttr_airflow")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench_work" / "abuse")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-stack", action="store_true")
    parser.add_argument("--traffic-log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--grpc-url", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.traffic_log:
        run_normal_traffic(args.grpc_url, args.model, args.queries, args.rps, args.traffic_log)
        return 0

    from tests.triton_testing import PeakMemory

    with stack_serving_minilm(args) as (settings, held_out):
        from recsys.credentials import triton_admin_key
        from recsys.stack import stack_dir

        ctx = Context(
            settings=settings,
            env=dict(os.environ),
            work=args.work,
            admin_key=str(triton_admin_key(settings)),
            model=settings.model_name,
        )
        pid_record = stack_dir(settings) / "pids" / "triton.json"
        triton_pid = int(json.loads(pid_record.read_text())["pid"])
        traffic = NormalTraffic(args.work, settings.triton_grpc_url, ctx.model, held_out, args.rps)
        # The attacker (this process) runs at nice 19 from here on, its children included: on
        # this 2-core host its own CPU (encoding 70 MB bodies, starting interpreters) would
        # otherwise compete with the server it attacks, which an attacker on another machine
        # does not. The stack and the normal clients were started before, at normal priority.
        os.nice(19)
        wait_for_traffic = time.time() + 60
        while not traffic.window(0, time.time())[0] and time.time() < wait_for_traffic:
            time.sleep(0.5)
        with PeakMemory(triton_pid) as quiet_memory:
            quiet_start = time.time()
            time.sleep(args.quiet_s)  # the quiet reference window itself
            quiet_end = time.time()
        quiet_latencies, quiet_failures = traffic.window(quiet_start, quiet_end)
        quiet_p99 = percentile(quiet_latencies, 99)
        say(f"quiet: p99 {quiet_p99} ms over {len(quiet_latencies)} requests")
        attacks = []
        for name, attack in ATTACKS:
            start = time.time()
            outcomes: list[tuple[str, str]] = []
            with PeakMemory(triton_pid) as memory:
                while not outcomes or time.time() - start < args.attack_s:
                    tick = time.monotonic()
                    try:
                        outcomes.append(attack(ctx))
                    except Exception as exc:
                        outcomes.append(("failed", f"{type(exc).__name__}: {exc}"[:300]))
                    if name in ("path_traversal_and_bad_versions", "hostile_data_file"):
                        break  # one pass: each try spawns interpreters
                    time.sleep(max(0.0, args.attack_interval_s - (time.monotonic() - tick)))
            end = time.time()
            latencies, failures = traffic.window(start, end)
            p99 = percentile(latencies, 99)
            worst = next((o for o in outcomes if o[0] == "failed"), None)
            outcome, evidence = worst or outcomes[0]
            entry = {
                "name": name,
                "outcome": outcome,
                "evidence": evidence,
                "tries": len(outcomes),
                "seconds": round(end - start, 1),
                "server_memory_peak_mb": round(memory.peak_mb, 1),
                "normal_p99_ms": p99,
                "normal_p99_ratio": round(p99 / quiet_p99, 2) if p99 and quiet_p99 else None,
                "normal_requests": len(latencies),
                "normal_failed_requests": failures,
            }
            attacks.append(entry)
            say(
                f"{name}: {outcome}, memory peak {entry['server_memory_peak_mb']} MB, "
                f"normal p99 x{entry['normal_p99_ratio']} ({failures} failed): {evidence[:100]}"
            )
        traffic.stop()

    changed = sum(t.get("rows_changed_without_reason", 0) for t in ctx.tries)
    ratios = [a["normal_p99_ratio"] for a in attacks if a["normal_p99_ratio"] is not None]
    result = {
        "benchmark": "abuse",
        "command": "python benchmarks/abuse.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "served": "all-MiniLM-L6-v2 over the full Home Depot catalogue, deployed by recsys deploy",
        "normal_traffic_rps": args.rps,
        "attack_seconds": args.attack_s,
        "attack_interval_s": args.attack_interval_s,
        "triton_instances": settings.triton_instances,
        "quiet": {
            "p99_ms": quiet_p99,
            "requests": len(quiet_latencies),
            "failed_requests": quiet_failures,
            "server_memory_peak_mb": round(quiet_memory.peak_mb, 1),
        },
        "attacks": attacks,
        "rows_changed_without_reason": changed,
        "targets": {
            "every_attack_refused_or_contained": all(
                a["outcome"] in ("refused", "contained") for a in attacks
            ),
            "max_normal_p99_ratio": max(ratios) if ratios else None,
            "normal_p99_within_2x": bool(ratios) and max(ratios) <= 2.0,
            "normal_failed_requests": sum(a["normal_failed_requests"] for a in attacks),
            "no_row_changed_without_reason": changed == 0,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.out}: {json.dumps(result['targets'])}")
    targets = result["targets"]
    met = (
        targets["every_attack_refused_or_contained"]
        and targets["normal_p99_within_2x"]
        and targets["no_row_changed_without_reason"]
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
