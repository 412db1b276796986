"""Fine-tuning the bi-encoder for product search with in-batch negatives.

Each batch holds (query, relevant product title) pairs; every other title in the batch is a
negative for a query. That is the standard recipe for dense retrieval (MultipleNegativesRanking
loss) and needs no mined negatives, so it scales from the tiny test model to MiniLM unchanged.

The input pipeline is built for throughput, because on a GPU the model is not the bottleneck:
tokenising every batch on the CPU held an H200 to ~1% of its bf16 peak. So

* the whole training set is tokenised once, up front, with the fast tokenizer, into int
  tensors (:class:`TokenTable`); a step only gathers rows;
* batches are length-bucketed (:func:`bucketed_batches`): pairs of similar token length share a
  batch, which pads to its own longest row instead of to one long outlier (half the padded
  positions of random batches, so less compute on CPU and GPU alike); the batch order is
  shuffled with the run's seeded RNG;
* on CUDA, batches travel from pinned memory with non-blocking copies, the forward pass runs
  under bf16 autocast (fp16 with loss scaling only where bf16 is missing), AdamW is fused and
  losses stay on the device until an epoch ends, so the CPU queues work ahead of the GPU instead
  of waiting for every step;
* ``compile=True`` wraps the model in ``torch.compile`` (off by default: compiling takes
  minutes on a CPU and pays off only on long GPU runs).

The CPU path runs in float32.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys.families.search.encoder import BiEncoder, load_tokenizer
from recsys.progress import progress_bar

log = logging.getLogger(__name__)

POSTFIX_EVERY = 10
"""Steps between progress-bar loss readouts on CUDA: reading a loss waits for the GPU."""
PROGRESS_LINE_EVERY_S = 60.0
"""Without a progress bar (Airflow task logs, CI), one log line per this many seconds of
training, so a run that takes an hour on a CPU never looks hung."""


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
    compile: bool = False
    """Run the model through ``torch.compile`` (worth it on long GPU runs; slow to start)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingResult:
    """What a fine-tuning run did. ``seconds`` and ``samples_per_second`` cover the optimiser
    loop; ``prepare_seconds`` the one-off tokenisation and batch planning before it.
    ``samples`` counts the rows the loop trained on (the reranker's include its negatives);
    ``tokens``/``padded_tokens`` the sequence positions it fed the model without and with
    padding (the benchmark turns them into model FLOP utilisation)."""

    checkpoint_dir: Path
    steps: int
    pairs: int
    device: str
    mixed_precision: bool
    seconds: float
    samples_per_second: float
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    prepare_seconds: float = 0.0
    hard_negatives: int = 0
    """Mined (query, title) negatives the reranker trained on (0 for the bi-encoder)."""


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


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` when given, else CUDA when present, else the CPU."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def planned_steps(items: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    """Optimiser steps of a run: whole epochs of ``items``, capped by ``max_steps`` (0 = none)."""
    total = max(1, math.ceil(items / batch_size)) * epochs
    return min(total, max_steps) if max_steps else total


# --- tokenised data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTable:
    """Texts (or text pairs) tokenised once: right-padded ``input_ids`` [n, width] (int32),
    ``lengths`` [n] (non-padding tokens) and, for pairs, the segment ids [n, width] (int8). A
    batch is then a row gather, not a tokenizer call."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    pad_id: int = 0

    @classmethod
    def encode(
        cls,
        tokenizer: Any,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        max_length: int,
    ) -> TokenTable:
        """Tokenise ``texts`` (with ``pairs`` as second segments) in one fast-tokenizer call,
        with the arguments serving uses: truncation to ``max_length`` (longest-first for pairs)
        and special tokens. Right padding, whatever the tokenizer's default, so a batch can cut
        every row at its longest length."""
        with_types = pairs is not None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if not texts:
            return cls(
                torch.full((0, 1), pad_id, dtype=torch.int32),
                torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, 1, dtype=torch.int8) if with_types else None,
                pad_id,
            )
        encoded = tokenizer(
            list(texts),
            list(pairs) if with_types else None,
            padding="longest",
            padding_side="right",
            truncation=True,
            max_length=max_length,
            return_token_type_ids=with_types,
            return_attention_mask=True,
            return_tensors="np",
        )
        ids = torch.from_numpy(encoded["input_ids"].astype(np.int32))
        types = None
        if with_types:
            types = torch.from_numpy(encoded["token_type_ids"].astype(np.int8))
        lengths = torch.from_numpy(encoded["attention_mask"].sum(axis=1).astype(np.int64))
        return cls(ids, lengths, types, pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def second_segment_lengths(self) -> torch.Tensor:
        """Tokens of each row's second segment (a pair's title, with its [SEP]); zeros when the
        tokenizer assigns no segment ids. Only a bucketing key, so an approximation is fine."""
        if self.token_type_ids is None:
            return torch.zeros_like(self.lengths)
        return (self.token_type_ids != 0).sum(dim=1).to(torch.int64)

    @staticmethod
    def concat(first: TokenTable, second: TokenTable) -> TokenTable:
        """Rows of ``first`` then ``second`` (padded to the wider of the two)."""
        width = max(first.width, second.width)

        def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

        types = None
        if first.token_type_ids is not None and second.token_type_ids is not None:
            types = torch.cat([widen(first.token_type_ids, 0), widen(second.token_type_ids, 0)])
        return TokenTable(
            torch.cat(
                [widen(first.input_ids, first.pad_id), widen(second.input_ids, first.pad_id)]
            ),
            torch.cat([first.lengths, second.lengths]),
            types,
            first.pad_id,
        )

    def gather(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, int]:
        """Model inputs of ``rows`` padded to their longest, as the tokenizer would pad them,
        and the batch's real and padded token counts."""
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        inputs = {
            "input_ids": self.input_ids[rows, :width].long(),
            "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
        }
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids[rows, :width].long()
        return inputs, int(lengths.sum()), len(rows) * width


@dataclass
class Batch:
    """One optimiser step's tensors, on the CPU until :meth:`to`; ``size`` samples (what
    samples/s counts) and the token positions they hold without and with padding."""

    tensors: dict[str, torch.Tensor]
    size: int
    tokens: int
    padded_tokens: int

    def __len__(self) -> int:
        return self.size

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors on ``device``. To CUDA they go from pinned memory without blocking, so
        the copy overlaps the GPU's previous step instead of stalling the CPU."""
        if device.type != "cuda":
            return {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return {
            name: tensor.pin_memory().to(device, non_blocking=True)
            for name, tensor in self.tensors.items()
        }


def bucketed_batches(
    keys: Sequence[np.ndarray | torch.Tensor],
    batch_size: int,
    rng: random.Random,
    *,
    groups: np.ndarray | torch.Tensor | None = None,
) -> list[list[int]]:
    """One epoch's batches (lists of item indices), length-bucketed.

    Items are sorted by ``keys`` (token lengths, the first key most significant) with a random
    tie-break from ``rng``, cut into batches in that order, and the batches shuffled: a batch
    holds items of nearly one length, so it pads little, while its members and the batch order
    still change every epoch (and reproduce with the seed). Every item is in exactly one batch.

    With ``groups``, no two items of a group share a batch (the bi-encoder's in-batch negatives:
    a repeated title would be a "negative" that is the query's own positive). An item whose
    group is already in the batch being filled waits for the next one, which comes from the
    same length range. A batch of one has no negatives, so an item left alone at the end takes
    an item of another group from a batch of three or more, or else joins a batch without its
    group (which then holds ``batch_size + 1``); only degenerate data (say, every pair of one
    title) can leave an item out, with a warning.
    """
    count = len(keys[0]) if keys else 0
    if count == 0:
        return []
    tiebreak = np.array([rng.random() for _ in range(count)])
    columns = [np.asarray(key) for key in reversed(keys)]
    order = np.lexsort((tiebreak, *columns)).tolist()
    if groups is None:
        batches = [order[start : start + batch_size] for start in range(0, count, batch_size)]
    else:
        batches = _distinct_group_batches(order, np.asarray(groups).tolist(), batch_size)
    rng.shuffle(batches)
    return batches


def _distinct_group_batches(order: list[int], groups: list[int], size: int) -> list[list[int]]:
    """``order`` cut into batches of ``size`` in which no group repeats (see
    :func:`bucketed_batches`): deferred items are retried first by the next batch."""
    batches: list[list[int]] = []
    deferred: list[int] = []
    position = 0
    while position < len(order) or deferred:
        batch: list[int] = []
        seen: set[int] = set()
        waiting: list[int] = []
        for item in deferred:
            if len(batch) < size and groups[item] not in seen:
                batch.append(item)
                seen.add(groups[item])
            else:
                waiting.append(item)
        while len(batch) < size and position < len(order):
            item = order[position]
            position += 1
            if groups[item] in seen:
                waiting.append(item)
            else:
                batch.append(item)
                seen.add(groups[item])
        deferred = waiting
        batches.append(batch)
    full = [batch for batch in batches if len(batch) > 1]
    left_out = 0
    for lone in (batch[0] for batch in batches if len(batch) == 1):
        group = groups[lone]
        donor = next((b for b in full if len(b) > 2 and any(groups[i] != group for i in b)), None)
        if donor is not None:
            partner = next(i for i in reversed(donor) if groups[i] != group)
            donor.remove(partner)
            full.append([lone, partner])
            continue
        home = next((b for b in full if all(groups[i] != group for i in b)), None)
        if home is None:
            left_out += 1
        else:
            home.append(lone)
    if left_out:
        log.warning("%d item(s) fit no batch without a repeated group; left out", left_out)
    return full


@dataclass(frozen=True)
class PairTokens:
    """The bi-encoder's positive pairs tokenised once: every distinct query and title is one
    row of ``queries``/``titles``; pair ``i`` is (``query_rows[i]``, ``title_rows[i]``)."""

    queries: TokenTable
    titles: TokenTable
    query_rows: torch.Tensor
    title_rows: torch.Tensor

    @classmethod
    def build(cls, pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int) -> PairTokens:
        query_index: dict[str, int] = {}
        title_index: dict[str, int] = {}
        query_rows = [query_index.setdefault(query, len(query_index)) for query, _ in pairs]
        title_rows = [title_index.setdefault(title, len(title_index)) for _, title in pairs]
        return cls(
            TokenTable.encode(tokenizer, list(query_index), max_length=max_length),
            TokenTable.encode(tokenizer, list(title_index), max_length=max_length),
            torch.tensor(query_rows, dtype=torch.int64),
            torch.tensor(title_rows, dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self.query_rows)

    def bucket_keys(self) -> list[torch.Tensor]:
        """A pair's query + title tokens, then its title tokens: a batch pads its queries and
        its titles separately, and this order leaves the least padding on both (measured on
        the Home Depot pairs against title-first and query-first orders)."""
        titles = self.titles.lengths[self.title_rows]
        return [titles + self.queries.lengths[self.query_rows], titles]

    def batch(self, pairs: Sequence[int]) -> Batch:
        rows = torch.as_tensor(pairs, dtype=torch.int64)
        queries, query_tokens, query_padded = self.queries.gather(self.query_rows[rows])
        titles, title_tokens, title_padded = self.titles.gather(self.title_rows[rows])
        tensors = {f"query_{name}": tensor for name, tensor in queries.items()}
        tensors.update({f"title_{name}": tensor for name, tensor in titles.items()})
        return Batch(tensors, len(rows), query_tokens + title_tokens, query_padded + title_padded)


def _batches(data: PairTokens, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of the bi-encoder: length-bucketed, shuffled batches of pair indices in which
    no product title repeats, so no in-batch 'negative' is actually the query's positive."""
    return bucketed_batches(data.bucket_keys(), batch_size, rng, groups=data.title_rows)


# --- the optimisation loop ----------------------------------------------------------------------


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled``, else ``model``. Sequence lengths vary from
    batch to batch, so PyTorch's automatic dynamic shapes mark them dynamic at the first
    recompilation instead of compiling every length (padding to fixed lengths would cost the
    compute bucketing saves); the parameters stay ``model``'s, so optimising and saving
    ``model`` is unchanged."""
    return torch.compile(model) if enabled else model


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
    tokens: int = 0
    padded_tokens: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def optimise(
    model: torch.nn.Module,
    epoch_batches: Callable[[], Iterable[Batch]],
    batch_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    epochs: int,
    total_steps: int,
    learning_rate: float,
    warmup_fraction: float,
    device: torch.device,
    desc: str,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> LoopOutcome:
    """The optimisation loop the bi-encoder and the cross-encoder share: AdamW (fused on CUDA),
    linear warm-up then linear decay to ``total_steps``, mixed precision on CUDA (bf16 where
    :func:`torch.cuda.is_bf16_supported`, else fp16 with loss scaling; float32 on CPU), a
    progress bar (TTY only: a MiniLM run on CPU takes minutes to hours) and each epoch's mean
    loss to ``on_epoch_end(epoch, loss)``.

    ``epoch_batches()`` yields one epoch's :class:`Batch` es; ``batch_loss(tensors)`` runs the
    model on one batch's device tensors (under autocast) and returns its scalar loss. Step
    losses stay on the device until the epoch ends: reading one per step would make the CPU
    wait for the GPU every step instead of preparing the next batch meanwhile."""
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, fused=True if device.type == "cuda" else None
    )
    warmup = max(1, int(total_steps * warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        ),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    step, samples, tokens, padded_tokens = 0, 0, 0, 0
    started = last_line = time.perf_counter()
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    bar = progress_bar(total=total_steps, desc=desc, unit="step")
    for epoch in range(epochs):
        losses: list[torch.Tensor] = []
        for batch in epoch_batches():
            tensors = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss = batch_loss(tensors)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.detach())
            step += 1
            samples += len(batch)
            tokens += batch.tokens
            padded_tokens += batch.padded_tokens
            bar.update(1)
            if not bar.disable and (not use_amp or step % POSTFIX_EVERY == 0):
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(losses[-1]):.4f}", refresh=False)
            elif bar.disable and time.perf_counter() - last_line >= PROGRESS_LINE_EVERY_S:
                last_line = time.perf_counter()
                elapsed = last_line - started
                log.info(
                    "%s: step %d/%d (%.0f%%), %.0fs elapsed, about %.0fs left",
                    desc, step, total_steps, 100.0 * step / total_steps, elapsed,
                    elapsed / step * (total_steps - step),
                )  # fmt: skip
            if step >= total_steps:
                break
        values = torch.stack(losses).float().tolist() if losses else []
        mean_loss = sum(values) / max(1, len(values))
        epoch_losses.append(mean_loss)
        step_losses.extend(values)
        log.info("%s epoch %d: %d steps, mean loss %.4f", desc, epoch + 1, len(values), mean_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, mean_loss)
        if step >= total_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    return LoopOutcome(
        steps=step,
        samples=samples,
        seconds=seconds,
        device=device.type,
        mixed_precision=use_amp,
        epoch_losses=epoch_losses,
        step_losses=step_losses,
        tokens=tokens,
        padded_tokens=padded_tokens,
    )


def training_result(
    output_dir: Path,
    pairs: int,
    outcome: LoopOutcome,
    *,
    prepare_seconds: float = 0.0,
    hard_negatives: int = 0,
) -> TrainingResult:
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
        samples=outcome.samples,
        tokens=outcome.tokens,
        padded_tokens=outcome.padded_tokens,
        prepare_seconds=prepare_seconds,
        hard_negatives=hard_negatives,
    )


def fine_tune(
    train_frame: pd.DataFrame,
    base_model_dir: Path,
    output_dir: Path,
    params: TrainingParams,
    *,
    on_epoch_end: Callable[[int, float], None] | None = None,
    device: str | torch.device | None = None,
) -> TrainingResult:
    """Fine-tune ``base_model_dir`` on ``train_frame`` and save weights + tokenizer to
    ``output_dir``. ``on_epoch_end(epoch, mean_loss)`` lets the caller log to MLflow;
    ``device`` overrides the automatic choice (CUDA when present)."""
    pairs = positive_pairs(train_frame, params.positive_threshold)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} training pair(s) with relevance >= {params.positive_threshold}; "
            "need at least 2 for in-batch negatives"
        )
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = pick_device(device)
    tokenizer = load_tokenizer(base_model_dir)
    model = BiEncoder.from_pretrained(base_model_dir).to(device).train()
    forward = compiled(model, params.compile)
    loss_fn = torch.nn.CrossEntropyLoss()

    prepare_started = time.perf_counter()
    data = PairTokens.build(pairs, tokenizer, params.max_length)
    prepare_seconds = time.perf_counter() - prepare_started
    log.info(
        "fine-tune: %d pairs (%d queries, %d titles) tokenised in %.1f s",
        len(data),
        len(data.queries),
        len(data.titles),
        prepare_seconds,
    )

    def epoch_batches() -> Iterator[Batch]:
        for rows in _batches(data, params.batch_size, rng):
            yield data.batch(rows)

    def batch_loss(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        queries = forward(tensors["query_input_ids"], tensors["query_attention_mask"])
        titles = forward(tensors["title_input_ids"], tensors["title_attention_mask"])
        logits = params.scale * queries @ titles.T
        return loss_fn(logits.float(), torch.arange(len(logits), device=logits.device))

    outcome = optimise(
        model,
        epoch_batches,
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
    return training_result(output_dir, len(pairs), outcome, prepare_seconds=prepare_seconds)
