"""Benchmark: bi-encoder fine-tuning throughput (samples/s) on CPU and, where present, GPU.

Uses the packaged all-MiniLM-L6-v2 when installed (``--base-model minilm``); otherwise, or with
``--base-model minilm-shaped``, a randomly initialised BERT of MiniLM's exact shape (6 layers,
hidden 384, 12 heads) with a vocabulary trained on the data, which costs the same compute. The
training loop is the pipeline's own (``recsys.families.search.training.fine_tune``), mixed
precision on GPU.

    python benchmarks/train_throughput.py --data ../shared/data/homedepot/train.csv --steps 50
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def minilm_shaped(target: Path, corpus: list[str]) -> Path:
    from recsys.families.search.tiny_model import build_tiny_bert

    return build_tiny_bert(
        target, corpus, vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12
    )


def main() -> int:
    import pandas as pd
    import torch

    from recsys.data import read_relevance_csv
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.training import TrainingParams, fine_tune

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    frame = read_relevance_csv(args.data).head(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.base_model == "minilm-shaped":
                raise FileNotFoundError
            base = resolve_base_model(args.base_model)
            model_label = args.base_model
        except (FileNotFoundError, ImportError):
            corpus = frame["product_title"].tolist() + frame["search_term"].tolist()
            base = minilm_shaped(Path(tmp) / "base", corpus)
            model_label = "minilm-shaped (random init)"
        params = TrainingParams(epochs=100, batch_size=args.batch_size, max_steps=args.steps)
        started = time.perf_counter()
        result = fine_tune(frame, base, Path(tmp) / "out", params)
        wall = time.perf_counter() - started
    device_name = torch.cuda.get_device_name(0) if result.device == "cuda" else platform.processor()
    record = {
        "benchmark": "train_throughput",
        "model": model_label,
        "device": result.device,
        "device_name": device_name or platform.machine(),
        "mixed_precision": result.mixed_precision,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "steps": result.steps,
        "samples_per_second": round(result.samples_per_second, 1),
        "train_seconds": round(result.seconds, 2),
        "wall_seconds_incl_load": round(wall, 2),
        "first_loss": round(result.step_losses[0], 4),
        "last_loss": round(result.step_losses[-1], 4),
        "cpu_threads": torch.get_num_threads(),
        "rows": len(pd.DataFrame(frame)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_throughput_{result.device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
