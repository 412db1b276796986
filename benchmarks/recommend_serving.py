"""Benchmark: serving throughput and p50/p95/p99 latency of the recommender, Triton vs a minimal
FastAPI + torch endpoint serving the same model, at 1, 8 and 32 concurrent clients.

What is measured, and why. A recommendation request is cheap compared with a search query (a
users-table lookup, one SASRec forward pass over at most ``max_len`` tokens, an ``n_items``
score vector, the user's seen items masked, a top-K), so per-request overhead (protocol,
serialisation, Python, scheduling) is a large part of its cost, and batching many users into
one forward pass is where a serving stack can win or lose. The question is what the
platform's Triton deployment costs or gains over the endpoint a team would write first.

Setup: the interactions of ``--data`` (default the full Amazon Grocery ``train.csv``: 14,681
users, 8,570 items after the split) are split with ``leave_one_out``, a SASRec with the item
metadata's relations (the served recipe) is fitted for ``--epochs`` epochs only (throughput
does not depend on quality; the catalogue and user-table sizes are the real ones), and
exported with the family's own ``build_serving_artifacts``. Triton: a real tritonserver (the
``nvidia-pytriton`` binary, no response cache so every request runs the model) serves the
version folder through the family's python backend (``serving_model.py``: onnxruntime,
``intra_op_threads`` per instance, dynamic batching up to ``--max-batch-size``), published with
``publish_version`` and loaded with ``TritonControl.load_version(config=
version_serving_config(...))``, once per instance count of ``--instance-counts`` (default 1 and
2). Clients call it over gRPC through the platform's own client
(``recsys.families.recommend.client.recommend``, one ``TritonControl`` per thread).

The baseline (``--serve-baseline``, this script run as a subprocess): FastAPI + uvicorn, one
process, one worker, a plain ``def`` handler (FastAPI's thread pool runs requests
concurrently), the fitted ``SASRecNet`` itself (pickled by ``torch.save``, loaded in eval
mode) run per request under ``torch.inference_mode`` with the same ``users.npz`` /
``items.npz`` tables, the same exclusion of seen items and the same popularity fallback, JSON
in and out over HTTP/1.1 keep-alive (one ``requests.Session`` per client thread). Threads as
in ``torch_http_baseline.py`` (the search family's baseline): ``torch.set_num_threads
(--torch-threads)`` (default: ``--intra-op-threads``, 1), one inter-op thread. What it does
differently from Triton: eager PyTorch instead of the exported ONNX graph in onnxruntime, no
batching (every request is its own forward pass, concurrency comes only from threads), no
separate model processes (one Python process, one GIL between the HTTP server and the model),
JSON instead of gRPC tensors.

Request mixes (``--mixes``): ``users``, known users drawn uniformly (seeded) from the users
table; ``sessions``, anonymous sessions of ``--session-length`` (5) known items (the latest
items of uniformly drawn users with that many). Always ``top_k`` ``--top-k`` (10) and
``exclude_seen`` true. Every system answers the same request sequence; before measuring, each
answers the same ``AGREEMENT_REQUESTS`` requests of each mix and their top-K items are compared
(top-1 match rate, mean top-K overlap): the ONNX graph and the eager network should rank alike.

Load: closed loop (``serving_throughput.closed_loop``), ``c`` client threads sending
back-to-back requests for ``c`` in ``--concurrency``; per point a warm-up
(``max(--warmup, 2c)`` requests), then ``--requests`` requests or ``--duration-s`` seconds,
whichever ends first (with the defaults, the duration ends it). Per point: requests/s
(successful requests per second of wall time), p50/p95/p99 latency, errors (an error answer,
or a popularity fallback where a personalised answer was due), and the 1/5/15-minute load
averages (as ``uptime`` shows them) before and after. The load generator runs on the same
machine as the servers and takes CPU too; on a machine shared with other work the load
averages say how much else ran.

Everything binds to 127.0.0.1; Triton (and its shared memory) and the baseline are stopped on
the way out.

    python benchmarks/recommend_serving.py --artifacts-dir .bench_work/recommend_serving
    python benchmarks/recommend_serving.py --quick     # < 1 minute, the test fixture
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_throughput import (  # noqa: E402  (needs the path above)
    LevelResult,
    agreement,
    closed_loop,
    machine_info,
    ratio,
)

RESULTS = ROOT / "benchmarks" / "results" / "recommend_serving.json"
DATA = ROOT.parent / "shared" / "data" / "amazon_grocery"
FIXTURE = ROOT / "tests" / "fixtures" / "amazon_grocery_sample"
HOST = "127.0.0.1"
TORCH = "torch_fastapi"
REQUEST_TIMEOUT_S = 30.0
AGREEMENT_REQUESTS = 50
NET_FILE = "sasrec_net.pt"
SOURCES = {"users": "user", "sessions": "session"}
"""The ``SOURCE`` each mix must be answered from: a popularity fallback counts as an error."""

Request = tuple[str, Any]
"""``("user", user_id)`` or ``("history", (item_id, ...))``."""
Caller = Callable[[Request], list[str]]


def triton_system(instances: int) -> str:
    return f"triton_i{instances}"


# -- the baseline server (``--serve-baseline``, run as a subprocess) --------------------------


class RecommendRequest(BaseModel):
    """The baseline's request body (at module level: FastAPI resolves the annotation here)."""

    user: str | None = None
    history: list[str] | None = None
    top_k: int = 10
    exclude_seen: bool = True


