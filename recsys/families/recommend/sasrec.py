"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A user is represented by the items of their history, in time order: item embeddings plus
learned positional embeddings go through ``blocks`` causal self-attention blocks, and the hidden
state at position ``t`` scores every item as the next one (dot product with the shared item
embeddings). Unlike :class:`.baselines.BPR` there is no user parameter, so a user's
recommendations follow their latest items without retraining.

Item relations (optional, with ``item_meta``): the also-bought / also-viewed lists of the
catalogue metadata add a learned bonus to item ``j``: ``sum_r sum_k w[r, k] * [j related to
the k-th latest item by r]`` over the ``relation_window`` latest items. On Amazon Grocery the
test item is also-bought with one of the 3 latest items in 18 % of cases (among ~28 related
items out of 8.6k), a signal the sequence of a sparse user cannot learn. The relation table
``[R, n_items + 1, M]`` is a constant of the network, so the ONNX graph computes the bonus
itself (a gather and a scatter-add).

Design choices, and why:

* **Training loss**: softmax cross-entropy over the whole catalogue at *every* position of each
  user's train sequence (``loss="ce"``, the default), as in Klenitskiy & Vasilev (RecSys 2023,
  "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?"). The paper's binary
  cross-entropy with one sampled negative (``loss="bce"``) is kept for comparison: on Amazon
  Grocery it reached sampled HR@5 0.341 / NDCG@5 0.261 after 70 epochs, below ReChorus'
  published SASRec (0.389 / 0.292); one negative per position tells the model little about
  the 8.6k other items. With CE, dropout 0.5 and the relations the served recipe reaches
  0.397 / 0.314 (``benchmarks/results/recommendation_quality.json``). A catalogue of that
  size keeps the ``(positions x items)`` logits affordable: on one CPU thread an epoch of the
  served recipe takes about 15 s against about 4 s for the BCE one, and early stopping ends
  the fit after about 26 epochs (7 min on one busy thread); a catalogue of millions would
  need sampled softmax instead.
* **Early stopping**: every ``eval_every`` epochs the validation stage is scored (sampled
  NDCG@10 of the validation item among 99 negatives, train histories only, negatives of their
  own seed, only the 100 candidates scored), the best weights are kept and training stops
  after ``patience`` checks without gain. CE overfits Amazon Grocery within tens of epochs
  (validation NDCG peaks, then falls while the loss keeps dropping), so a fixed epoch count is
  either too short or wasted time; the check costs about a second on the full data.
  ``describe()`` records the chosen epoch and the curve.
