"""Benchmark: serving throughput and p50/p99 latency over gRPC, Triton fp32 vs INT8 vs a
minimal FastAPI + torch endpoint serving the same model (issue #3).

One checkpoint (``--model-dir``; default the packaged all-MiniLM-L6-v2) is exported once with
the platform's own exporter (``build_serving_artifacts``: ONNX encoder + the catalogue's
embeddings), copied and quantised to INT8 (``quantize_encoder`` + ``set_served_encoder``), and
both are published into a temporary Triton repository as two models. A real tritonserver (the
``nvidia-pytriton`` binary, no response cache so every request runs the model) serves them one
at a time; then ``torch_http_baseline.py`` serves the same checkpoint with PyTorch behind
FastAPI/uvicorn. The catalogue is the unique products of ``--data`` (Home Depot train.csv),
the queries its unique search terms in a fixed shuffled order, the same sequence for every
system.

Load: closed loop, ``c`` client threads (one gRPC client / one HTTP session each) sending
back-to-back requests, for ``c`` in ``--concurrency``; each level warms up first, then measures
``--requests`` requests or ``--duration-s`` seconds, whichever ends first. Per system and level:
throughput (successful requests per second of wall time), p50/p99 latency, errors; then the
ratios Triton / torch (throughput: >1 is better; latency: <1 is better) and INT8 / fp32.

Like-for-like threads by default: each model execution gets ``--intra-op-threads`` threads
(ONNX Runtime in Triton, ``torch.set_num_threads`` per request in the baseline, default 1), and
Triton runs ``--instance-count`` instances (default: the number of CPUs), so both can run as many
executions in parallel as there are cores; Triton also batches (dynamic batching up to
``--max-batch-size``). The load generator runs on the same machine and takes CPU too.

Everything binds to 127.0.0.1; every server is stopped (and Triton's shared memory removed) on
the way out.

    python benchmarks/serving_throughput.py --data ../shared/data/homedepot/train.csv
    python benchmarks/serving_throughput.py --requests 40 --concurrency 1 8 \\
        --max-products 2000 --out /tmp/serving_quick.json     # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "serving_throughput.json"
BASELINE_SCRIPT = Path(__file__).resolve().parent / "torch_http_baseline.py"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "homedepot" / "train.csv"
HOST = "127.0.0.1"
FP32, INT8, TORCH = "triton_fp32", "triton_int8", "torch_fastapi"
MODELS = {FP32: "bench_fp32", INT8: "bench_int8"}
REQUEST_TIMEOUT_S = 30.0
AGREEMENT_QUERIES = 50
RATIO_KEYS = ("throughput", "p50", "p99")

Caller = Callable[[str], list[str]]
"""One client's search call: query -> top-K product ids (raises on any error)."""


@dataclass
class LevelResult:
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        import numpy as np

        lat = np.array(self.latencies_s) * 1000.0
        ok = len(lat)
        return {
            "concurrency": self.concurrency,
            "requests": ok + self.errors,
            "ok": ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(ok / self.wall_s, 2) if self.wall_s > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if ok else None,
            "p90_ms": round(float(np.percentile(lat, 90)), 2) if ok else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if ok else None,
            "mean_ms": round(float(lat.mean()), 2) if ok else None,
            "max_ms": round(float(lat.max()), 2) if ok else None,
        }


def closed_loop(
    callers: list[Caller], queries: list[str], offset: int, total: int, duration_s: float
) -> LevelResult:
    """``len(callers)`` threads send back-to-back requests until ``total`` were sent or
    ``duration_s`` passed; every request's latency (or error) is recorded."""
    concurrency = len(callers)
    result = LevelResult(concurrency)
    counter = itertools.count()
    lock = threading.Lock()
    clock: dict[str, float] = {}

    def start_clock() -> None:  # runs once, when every thread is at the barrier
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + duration_s

    barrier = threading.Barrier(concurrency, action=start_clock)

    def worker(call: Caller) -> None:
        latencies: list[float] = []
        errors = 0
        first_error = None
        barrier.wait()
        deadline = clock["deadline"]
        while True:
            i = next(counter)  # atomic under the GIL
            if i >= total or time.perf_counter() >= deadline:
                break
            query = queries[(offset + i) % len(queries)]
            started = time.perf_counter()
            try:
                call(query)
            except Exception as exc:  # a benchmark counts failures, it does not stop on them
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
            else:
                latencies.append(time.perf_counter() - started)
        with lock:
            result.latencies_s.extend(latencies)
            result.errors += errors
            result.first_error = result.first_error or first_error

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + REQUEST_TIMEOUT_S + 30)
    result.wall_s = time.perf_counter() - clock.get("start", time.perf_counter())
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("load generator threads did not finish; a request hangs")
    return result


