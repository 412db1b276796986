"""Fine-tuning the bi-encoder for product search with in-batch negatives.

Each batch holds (query, relevant product title) pairs; every other title in the batch is a
negative for a query. That is the standard recipe for dense retrieval (MultipleNegativesRanking
loss) and needs no mined negatives, so it scales from the tiny test model to MiniLM unchanged.
Mixed precision is used on a GPU; the CPU path runs in float32.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from recsys.families.search.encoder import BiEncoder, load_tokenizer
from recsys.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingParams:
    """Every knob of a fine-tuning run; all are Airflow DAG params and MLflow run params."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = run all epochs); keeps smoke runs short."""
    positive_threshold: float = 2.33
    """Minimum graded relevance (1-3) for a pair to count as a positive."""
    max_length: int = 64
    scale: float = 20.0
    """Inverse temperature of the in-batch softmax (cosine similarities are in [-1, 1])."""
    warmup_fraction: float = 0.1
    seed: int = 13

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingResult:
    checkpoint_dir: Path
    steps: int
    pairs: int
    device: str
    mixed_precision: bool
    seconds: float
    samples_per_second: float
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


def positive_pairs(frame: pd.DataFrame, threshold: float) -> list[tuple[str, str]]:
    """(search_term, product_title) pairs judged relevant enough to pull together."""
    positives = frame[frame["relevance"] >= threshold]
    return list(
        zip(
            positives["search_term"].astype(str),
            positives["product_title"].astype(str),
            strict=True,
        )
    )


def _batches(pairs: list[tuple[str, str]], batch_size: int, rng: random.Random):
    """Shuffled batches in which no product title repeats, so no in-batch 'negative' is
    actually the query's positive."""
    order = pairs[:]
    rng.shuffle(order)
    batch: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pair in order:
        if pair[1] in seen:
            continue
        batch.append(pair)
        seen.add(pair[1])
        if len(batch) == batch_size:
            yield batch
            batch, seen = [], set()
    if len(batch) > 1:
        yield batch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def planned_steps(items: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    """Optimiser steps of a run: whole epochs of ``items``, capped by ``max_steps`` (0 = none)."""
    total = max(1, math.ceil(items / batch_size)) * epochs
    return min(total, max_steps) if max_steps else total


@dataclass
class LoopOutcome:
    """What :func:`optimise` did, for a :class:`TrainingResult`."""

    steps: int
    samples: int
    seconds: float
    device: str
    mixed_precision: bool
    epoch_losses: list[float]
    step_losses: list[float]

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def optimise(
    model: torch.nn.Module,
    epoch_batches: Callable[[], Iterable[Sequence[Any]]],
    batch_loss: Callable[[Sequence[Any]], torch.Tensor],
    *,
    epochs: int,
    total_steps: int,
    learning_rate: float,
    warmup_fraction: float,
    device: torch.device,
    desc: str,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> LoopOutcome:
    """The optimisation loop the bi-encoder and the cross-encoder share: AdamW, linear warm-up
    then linear decay to ``total_steps``, mixed precision on CUDA (bf16, or fp16 with loss
    scaling where bf16 is missing; float32 on CPU), a progress bar (TTY only: a MiniLM run on CPU
    takes minutes to hours) and each epoch's mean loss to ``on_epoch_end(epoch, loss)``.

    ``epoch_batches()`` yields one epoch's batches; ``batch_loss(batch)`` runs the model on one
    (under autocast) and returns its scalar loss."""
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    warmup = max(1, int(total_steps * warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        ),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    step, samples, started = 0, 0, time.perf_counter()
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    bar = progress_bar(total=total_steps, desc=desc, unit="step")
    for epoch in range(epochs):
        losses: list[float] = []
        for batch in epoch_batches():
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            samples += len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}", refresh=False)
            if step >= total_steps:
                break
        mean_loss = sum(losses) / max(1, len(losses))
        epoch_losses.append(mean_loss)
        step_losses.extend(losses)
        log.info("%s epoch %d: %d steps, mean loss %.4f", desc, epoch + 1, len(losses), mean_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, mean_loss)
        if step >= total_steps:
            break
    bar.close()
    return LoopOutcome(
        steps=step,
        samples=samples,
        seconds=time.perf_counter() - started,
        device=device.type,
        mixed_precision=use_amp,
        epoch_losses=epoch_losses,
        step_losses=step_losses,
    )


def training_result(output_dir: Path, pairs: int, outcome: LoopOutcome) -> TrainingResult:
    return TrainingResult(
        checkpoint_dir=output_dir,
        steps=outcome.steps,
        pairs=pairs,
        device=outcome.device,
        mixed_precision=outcome.mixed_precision,
        seconds=outcome.seconds,
        samples_per_second=outcome.samples_per_second,
        epoch_losses=outcome.epoch_losses,
        step_losses=outcome.step_losses,
    )


def fine_tune(
    train_frame: pd.DataFrame,
    base_model_dir: Path,
    output_dir: Path,
    params: TrainingParams,
    *,
    on_epoch_end=None,
) -> TrainingResult:
    """Fine-tune ``base_model_dir`` on ``train_frame`` and save weights + tokenizer to
    ``output_dir``. ``on_epoch_end(epoch, mean_loss)`` lets the caller log to MLflow."""
    pairs = positive_pairs(train_frame, params.positive_threshold)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} training pair(s) with relevance >= {params.positive_threshold}; "
            "need at least 2 for in-batch negatives"
        )
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = pick_device()
    tokenizer = load_tokenizer(base_model_dir)
    model = BiEncoder.from_pretrained(base_model_dir).to(device).train()
    loss_fn = torch.nn.CrossEntropyLoss()

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=params.max_length, return_tensors="pt"
        )
        return {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}

    def batch_loss(batch: Sequence[tuple[str, str]]) -> torch.Tensor:
        queries, titles = zip(*batch, strict=True)
        logits = params.scale * model(**tokenize(list(queries))) @ model(**tokenize(list(titles))).T
        return loss_fn(logits.float(), torch.arange(len(batch), device=device))

    outcome = optimise(
        model,
        lambda: _batches(pairs, params.batch_size, rng),
        batch_loss,
        epochs=params.epochs,
        total_steps=planned_steps(len(pairs), params.batch_size, params.epochs, params.max_steps),
        learning_rate=params.learning_rate,
        warmup_fraction=params.warmup_fraction,
        device=device,
        desc="fine-tune",
        on_epoch_end=on_epoch_end,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().eval().save_pretrained(output_dir)
    tokenizer.save_pretrained(str(output_dir))
    return training_result(output_dir, len(pairs), outcome)
