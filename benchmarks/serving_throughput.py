"""Benchmark: serving throughput and p50/p99 latency, Triton fp32 vs INT8 over gRPC vs the same
model behind FastAPI, configured as a user would (torch with a worker per core, and ONNX
Runtime INT8), over HTTP (issues #3, #13).

One checkpoint (``--model-dir``; default the packaged all-MiniLM-L6-v2) is exported once with
the platform's own exporter (``build_serving_artifacts``: ONNX encoder + the catalogue's
embeddings), copied and quantised to INT8 (``quantize_encoder`` + ``set_served_encoder``).

Triton serves what a platform deploy serves: each folder is registered in a throwaway MLflow
server and published, loaded and smoke-tested by ``recsys.deploy.deploy_model`` (the pipeline's
and ``recsys deploy``'s path) as its own model, with the platform's serving knobs
(``Settings.serving_knobs``: the defaults of ``recsys.triton.repository.default_serving`` and
any ``RECSYS_TRITON_*`` override) unless ``--instance-count``, ``--max-batch-size``,
``--[no-]dynamic-batching``, ``--max-queue-delay-us`` or ``--intra-op-threads`` override them.
The knobs used, the deploy's audit record and the config Triton reports having loaded are all
recorded. One tritonserver (``nvidia-pytriton``'s binary, no response cache so every request
runs the model) serves the two models one at a time; it and MLflow are stopped before the
baselines run.

Baselines (``torch_http_baseline.py``, FastAPI + uvicorn, ``--baseline-workers`` worker
processes, default one per CPU, each running one forward pass at a time with
``--baseline-threads`` threads, default 1: no oversubscription, no batching):
``torch_fastapi`` is the same checkpoint in eager PyTorch; ``onnx_int8_fastapi`` is the stronger
alternative a user would pick, ONNX Runtime on the very INT8 folder Triton serves (same encoder
file, same ``tokenizer.json`` through the same fast tokenizer, same catalogue). ``--baselines``
picks them. The catalogue is the unique products of ``--data`` (Home Depot train.csv), the
queries its unique search terms in a fixed shuffled order, the same sequence for every system.

Load: closed loop, ``c`` client threads (one gRPC client / one HTTP session each) sending
back-to-back requests, for ``c`` in ``--concurrency``; each level warms up first, then measures
``--requests`` requests or ``--duration-s`` seconds, whichever ends first. Per system and level:
throughput (successful requests per second of wall time), p50/p99 latency, errors; then the
ratios of each Triton system to each baseline (throughput: >1 is better; latency: <1 is
better) and INT8 / fp32. The load generator runs on the same machine and takes CPU too.

Everything binds to 127.0.0.1; every server is stopped (and Triton's shared memory removed) on
the way out.

    python benchmarks/serving_throughput.py --data ../shared/data/homedepot/train.csv
    python benchmarks/serving_throughput.py --requests 40 --concurrency 1 8 \\
        --max-products 2000 --duration-s 10 --out /tmp/serving_quick.json     # a quick check
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
FP32, INT8 = "triton_fp32", "triton_int8"
TORCH, ONNX = "torch_fastapi", "onnx_int8_fastapi"
TRITON_SYSTEMS, BASELINES = (FP32, INT8), (TORCH, ONNX)
MODELS = {FP32: "bench_fp32", INT8: "bench_int8"}
VERSUS = {TORCH: "torch", ONNX: "onnx_int8"}
"""A baseline's name in the ``ratios`` / ``agreement`` keys (``triton_int8_vs_onnx_int8``)."""
LABELS = {
    FP32: "Triton, ONNX fp32",
    INT8: "Triton, ONNX INT8",
    TORCH: "FastAPI + torch (fp32)",
    ONNX: "FastAPI + ONNX Runtime INT8",
}
KNOB_FLAGS = {
    "instance_count": "instance_count",
    "max_batch_size": "max_batch_size",
    "dynamic_batching": "dynamic_batching",
    "max_queue_delay_us": "max_queue_delay_us",
    "intra_op_threads": "intra_op_threads",
}
"""argparse dest -> serving knob of the flags that override the platform's serving knobs."""
REQUEST_TIMEOUT_S = 30.0
AGREEMENT_QUERIES = 50

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


