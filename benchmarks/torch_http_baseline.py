"""Baselines for ``serving_throughput.py``: the same bi-encoder behind FastAPI + uvicorn, set up
the way a user serving a model without a platform would set it up on this machine.

``POST /search {"query": str, "top_k": int}`` -> ``{"ids": [...], "scores": [...]}``: the query is
tokenised (truncated to the max query tokens, as Triton's model does), embedded, and scored
against the catalogue by one matrix product; the top-K ids come back best first. ``GET /health``
answers once a worker has loaded the model.

Two backends:

* ``--backend torch``: eager PyTorch (``BiEncoder``: mean pooling + L2 normalisation) of
  ``--model-dir`` with its Hugging Face tokenizer. The catalogue is embedded once at start-up
  from ``--data`` (a relevance CSV's unique products, optionally capped by ``--max-products``),
  or read from ``--products-npz`` (the ``products.npz`` of serving artifacts built from the
  same checkpoint: the same embeddings, without embedding the catalogue again).
* ``--backend onnx``: the stronger alternative a user would pick: ONNX Runtime on a serving
  folder (``--artifacts-dir``: the encoder its manifest serves, e.g. ``encoder.int8.onnx``, its
  ``tokenizer.json`` through the ``tokenizers`` fast tokenizer with the same truncation and
  padding as Triton's model, its ``products.npz`` and ``max_query_tokens``). Same model, same
  tokenizer, same catalogue as Triton serving that folder; only the server differs.

Processes and threads: ``--workers`` uvicorn worker processes (default: the CPU count), each
loading its own copy of the model; each worker runs at most ``--max-inflight`` forward passes
at once (default 1; further requests wait in its thread pool) with ``--threads`` intra-op
threads each (default 1; BLAS is limited to the same), so workers x in-flight x threads = the
cores and nothing is oversubscribed. No batching. ``--ready-dir`` gets one file per worker once
its model is loaded, so a load generator can wait for every worker.

    python benchmarks/torch_http_baseline.py --model-dir DIR --products-npz products.npz --port 8100
    python benchmarks/torch_http_baseline.py --backend onnx --artifacts-dir VERSION_DIR --port 8101
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG_ENV = "RECSYS_BASELINE_CONFIG"
"""The JSON config a worker process builds its app from (uvicorn workers import the factory)."""
BACKENDS = ("torch", "onnx")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

Embed = Callable[[str], Any]
"""query -> its (1, dim) float32 embedding as a numpy array."""


class SearchRequest(BaseModel):
    """The request body (at module level: FastAPI resolves the handler's annotation here)."""

    query: str
    top_k: int = 10


def read_products(path: Path) -> tuple[list[str], Any]:
    """Product ids and their (n, dim) float32 embeddings of a ``products.npz``."""
    import numpy as np

    with np.load(path, allow_pickle=False) as products:
        ids = [str(i) for i in products["ids"]]
        embeddings = np.ascontiguousarray(products["embeddings"], np.float32)
    return ids, embeddings


def torch_backend(config: dict[str, Any]) -> tuple[Embed, list[str], Any, str]:
    """Eager PyTorch: the embed function, the catalogue and a description."""
    import torch

    from recsys.families.search.encoder import BiEncoder, encode_texts, load_tokenizer

    torch.set_num_threads(config["threads"])
    torch.set_num_interop_threads(1)
    model = BiEncoder.from_pretrained(config["model_dir"]).eval()
    tokenizer = load_tokenizer(config["model_dir"])
    max_length = config["max_query_tokens"]
    if config.get("products_npz"):
        ids, embeddings = read_products(Path(config["products_npz"]))
    else:
        from recsys.data import product_catalog, read_relevance_csv

        catalog = product_catalog(read_relevance_csv(Path(config["data"])))
        if config.get("max_products"):
            catalog = catalog.head(config["max_products"])
        titles = catalog["product_title"].astype(str).tolist()
        vectors = encode_texts(model, tokenizer, titles, max_length=max_length)
        ids = catalog["product_uid"].astype(str).tolist()
        embeddings = vectors.float().contiguous().numpy()

    def embed(text: str) -> Any:
        with torch.inference_mode():
            batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            return model(**batch).float().numpy()

    return embed, ids, embeddings, f"torch {torch.__version__} eager, {config['model_dir']}"


def onnx_backend(config: dict[str, Any]) -> tuple[Embed, list[str], Any, str]:
    """ONNX Runtime on a serving folder, tokenised exactly as Triton's model tokenises."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = Path(config["artifacts_dir"])
    manifest = json.loads((folder / "manifest.json").read_text())
    stages = [key for key in ("reranker", "hybrid") if manifest.get(key)]
    if stages:
        raise ValueError(f"{folder} serves {stages} too; this baseline serves dense retrieval only")
    onnx_file = manifest.get("onnx_file") or "encoder.onnx"
    if Path(onnx_file).name != onnx_file:
        raise ValueError(f"manifest onnx_file {onnx_file!r} is not a plain file name")
    options = ort.SessionOptions()
    options.intra_op_num_threads = config["threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(folder / onnx_file), options, providers=["CPUExecutionProvider"]
    )
    names = list(manifest.get("onnx_inputs") or [i.name for i in session.get_inputs()])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(int(manifest.get("max_query_tokens", 64)))
    pad_token = (tokenizer.padding or {}).get("pad_token") or "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    ids, embeddings = read_products(folder / "products.npz")
    columns = {
        "input_ids": lambda e: e.ids,
        "attention_mask": lambda e: e.attention_mask,
        "token_type_ids": lambda e: e.type_ids,
    }

    def embed(text: str) -> Any:
        encodings = tokenizer.encode_batch([text])
        feed = {n: np.asarray([columns[n](e) for e in encodings], np.int64) for n in names}
        return session.run(["embeddings"], feed)[0].astype(np.float32, copy=False)

    return embed, ids, embeddings, f"onnxruntime {ort.__version__}, {folder / onnx_file}"


def best(scores: Any, k: int) -> tuple[Any, Any]:
    """Indices and values of a score row's ``k`` highest, best first (as Triton's model)."""
    import numpy as np

    top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(len(scores))
    order = np.argsort(-scores[top], kind="stable")
    return top[order], scores[top][order]


def build_app(config: dict[str, Any]) -> Any:
    """The FastAPI app of one worker process."""
    from fastapi import FastAPI, HTTPException

    started = time.perf_counter()
    load = torch_backend if config["backend"] == "torch" else onnx_backend
    embed, ids, embeddings, what = load(config)
    max_top_k = min(config["max_top_k"], len(ids))
    inflight = threading.BoundedSemaphore(config["max_inflight"])
    print(
        f"{config['backend']} baseline worker {os.getpid()}: {len(ids)} products, dim "
        f"{embeddings.shape[1]}, {what}, {config['threads']} intra-op thread(s), at most "
        f"{config['max_inflight']} in flight, loaded in {time.perf_counter() - started:.1f}s",
        flush=True,
    )

    app = FastAPI(title=f"{config['backend']} search baseline")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "products": len(ids), "pid": os.getpid()}

    @app.post("/search")
    def search(request: SearchRequest) -> dict[str, Any]:
        if not request.query.strip():
            raise HTTPException(400, "query is empty")
        if not 1 <= request.top_k <= max_top_k:
            raise HTTPException(400, f"top_k must be between 1 and {max_top_k}")
        with inflight:
            query = embed(request.query)
            top, scores = best((query @ embeddings.T)[0], request.top_k)
        return {"ids": [ids[i] for i in top.tolist()], "scores": scores.tolist()}

    if config.get("ready_dir"):
        ready = Path(config["ready_dir"])
        ready.mkdir(parents=True, exist_ok=True)
        (ready / f"{os.getpid()}.ready").write_text("ok\n")
    return app


def app_factory() -> Any:
    """uvicorn's factory (``--workers`` > 1 imports it in every worker process)."""
    return build_app(json.loads(os.environ[CONFIG_ENV]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--model-dir", default="minilm", help="torch: checkpoint or 'minilm'")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--products-npz", type=Path, help="torch: precomputed embeddings")
    source.add_argument("--data", type=Path, help="torch: relevance CSV whose products to embed")
    parser.add_argument("--artifacts-dir", type=Path, help="onnx: a serving (version) folder")
    parser.add_argument("--max-products", type=int, default=0, help="cap the catalogue (0: all)")
    parser.add_argument("--max-query-tokens", type=int, default=64, help="torch (onnx: manifest)")
    parser.add_argument("--max-top-k", type=int, default=100)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="uvicorn worker processes"
    )
    parser.add_argument(
        "--threads", "--torch-threads", dest="threads", type=int, default=1,
        help="intra-op threads per forward pass (torch / ONNX Runtime / BLAS)",
    )  # fmt: skip
    parser.add_argument(
        "--max-inflight", type=int, default=1, help="forward passes at once per worker"
    )
    parser.add_argument("--ready-dir", type=Path, help="a file per worker once it has loaded")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the baseline binds to a loopback address only")
    if args.backend == "torch" and not (args.products_npz or args.data):
        parser.error("--backend torch needs --products-npz or --data")
    if args.backend == "onnx" and not args.artifacts_dir:
        parser.error("--backend onnx needs --artifacts-dir (a serving folder)")
    if min(args.workers, args.threads, args.max_inflight) < 1:
        parser.error("--workers, --threads and --max-inflight must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    # Set before numpy, torch or a worker process starts: BLAS (the catalogue matmul) keeps to
    # the same threads as the forward pass, in this process and every worker.
    os.environ.update({name: str(args.threads) for name in THREAD_VARIABLES})
    config: dict[str, Any] = {
        "backend": args.backend,
        "threads": args.threads,
        "max_inflight": args.max_inflight,
        "max_top_k": args.max_top_k,
        "max_query_tokens": args.max_query_tokens,
        "max_products": args.max_products,
        "products_npz": str(args.products_npz.resolve()) if args.products_npz else None,
        "data": str(args.data.resolve()) if args.data else None,
        "artifacts_dir": str(args.artifacts_dir.resolve()) if args.artifacts_dir else None,
        "ready_dir": str(args.ready_dir.resolve()) if args.ready_dir else None,
    }
    if args.backend == "torch":
        from recsys.families.search.encoder import resolve_base_model

        config["model_dir"] = str(resolve_base_model(args.model_dir))
    os.environ[CONFIG_ENV] = json.dumps(config)
    import uvicorn

    uvicorn.run(
        f"{Path(__file__).stem}:app_factory",
        factory=True,
        app_dir=str(Path(__file__).resolve().parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