def run_levels(
    system: str,
    make_caller: Callable[[], tuple[Caller, Callable[[], None]]],
    queries: list[str],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """Warm up and measure every concurrency level of one system; one caller per thread."""
    levels: dict[str, dict[str, Any]] = {}
    for level, concurrency in enumerate(args.concurrency):
        pairs = [make_caller() for _ in range(concurrency)]
        try:
            callers = [call for call, _ in pairs]
            # Queries of a level are the same for every system; warm-up uses others.
            offset = level * (args.requests + args.warmup)
            warm = max(args.warmup, 2 * concurrency)
            closed_loop(callers, queries, offset + args.requests, warm, args.duration_s)
            measured = closed_loop(callers, queries, offset, args.requests, args.duration_s)
        finally:
            for _, close in pairs:
                with contextlib.suppress(Exception):
                    close()
        levels[str(concurrency)] = summary = measured.summary()
        print(
            f"  {system:14s} c={concurrency:<3d} {summary['throughput_rps']} req/s, "
            f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
            f"errors {summary['errors']}/{summary['requests']}",
            flush=True,
        )
    return levels


# -- Triton ---------------------------------------------------------------------------------


def triton_caller(url: str, model: str, top_k: int) -> tuple[Caller, Callable[[], None]]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    top_k_input = grpcclient.InferInput("TOP_K", [1, 1], "INT32")
    top_k_input.set_data_from_numpy(np.array([[top_k]], dtype=np.int32))
    outputs = [
        grpcclient.InferRequestedOutput("PRODUCT_IDS"),
        grpcclient.InferRequestedOutput("SCORES"),
    ]

    def call(query: str) -> list[str]:
        query_input = grpcclient.InferInput("QUERY", [1, 1], "BYTES")
        query_input.set_data_from_numpy(np.array([[query.encode("utf-8")]], dtype=np.object_))
        result = client.infer(
            model, [query_input, top_k_input], outputs=outputs, client_timeout=REQUEST_TIMEOUT_S
        )
        ids = result.as_numpy("PRODUCT_IDS")
        if ids is None or ids.size != top_k:
            raise RuntimeError(f"expected {top_k} ids, got {None if ids is None else ids.size}")
        return [i.decode("utf-8") for i in ids.reshape(-1)]

    return call, client.close


def run_triton(
    work: Path, artifacts: dict[str, Path], queries: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, list[list[str]]], str]:
    """Serve fp32 and INT8 one after the other on one tritonserver and measure both; also
    return each one's answers to the agreement queries and the server's version."""
    from recsys.triton.control import TritonControl
    from recsys.triton.repository import publish_version, version_serving_config
    from recsys.triton.server import TritonServer
    from tests.triton_testing import free_port

    admin_key = secrets.token_urlsafe(32)
    repo = work / "triton_repo"
    server = TritonServer(
        repo,
        host=HOST,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=work / "triton",
        admin_key=admin_key,
        response_cache_bytes=0,  # every request must run the model
    )
    knobs = {
        "instance_count": args.instance_count,
        "intra_op_threads": args.intra_op_threads,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "dynamic_batching": args.max_batch_size > 1,
        "response_cache": False,
    }
    results: dict[str, Any] = {}
    answers: dict[str, list[list[str]]] = {}
    try:
        server.start(timeout_s=120)
        with TritonControl(
            server.grpc_url, timeout_s=120, load_timeout_s=300, admin_key=admin_key
        ) as control:
            version = str(control.client.get_server_metadata().version)
            for system in (FP32, INT8):
                model = MODELS[system]
                publish_version(repo, model, 1, artifacts[system], serving=knobs)
                started = time.perf_counter()
                control.load_version(model, 1, repo, config=version_serving_config(repo, model, 1))
                print(f"{system}: loaded in {time.perf_counter() - started:.1f}s", flush=True)
                call, close = triton_caller(server.grpc_url, model, args.top_k)
                try:
                    answers[system] = [call(q) for q in queries[-AGREEMENT_QUERIES:]]
                finally:
                    close()
                results[system] = run_levels(
                    system,
                    lambda model=model: triton_caller(server.grpc_url, model, args.top_k),
                    queries,
                    args,
                )
                control.unload(model)
    finally:
        server.stop()  # also removes its shared-memory regions
    return results, answers, version