def create_baseline_app(folder: Path, torch_threads: int) -> Any:
    """The FastAPI app: ``POST /recommend`` -> ``{"items", "scores", "source"}``, ``GET
    /health``. Same tables, exclusion and fallback as the Triton model, eager torch."""
    import numpy as np
    import torch
    from fastapi import FastAPI, HTTPException

    torch.set_num_threads(torch_threads)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    net = torch.load(folder / NET_FILE, weights_only=False, map_location="cpu").eval()
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / "items.npz", allow_pickle=False) as items:
        item_ids = [str(i) for i in items["item_ids"]]
        popularity = torch.from_numpy(np.asarray(items["popularity"], dtype=np.float32))
    with np.load(folder / "users.npz", allow_pickle=False) as users:
        user_index = {str(u): k for k, u in enumerate(users["user_ids"])}
        history_tokens = torch.from_numpy(np.ascontiguousarray(users["history_tokens"]))
        seen_indptr = users["seen_indptr"].astype(np.int64)
        seen_items = torch.from_numpy(users["seen_items"].astype(np.int64))
    item_index = {item: k for k, item in enumerate(item_ids)}
    max_len = int(history_tokens.shape[1])
    max_top_k = min(int(manifest.get("max_top_k", 100)), len(item_ids))
    print(
        f"torch baseline: {len(user_index)} users, {len(item_ids)} items, max_len {max_len}, "
        f"torch {torch.__version__} ({torch_threads} intra-op thread(s)), loaded in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )

    app = FastAPI(title="torch recommendation baseline")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "users": len(user_index), "items": len(item_ids)}

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> dict[str, Any]:
        if (request.user is None) == (request.history is None):
            raise HTTPException(400, "send user or history, not both and not neither")
        if not 1 <= request.top_k <= max_top_k:
            raise HTTPException(400, f"top_k must be between 1 and {max_top_k}")
        tokens = seen = None
        if request.user is not None:
            index = user_index.get(request.user)
            if index is not None:
                tokens = history_tokens[index : index + 1]
                seen = seen_items[seen_indptr[index] : seen_indptr[index + 1]]
                source = "user"
            else:
                source = f"popularity: unknown user {request.user!r}"
        else:
            known = [item_index[i] for i in request.history or [] if i in item_index]
            if known:
                tokens = torch.zeros(1, max_len, dtype=torch.int64)
                tail = torch.tensor(known[-max_len:], dtype=torch.int64)
                tokens[0, max_len - len(tail) :] = tail + 1
                seen = torch.unique(torch.tensor(known, dtype=torch.int64))
                source = "session"
            else:
                source = "popularity: no known item in HISTORY"
        with torch.inference_mode():
            if tokens is None:
                scores = popularity.clone()
            else:
                scores = net(tokens)[0]
                if request.exclude_seen and len(seen):
                    scores[seen] = -torch.inf
            values, top = torch.topk(scores, request.top_k)
        keep = torch.isfinite(values)
        return {
            "items": [item_ids[i] for i in top[keep].tolist()],
            "scores": values[keep].tolist(),
            "source": source,
        }

    return app


