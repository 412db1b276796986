"""Benchmark: search quality on the full Home Depot data, system by system.

BM25 (untuned, and stemmed with k1/b tuned on the training queries), off-the-shelf
all-MiniLM-L6-v2, MiniLM fine-tuned as a bi-encoder (the pipeline's own training loop) and
fine-tuned bi-encoder + cross-encoder reranker, all scored by the same ranx code on the same
held-out queries (split by query, the pipeline's default 80/20 split, seed 13) ranking the whole
catalogue of every product in the data. The data goes through the pipeline's GX gate first,
exactly as a DAG run would.

Precision/recall/F1/accuracy of the held-out judged pairs use a score threshold chosen per model
on a seeded sample of TRAINING pairs (the F1-best cut, :func:`.calibration.choose_threshold`),
never 0.5, and the table has the majority-class constant classifier's row beside them: the
judged pairs are ~68% relevant, so "always relevant" already has F1 ~0.81.

Stages cache their results under ``--work`` so a long CPU run can be resumed; ``--fresh``
starts over. Training is bounded by ``--max-steps`` (0 = one full epoch): on the 2-core CI
machine one epoch over the ~47k positive pairs takes hours, so the README says how many pairs
each model saw.

    python benchmarks/quality_table.py --data ../shared/data/homedepot/train.csv \\
        --max-steps 300 --batch-size 64 --reranker-max-steps 300
    python benchmarks/quality_table.py --bm25-only     # BM25 rows + majority baseline, ~3 min
    python benchmarks/quality_table.py --smoke         # every stage on the test fixture, ~1 min
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_DATA = ROOT / "tests" / "fixtures" / "homedepot_sample.csv"
KEYS = (
    "ndcg_at_10",
    "mrr",
    "recall_at_10",
    "recall_at_100",
    "precision",
    "recall",
    "f1",
    "accuracy",
    "score_threshold",
)
SMOKE_GRID = {"stemmer": ("english", None), "k1": (0.6, 1.2), "b": (0.5, 0.75)}


def cached(work: Path, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage unless its result is already in ``work`` (resuming a long run)."""
    path = work / f"{name}.json"
    if path.is_file():
        print(f"[{name}] cached: {path}")
        return json.loads(path.read_text())
    print(f"[{name}] started", flush=True)  # stages take minutes: say which one runs
    started = time.perf_counter()
    result = compute()
    result["seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"[{name}] {result['seconds']} s: {json.dumps(result.get('metrics', {}))}", flush=True)
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| system | " + " | ".join(KEYS) + " |"
    lines = [header, "|" + "---|" * (len(KEYS) + 1)]
    for row in rows:
        cells = [f"{row[k]:.4f}" if row.get(k) is not None else "n/a" for k in KEYS]
        lines.append(f"| {row['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/homedepot/train.csv")
    parser.add_argument(
        "--work", default=None, help="stage cache (default .bench_work/quality[_smoke])"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore cached stages")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--reranker-max-steps", type=int, default=300)
    parser.add_argument("--reranker-batch-size", type=int, default=32)
    parser.add_argument("--rerank-candidates", type=int, default=20)
    parser.add_argument("--positive-threshold", type=float, default=2.33)
    parser.add_argument("--no-reranker", action="store_true")
    parser.add_argument(
        "--tune-queries",
        type=int,
        default=1000,
        help="training queries BM25's k1/b/stemmer are tuned on (seeded sample; 0 = all)",
    )
    parser.add_argument(
        "--calibration-pairs",
        type=int,
        default=10000,
        help="training pairs each model's score threshold is chosen on (seeded sample; 0 = all)",
    )
    parser.add_argument(
        "--bm25-only",
        action="store_true",
        help="only the BM25 rows and the majority baseline (no model is trained or embedded)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage on the test fixture with 2 training steps and a small BM25 grid",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON (default benchmarks/results/quality_table.json; "
        "with --smoke or --bm25-only, <work>/quality_table.json)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.data = str(SMOKE_DATA)
        args.max_steps = args.reranker_max_steps = 2
        args.batch_size = args.reranker_batch_size = 8
    if args.work is None:
        args.work = ".bench_work/quality_smoke" if args.smoke else ".bench_work/quality"
    if args.out is None:
        partial = args.smoke or args.bm25_only
        out = Path(args.work) / "quality_table.json" if partial else RESULTS / "quality_table.json"
        args.out = str(out)
    return args


@dataclass
class Bench:
    """What every stage reads: the gated data, its split and the stage cache."""

    args: argparse.Namespace
    work: Path
    data: dict[str, Any]
    split: dict[str, Any]
    train: Any
    test: Any
    catalog: Any

    @property
    def threshold(self) -> float:
        return self.args.positive_threshold


def prepare(args: argparse.Namespace) -> Bench:
    """Gate the data through GX and split it by query, as the pipeline's first two tasks do."""
    from recsys.families.search import pipeline

    work = Path(args.work).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    data = cached(
        work,
        "data",
        lambda: pipeline.validate_data(args.data, work) | {"path": str(Path(args.data))},
    )
    split = cached(work, "split", lambda: pipeline.split_data(data["clean_path"], work, 0.2, 13))
    train, test, catalog = (
        pipeline.read_split_frame(split[f"{n}_path"]) for n in ("train", "test", "catalog")
    )
    return Bench(args, work, data, split, train, test, catalog)


def metrics_of(result: Any) -> dict[str, Any]:
    return {"metrics": result.metrics, "queries": result.queries, "products": result.products}


def bm25_section(bench: Bench) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The untuned BM25 row, the tuning on the training queries and the tuned BM25 row."""
    from recsys.families.search import baselines
    from recsys.families.search.hybrid import LexicalConfig

    args, threshold = bench.args, bench.threshold
    grid = SMOKE_GRID if args.smoke else baselines.BM25_GRID

    def tune() -> dict[str, Any]:
        chosen, results = baselines.tune_bm25(
            bench.train,
            bench.catalog,
            grid=grid,
            max_queries=args.tune_queries,
            positive_threshold=threshold,
            progress=print,
        )
        queries = baselines.sample_queries(bench.train, args.tune_queries)
        return {
            "chosen": chosen.to_dict(),
            "metric": "ndcg_at_10",
            "training_queries": int(queries["search_term"].nunique()),
            "grid": {k: list(v) for k, v in grid.items()},
            "results": results,
        }

    untuned = baselines.UNTUNED_BM25
    tuning = cached(bench.work, "bm25_tuning", tune)
    tuned = LexicalConfig.from_dict(tuning["chosen"])

    def bm25_row(config: LexicalConfig) -> dict[str, Any]:
        result = baselines.evaluate_bm25(
            bench.test, bench.catalog, positive_threshold=threshold, config=config
        )
        return metrics_of(result) | {"config": config.to_dict()}

    def describe(config: LexicalConfig) -> str:
        return f"k1={config.k1}, b={config.b}, stemmer={config.stemmer or 'none'}"

    rows = {
        f"BM25 untuned (bm25s defaults: {describe(untuned)})": cached(
            bench.work, "bm25_untuned", lambda: bm25_row(untuned)
        ),
        f"BM25 tuned on {tuning['training_queries']} training queries ({describe(tuned)})": (
            cached(bench.work, "bm25_tuned", lambda: bm25_row(tuned))
        ),
    }
    return rows, tuning


def majority_row(bench: Bench) -> dict[str, Any]:
    """The majority-class constant classifier on the held-out pairs (no ranking metrics)."""
    from recsys.families.search.calibration import CLASSIFICATION_KEYS, majority_baseline

    baseline = majority_baseline(bench.test["relevance"].to_numpy(), bench.threshold)
    label = "relevant" if baseline["majority_relevant"] else "irrelevant"
    metrics = {k: baseline[f"majority_{k}"] for k in CLASSIFICATION_KEYS}
    return {
        "system": f"majority class, constant '{label}' ({baseline['positive_rate']:.1%} relevant)",
        "baseline": baseline,
        "metrics": metrics,
    }


def training_pairs(bench: Bench) -> Any:
    """A seeded sample of at most ``--calibration-pairs`` training pairs (0 = all)."""
    size = bench.args.calibration_pairs
    if not size or size >= len(bench.train):
        return bench.train
    return bench.train.sample(n=size, random_state=13)


def memoized(embed: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """An embedder that embeds each distinct text once: the catalogue embedded for ranking
    also serves the calibration pairs' titles."""
    cache: dict[str, np.ndarray] = {}

    def run(texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            cache.update(zip(missing, embed(missing), strict=True))
        if not texts:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([cache[t] for t in texts])

    return run


def encoder_threshold(embed: Callable[[list[str]], np.ndarray], bench: Bench) -> float:
    """The F1-best cosine threshold of an encoder on the training pairs."""
    from recsys.families.search.calibration import choose_threshold

    pairs = training_pairs(bench)
    queries = embed(pairs["search_term"].astype(str).tolist())
    titles = embed(pairs["product_title"].astype(str).tolist())
    scores = np.einsum("ij,ij->i", queries, titles)
    return choose_threshold(pairs["relevance"].to_numpy(), scores, bench.threshold)


def reranker_threshold(score_pairs: Callable[..., np.ndarray], bench: Bench) -> float:
    """The F1-best sigmoid threshold of a cross-encoder on the training pairs."""
    from recsys.families.search.calibration import choose_threshold

    pairs = training_pairs(bench)
    logits = np.asarray(
        score_pairs(
            pairs["search_term"].astype(str).tolist(), pairs["product_title"].astype(str).tolist()
        ),
        dtype=np.float64,
    )
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    return choose_threshold(pairs["relevance"].to_numpy(), probabilities, bench.threshold)


def model_section(
    bench: Bench,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """Off-the-shelf MiniLM, the fine-tuned bi-encoder and the reranked rows, each with its
    own score threshold chosen on training pairs; and both training records."""
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.evaluation import evaluate_embeddings, torch_embedder
    from recsys.families.search.training import TrainingParams, fine_tune

    args, threshold, work = bench.args, bench.threshold, bench.work
    base_dir = resolve_base_model("minilm")

    def calibrated_encoder(model_dir: Path, embed_cache: dict[str, Any]) -> dict[str, Any]:
        embed = embed_cache.setdefault("embed", memoized(torch_embedder(model_dir, max_length=64)))
        score_threshold = encoder_threshold(embed, bench)
        result = evaluate_embeddings(
            embed,
            bench.test,
            bench.catalog,
            positive_threshold=threshold,
            score_threshold=score_threshold,
        )
        return metrics_of(result)

    rows: dict[str, dict[str, Any]] = {}
    rows["all-MiniLM-L6-v2, off the shelf"] = cached(
        work, "base_model_calibrated", lambda: calibrated_encoder(base_dir, {})
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
        result = fine_tune(bench.train, base_dir, checkpoint, params)
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
    fine_tuned_embed: dict[str, Any] = {}
    rows[f"MiniLM fine-tuned bi-encoder ({training['pairs_seen']} pairs)"] = cached(
        work, "fine_tuned_calibrated", lambda: calibrated_encoder(checkpoint, fine_tuned_embed)
    )

    reranker_training = None
    if not args.no_reranker:
        from recsys.families.search import reranker

        rerank_dir = work / "cross_encoder"
        rerank_params = reranker.RerankerParams(
            batch_size=args.reranker_batch_size,
            max_steps=args.reranker_max_steps,
            candidates=args.rerank_candidates,
            positive_threshold=threshold,
        )

        def train_reranker() -> dict[str, Any]:
            result = reranker.fine_tune_reranker(bench.train, base_dir, rerank_dir, rerank_params)
            return {
                "params": rerank_params.to_dict(),
                "steps": result.steps,
                "pairs_seen": result.steps * args.reranker_batch_size,
                "samples_per_second": result.samples_per_second,
                "epoch_losses": result.epoch_losses,
                "device": result.device,
            }

        def reranked() -> dict[str, Any]:
            score_pairs = reranker.torch_pair_scorer(rerank_dir)
            embed = fine_tuned_embed.setdefault(
                "embed", memoized(torch_embedder(checkpoint, max_length=64))
            )
            result = reranker.evaluate_reranked(
                embed,
                score_pairs,
                bench.test,
                bench.catalog,
                candidates=args.rerank_candidates,
                positive_threshold=threshold,
                score_threshold=reranker_threshold(score_pairs, bench),
            )
            return metrics_of(result)

        reranker_training = cached(work, "train_reranker", train_reranker)
        label = f"fine-tuned bi-encoder + cross-encoder reranker (top {args.rerank_candidates})"
        rows[label] = cached(work, "reranked_calibrated", reranked)
    return rows, training, reranker_training


def build_results(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) every stage and return the results document ``main`` writes.

    Sections: ``data``, ``bm25_tuning``, ``calibration``, ``bi_encoder_training``,
    ``reranker_training``, ``table`` (one row per system, plus the majority-class row) and
    ``machine``. Hook: a further section (e.g. ``served``: the exported version folder scored
    as it serves) is a ``summary[...] = ...`` before the return, reusing ``bench``."""
    bench = prepare(args)
    rows, tuning = bm25_section(bench)
    training = reranker_training = None
    if not args.bm25_only:
        model_rows, training, reranker_training = model_section(bench)
        rows.update(model_rows)
    majority = majority_row(bench)

    table = [{"system": name, **row["metrics"]} for name, row in rows.items()]
    table.append({"system": majority["system"], **majority["metrics"]})
    thresholds = {
        name: row["metrics"]["score_threshold"]
        for name, row in rows.items()
        if "score_threshold" in row["metrics"]
    }
    summary: dict[str, Any] = {
        "benchmark": "quality_table",
        "command": " ".join(["python", *sys.argv]),
        "data": {
            "path": bench.data["path"],
            "rows": bench.data["rows"],
            "clean_rows": int(len(bench.train) + len(bench.test)),
            "data_hash": bench.data["data_hash"],
            "train_queries": bench.split["train_queries"],
            "test_queries": bench.split["test_queries"],
            "catalog_products": len(bench.catalog),
            "positive_threshold": bench.threshold,
        },
        "bm25_tuning": tuning,
        "calibration": {
            "criterion": "f1",
            "training_pairs": None if args.bm25_only else len(training_pairs(bench)),
            "score_thresholds": thresholds,
            "majority_baseline": majority["baseline"],
        },
        "bi_encoder_training": training,
        "reranker_training": reranker_training,
        "table": table,
        "stage_seconds": {name: row.get("seconds") for name, row in rows.items()}
        | {"bm25_tuning": tuning.get("seconds")},
        "machine": machine(),
    }
    return summary


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import bm25s  # noqa: F401  (sets its logger to DEBUG on import: one line per index build)

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    summary = build_results(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text(markdown_table(summary["table"]) + "\n")
    print(markdown_table(summary["table"]))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