def requested_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The serving knobs the command line sets (the rest are the platform's)."""
    return {
        knob: getattr(args, dest)
        for dest, knob in KNOB_FLAGS.items()
        if getattr(args, dest, None) is not None
    }


def serving_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """Every knob Triton serves the benchmarked models with: what a platform deploy would use
    (``Settings.serving_knobs``) with the command line's overrides."""
    from recsys.config import load_settings

    return load_settings().serving_knobs(requested_knobs(args))


def platform_env(work: Path) -> None:
    """Point the platform (settings, secrets, state) at ``work``, as a fresh stack."""
    os.environ.update(
        {
            "RECSYS_HOME": str(work / "home"),
            "RECSYS_TRITON_ADMIN_KEY": secrets.token_urlsafe(32),
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
            "RECSYS_MODEL_NAME": MODELS[FP32],
        }
    )
    for variable in ("RECSYS_ALERT_WEBHOOK", "RECSYS_MONITOR_CONFIG", "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)


def run_triton(
    work: Path, artifacts: dict[str, Path], queries: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, list[list[str]]], dict[str, Any]]:
    """Deploy fp32 and INT8 through the platform's deploy path and measure them one after the
    other on one tritonserver; also return each one's answers to the agreement queries and
    what was served (server version, knobs, deploy audit records, loaded configs)."""
    import dataclasses

    from recsys import registry
    from recsys.audit import read_records
    from recsys.config import load_settings
    from recsys.deploy import deploy_model, register_model
    from recsys.stack import running_mlflow_server
    from recsys.triton.control import TritonControl
    from tests.triton_testing import free_port, running_triton

    requested = requested_knobs(args)
    results: dict[str, Any] = {}
    answers: dict[str, list[list[str]]] = {}
    served: dict[str, Any] = {"published_via": "recsys.deploy.deploy_model", "models": {}}
    with (
        running_mlflow_server(work / "mlflow", free_port()) as mlflow_uri,
        running_triton(work / "triton", response_cache_bytes=0) as triton,  # every request runs
    ):
        server = triton.server
        os.environ.update(triton.platform_environment(mlflow_uri))
        base = load_settings()
        served["knobs"] = base.serving_knobs(requested)
        served["knobs_from_flags"] = requested
        control = TritonControl(base.triton_grpc_url, timeout_s=120, load_timeout_s=300)
        served["server_version"] = str(control.client.get_server_metadata().version)
        for system in artifacts:
            model = MODELS.get(system, f"bench_{system}")
            settings = dataclasses.replace(base, model_name=model)
            run_id = registry.start_training_run(
                mlflow_uri, "serving-throughput", system, {}, {"benchmark": "serving_throughput"}
            )
            version = register_model(settings, run_id, str(artifacts[system]), {})["version"]
            started = time.perf_counter()
            deployed = deploy_model(
                settings,
                version,
                str(artifacts[system]),
                {"query": queries[0], "top_k": args.top_k},
                requested or None,
                reason="serving_throughput benchmark",
            )
            took = time.perf_counter() - started
            loaded = control.model_config(model)
            record = read_records(settings.audit_log, model)[-1]
            served["models"][system] = {
                "model": model,
                "version": version,
                "deploy_s": round(took, 1),
                "audit_serving": record.get("serving"),
                "loaded_config": {
                    "instance_group": loaded.get("instance_group"),
                    "max_batch_size": loaded.get("max_batch_size"),
                    "dynamic_batching": loaded.get("dynamic_batching"),
                    "parameters": {
                        k: v
                        for k, v in (loaded.get("parameters") or {}).items()
                        if k == "intra_op_threads"
                    },
                },
            }
            if deployed["serving"] != served["knobs"]:
                raise RuntimeError(f"{model} serves {deployed['serving']}, not {served['knobs']}")
            print(
                f"{system}: deployed v{version} through recsys.deploy.deploy_model in "
                f"{took:.1f}s with {deployed['serving']}",
                flush=True,
            )
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
        control.close()
    return results, answers, served


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


def baseline_command(
    system: str, model_dir: Path, artifacts: dict[str, Path], args: argparse.Namespace
) -> list[str]:
    """``torch_http_baseline.py``'s arguments for ``system``, without host, port, ready dir."""
    common = [
        "--workers", str(args.baseline_workers),
        "--threads", str(args.baseline_threads),
        "--max-inflight", str(args.baseline_inflight),
    ]  # fmt: skip
    if system == TORCH:
        return [
            "--backend", "torch", "--model-dir", str(model_dir),
            "--products-npz", str(artifacts[FP32] / "products.npz"),
            "--max-query-tokens", str(args.max_query_tokens), *common,
        ]  # fmt: skip
    return ["--backend", "onnx", "--artifacts-dir", str(artifacts[INT8]), *common]


@contextlib.contextmanager
def fastapi_baseline(command: list[str], work: Path, workers: int) -> Iterator[str]:
    """Run ``torch_http_baseline.py`` with ``command`` on a free loopback port; yield its
    /search URL once every worker has loaded its model, and stop it (its whole process group)
    on the way out."""
    import requests

    from tests.triton_testing import free_port

    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    ready, log_path = work / "ready", work / "baseline.log"
    full = [
        sys.executable, str(BASELINE_SCRIPT), *command,
        "--ready-dir", str(ready), "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            full,
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
                raise RuntimeError(f"baseline exited with {process.returncode}:\n{tail}")
            if ready.is_dir() and len(list(ready.glob("*.ready"))) >= workers:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{base}/health", timeout=2).ok:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline not ready after 300s; log {log_path}")
            time.sleep(0.5)
        yield f"{base}/search"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=10)


