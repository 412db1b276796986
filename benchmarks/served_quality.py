"""Benchmark: the quality of the search system a training profile would SERVE.

Runs the search pipeline's own task functions in the DAG's order with a profile's params
(``recsys.families.search.profiles``, resolved against the DAG's declared defaults exactly as
the DAG resolves them): GX gate, split by query (seed 13), bi-encoder fine-tuning, BM25 tuning
on the training queries, export (hybrid when the profile says so), hard-negative mining with
the run's bi-encoder, cross-encoder fine-tuning, the reranker model's export, and then scores
both served folders with the champion gate's own code
(``promotion.evaluate_serving_artifacts``: the folder's ONNX graphs, tokenizer, BM25 index and
``hybrid.py``) on the held-out queries. What the pipeline would serve is the reranker model when
it beats the bi-encoder alone on those queries (the reranker gate's rule), else the bi-encoder.

MLflow logging and Triton are left out (they do not change a metric); training wall time per
stage is recorded. Stages are cached under ``--work`` so an interrupted run resumes.

    python benchmarks/served_quality.py --profile cpu          # about an hour on 2 cores

Writes ``served`` (and ``served_<profile>``) into ``benchmarks/results/quality_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.quality_table import cached  # noqa: E402  (one stage cache for both benchmarks)


def dag_params(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The search DAG's params for ``profile``, resolved as the DAG's tasks resolve them."""
    import importlib.util

    from recsys.families.search.profiles import apply_profile

    spec = importlib.util.spec_from_file_location(
        "search_dag_for_benchmark", ROOT / "dags" / "search_model_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.search_model_pipeline()  # the @dag function builds the DAG object
    declared = {key: dag.params[key] for key in dag.params}
    return apply_profile({**declared, **overrides, "profile": profile}, declared)


def trained_summary(result: Any) -> dict[str, Any]:
    """What a cached training stage keeps of a ``TrainingResult``."""
    return {
        "checkpoint": str(result.checkpoint_dir),
        "steps": result.steps,
        "samples_per_second": result.samples_per_second,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=["cpu", "gpu", "custom"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/homedepot/train.csv"))
    parser.add_argument("--work", default=None, help="default: .bench_work/served_<profile>")
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--max-rows", type=int, default=0, help="smoke runs only (0 = all)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PARAM=JSON", help="override a DAG param"
    )
    parser.add_argument("--out", default=str(RESULTS / "quality_table.json"))
    args = parser.parse_args()

    from recsys.families.search import pipeline, pipeline_reranker
    from recsys.families.search.evaluation import calibration_sample
    from recsys.families.search.export import add_reranker, copy_fp32_artifacts
    from recsys.families.search.promotion import evaluate_serving_artifacts
    from recsys.families.search.reranker import RerankerParams
    from recsys.families.search.training import TrainingParams

    overrides = {"base_model": args.base_model, "max_rows": args.max_rows}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    params = dag_params(args.profile, overrides)
    work = Path(args.work or ROOT / ".bench_work" / f"served_{args.profile}").resolve()
    work.mkdir(parents=True, exist_ok=True)

    validated = cached(
        work, "validate", lambda: pipeline.validate_data(args.data, work, args.max_rows)
    )
    split = cached(
        work,
        "split",
        lambda: pipeline.split_data(
            validated["clean_path"], work, params["test_fraction"], params["seed"]
        ),
    )

    def train_bi_encoder() -> dict[str, Any]:
        from recsys.families.search.encoder import resolve_base_model
        from recsys.families.search.training import fine_tune

        training = TrainingParams(**{k: params[k] for k in TrainingParams.__dataclass_fields__})
        result = fine_tune(
            pipeline.read_split_frame(split["train_path"]),
            resolve_base_model(params["base_model"]),
            work / "bi_encoder",
            training,
        )
        return trained_summary(result)

    trained = cached(work, "train_bi_encoder", train_bi_encoder)

    def tune_bm25() -> dict[str, Any]:
        from recsys.families.search.baselines import tune_bm25 as tune
        from recsys.families.search.hybrid import LexicalConfig

        if not params["tune_bm25"]:
            return {"lexical": LexicalConfig().to_dict()}
        config, grid = tune(
            pipeline.read_split_frame(split["train_path"]),
            pipeline.read_split_frame(split["catalog_path"]),
            positive_threshold=params["positive_threshold"],
        )
        return {"lexical": config.to_dict(), "grid": grid}

    lexical = cached(work, "tune_bm25", tune_bm25)
    fusion = pipeline.fusion_settings(params)
    exported = cached(
        work,
        "export",
        lambda: pipeline.export_model(
            split,
            trained["checkpoint"],
            work,
            "product_search",
            None,
            precision=params["precision"],
            max_ndcg_drop=params["max_ndcg_drop"],
            positive_threshold=params["positive_threshold"],
            retrieval=params["retrieval"],
            lexical=lexical["lexical"],
            fusion=fusion,
        ),
    )
    systems: dict[str, dict[str, Any]] = {}
    test = pipeline.read_split_frame(split["test_path"])
    catalog = pipeline.read_split_frame(split["catalog_path"])

    def score(folder: str) -> dict[str, Any]:
        result = evaluate_serving_artifacts(
            Path(folder),
            test,
            catalog,
            positive_threshold=params["positive_threshold"],
            calibration_frame=calibration_sample(pipeline.read_split_frame(split["train_path"])),
        )
        return {"metrics": result.metrics, "queries": result.queries, "products": result.products}

    systems["bi_encoder"] = cached(
        work, "score_bi_encoder", lambda: score(exported["artifacts_dir"])
    )
    if params["train_reranker"]:
        negatives = cached(
            work,
            "mine_hard_negatives",
            lambda: pipeline.mine_negatives(
                split,
                trained["checkpoint"],
                work,
                pipeline.mining_settings(params),
            ),
        )

        def train_reranker() -> dict[str, Any]:
            from recsys.families.search.encoder import resolve_base_model
            from recsys.families.search.hard_negatives import read_negatives
            from recsys.families.search.reranker import fine_tune_reranker

            reranker_params = RerankerParams(**pipeline_reranker.reranker_params(params))
            extra = read_negatives(Path(negatives["path"])) if negatives["count"] else []
            result = fine_tune_reranker(
                pipeline.read_split_frame(split["train_path"]),
                resolve_base_model(params["base_model"]),
                work / "reranker",
                reranker_params,
                extra_negatives=extra,
            )
            return trained_summary(result)

        reranker = cached(work, "train_reranker", train_reranker)

        def export_reranker() -> dict[str, Any]:
            folder = copy_fp32_artifacts(
                Path(exported["artifacts_dir"]),
                work / "serving_reranker",
                model_name="product_search_reranker",
            )
            add_reranker(
                folder,
                Path(reranker["checkpoint"]),
                catalog,
                candidates=params["rerank_candidates"],
                max_length=params["reranker_max_length"],
            )
            return {"artifacts_dir": str(folder)}

        reranker_folder = cached(work, "export_reranker", export_reranker)
        systems["reranker"] = cached(
            work, "score_reranker", lambda: score(reranker_folder["artifacts_dir"])
        )

    metric = "ndcg_at_10"
    chosen = "bi_encoder"
    if "reranker" in systems and (
        systems["reranker"]["metrics"][metric] > systems["bi_encoder"]["metrics"][metric]
    ):
        chosen = "reranker"
    training_seconds = trained["seconds"] + (reranker["seconds"] if params["train_reranker"] else 0)
    served = {
        "profile": args.profile,
        "system": chosen,
        "retrieval": params["retrieval"],
        "metrics": systems[chosen]["metrics"],
        "systems": {name: value["metrics"] for name, value in systems.items()},
        "training_seconds": round(training_seconds, 1),
        "params": {k: v for k, v in params.items() if not isinstance(v, dict)},
        "lexical": lexical["lexical"],
        "queries": systems[chosen]["queries"],
        "products": systems[chosen]["products"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python benchmarks/served_quality.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if not args.max_rows:  # a smoke run never overwrites the published numbers
        results[f"served_{args.profile}"] = served
        results["served"] = served
        out.write_text(json.dumps(results, indent=2, default=str))
    print(
        json.dumps(
            {k: served[k] for k in ("profile", "system", "metrics", "training_seconds")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
