"""Benchmark: bi-encoder fine-tuning throughput (samples/s) and model FLOP utilisation (MFU).

Uses the packaged all-MiniLM-L6-v2 when installed (``--base-model minilm``); otherwise, or with
``--base-model minilm-shaped``, a randomly initialised BERT of MiniLM's exact shape (6 layers,
hidden 384, 12 heads) with a vocabulary trained on the data, which costs the same compute. The
training loop is the pipeline's own (``recsys.families.search.training.fine_tune``): the
training set tokenised once, length-bucketed batches, and on CUDA pinned non-blocking copies
and bf16 autocast; ``--compile`` adds ``torch.compile``.

    python benchmarks/train_throughput.py --data ../shared/data/homedepot/train.csv --steps 50
    python benchmarks/train_throughput.py --data ... --device cuda --batch-size 512 --steps 200

MFU. Training a transformer costs about 6 FLOPs per parameter per token (2 forward, 4
backward), so the model FLOPs of the timed loop are ``6 x N x T`` where ``N`` counts the
parameters that multiply (all but the embedding tables: a lookup costs no FLOPs) and ``T`` the
real, non-padding tokens of every query and title the loop encoded. ``mfu`` divides those FLOPs
per second by the device's dense bf16 peak (``PEAK_FLOPS``, or ``--peak-flops``); attention's
own ``O(length^2)`` FLOPs are left out (small at ~10-30 tokens). ``mfu_padded`` counts padded
tokens instead (the work the hardware actually ran); the gap between the two is what padding
wastes. On a CPU ``mfu`` is null unless ``--peak-flops`` is given.

``--repeats N`` times the run N times and reports the fastest (on a shared machine other jobs
only ever slow a run down); every run's samples/s is listed. Results go to
``benchmarks/results/train_throughput_cpu.json`` on the CPU and
``train_throughput_<device>_bs<batch>.json`` elsewhere (``--output`` overrides). A number
measured with the previous loop can be recorded beside the new one with
``--baseline-samples-per-second`` and ``--baseline-note``.
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

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}
"""Dense bf16 peak FLOP/s by device-name substring (no sparsity), first match wins."""

FLOPS_FORMULA = (
    "model FLOPs = 6 x non-embedding parameters x non-padding tokens (queries + titles) of the "
    "timed loop; mfu = model FLOPs / train_seconds / peak_flops; mfu_padded uses padded tokens; "
    "attention's length^2 term is ignored"
)


def minilm_shaped(target: Path, corpus: list[str]) -> Path:
    from recsys.families.search.tiny_model import build_tiny_bert

    return build_tiny_bert(
        target, corpus, vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12
    )


def parameter_counts(base: Path) -> tuple[int, int]:
    """(all parameters, parameters outside embedding tables) of the encoder in ``base``."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(base))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    )
    return total, total - embedding


def peak_flops(device_name: str, override: float | None) -> float | None:
    """``override``, else the table's entry for ``device_name``; None when unknown (CPUs)."""
    if override:
        return override
    return next((peak for key, peak in PEAK_FLOPS.items() if key in device_name), None)


def main() -> int:
    import torch

    from recsys.data import read_relevance_csv
    from recsys.families.search.encoder import resolve_base_model
    from recsys.families.search.training import TrainingParams, fine_tune, pick_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=TrainingParams.max_length)
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=-1,
        help="untimed steps run first (CUDA init, compilation); -1 = 10 on CUDA or with "
        "--compile, else 0",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs; the fastest is reported (others' load on a shared machine only ever "
        "slows a run down), all are listed",
    )
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU")
    parser.add_argument("--baseline-samples-per-second", type=float)
    parser.add_argument("--baseline-note", default="")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--output", help="result file (default: see the module docstring)")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    warmup = args.warmup_steps
    if warmup < 0:
        warmup = 10 if device.type == "cuda" or args.compile else 0

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
        params_total, params_matmul = parameter_counts(base)
        params = TrainingParams(
            epochs=100,
            batch_size=args.batch_size,
            max_steps=args.steps,
            max_length=args.max_length,
            compile=args.compile,
        )
        if warmup:
            warm = TrainingParams(**{**params.to_dict(), "max_steps": warmup})
            fine_tune(frame, base, Path(tmp) / "warmup", warm, device=device)
        runs = []
        for repeat in range(max(1, args.repeats)):
            started = time.perf_counter()
            run = fine_tune(frame, base, Path(tmp) / f"out{repeat}", params, device=device)
            runs.append((run, time.perf_counter() - started))
        result, wall = max(runs, key=lambda item: item[0].samples_per_second)

    if result.device == "cuda":
        device_name = torch.cuda.get_device_name(0)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        device_name = platform.processor() or platform.machine()
        precision = "fp32"
    peak = peak_flops(device_name, args.peak_flops)
    seconds = result.seconds
    model_flops = 6 * params_matmul * result.tokens
    padded_flops = 6 * params_matmul * result.padded_tokens

    def utilisation(flops: float) -> float | None:
        return round(flops / seconds / peak, 4) if peak and seconds > 0 else None

    record = {
        "benchmark": "train_throughput",
        "model": model_label,
        "device": result.device,
        "device_name": device_name,
        "precision": precision,
        "mixed_precision": result.mixed_precision,
        "compile": args.compile,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": result.steps,
        "warmup_steps": warmup,
        "samples_per_second": round(result.samples_per_second, 1),
        "samples_per_second_runs": [round(run.samples_per_second, 1) for run, _ in runs],
        "samples_per_second_incl_tokenisation": round(
            result.samples / (seconds + result.prepare_seconds), 1
        ),
        "tokens_per_second": round(result.tokens / seconds, 1) if seconds else None,
        "train_seconds": round(seconds, 2),
        "tokenise_seconds": round(result.prepare_seconds, 2),
        "wall_seconds_incl_load": round(wall, 2),
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "padding_fraction": round(1 - result.tokens / max(1, result.padded_tokens), 4),
        "samples": result.samples,
        "tokens_per_sample": round(result.tokens / max(1, result.samples), 2),
        "parameters": params_total,
        "parameters_non_embedding": params_matmul,
        "model_tflops_per_second": round(model_flops / seconds / 1e12, 4) if seconds else None,
        "peak_flops": peak,
        "mfu": utilisation(model_flops),
        "mfu_padded": utilisation(padded_flops),
        "flops_formula": FLOPS_FORMULA,
        "first_loss": round(result.step_losses[0], 4),
        "last_loss": round(result.step_losses[-1], 4),
        "cpu_threads": torch.get_num_threads(),
        "rows": len(frame),
    }
    if args.baseline_samples_per_second:
        record["baseline_samples_per_second"] = args.baseline_samples_per_second
        record["speedup_vs_baseline"] = round(
            result.samples_per_second / args.baseline_samples_per_second, 2
        )
        record["baseline_note"] = args.baseline_note
    if args.output:
        path = Path(args.output)
    else:
        name = (
            "train_throughput_cpu.json"
            if result.device == "cpu"
            else f"train_throughput_{result.device}_bs{args.batch_size}.json"
        )
        path = Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