# -- torch baseline -------------------------------------------------------------------------


def http_caller(url: str, top_k: int) -> tuple[Caller, Callable[[], None]]:
    import requests

    session = requests.Session()

    def call(query: str) -> list[str]:
        response = session.post(
            url, json={"query": query, "top_k": top_k}, timeout=REQUEST_TIMEOUT_S
        )
        response.raise_for_status()
        ids = response.json()["ids"]
        if len(ids) != top_k:
            raise RuntimeError(f"expected {top_k} ids, got {len(ids)}")
        return ids

    return call, session.close


@contextlib.contextmanager
def torch_baseline(
    model_dir: Path, products_npz: Path, log_path: Path, args: argparse.Namespace
) -> Iterator[str]:
    """Run ``torch_http_baseline.py`` on a free loopback port; yield its /search URL and stop
    it (its whole process group) on the way out."""
    import requests

    from tests.triton_testing import free_port

    port = free_port()
    command = [
        sys.executable, str(BASELINE_SCRIPT),
        "--model-dir", str(model_dir),
        "--products-npz", str(products_npz),
        "--max-query-tokens", str(args.max_query_tokens),
        "--torch-threads", str(args.torch_threads),
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"torch baseline exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"torch baseline not healthy after 300s; log {log_path}")
            time.sleep(0.5)
        yield f"{base}/search"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=10)


# -- report ---------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, Any]:
    return {
        level: {
            "throughput": ratio(row["throughput_rps"], denominator[level]["throughput_rps"]),
            "p50": ratio(row["p50_ms"], denominator[level]["p50_ms"]),
            "p99": ratio(row["p99_ms"], denominator[level]["p99_ms"]),
        }
        for level, row in numerator.items()
        if level in denominator
    }


def agreement(a: list[list[str]], b: list[list[str]]) -> dict[str, float]:
    """Top-1 match rate and mean top-K overlap of two systems' answers to the same queries."""
    pairs = list(zip(a, b, strict=True))
    return {
        "queries": len(pairs),
        "top1_match": round(sum(x[0] == y[0] for x, y in pairs) / len(pairs), 3),
        "topk_overlap": round(sum(len(set(x) & set(y)) / len(x) for x, y in pairs) / len(pairs), 3),
    }