* **Refit** (``refit=True``, off by default): after early stopping, a fresh network is trained
  for the chosen number of epochs on the train sequences *plus* the validation item, which the
  test stage knows anyway (ReChorus' models train on those interactions too). It doubles the
  fit time and was not measured on the full data within the CPU budget, so it is not the
  default; its validation-stage scores are not an honest estimate (``describe()["refitted"]``).
* **Item relations** are catalogue metadata, not interactions: they are taken as given (no
  leakage of the held-out rows through them; note that Amazon computed its also-bought lists
  from its whole purchase history, as any shop's catalogue would be at serving time). Items
  outside train (no index) and the item itself are dropped from the lists, each list is cut
  to ``max_related``. The weights start at 0 and are learned with the network by the same
  loss, so a shop whose relations carry no signal gets weights near 0; without ``item_meta``
  the model is plain SASRec.
* **Sequences**: item index ``k`` of :class:`.split.LeaveOneOutSplit` is token ``k + 1``,
  token 0 is padding; histories are **left**-padded (or cut to their last ``max_len`` items),
  so the last position always holds the latest item and is the one that scores.
* **Attention block**: written out (pre-LN: ``x + drop(attn(LN(x)))``,
  ``x + drop(ffn(LN(x)))``, a final LayerNorm) instead of ``nn.TransformerEncoderLayer``:
  the layer's inference fast path and nested tensors get in the way of ONNX export, and the
  explicit block lets padding be handled like the original does: a query attends to itself
  and to earlier *real* positions only (so a padded row never has every key masked, hence no
  NaN in any dtype), and padded positions are zeroed after every block.
* **Positions** are indexed as in the ``max_len``-padded sequence, so a batch may be trimmed
  to its longest history (training and scoring skip the all-padding columns, a large saving:
  the median Amazon Grocery user has 5 interactions) and give the same result as the padded
  ``[B, max_len]`` input the ONNX graph takes.
* **No leakage**: scoring takes the stage explicitly. ``"validation"`` scores from the train
  sequence only; ``"test"`` from the train sequence followed by the validation item (known by
  then, as in the original). The test item is never part of any history, and training only
  sees train rows. A validation item unseen in train (``item_idx == -1``) has no embedding
  and is left out of the test history.
* **Item categories** of ``item_meta`` are not used: on Amazon Grocery 96 % of the items have
  category 0, so a category embedding would add parameters and no signal.
* **Device**: CUDA when available with autocast (bf16, or fp16 with loss scaling where bf16 is
  missing), the CPU in float32 otherwise. ``seed`` fixes initialisation, dropout, batch order
  and negatives (the caller's global torch RNG state is restored afterwards), so two fits on
  the same machine give the same model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys.families.recommend.data import LIST_COLUMNS
from recsys.families.recommend.split import ITEM_IDX, USER_IDX, LeaveOneOutSplit

log = logging.getLogger(__name__)

__all__ = [
    "ONNX_INPUT",
    "ONNX_OUTPUT",
    "PAD",
    "SASRec",
    "SASRecNet",
    "SASRecParams",
    "encode_histories",
    "export_onnx",
]

Stage = Literal["validation", "test"]
PAD = 0
"""Padding token; item index ``k`` is token ``k + 1``."""
ONNX_INPUT, ONNX_OUTPUT = "HISTORY", "SCORES"


@dataclass(frozen=True)
class SASRecParams:
    """Hyper-parameters. The architecture follows the paper (2 blocks, ``max_len`` 50, batch
    128). The rest was chosen on the validation stage of Amazon Grocery (sampled NDCG@10, with
    relations): dropout 0.5, the paper's value for sparse Amazon data (0.2 overfits after about
    10 epochs with the CE loss: 0.328 vs 0.337 at best), Adam 2e-3 (with early stopping a
    larger step mainly shortens the fit), and embedding size 96 with a relation window of 8
    (about 0.35, against 0.337 for ReChorus' size 64 with a window of 3; the two were not
    separated)."""

    dim: int = 96
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.5
    lr: float = 2e-3
    batch_size: int = 128
    epochs: int = 200
    """Upper bound; early stopping (``eval_every``) usually ends the fit far earlier."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW (0 = plain Adam, the paper's setting)."""
    loss: Literal["ce", "bce"] = "ce"
    """``"ce"``: softmax cross-entropy over the whole catalogue at every position;
    ``"bce"``: the paper's binary cross-entropy with one sampled negative per position."""
    eval_every: int = 2
    """Score the validation stage every ``eval_every`` epochs and keep the best weights
    (0 = off: the weights of the last epoch are kept)."""
    patience: int = 3
    """Stop after this many validation checks in a row without a better score."""
    eval_users: int = 0
    """Validation users scored per check, a seeded subset (0 = all of them)."""
    relation_window: int = 8
    """With ``item_meta``: the latest items whose related items (also bought / also viewed)
    get a learned score bonus (0 = ignore the relations)."""
    max_related: int = 100
    """Related items kept per item and relation (the first ones of the metadata list)."""
    refit: bool = False
    """After early stopping, train a fresh network for the best number of epochs on the train
    sequences *followed by the validation item* (known when the test stage scores). Its
    validation-stage scores are then no longer an honest estimate (the network saw those
    items); the test stage stays clean."""
    seed: int = 0
    device: str = "auto"
    """``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.blocks < 1 or self.heads < 1 or self.max_len < 2:
            raise ValueError("dim, blocks and heads must be >= 1 and max_len >= 2")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.eval_every < 0 or self.patience < 1 or self.eval_users < 0:
            raise ValueError("eval_every and eval_users must be >= 0 and patience >= 1")
        if self.relation_window < 0 or self.relation_window > self.max_len:
            raise ValueError("relation_window must be in [0, max_len]")
        if self.max_related < 1:
            raise ValueError("max_related must be >= 1")


class _CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(x).split(dim, dim=-1)
        q, k, v = (
            t.reshape(batch, length, self.heads, head_dim).transpose(1, 2) for t in (q, k, v)
        )
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        weights = self.dropout(torch.softmax(logits.float(), dim=-1).to(v.dtype))
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out(mixed)


class _Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a position-wise feed-forward
    network (``dim -> dim``, ReLU, as the paper's point-wise convolutions)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = _CausalSelfAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRecNet(nn.Module):
    """The network. ``forward(history) -> scores`` is a pure function of a left-padded token
    tensor ``[B, L]`` (``L <= max_len``; token = item index + 1, 0 = padding) to float32
    scores ``[B, n_items]`` of every train-indexed item as the next one: what the ONNX graph
    computes."""

    def __init__(
        self, n_items: int, params: SASRecParams, relations: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.max_len = params.max_len
        self.scale = math.sqrt(params.dim)
        self.item_embedding = nn.Embedding(n_items + 1, params.dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(params.max_len, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.blocks = nn.ModuleList(
            _Block(params.dim, params.heads, params.dropout) for _ in range(params.blocks)
        )
        self.final_norm = nn.LayerNorm(params.dim)
        nn.init.normal_(self.item_embedding.weight, std=params.dim**-0.5)
        nn.init.normal_(self.position_embedding.weight, std=params.dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[PAD].zero_()
        self.window = params.relation_window if relations is not None else 0
        if self.window:
            # [R, n_items + 1, M] related tokens of each token (0 = none); a constant of the graph
            self.register_buffer("relations", relations.to(torch.int64))
            self.relation_weight = nn.Parameter(torch.zeros(relations.shape[0], self.window))
        else:
            self.relations = None

    def hidden(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` hidden states; position ``t`` summarises tokens ``<= t``."""
        length = history.shape[1]
        real = history != PAD
        steps = torch.arange(length, device=history.device)
        positions = steps + (self.max_len - length)  # as if padded to max_len
        x = self.item_embedding(history) * self.scale + self.position_embedding(positions)
        x = self.dropout(x) * real.unsqueeze(-1).to(x.dtype)
        causal = steps.unsqueeze(1) >= steps.unsqueeze(0)  # (no tril/eye: ONNX Runtime lacks
        own = steps.unsqueeze(1) == steps.unsqueeze(0)  # Trilu and EyeLike for booleans)
        # [B, 1, L, L]: a query sees itself and earlier real positions (never an empty row)
        allowed = ((causal & real.unsqueeze(1)) | own).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1).to(x.dtype)
        return self.final_norm(x)

    def item_vectors(self) -> torch.Tensor:
        """``[n_items, dim]`` output embeddings (the input ones, without padding)."""
        return self.item_embedding.weight[1:]

    def windows(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, L, window]`` tokens: ``[b, t, k]`` is the token ``k`` steps before position
        ``t`` (``k = 0``: the item at ``t`` itself), padding before the sequence starts."""
        length = history.shape[1]
        shifted = [nn.functional.pad(history, (k, 0))[:, :length] for k in range(self.window)]
        return torch.stack(shifted, dim=-1)

    def add_relation_scores(self, scores: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[N, n_items]`` (float32) plus the relation bonus of every item for the
        ``N`` windows ``[N, K]`` (latest item first): ``sum_r sum_k weight[r, k] * [item
        related to windows[:, k] by r]``. One out-of-place scatter-add of the related tokens;
        padding adds 0 to column 0."""
        count = windows.shape[0]
        related = self.relations[:, windows]  # [R, N, K, M]
        weights = self.relation_weight[:, None, :, None] * (related != PAD).float()
        index = (related - 1).clamp(min=0).permute(1, 0, 2, 3).reshape(count, -1)
        values = weights.permute(1, 0, 2, 3).reshape(count, -1)
        return scores.scatter_add(1, index, values)

    def candidate_scores(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` scores of the item indices ``items`` ``[B, C]`` only (same values as the
        matching columns of :meth:`forward`)."""
        last = self.hidden(history)[:, -1, :]
        scores = (self.item_vectors()[items] * last.unsqueeze(1)).sum(-1).float()
        if self.window:
            bonus = self.add_relation_scores(
                scores.new_zeros(len(history), self.n_items), self.windows(history)[:, -1]
            )
            scores = scores + torch.gather(bonus, 1, items)
        return scores

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        last = self.hidden(history)[:, -1, :]
        scores = (last @ self.item_vectors().T).float()
        if self.window:
            scores = self.add_relation_scores(scores, self.windows(history)[:, -1])
        return scores


def encode_histories(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """``[len(sequences), max_len]`` int64 tokens: each sequence of item indices, latest last,
    cut to its last ``max_len`` items, shifted by one and left-padded with :data:`PAD`."""
    out = np.full((len(sequences), max_len), PAD, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tail = np.asarray(sequence, dtype=np.int64)[-max_len:]
        if len(tail):
            if tail.min() < 0:
                raise ValueError("a history holds an item index < 0 (an item unseen in train)")
            out[row, max_len - len(tail) :] = tail + 1
    return out


def _trim(tokens: np.ndarray) -> np.ndarray:
    """Drop the leading columns that are padding in every row (at least one column stays)."""
    filled = (tokens != PAD).any(axis=0)
    first = int(np.argmax(filled)) if filled.any() else tokens.shape[1] - 1
    return tokens[:, first:]


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class SASRec:
    """SASRec trained on a :class:`.split.LeaveOneOutSplit`; after :meth:`fit`,
    :meth:`scorer` gives the :class:`.evaluate.Scorer` of a stage.

    ``loss_history`` / ``epoch_seconds`` hold each epoch's mean loss (per predicted position)
    and wall time; one log line is written per epoch.
    """

    params: SASRecParams = field(default_factory=SASRecParams)
    item_meta: pd.DataFrame | None = field(default=None, repr=False)
    """Item metadata (:func:`.data.read_item_meta`); its also-bought / also-viewed lists give
    the relation bonus. Optional: without it the model is plain SASRec."""
    loss_history: list[float] = field(default_factory=list, init=False)
    epoch_seconds: list[float] = field(default_factory=list, init=False)

    # --- data ------------------------------------------------------------------------------

    def _index(self, split: LeaveOneOutSplit) -> None:
        train = split.train  # time-ordered within each user (see split.leave_one_out)
        users = train[USER_IDX].to_numpy(dtype=np.int64)
        items = train[ITEM_IDX].to_numpy(dtype=np.int64)
        order = np.argsort(users, kind="stable")
        users, items = users[order], items[order]
        bounds = np.searchsorted(users, np.arange(split.n_users + 1))
        self.train_sequences = [items[bounds[u] : bounds[u + 1]] for u in range(split.n_users)]
        self.validation_items = np.full(split.n_users, -1, dtype=np.int64)
        validation = split.validation
        self.validation_items[validation[USER_IDX].to_numpy(dtype=np.int64)] = validation[
            ITEM_IDX
        ].to_numpy(dtype=np.int64)
        self.n_items = split.n_items
        self.relations = self._relation_table(split) if self.params.relation_window else None
        self._seen_keys = np.unique(users * self.n_items + items)

    def _relation_table(self, split: LeaveOneOutSplit) -> torch.Tensor | None:
        """``[R, n_items + 1, M]`` int64: for each relation column of ``item_meta`` that
        relates any two train items, the tokens related to each token (first ``max_related``
        in list order, duplicates and the item itself dropped, 0-padded); ``None`` without
        ``item_meta`` or without any relation between train items."""
        if self.item_meta is None:
            return None
        index = split.item_index
        tables = []
        for column in LIST_COLUMNS:
            if column not in self.item_meta.columns:
                continue
            rows: list[list[int]] = [[] for _ in range(self.n_items + 1)]
            for item, related in zip(
                self.item_meta["item_id"], self.item_meta[column], strict=True
            ):
                own = index.get(str(item))
                if own is None or not isinstance(related, (tuple, list)):
                    continue
                tokens = dict.fromkeys(index[r] + 1 for r in map(str, related) if r in index)
                tokens.pop(own + 1, None)
                rows[own + 1] = list(tokens)[: self.params.max_related]
            if any(rows):
                tables.append(rows)
        if not tables:
            return None
        width = max(len(row) for rows in tables for row in rows)
        out = np.zeros((len(tables), self.n_items + 1, width), dtype=np.int64)
        for r, rows in enumerate(tables):
            for token, row in enumerate(rows):
                out[r, token, : len(row)] = row
        return torch.from_numpy(out)

    def histories(self, users: np.ndarray, stage: Stage) -> np.ndarray:
        """``[len(users), max_len]`` tokens the model scores ``stage`` from: the train sequence
        (``"validation"``), or the train sequence then the validation item (``"test"``)."""
        if not hasattr(self, "train_sequences"):
            raise RuntimeError("SASRec is not fitted: call fit(split) first")
        if stage not in ("validation", "test"):
            raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")
        sequences = []
        for user in np.asarray(users, dtype=np.int64):
            sequence = self.train_sequences[user]
            validation_item = self.validation_items[user]
            if stage == "test" and validation_item >= 0:
                sequence = np.append(sequence, validation_item)
            sequences.append(sequence)
        return encode_histories(sequences, self.params.max_len)

    def _training_batches(
        self, sequences: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Users with >= 2 items in ``sequences``; their inputs (all but the last item) and
        targets (all but the first), both as left-padded tokens."""
        users = np.array([u for u, s in enumerate(sequences) if len(s) >= 2], dtype=np.int64)
        if not len(users):
            raise ValueError("no user has 2 or more train interactions to learn a sequence from")
        inputs = encode_histories([sequences[u][:-1] for u in users], self.params.max_len)
        targets = encode_histories([sequences[u][1:] for u in users], self.params.max_len)
        return users, inputs, targets

    def _negatives(self, rng: np.random.Generator, users: np.ndarray, targets: np.ndarray):
        """One uniform token per position that is not a train item of the user (redrawn up to
        50 rounds, like :meth:`.baselines.BPR._negatives`); padding stays padding."""
        shape = targets.shape
        owner = np.broadcast_to(users[:, None], shape)
        negatives = rng.integers(0, self.n_items, size=shape)
        for _ in range(50):
            clash = np.isin(owner * self.n_items + negatives, self._seen_keys)
            if not clash.any():
                break
            negatives[clash] = rng.integers(0, self.n_items, size=int(clash.sum()))
        return np.where(targets != PAD, negatives + 1, PAD)

    def _batches(self, rng: np.random.Generator, lengths: np.ndarray) -> list[np.ndarray]:
        """One epoch's batches (rows of the training arrays), bucketed by length: rows sorted by
        (length, random key), cut into batches, batches shuffled. A random batch of Amazon
        Grocery users nearly always holds one 50-item history and pads the rest to it; buckets
        make an epoch about 3x cheaper, and the batch order and members still change."""
        order = np.lexsort((rng.random(len(lengths)), lengths))
        size = self.params.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        return [batches[k] for k in rng.permutation(len(batches))]

    # --- training ---------------------------------------------------------------------------

    def fit(self, split: LeaveOneOutSplit) -> SASRec:
        """Train on ``split.train`` (early stopping on the validation stage when
        ``eval_every``); with ``refit``, train again from scratch for the best number of epochs
        on the train sequences followed by the validation item."""
        params = self.params
        self._index(split)
        self.device = _pick_device(params.device)
        validation = self._validation_probe(split) if params.eval_every else None
        self.refitted = False
        self._train(self.train_sequences, params.epochs, validation)
        if params.refit and validation is not None:
            self.first_fit = {
                "loss_history": self.loss_history,
                "train_seconds": round(sum(self.epoch_seconds), 1),
            }
            sequences = [
                np.append(sequence, item) if item >= 0 else sequence
                for sequence, item in zip(self.train_sequences, self.validation_items, strict=True)
            ]
            self._train(sequences, self.best_epoch, None, refit=True)
            self.refitted = True
        return self

    def _train(
        self, sequences: list[np.ndarray], epochs: int, validation, refit: bool = False
    ) -> None:
        """A fresh network trained on ``sequences`` for at most ``epochs`` epochs, keeping the
        weights of the best validation check when ``validation`` is given (``refit``: keep the
        first run's validation curve and best epoch)."""
        params = self.params
        users, inputs, targets = self._training_batches(sequences)
        lengths = (targets != PAD).sum(axis=1)
        owners = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        self._seen_keys = np.unique(owners * self.n_items + np.concatenate(sequences))
        cuda = self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        devices = [self.device.index or 0] if cuda else []
        if not refit:
            self.validation_curve, self.best_epoch = [], epochs
        best_score, best_state, stale = -math.inf, None, 0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(params.seed)
            rng = np.random.default_rng(params.seed)
            self.net = SASRecNet(self.n_items, params, self.relations).to(self.device)
            optimiser = torch.optim.AdamW(
                self.net.parameters(), lr=params.lr, weight_decay=params.weight_decay
            )
            scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
            self.loss_history, self.epoch_seconds = [], []
            for epoch in range(epochs):
                started = time.perf_counter()
                self.net.train()
                total, count = 0.0, 0
                for batch in self._batches(rng, lengths):
                    if params.loss == "bce":
                        negatives = self._negatives(rng, users[batch], targets[batch])
                        stacked = np.concatenate([inputs[batch], targets[batch], negatives])
                    else:
                        stacked = np.concatenate([inputs[batch], targets[batch]])
                    parts = torch.from_numpy(_trim(stacked)).to(self.device)
                    parts = parts.chunk(3 if params.loss == "bce" else 2)
                    x, pos = parts[0], parts[1]
                    real = pos != PAD
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=cuda):
                        hidden = self.net.hidden(x)
                        if params.loss == "ce":
                            logits = hidden[real] @ self.net.item_vectors().T
                        else:
                            vectors = self.net.item_embedding
                            pos_logits = (hidden * vectors(pos)).sum(-1)
                            neg_logits = (hidden * vectors(parts[2])).sum(-1)
                    if params.loss == "ce":
                        logits = logits.float()
                        if self.net.window:
                            windows = self.net.windows(x)[real]
                            logits = self.net.add_relation_scores(logits, windows)
                        loss = nn.functional.cross_entropy(logits, pos[real] - 1)
                    else:
                        pos_logits, neg_logits = pos_logits.float(), neg_logits.float()
                        if self.net.window:
                            windows = self.net.windows(x)[real]
                            bonus = self.net.add_relation_scores(
                                pos_logits.new_zeros(len(windows), self.n_items), windows
                            )
                            pos_logits = (
                                pos_logits[real] + bonus.gather(1, pos[real, None] - 1)[:, 0]
                            )
                            neg_logits = (
                                neg_logits[real] + bonus.gather(1, parts[2][real, None] - 1)[:, 0]
                            )
                        else:
                            pos_logits, neg_logits = pos_logits[real], neg_logits[real]
                        losses = -nn.functional.logsigmoid(pos_logits) - nn.functional.logsigmoid(
                            -neg_logits
                        )
                        loss = losses.mean()
                    n_real = int(real.sum())
                    optimiser.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimiser)
                    scaler.update()
                    total += float(loss.detach()) * n_real
                    count += n_real
                self.loss_history.append(total / count)
                if not math.isfinite(self.loss_history[-1]):
                    raise FloatingPointError(f"SASRec loss diverged: {self.loss_history}")
                checked = ""
                if validation is not None and (
                    (epoch + 1) % params.eval_every == 0 or epoch + 1 == epochs
                ):
                    score = self._validation_score(*validation)
                    self.validation_curve.append((epoch + 1, round(score, 5)))
                    checked = f" validation NDCG@10 {score:.4f}"
                    if score > best_score:
                        best_score, stale, self.best_epoch = score, 0, epoch + 1
                        best_state = copy.deepcopy(self.net.state_dict())
                    else:
                        stale += 1
                self.epoch_seconds.append(time.perf_counter() - started)
                log.info(
                    "SASRec %sepoch %d/%d loss %.4f%s %.1f s",
                    "refit " if refit else "",
                    epoch + 1,
                    epochs,
                    self.loss_history[-1],
                    checked,
                    self.epoch_seconds[-1],
                )
                if stale >= params.patience:
                    log.info(
                        "SASRec early stop: no gain in %d checks, best epoch %d",
                        stale,
                        self.best_epoch,
                    )
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()

    def _validation_probe(self, split: LeaveOneOutSplit):
        """(token histories, [held-out item, 99 negatives]) of the validation users the early
        stopping scores: train sequences only, and the negatives avoid train and validation
        items only (the test frame is dropped first), so nothing of the test stage is seen. The
        negatives use their own seed (not the benchmark's), so the check does not tune on the
        reported validation sample."""
        from recsys.families.recommend.evaluate import build_cases, sample_negatives

        cases = build_cases(replace(split, test=split.test.iloc[:0]), "validation")
        seen = cases.targets >= 0
        rows = np.flatnonzero(seen)
        if not len(rows):
            return None
        rng = np.random.default_rng([self.params.seed, 7919])
        if self.params.eval_users and self.params.eval_users < len(rows):
            rows = np.sort(rng.choice(rows, self.params.eval_users, replace=False))
        n_negatives = min(99, self.n_items - int(cases.interacted.sum(axis=1).max()))
        if n_negatives < 1:
            return None
        negatives = sample_negatives(cases, n_negatives=n_negatives, seed=int(rng.integers(2**31)))
        candidates = np.concatenate([cases.targets[rows, None], negatives[rows]], axis=1)
        tokens = self.histories(cases.users[rows], "validation")
        order = np.argsort((tokens != PAD).sum(axis=1), kind="stable")
        return tokens[order], candidates[order]

    def _validation_score(self, tokens: np.ndarray, candidates: np.ndarray) -> float:
        """Sampled NDCG@10 (pessimistic ties, as :mod:`.evaluate`) of the held-out item,
        column 0 of ``candidates``; only the candidates are scored, in batches of similar
        history length (``tokens`` is sorted by length)."""
        cuda = self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.net.eval()
        ranks = []
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=amp_dtype, enabled=cuda),
        ):
            for start in range(0, len(tokens), 1024):
                rows = slice(start, start + 1024)
                history = torch.from_numpy(_trim(tokens[rows])).to(self.device)
                picked = torch.from_numpy(candidates[rows]).to(self.device)
                scores = self.net.candidate_scores(history, picked).float()
                ranks.append((1 + (scores[:, 1:] >= scores[:, :1]).sum(dim=1)).cpu().numpy())
        rank = np.concatenate(ranks)
        return float(np.where(rank <= 10, 1.0 / np.log2(rank + 1.0), 0.0).mean())

    # --- scoring ----------------------------------------------------------------------------

    def score_histories(self, tokens: np.ndarray) -> np.ndarray:
        """Float32 ``[B, n_items]`` scores of left-padded ``tokens`` (see :class:`SASRecNet`)."""
        if not hasattr(self, "net"):
            raise RuntimeError("SASRec is not fitted: call fit(split) first")
        cuda = self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.net.eval()
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=amp_dtype, enabled=cuda),
        ):
            scores = self.net(torch.from_numpy(_trim(tokens)).to(self.device))
        return scores.float().cpu().numpy()

    def scores(self, users: np.ndarray, stage: Stage) -> np.ndarray:
        return self.score_histories(self.histories(users, stage))

    def scorer(self, stage: Stage):
        """The :class:`.evaluate.Scorer` of ``stage`` (its history rule: :meth:`histories`)."""
        if stage not in ("validation", "test"):
            raise ValueError(f"stage must be 'validation' or 'test', got {stage!r}")

        def score(users: np.ndarray) -> np.ndarray:
            return self.scores(users, stage)

        return score

    def describe(self) -> dict[str, object]:
        """Parameters and training summary (for a run log or a model card): ``best_epoch`` (the
        epoch whose weights are kept), ``validation_curve`` (``[epoch, sampled NDCG@10]`` of
        each check), the relation table's shape ``[R, n_items + 1, M]`` and learned weights
        ``[R, relation_window]`` (``None`` without relations)."""
        relations, net = getattr(self, "relations", None), getattr(self, "net", None)
        refitted = getattr(self, "refitted", False)
        first_seconds = self.first_fit["train_seconds"] if refitted else 0.0
        return {
            **asdict(self.params),
            "n_items": getattr(self, "n_items", None),
            "epochs_run": len(self.loss_history),
            "train_seconds": round(sum(self.epoch_seconds) + first_seconds, 1),
            "final_loss": self.loss_history[-1] if self.loss_history else None,
            "refitted": refitted,
            "first_fit": self.first_fit if refitted else None,
            "best_epoch": getattr(self, "best_epoch", None),
            "validation_curve": [list(p) for p in getattr(self, "validation_curve", [])],
            "relations": None if relations is None else list(relations.shape),
            "relation_weight": (
                None
                if net is None or not net.window
                else [[round(float(w), 4) for w in row] for row in net.relation_weight.detach()]
            ),
        }


def export_onnx(model: SASRec | SASRecNet, path: Path | str, opset: int = 17) -> Path:
    """Export the scoring function to ONNX: input ``HISTORY`` int64 ``[B, max_len]`` (left-padded
    tokens, item index + 1, 0 = padding), output ``SCORES`` float32 ``[B, n_items]``, dynamic
    batch axis. The graph is traced in float32 on the CPU (the model itself is not moved)."""
    import warnings

    net = model.net if isinstance(model, SASRec) else model
    net = copy.deepcopy(net).float().cpu().eval()
    path = Path(path)
    sample = torch.zeros(2, net.max_len, dtype=torch.int64)
    sample[:, -3:] = torch.tensor([1, 2, min(3, net.n_items)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (sample,),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path