def run_baselines(
    model_dir: Path,
    artifacts: dict[str, Path],
    queries: list[str],
    work: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, list[list[str]]]]:
    """Measure every baseline of ``--baselines``, one after the other."""
    results: dict[str, Any] = {}
    answers: dict[str, list[list[str]]] = {}
    for system in args.baselines:
        command = baseline_command(system, model_dir, artifacts, args)
        print(f"{system}: torch_http_baseline.py {shlex.join(command)}", flush=True)
        with fastapi_baseline(command, work / system, args.baseline_workers) as url:
            call, close = http_caller(url, args.top_k)
            try:
                answers[system] = [call(q) for q in queries[-AGREEMENT_QUERIES:]]
            finally:
                close()
            results[system] = run_levels(
                system, lambda url=url: http_caller(url, args.top_k), queries, args
            )
    return results, answers


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
    """Every system and level, with each Triton system's ratios to each baseline measured."""
    results, comparisons = record["results"], record["ratios"]
    baselines = [b for b in BASELINES if b in results]
    header = ["system", "clients", "req/s", "p50 ms", "p99 ms", "errors"]
    for baseline in baselines:
        header += [f"req/s vs {LABELS[baseline]}", f"p99 vs {LABELS[baseline]}"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    extras = sorted(results.keys() - {*TRITON_SYSTEMS, *BASELINES})  # --served-folder systems
    for system in (*TRITON_SYSTEMS, *extras, *BASELINES):
        for level, row in results.get(system, {}).items():
            cells = [
                LABELS.get(system, system), level, row["throughput_rps"], row["p50_ms"],
                row["p99_ms"], f"{row['errors']}/{row['requests']}",
            ]  # fmt: skip
            for baseline in baselines:
                if system == baseline:
                    cells += ["1x", "1x"]
                    continue
                r = comparisons.get(f"{system}_vs_{VERSUS[baseline]}", {}).get(level, {})
                cells += [
                    f"{r[k]}x" if r.get(k) is not None else "-" for k in ("throughput", "p99")
                ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for name in extras:
        lines += ["", f"| clients | {name}/fp32 req/s | {name}/fp32 p50 | {name}/fp32 p99 |"]
        lines.append("|---:|---:|---:|---:|")
        for level, r in comparisons.get(f"{name}_vs_fp32", {}).items():
            lines.append(f"| {level} | {r['throughput']}x | {r['p50']}x | {r['p99']}x |")
    int8 = comparisons.get("int8_vs_fp32", {})
    if int8:
        lines += ["", "| clients | INT8/fp32 req/s | INT8/fp32 p50 | INT8/fp32 p99 |"]
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


def cross_encoder_checkpoint(model_dir: Path, target: Path, seed: int = 0) -> Path:
    """``model_dir`` as a cross-encoder checkpoint with a seeded, saved classification head (a
    base encoder gets a fresh random head at every load, so the export's check against PyTorch
    needs one fixed head)."""
    import torch

    from recsys.families.search.encoder import load_tokenizer
    from recsys.families.search.reranker import load_cross_encoder

    torch.manual_seed(seed)
    load_cross_encoder(model_dir).save_pretrained(str(target))
    load_tokenizer(model_dir).save_pretrained(str(target))
    return target


def hybrid_reranker_folder(
    fp32: Path, model_dir: Path, catalog: Any, target: Path, precision: str
) -> tuple[Path, dict[str, Any]]:
    """The cpu profile's served system built from the fp32 bi-encoder folder with the
    platform's exporters: BM25 over the catalogue's titles fused by RRF (depth 100), and a
    cross-encoder reranking the fused top 20 (``model_dir`` with a fresh classification head:
    an untrained head costs exactly what a trained one does), served at ``precision``.
    Cached in ``target`` (stamp: the fp32 folder's manifest and the precision)."""
    from recsys.families.search.export import add_hybrid, add_reranker, copy_fp32_artifacts

    key = {"fp32": json.loads((fp32 / "manifest.json").read_text()), "precision": precision}
    stamp = target / "stamp.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(stamp.read_text())
        if recorded["key"] == json.loads(json.dumps(key, default=str)):
            print(f"reusing hybrid + reranker folder {target}", flush=True)
            return target / "folder", recorded["info"]
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    cross_encoder = cross_encoder_checkpoint(model_dir, target / "cross_encoder")
    folder = copy_fp32_artifacts(fp32, target / "folder", model_name="bench_hybrid_reranker")
    add_hybrid(folder, {"k1": 1.2, "b": 0.75}, {"method": "rrf", "depth": 100})
    add_reranker(folder, cross_encoder, catalog, candidates=20, max_length=96, precision=precision)
    section = json.loads((folder / "manifest.json").read_text())["reranker"]
    info = {
        "built_from": str(fp32),
        "cross_encoder": f"{model_dir} with a fresh (untrained) single-logit head",
        "retrieval": "hybrid: BM25 (k1 1.2, b 0.75) + dense, RRF, depth 100",
        "rerank_candidates": section["candidates"],
        "rerank_max_length": section["max_length"],
        "reranker_onnx_file": section["onnx_file"],
        "reranker_precision": section.get("precision", "fp32"),
        "build_s": round(time.perf_counter() - started, 1),
    }
    stamp.write_text(json.dumps({"key": key, "info": info}, indent=2, default=str) + "\n")
    return target / "folder", info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
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
    knobs = parser.add_argument_group(
        "Triton serving knobs",
        "default: the platform's (recsys.triton.repository.default_serving, or RECSYS_TRITON_*), "
        "i.e. what `recsys deploy` and the pipelines publish",
    )
    knobs.add_argument(
        "--instance-count", type=int, default=None, help="model instances (default: CPUs, <= 4)"
    )
    knobs.add_argument(
        "--intra-op-threads", type=int, default=None, help="ONNX Runtime threads per instance"
    )
    knobs.add_argument("--max-batch-size", type=int, default=None, help="default 32")
    knobs.add_argument(
        "--dynamic-batching", action=argparse.BooleanOptionalAction, default=None,
        help="batch concurrent requests (default: on)",
    )  # fmt: skip
    knobs.add_argument("--max-queue-delay-us", type=int, default=None, help="default 2000")
    baselines = parser.add_argument_group("FastAPI baselines (torch_http_baseline.py)")
    baselines.add_argument(
        "--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
        help="which to run (none: Triton only)",
    )  # fmt: skip
    baselines.add_argument(
        "--baseline-workers", type=int, default=cpus, help="uvicorn workers (default: CPUs)"
    )
    baselines.add_argument(
        "--baseline-threads", "--torch-threads", dest="baseline_threads", type=int, default=1,
        help="intra-op threads per forward pass (default 1)",
    )  # fmt: skip
    baselines.add_argument(
        "--baseline-inflight", type=int, default=1, help="forward passes at once per worker"
    )
    baselines.add_argument("--skip-baseline", action="store_true", help="= --baselines")
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        help="keep the exported fp32/INT8 artifacts here and reuse them on the next run",
    )
    parser.add_argument(
        "--served-folder",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="also deploy and measure this serving folder on Triton (e.g. a hybrid + reranker "
        "export); reported as NAME with its ratios to the fp32 bi-encoder",
    )
    parser.add_argument(
        "--hybrid-reranker",
        action="append",
        default=[],
        choices=["fp32", "int8"],
        help="also build (from the fp32 folder and --model-dir as the cross-encoder) and "
        "measure the cpu profile's hybrid + reranker system with this cross-encoder precision; "
        "reported as hybrid_reranker_<precision> (cached under --artifacts-dir)",
    )
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.skip_baseline:
        args.baselines = []
    args.served_folders = {}
    for item in args.served_folder:
        name, _, folder = item.partition("=")
        if not name.isidentifier() or not (Path(folder) / "manifest.json").is_file():
            parser.error(f"--served-folder {item!r}: want NAME=FOLDER with a manifest.json")
        args.served_folders[name] = Path(folder)
    if min(args.concurrency) < 1 or args.requests < 1 or args.duration_s <= 0:
        parser.error("--concurrency, --requests and --duration-s must be positive")
    if min(args.baseline_workers, args.baseline_threads, args.baseline_inflight) < 1:
        parser.error("--baseline-workers, --baseline-threads and --baseline-inflight must be >= 1")
    try:
        from recsys.triton.repository import check_serving_knobs

        check_serving_knobs(requested_knobs(args))
    except ValueError as exc:
        parser.error(str(exc))
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
    platform_env(work)
    knobs = serving_knobs(args)
    print(f"Triton serving knobs: {knobs} (from flags: {requested_knobs(args)})", flush=True)
    try:
        artifacts, export_info = cached_artifacts(model_dir, catalog, work, args)
        for precision in args.hybrid_reranker:
            name = f"hybrid_reranker_{precision}"
            base = args.artifacts_dir.resolve() if args.artifacts_dir else work
            folder, info = hybrid_reranker_folder(
                artifacts[FP32], model_dir, catalog, base / name, precision
            )
            args.served_folders[name] = folder
            export_info[name] = info
        artifacts.update(args.served_folders)  # measured after fp32 and INT8, Triton only
        print(f"artifacts: {export_info}", flush=True)
        load_before = os.getloadavg()
        results, answers, served = run_triton(work, artifacts, queries, args)
        load_after = os.getloadavg()
        baseline_results, baseline_answers = run_baselines(
            model_dir, artifacts, queries, work / "baselines", args
        )
        results.update(baseline_results)
        answers.update(baseline_answers)
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    comparisons: dict[str, Any] = {"int8_vs_fp32": ratios(results[INT8], results[FP32])}
    for name in args.served_folders:  # e.g. hybrid + reranker: what it costs over fp32 dense
        comparisons[f"{name}_vs_fp32"] = ratios(results[name], results[FP32])
    agreements = {"int8_vs_fp32": agreement(answers[INT8], answers[FP32])}
    for baseline in BASELINES:
        if baseline not in results:
            continue
        for system in TRITON_SYSTEMS:
            key = f"{system}_vs_{VERSUS[baseline]}"
            comparisons[key] = ratios(results[system], results[baseline])
            agreements[key] = agreement(answers[system], answers[baseline])
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
            "protocol": {
                "triton": "gRPC (tritonclient.grpc)",
                "fastapi": "HTTP/1.1 JSON (requests)",
            },
            "pattern": "closed loop, one client per thread, back-to-back requests",
            "concurrency": args.concurrency,
            "requests_per_level": args.requests,
            "duration_cap_s": args.duration_s,
            "warmup_per_level": args.warmup,
            "top_k": args.top_k,
        },
        "triton": {
            "server_version": served["server_version"],
            **served["knobs"],
            "knobs_from_flags": served["knobs_from_flags"],
            "published_via": served["published_via"],
            "models": served["models"],
        },
        "baselines": {
            "server": (
                f"FastAPI + uvicorn, {args.baseline_workers} worker process(es), sync handler, "
                f"at most {args.baseline_inflight} forward pass(es) at once per worker, "
                "no batching"
            ),
            "workers": args.baseline_workers,
            "threads_per_forward_pass": args.baseline_threads,
            "inflight_per_worker": args.baseline_inflight,
            "systems": {
                TORCH: "eager PyTorch of the checkpoint, its Hugging Face tokenizer, the "
                "fp32 folder's products.npz",
                ONNX: "ONNX Runtime on the INT8 folder Triton serves (encoder.int8.onnx, its "
                "tokenizer.json via tokenizers, its products.npz)",
            },
            "run": args.baselines,
        },
        "machine": {
            **machine,
            "load_average_before_triton": [round(x, 2) for x in load_before],
            "load_average_after_triton": [round(x, 2) for x in load_after],
        },
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