def serve_baseline(args: argparse.Namespace) -> int:
    import uvicorn

    app = create_baseline_app(args.serve_baseline, args.torch_threads)
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False)
    return 0


# -- the model under test ---------------------------------------------------------------------


def file_key(path: Path) -> list[Any]:
    path = path.resolve()
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The serving-artifacts folder (plus the pickled network, :data:`NET_FILE`) of a SASRec
    fitted on ``--data``: reused from ``--artifacts-dir`` when it holds one for the same data,
    epochs and ``sasrec.py``, else built (there, when given)."""
    from recsys.families.recommend import sasrec

    key = {
        "data": file_key(args.data),
        "meta": file_key(args.meta),
        "epochs": args.epochs,
        "seed": args.seed,
        "sasrec_py": hashlib.sha256(Path(sasrec.__file__).read_bytes()).hexdigest(),
    }
    if args.artifacts_dir is None:
        return build_model(args, work / "artifacts")
    target = args.artifacts_dir.resolve()
    stamp = target / "stamp.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(stamp.read_text())
        if recorded["key"] == json.loads(json.dumps(key)):
            print(f"reusing the fitted model and serving artifacts in {target}", flush=True)
            return target / "artifacts", {**recorded["info"], "reused_from": str(target)}
    shutil.rmtree(target, ignore_errors=True)
    folder, info = build_model(args, target / "artifacts")
    stamp.write_text(json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return folder, info


def build_model(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    import torch

    from recsys.families.recommend.data import read_interactions, read_item_meta
    from recsys.families.recommend.export import build_serving_artifacts
    from recsys.families.recommend.sasrec import SASRec, SASRecParams
    from recsys.families.recommend.split import leave_one_out

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    item_meta = read_item_meta(args.meta)
    split = leave_one_out(read_interactions(args.data))
    params = SASRecParams(epochs=args.epochs, eval_every=0, seed=args.seed, device="cpu")
    print(
        f"fitting SASRec for {args.epochs} epoch(s): {split.n_users} users, {split.n_items} "
        f"items, {len(split.train)} train rows",
        flush=True,
    )
    model = SASRec(params, item_meta=item_meta).fit(split)
    fitted = time.perf_counter()
    build_serving_artifacts(model, split, out, item_meta=item_meta)
    net = copy.deepcopy(model.net).float().cpu().eval()
    torch.save(net, out / NET_FILE)
    info = {
        "users": int(split.n_users),
        "items": int(split.n_items),
        "train_rows": len(split.train),
        "max_len": int(params.max_len),
        "dim": int(params.dim),
        "blocks": int(params.blocks),
        "relations": None if net.relations is None else list(net.relations.shape),
        "epochs": args.epochs,
        "fit_s": round(fitted - started, 1),
        "export_s": round(time.perf_counter() - fitted, 1),
        "onnx_bytes": (out / "sasrec.onnx").stat().st_size,
    }
    print(f"model: {info}", flush=True)
    return out, info


def make_requests(folder: Path, args: argparse.Namespace) -> dict[str, list[Request]]:
    """Each mix's request sequence (seeded; the same for every system): uniformly drawn known
    users; sessions of the latest ``--session-length`` items of uniformly drawn users who have
    that many."""
    import numpy as np

    with np.load(folder / "users.npz", allow_pickle=False) as users:
        user_ids = [str(u) for u in users["user_ids"]]
        tokens = users["history_tokens"]
    with np.load(folder / "items.npz", allow_pickle=False) as items:
        item_ids = [str(i) for i in items["item_ids"]]
    rng = random.Random(args.seed)
    count = args.request_pool
    mixes: dict[str, list[Request]] = {}
    if "users" in args.mixes:
        mixes["users"] = [("user", rng.choice(user_ids)) for _ in range(count)]
    if "sessions" in args.mixes:
        length = args.session_length
        eligible = np.flatnonzero((tokens != 0).sum(axis=1) >= length)
        if not len(eligible):
            raise SystemExit(f"no user has {length} items for a session; lower --session-length")
        mixes["sessions"] = [
            ("history", tuple(item_ids[t - 1] for t in tokens[int(rng.choice(eligible)), -length:]))
            for _ in range(count)
        ]
    return mixes


# -- clients ----------------------------------------------------------------------------------


def triton_caller(url: str, model: str, mix: str, top_k: int) -> tuple[Caller, Callable[[], None]]:
    """One client thread's call through the platform's client (its own gRPC channel)."""
    from recsys.families.recommend.client import recommend
    from recsys.triton.control import TritonControl

    control = TritonControl(url, timeout_s=REQUEST_TIMEOUT_S)

    def call(request: Request) -> list[str]:
        kind, value = request
        answer = recommend(
            control,
            model,
            user=value if kind == "user" else None,
            history=list(value) if kind == "history" else None,
            top_k=top_k,
            exclude_seen=True,
        )
        return checked(answer.source, [item for item, _, _ in answer.items], mix, top_k)

    return call, control.close


def http_caller(url: str, mix: str, top_k: int) -> tuple[Caller, Callable[[], None]]:
    """One client thread's call to the baseline: its own keep-alive HTTP session."""
    import requests

    session = requests.Session()

    def call(request: Request) -> list[str]:
        kind, value = request
        body = {"top_k": top_k, "exclude_seen": True}
        body["user" if kind == "user" else "history"] = value if kind == "user" else list(value)
        response = session.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        answer = response.json()
        return checked(answer["source"], answer["items"], mix, top_k)

    return call, session.close


