"""Benchmark: search quality on the full Home Depot data, system by system.

BM25, off-the-shelf all-MiniLM-L6-v2, MiniLM fine-tuned as a bi-encoder (the pipeline's own
training loop) and fine-tuned bi-encoder + cross-encoder reranker, all scored by the same ranx
code on the same held-out queries (split by query, the pipeline's default 80/20 split, seed 13)
ranking the whole catalogue of every product in the data. The data goes through the pipeline's
GX gate first, exactly as a DAG run would.

Stages cache their results under ``--work`` so a long CPU run can be resumed; ``--fresh``
starts over. Training is bounded by ``--max-steps`` (0 = one full epoch): on the 2-core CI
machine one epoch over the ~47k positive pairs takes hours, so the README says how many pairs
each model saw.

    python benchmarks/quality_table.py --data ../shared/data/homedepot/train.csv \\
        --max-steps 300 --batch-size 64 --reranker-max-steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("ndcg_at_10", "mrr", "recall_at_10", "recall_at_100", "precision", "recall", "f1")


def cached(work: Path, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage unless its result is already in ``work`` (resuming a long run)."""
    path = work / f"{name}.json"
    if path.is_file():
        print(f"[{name}] cached: {path}")
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    result["seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=2))
    print(f"[{name}] {result['seconds']} s: {json.dumps(result.get('metrics', {}))}")
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| system | " + " | ".join(KEYS) + " |"
    lines = [header, "|" + "---|" * (len(KEYS) + 1)]
    for row in rows:
        cells = [f"{row[k]:.4f}" if row.get(k) is not None else "n/a" for k in KEYS]
        lines.append(f"| {row['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:

    from recsys.families.search import baselines, pipeline
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.evaluation import evaluate_encoder
    from recsys.families.search.training import TrainingParams, fine_tune

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/homedepot/train.csv")
    parser.add_argument("--work", default=".bench_work/quality")
    parser.add_argument("--fresh", action="store_true", help="ignore cached stages")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--reranker-max-steps", type=int, default=300)
    parser.add_argument("--reranker-batch-size", type=int, default=32)
    parser.add_argument("--rerank-candidates", type=int, default=20)
    parser.add_argument("--positive-threshold", type=float, default=2.33)
    parser.add_argument("--no-reranker", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "quality_table.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.work).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    threshold = args.positive_threshold

    data = cached(
        work,
        "data",
        lambda: pipeline.validate_data(args.data, work) | {"path": str(Path(args.data))},
    )
    split = cached(work, "split", lambda: pipeline.split_data(data["clean_path"], work, 0.2, 13))

    train, test, catalog = (
        pipeline.read_split_frame(split[f"{n}_path"]) for n in ("train", "test", "catalog")
    )
    base_dir = resolve_base_model("minilm")

    def metrics_of(result) -> dict[str, Any]:
        return {"metrics": result.metrics, "queries": result.queries, "products": result.products}

    rows: dict[str, dict[str, Any]] = {}
    rows["BM25 (bm25s)"] = cached(
        work,
        "bm25",
        lambda: metrics_of(baselines.evaluate_bm25(test, catalog, positive_threshold=threshold)),
    )
    rows["all-MiniLM-L6-v2, off the shelf"] = cached(
        work,
        "base_model",
        lambda: metrics_of(evaluate_encoder(base_dir, test, catalog, positive_threshold=threshold)),
    )

    checkpoint = work / "bi_encoder"
    params = TrainingParams(
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        positive_threshold=threshold,
    )

    def train_bi_encoder() -> dict[str, Any]:
        result = fine_tune(train, base_dir, checkpoint, params)
        return {
            "params": params.to_dict(),
            "steps": result.steps,
            "pairs_seen": result.steps * args.batch_size,
            "positive_pairs": result.pairs,
            "samples_per_second": result.samples_per_second,
            "epoch_losses": result.epoch_losses,
            "device": result.device,
        }

    training = cached(work, "train_bi_encoder", train_bi_encoder)
    fine_tuned_label = f"MiniLM fine-tuned bi-encoder ({training['pairs_seen']} pairs)"
    rows[fine_tuned_label] = cached(
        work,
        "fine_tuned",
        lambda: metrics_of(
            evaluate_encoder(checkpoint, test, catalog, positive_threshold=threshold)
        ),
    )

    reranker_training = None
    if not args.no_reranker:
        from recsys.families.search import reranker
        from recsys.families.search.evaluation import torch_embedder

        rerank_dir = work / "cross_encoder"
        rerank_params = reranker.RerankerParams(
            batch_size=args.reranker_batch_size,
            max_steps=args.reranker_max_steps,
            candidates=args.rerank_candidates,
            positive_threshold=threshold,
        )

        def train_reranker() -> dict[str, Any]:
            result = reranker.fine_tune_reranker(train, base_dir, rerank_dir, rerank_params)
            return {
                "params": rerank_params.to_dict(),
                "steps": result.steps,
                "pairs_seen": result.steps * args.reranker_batch_size,
                "samples_per_second": result.samples_per_second,
                "epoch_losses": result.epoch_losses,
                "device": result.device,
            }

        reranker_training = cached(work, "train_reranker", train_reranker)
        rows[f"fine-tuned bi-encoder + cross-encoder reranker (top {args.rerank_candidates})"] = (
            cached(
                work,
                "reranked",
                lambda: metrics_of(
                    reranker.evaluate_reranked(
                        torch_embedder(checkpoint),
                        reranker.torch_pair_scorer(rerank_dir),
                        test,
                        catalog,
                        candidates=args.rerank_candidates,
                        positive_threshold=threshold,
                    )
                ),
            )
        )

    import onnxruntime
    import torch

    table = [{"system": name, **row["metrics"]} for name, row in rows.items()]
    summary = {
        "benchmark": "quality_table",
        "command": " ".join(["python", *sys.argv]),
        "data": {
            "path": data["path"],
            "rows": data["rows"],
            "clean_rows": int(len(train) + len(test)),
            "data_hash": data["data_hash"],
            "train_queries": split["train_queries"],
            "test_queries": split["test_queries"],
            "catalog_products": len(catalog),
            "positive_threshold": threshold,
        },
        "bi_encoder_training": training,
        "reranker_training": reranker_training,
        "table": table,
        "stage_seconds": {name: row.get("seconds") for name, row in rows.items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