def markdown(record: dict[str, Any]) -> str:
    results, vs_torch = record["results"], record["ratios"]
    lines = [
        "| system | concurrency | req/s | p50 ms | p99 ms | errors | req/s vs torch | "
        "p50 vs torch | p99 vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in (FP32, INT8, TORCH):
        for level, row in results.get(system, {}).items():
            r = vs_torch.get(f"{system}_vs_torch", {}).get(level, {})
            versus = [f"{r[k]}x" if r.get(k) is not None else "-" for k in RATIO_KEYS]
            cells = [
                system, level, row["throughput_rps"], row["p50_ms"], row["p99_ms"],
                f"{row['errors']}/{row['requests']}", *versus,
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    int8 = vs_torch.get("int8_vs_fp32", {})
    if int8:
        lines += ["", "| concurrency | INT8/fp32 req/s | INT8/fp32 p50 | INT8/fp32 p99 |"]
        lines.append("|---:|---:|---:|---:|")
        for level, r in int8.items():
            lines.append(f"| {level} | {r['throughput']}x | {r['p50']}x | {r['p99']}x |")
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{
            name: version(name)
            for name in (
                "torch", "onnxruntime", "numpy", "transformers", "tokenizers", "tritonclient",
                "nvidia-pytriton", "fastapi", "uvicorn", "requests",
            )
        },
    }  # fmt: skip


# -- main -----------------------------------------------------------------------------------


def artifacts_key(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What the artifacts depend on: the checkpoint's files, the data file, the catalogue cap."""
    data = args.data.resolve()
    return {
        "model_dir": str(model_dir.resolve()),
        "model_files": sorted(
            [p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in model_dir.resolve().iterdir()
            if p.is_file()
        ),
        "data": [str(data), data.stat().st_size, data.stat().st_mtime_ns],
        "max_products": args.max_products,
        "max_query_tokens": args.max_query_tokens,
    }


def cached_artifacts(
    model_dir: Path, catalog: Any, work: Path, args: argparse.Namespace
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The fp32 and INT8 artifacts: from ``--artifacts-dir`` when it holds them for the same
    checkpoint, data and cap (exporting the full catalogue takes minutes), else built (into
    ``--artifacts-dir`` when given, for the next run)."""
    key = artifacts_key(model_dir, args)
    if args.artifacts_dir is None:
        return build_artifacts(model_dir, catalog, work / "artifacts", args.max_query_tokens)
    target = args.artifacts_dir.resolve()
    stamp = target / "stamp.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(stamp.read_text())
        if recorded["key"] == json.loads(json.dumps(key)):
            print(f"reusing serving artifacts in {target}", flush=True)
            return {FP32: target / "fp32", INT8: target / "int8"}, recorded["info"]
    shutil.rmtree(target, ignore_errors=True)
    artifacts, info = build_artifacts(model_dir, catalog, target, args.max_query_tokens)
    stamp.write_text(json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return artifacts, info


def build_artifacts(
    model_dir: Path, catalog: Any, work: Path, max_query_tokens: int
) -> tuple[dict[str, Path], dict[str, Any]]:
    """fp32 serving artifacts with the platform's exporter, and an INT8 copy of them."""
    from recsys.families.search.export import build_serving_artifacts
    from recsys.families.search.quantization import (
        INT8_ONNX_FILE,
        embedding_agreement,
        quantize_encoder,
        set_served_encoder,
    )

    started = time.perf_counter()
    fp32 = build_serving_artifacts(
        model_dir,
        catalog,
        work / "fp32",
        model_name=MODELS[FP32],
        max_query_tokens=max_query_tokens,
    )
    exported = time.perf_counter()
    int8 = work / "int8"
    shutil.copytree(fp32, int8)
    quantize_encoder(int8 / "encoder.onnx", int8 / INT8_ONNX_FILE)
    probes = catalog["product_title"].astype(str).head(64).tolist()
    cosines = embedding_agreement(
        int8 / "encoder.onnx", int8 / INT8_ONNX_FILE, int8 / "tokenizer.json", probes
    )
    set_served_encoder(int8, "int8", {"source": "serving_throughput benchmark", **cosines})
    info = {
        "export_s": round(exported - started, 1),
        "quantize_s": round(time.perf_counter() - exported, 1),
        "fp32_onnx_bytes": (fp32 / "encoder.onnx").stat().st_size,
        "int8_onnx_bytes": (int8 / INT8_ONNX_FILE).stat().st_size,
        "int8_vs_fp32_cosine": {k: round(v, 5) for k, v in cosines.items()},
    }
    return {FP32: fp32, INT8: int8}, info


def parse_args() -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="minilm", help="checkpoint folder or 'minilm'")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="relevance CSV")
    parser.add_argument("--max-products", type=int, default=0, help="cap the catalogue (0: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per level")
    parser.add_argument(
        "--duration-s", type=float, default=30.0, help="cap per level (warm-up and measurement)"
    )
    parser.add_argument(
        "--warmup", type=int, default=50, help="warm-up requests per level (at least 2 x c)"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-query-tokens", type=int, default=64)
    parser.add_argument("--instance-count", type=int, default=cpus, help="Triton instances")
    parser.add_argument(
        "--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per instance"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="baseline (default: --intra-op-threads)"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="1 disables batching")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        help="keep the exported fp32/INT8 artifacts here and reuse them on the next run",
    )
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.torch_threads = args.torch_threads or args.intra_op_threads
    if min(args.concurrency) < 1 or args.requests < 1 or args.duration_s <= 0:
        parser.error("--concurrency, --requests and --duration-s must be positive")
    return args


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.encoder import resolve_base_model

    started = time.perf_counter()
    machine = machine_info()
    model_dir = resolve_base_model(args.model_dir)
    frame = read_relevance_csv(args.data)
    catalog = product_catalog(frame)
    if args.max_products:
        catalog = catalog.head(args.max_products)
    queries = list(dict.fromkeys(frame["search_term"].dropna().astype(str).str.strip()))
    queries = [q for q in queries if q]
    random.Random(0).shuffle(queries)
    print(
        f"{len(catalog)} products, {len(queries)} distinct queries, model {model_dir}, "
        f"concurrency {args.concurrency}, {args.requests} requests or {args.duration_s:g}s "
        "per level",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    try:
        artifacts, export_info = cached_artifacts(model_dir, catalog, work, args)
        print(f"artifacts: {export_info}", flush=True)
        results, answers, triton_version = run_triton(work, artifacts, queries, args)
        if not args.skip_baseline:
            log_path = work / "torch_baseline.log"
            with torch_baseline(model_dir, artifacts[FP32] / "products.npz", log_path, args) as url:
                call, close = http_caller(url, args.top_k)
                try:
                    answers[TORCH] = [call(q) for q in queries[-AGREEMENT_QUERIES:]]
                finally:
                    close()
                results[TORCH] = run_levels(
                    TORCH, lambda: http_caller(url, args.top_k), queries, args
                )
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    comparisons: dict[str, Any] = {"int8_vs_fp32": ratios(results[INT8], results[FP32])}
    agreements = {"int8_vs_fp32": agreement(answers[INT8], answers[FP32])}
    if TORCH in results:
        for system in (FP32, INT8):
            comparisons[f"{system}_vs_torch"] = ratios(results[system], results[TORCH])
            agreements[f"{system}_vs_torch"] = agreement(answers[system], answers[TORCH])
    record = {
        "benchmark": "serving_throughput",
        "command": shlex.join(["python", *sys.argv]),
        "wall_s": round(time.perf_counter() - started, 1),
        "model": {
            "model_dir": str(model_dir),
            "label": "all-MiniLM-L6-v2 (packaged)"
            if args.model_dir == "minilm"
            else args.model_dir,
            "products": len(catalog),
            "queries": len(queries),
            "max_query_tokens": args.max_query_tokens,
            **export_info,
        },
        "load": {
            "protocol": {"triton": "gRPC (tritonclient.grpc)", "torch": "HTTP/1.1 JSON (requests)"},
            "pattern": "closed loop, one client per thread, back-to-back requests",
            "concurrency": args.concurrency,
            "requests_per_level": args.requests,
            "duration_cap_s": args.duration_s,
            "warmup_per_level": args.warmup,
            "top_k": args.top_k,
        },
        "triton": {
            "server_version": triton_version,
            "instance_count": args.instance_count,
            "intra_op_threads": args.intra_op_threads,
            "max_batch_size": args.max_batch_size,
            "dynamic_batching": args.max_batch_size > 1,
            "max_queue_delay_us": args.max_queue_delay_us,
            "response_cache": False,
        },
        "torch_baseline": {
            "server": "FastAPI + uvicorn, 1 worker, sync handler (thread pool), no batching",
            "torch_threads_per_request": args.torch_threads,
        },
        "machine": machine,
        "results": results,
        "ratios": comparisons,
        "agreement": agreements,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print()
    print(markdown(record))
    print(f"\nagreement: {agreements}")
    print(f"wall {record['wall_s']}s -> {args.out}")
    errors = sum(row["errors"] for levels in results.values() for row in levels.values())
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