def checked(source: str, items: list[str], mix: str, top_k: int) -> list[str]:
    if source != SOURCES[mix]:
        raise RuntimeError(f"answered from {source!r}, expected {SOURCES[mix]!r}")
    if len(items) != top_k:
        raise RuntimeError(f"expected {top_k} items, got {len(items)}")
    return items


# -- measuring --------------------------------------------------------------------------------


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    return [round(x, 2) for x in os.getloadavg()]


def summary(result: LevelResult) -> dict[str, Any]:
    import numpy as np

    row = result.summary()
    lat = np.array(result.latencies_s) * 1000.0
    row["p95_ms"] = round(float(np.percentile(lat, 95)), 2) if len(lat) else None
    return row


def run_levels(
    system: str,
    mix: str,
    make_caller: Callable[[], tuple[Caller, Callable[[], None]]],
    requests: list[Request],
    args: argparse.Namespace,
    alive: Callable[[], bool],
) -> dict[str, dict[str, Any]]:
    """Warm up and measure every concurrency level of one system and mix; one caller (and
    connection) per thread. A level's measured requests are the same for every system; the
    warm-up uses others. Stops the run when the server died (``alive``) during a level."""
    levels: dict[str, dict[str, Any]] = {}
    for level, concurrency in enumerate(args.concurrency):
        pairs = [make_caller() for _ in range(concurrency)]
        try:
            callers = [call for call, _ in pairs]
            offset = AGREEMENT_REQUESTS + level * (args.requests + args.warmup)
            warm = max(args.warmup, 2 * concurrency)
            before = load_average()
            closed_loop(callers, requests, offset + args.requests, warm, args.duration_s)
            measured = closed_loop(callers, requests, offset, args.requests, args.duration_s)
            after = load_average()
        finally:
            for _, close in pairs:
                with contextlib.suppress(Exception):
                    close()
        if measured.errors and not alive():
            raise RuntimeError(
                f"{system} stopped answering during c={concurrency} ({measured.first_error}); "
                "on a shared machine, did something else stop it? Rerun."
            )
        row = summary(measured)
        row["load_avg_before"], row["load_avg_after"] = before, after
        levels[str(concurrency)] = row
        print(
            f"  {system:13s} {mix:8s} c={concurrency:<3d} {row['throughput_rps']} req/s, "
            f"p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms, "
            f"errors {row['errors']}/{row['requests']}, load {before[0]} -> {after[0]}",
            flush=True,
        )
    return levels


