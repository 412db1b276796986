"""Baseline for ``serving_throughput.py``: the same bi-encoder behind a minimal FastAPI + torch
endpoint, the way a model is often served before a platform exists.

``POST /search {"query": str, "top_k": int}`` -> ``{"ids": [...], "scores": [...]}``: the query is
tokenised (truncated to ``--max-query-tokens``, as Triton's model does), embedded by PyTorch
(``BiEncoder``: mean pooling + L2 normalisation) and scored against the catalogue by one matrix
product; the top-K ids come back best first. ``GET /health`` answers once the model is loaded.

The catalogue is embedded once at start-up, from ``--data`` (a relevance CSV; its unique
products, optionally capped by ``--max-products``), or read from ``--products-npz`` (the
``products.npz`` of serving artifacts built from the same checkpoint: the same torch embeddings,
without embedding the catalogue a second time).

Threads: the handler is a plain ``def``, so FastAPI runs requests concurrently in its thread
pool (40 threads); PyTorch releases the GIL inside its kernels, so concurrent requests run in
parallel, each with ``--torch-threads`` intra-op threads (default 1: one core per in-flight
request, no oversubscription; inter-op threads are 1). One uvicorn worker, no batching.

    python benchmarks/torch_http_baseline.py --model-dir DIR --products-npz products.npz --port 8100
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class SearchRequest(BaseModel):
    """The request body (at module level: FastAPI resolves the handler's annotation here)."""

    query: str
    top_k: int = 10


def load_catalogue(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[list[str], Any]:
    """Product ids and their (n, dim) float32 embeddings as a torch tensor."""
    import numpy as np
    import torch

    if args.products_npz:
        with np.load(args.products_npz, allow_pickle=False) as products:
            ids = [str(i) for i in products["ids"]]
            embeddings = torch.from_numpy(np.ascontiguousarray(products["embeddings"], np.float32))
        return ids, embeddings
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.encoder import encode_texts

    catalog = product_catalog(read_relevance_csv(args.data))
    if args.max_products:
        catalog = catalog.head(args.max_products)
    titles = catalog["product_title"].astype(str).tolist()
    embeddings = encode_texts(model, tokenizer, titles, max_length=args.max_query_tokens)
    return catalog["product_uid"].astype(str).tolist(), embeddings.float().contiguous()


def create_app(args: argparse.Namespace) -> Any:
    import torch
    from fastapi import FastAPI, HTTPException

    from recsys.families.search.encoder import BiEncoder, load_tokenizer

    torch.set_num_threads(args.torch_threads)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    model = BiEncoder.from_pretrained(args.model_dir).eval()
    tokenizer = load_tokenizer(args.model_dir)
    ids, embeddings = load_catalogue(args, model, tokenizer)
    max_top_k = min(args.max_top_k, len(ids))
    print(
        f"torch baseline: {len(ids)} products, dim {embeddings.shape[1]}, torch "
        f"{torch.__version__} ({args.torch_threads} intra-op thread(s) per request), loaded in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )

    app = FastAPI(title="torch search baseline")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "products": len(ids)}

    @app.post("/search")
    def search(request: SearchRequest) -> dict[str, Any]:
        if not request.query.strip():
            raise HTTPException(400, "query is empty")
        if not 1 <= request.top_k <= max_top_k:
            raise HTTPException(400, f"top_k must be between 1 and {max_top_k}")
        with torch.inference_mode():
            batch = tokenizer(
                [request.query],
                truncation=True,
                max_length=args.max_query_tokens,
                return_tensors="pt",
            )
            query = model(**batch)
            scores, top = torch.topk(query @ embeddings.T, request.top_k, dim=1)
        return {"ids": [ids[i] for i in top[0].tolist()], "scores": scores[0].tolist()}

    return app


def main() -> int:
    import uvicorn

    from recsys.families.search.encoder import resolve_base_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="minilm", help="checkpoint folder or 'minilm'")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--products-npz", type=Path, help="precomputed catalogue embeddings")
    source.add_argument("--data", type=Path, help="relevance CSV whose products to embed")
    parser.add_argument("--max-products", type=int, default=0, help="cap the catalogue (0: all)")
    parser.add_argument("--max-query-tokens", type=int, default=64)
    parser.add_argument("--max-top-k", type=int, default=100)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the baseline binds to a loopback address only")
    args.model_dir = str(resolve_base_model(args.model_dir))
    app = create_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
