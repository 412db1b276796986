"""Benchmark: recommendation quality on the full Amazon Grocery data, system by system.

Popularity, item-kNN, BPR-MF and SASRec are fitted on the train part of the time-ordered
leave-one-out split (:mod:`recsys.families.recommend.split`) and scored by the same code on
the same cases: the sampled protocol (the held-out item among 99 seeded negatives, HR/NDCG@5
and @10, ReChorus' protocol) and full ranking (Recall/NDCG@20 over every item not interacted
with before). SASRec scores the test stage from the train sequence plus the validation item
(the baselines are fitted on train only, as in the groundwork). ``--gate DIR`` sends the
interactions through the family's quality gate first, as a pipeline run would (the Amazon
export passes it whole).

    python benchmarks/recommend_quality.py --data ../shared/data/amazon_grocery/train.csv \\
        --threads 1 --sasrec-epochs 60

Writes ``benchmarks/results/recommend_quality.json``: the command, parameters, timings and
metrics of every system.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data/amazon_grocery/train.csv")
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "recommend_quality.json")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of BPR and SASRec")
    parser.add_argument("--negatives-seed", type=int, default=2024)
    parser.add_argument("--bpr-epochs", type=int, default=20)
    parser.add_argument("--sasrec-epochs", type=int, default=60)
    parser.add_argument(
        "--gate",
        type=Path,
        default=None,
        help="run the quality gate first, writing its report to this folder (default: off)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from recsys.families.recommend.baselines import BPR, ItemKNN, Popularity, RandomScorer
    from recsys.families.recommend.data import read_interactions
    from recsys.families.recommend.evaluate import (
        build_cases,
        evaluate_full,
        evaluate_sampled,
        sample_negatives,
    )
    from recsys.families.recommend.sasrec import SASRec, SASRecParams
    from recsys.families.recommend.split import leave_one_out

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    frame = read_interactions(args.data)
    if args.gate is not None:
        from recsys.families.recommend.suite import validate_interactions

        frame = validate_interactions(frame, args.gate).clean
    split = leave_one_out(frame)
    train = split.train_matrix()
    stages = {stage: build_cases(split, stage) for stage in ("validation", "test")}
    negatives = {
        stage: sample_negatives(cases, seed=args.negatives_seed) for stage, cases in stages.items()
    }
    prepared = time.perf_counter() - started
    print(f"data: {split.n_users} users, {split.n_items} items, {prepared:.1f} s")

    def evaluate(scorer, stage: str = "test") -> dict[str, float]:
        metrics = evaluate_sampled(scorer, stages[stage], negatives[stage])
        full = evaluate_full(scorer, stages[stage])
        metrics.update({k: v for k, v in full.items() if k.startswith(("Recall", "NDCG@20"))})
        return {k: round(v, 4) for k, v in metrics.items()}

    systems: dict[str, dict[str, Any]] = {}

    def record(name: str, fit, params: dict[str, Any], scorer_of) -> None:
        begun = time.perf_counter()
        fitted = fit()
        fit_seconds = time.perf_counter() - begun
        begun = time.perf_counter()
        metrics = {"test": evaluate(scorer_of(fitted, "test"))}
        if isinstance(fitted, SASRec):
            metrics["validation"] = evaluate(scorer_of(fitted, "validation"), "validation")
        systems[name] = {
            "params": params,
            "fit_seconds": round(fit_seconds, 1),
            "eval_seconds": round(time.perf_counter() - begun, 1),
            "metrics": metrics,
        }
        print(f"[{name}] fit {fit_seconds:.1f} s: {json.dumps(metrics['test'])}", flush=True)

    record("random", lambda: RandomScorer(split.n_items), {"seed": 0}, lambda m, _: m)
    record("popularity", lambda: Popularity().fit(train), {}, lambda m, _: m)
    record("itemknn", lambda: ItemKNN().fit(train), {"neighbours": None}, lambda m, _: m)
    bpr = BPR(epochs=args.bpr_epochs, seed=args.seed)
    bpr_params = {k: getattr(bpr, k) for k in ("dim", "epochs", "lr", "reg", "batch_size", "seed")}
    record("bpr", lambda: bpr.fit(train), bpr_params, lambda m, _: m)
    sasrec_params = SASRecParams(epochs=args.sasrec_epochs, seed=args.seed)
    sasrec = SASRec(sasrec_params)
    record("sasrec", lambda: sasrec.fit(split), asdict(sasrec_params), lambda m, s: m.scorer(s))
    systems["sasrec"]["loss_history"] = [round(x, 4) for x in sasrec.loss_history]
    systems["sasrec"]["device"] = str(sasrec.device)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": str(args.data),
        "n_users": split.n_users,
        "n_items": split.n_items,
        "n_train_rows": len(split.train),
        "n_cases": len(stages["test"]),
        "negatives_seed": args.negatives_seed,
        "quality_gate": args.gate is not None,
        "torch_threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "prepare_seconds": round(prepared, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "systems": systems,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