def answers_of(call: Caller, requests: list[Request]) -> list[list[str]]:
    return [call(r) for r in requests[:AGREEMENT_REQUESTS]]


def run_triton(
    work: Path, folder: Path, mixes: dict[str, list[Request]], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Serve the version with each instance count in turn on one tritonserver; measure every
    mix; return results, agreement answers and the server version."""
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
    results: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    try:
        server.start(timeout_s=120)
        with TritonControl(
            server.grpc_url, timeout_s=120, load_timeout_s=300, admin_key=admin_key
        ) as control:
            version = str(control.client.get_server_metadata().version)
            for instances in args.instance_counts:
                system, model = triton_system(instances), f"recommend_bench_i{instances}"
                knobs = {
                    "instance_count": instances,
                    "intra_op_threads": args.intra_op_threads,
                    "max_batch_size": args.max_batch_size,
                    "max_queue_delay_us": args.max_queue_delay_us,
                    "dynamic_batching": args.max_batch_size > 1,
                    "response_cache": False,
                }
                publish_version(repo, model, 1, folder, serving=knobs)
                started = time.perf_counter()
                control.load_version(model, 1, repo, config=version_serving_config(repo, model, 1))
                print(f"{system}: loaded in {time.perf_counter() - started:.1f}s", flush=True)
                results[system], answers[system] = {}, {}
                for mix, requests in mixes.items():

                    def make(mix: str = mix, model: str = model) -> tuple[Caller, Any]:
                        return triton_caller(server.grpc_url, model, mix, args.top_k)

                    call, close = make()
                    try:
                        answers[system][mix] = answers_of(call, requests)
                    finally:
                        close()
                    results[system][mix] = run_levels(
                        system, mix, make, requests, args, server.is_live
                    )
                control.unload(model)
    except Exception:
        with contextlib.suppress(OSError):
            print(f"tritonserver log tail:\n{server.log_path.read_text()[-3000:]}", flush=True)
        raise
    finally:
        server.stop()  # also removes its shared-memory regions
    return results, answers, version


@contextlib.contextmanager
def torch_baseline(
    folder: Path, log_path: Path, args: argparse.Namespace
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run this script's ``--serve-baseline`` on a free loopback port; yield its /recommend
    URL and process, and stop it (its whole process group) on the way out. (The
    start/health/stop logic of ``serving_throughput.torch_baseline``, copied: that one is
    tied to the search baseline's script and arguments.)"""
    import requests

    from tests.triton_testing import free_port

    port = free_port()
    command = [
        sys.executable, str(Path(__file__).resolve()),
        "--serve-baseline", str(folder),
        "--torch-threads", str(args.torch_threads),
        "--port", str(port),
    ]  # fmt: skip
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
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
            time.sleep(0.3)
        yield f"{base}/recommend", process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=10)


def run_torch(
    work: Path, folder: Path, mixes: dict[str, list[Request]], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    log_path = work / "torch_baseline.log"
    with torch_baseline(folder, log_path, args) as (url, process):
        for mix, requests in mixes.items():

            def make(mix: str = mix) -> tuple[Caller, Any]:
                return http_caller(url, mix, args.top_k)

            call, close = make()
            try:
                answers[mix] = answers_of(call, requests)
            finally:
                close()
            results[mix] = run_levels(
                TORCH, mix, make, requests, args, lambda: process.poll() is None
            )
    return results, answers


# -- report -----------------------------------------------------------------------------------


def comparisons(results: dict[str, Any]) -> dict[str, Any]:
    """Each Triton row / the baseline's row of the same mix and level (throughput: > 1 is
    better; latency: < 1 is better)."""
    out: dict[str, Any] = {}
    base = results.get(TORCH, {})
    for system, mixes in results.items():
        if system == TORCH:
            continue
        for mix, levels in mixes.items():
            for level, row in levels.items():
                other = base.get(mix, {}).get(level)
                if other is None:
                    continue
                out.setdefault(f"{system}_vs_torch", {}).setdefault(mix, {})[level] = {
                    "throughput": ratio(row["throughput_rps"], other["throughput_rps"]),
                    **{p: ratio(row[f"{p}_ms"], other[f"{p}_ms"]) for p in ("p50", "p95", "p99")},
                }
    return out


def markdown(record: dict[str, Any]) -> str:
    results, versus = record["results"], record["ratios"]
    lines = [
        "| system | requests | clients | req/s | p50 ms | p95 ms | p99 ms | errors | "
        "req/s vs torch | p99 vs torch | load avg (1 min) before -> after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mix in record["load"]["mixes"]:
        for system, mixes in results.items():
            for level, row in mixes.get(mix, {}).items():
                r = versus.get(f"{system}_vs_torch", {}).get(mix, {}).get(level, {})
                cells = [
                    system, mix, level, row["throughput_rps"], row["p50_ms"], row["p95_ms"],
                    row["p99_ms"], f"{row['errors']}/{row['requests']}",
                    f"{r['throughput']}x" if r.get("throughput") is not None else "-",
                    f"{r['p99']}x" if r.get("p99") is not None else "-",
                    f"{row['load_avg_before'][0]} -> {row['load_avg_after'][0]}",
                ]  # fmt: skip
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA / "train.csv", help="interactions")
    parser.add_argument("--meta", type=Path, default=DATA / "item_meta.csv", help="item metadata")
    parser.add_argument("--epochs", type=int, default=1, help="SASRec epochs (quality is moot)")
    parser.add_argument("--seed", type=int, default=0, help="model and request seed")
    parser.add_argument("--mixes", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--session-length", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=20000, help="measured requests per point (cap)"
    )
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="cap per point (warm-up and measurement)"
    )
    parser.add_argument("--warmup", type=int, default=60, help="warm-up requests (>= 2 x c)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--instance-counts", type=int, nargs="+", default=[1, 2])
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
        help="keep the fitted model's artifacts here and reuse them on the next run",
    )
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", type=Path, help=f"result JSON (default {RESULTS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test on the test fixture (< 1 minute); writes to a temporary file",
    )
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.torch_threads = args.torch_threads or args.intra_op_threads
    if args.serve_baseline is not None:
        return args
    if args.quick:
        args.data, args.meta = FIXTURE / "train.tsv", FIXTURE / "item_meta.tsv"
        args.concurrency, args.instance_counts = [1, 8], [1]
        args.requests, args.duration_s, args.warmup = 80, 2.0, 16
    if args.out is None:
        quick = Path(tempfile.gettempdir()) / "recommend_serving_quick.json"
        args.out = quick if args.quick else RESULTS
    if min(args.concurrency) < 1 or args.requests < 1 or args.duration_s <= 0:
        parser.error("--concurrency, --requests and --duration-s must be positive")
    # enough distinct requests for the agreement check and every level's warm-up + measurement
    args.request_pool = AGREEMENT_REQUESTS + len(args.concurrency) * (args.requests + args.warmup)
    return args


def main() -> int:
    args = parse_args()
    if args.serve_baseline is not None:
        return serve_baseline(args)
    started = time.perf_counter()
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="recommend-serving-bench-"))
    try:
        folder, model_info = prepare_model(args, work)
        mixes = make_requests(folder, args)
        print(
            f"mixes {list(mixes)}, concurrency {args.concurrency}, {args.requests} requests or "
            f"{args.duration_s:g}s per point, load average {load_average()}",
            flush=True,
        )
        results, answers, triton_version = run_triton(work, folder, mixes, args)
        if not args.skip_baseline:
            results[TORCH], answers[TORCH] = run_torch(work, folder, mixes, args)
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    systems = list(answers)
    agreements = {
        f"{a}_vs_{b}": {mix: agreement(answers[a][mix], answers[b][mix]) for mix in mixes}
        for i, a in enumerate(systems)
        for b in systems[i + 1 :]
    }
    record = {
        "benchmark": "recommend_serving",
        "command": shlex.join(["python", *sys.argv]),
        "wall_s": round(time.perf_counter() - started, 1),
        "note": (
            "Measured on a machine shared with other work running at the same time: see each "
            "point's load averages (load_avg_before/after, 1/5/15 min) against cpus_usable; the "
            "load generator runs on the same machine as the servers."
        ),
        "model": {
            "data": str(args.data),
            "meta": str(args.meta),
            "recipe": "SASRec (served defaults, item relations), epochs as given, no early "
            "stopping: throughput does not depend on quality",
            **model_info,
        },
        "load": {
            "protocol": {
                "triton": "gRPC (recsys.families.recommend.client.recommend)",
                "torch": "HTTP/1.1 JSON, keep-alive (requests.Session)",
            },
            "pattern": "closed loop, one client per thread, back-to-back requests",
            "mixes": list(mixes),
            "users": "known users drawn uniformly (seeded), with replacement",
            "sessions": f"anonymous sessions of {args.session_length} known items",
            "concurrency": args.concurrency,
            "requests_per_point": args.requests,
            "duration_cap_s": args.duration_s,
            "warmup_per_point": args.warmup,
            "top_k": args.top_k,
            "exclude_seen": True,
        },
        "triton": {
            "server_version": triton_version,
            "backend": "python (recsys.families.recommend.serving_model, onnxruntime)",
            "instance_counts": args.instance_counts,
            "intra_op_threads": args.intra_op_threads,
            "max_batch_size": args.max_batch_size,
            "dynamic_batching": args.max_batch_size > 1,
            "max_queue_delay_us": args.max_queue_delay_us,
            "response_cache": False,
        },
        "torch_baseline": {
            "server": "FastAPI + uvicorn, 1 process, 1 worker, sync handler (thread pool), "
            "eager SASRecNet under inference_mode, no batching",
            "torch_threads": args.torch_threads,
            "interop_threads": 1,
        },
        "machine": {**machine, "load_average_at_end": load_average()},
        "results": results,
        "ratios": comparisons(results),
        "agreement": agreements,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print()
    print(markdown(record))
    print(f"\nagreement (top-{args.top_k} of the same {AGREEMENT_REQUESTS} requests): {agreements}")
    print(
        f"machine: {machine['cpus_usable']} usable CPUs ({machine['cpu_model']}), shared; load "
        f"average {machine['load_average_at_start']} at start, {load_average()} at end"
    )
    print(f"command: {record['command']}")
    print(f"wall {record['wall_s']}s -> {args.out}")
    errors = sum(
        row["errors"] for mixes in results.values() for lv in mixes.values() for row in lv.values()
    )
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
