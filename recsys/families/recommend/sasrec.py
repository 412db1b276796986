"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A user is represented by the items of their history, in time order: item embeddings plus
learned positional embeddings go through ``blocks`` causal self-attention blocks, and the hidden
state at position ``t`` scores every item as the next one (dot product with the shared item
embeddings). Unlike :class:`.baselines.BPR` there is no user parameter, so a user's
recommendations follow their latest items without retraining.

Design choices, and why:

* **Training loss**: the original recipe, binary cross-entropy at *every* position of each
  user's train sequence, with the true next item as positive and **one** uniformly drawn item
  the user never had in train as negative, redrawn every epoch. Sampled softmax would rank
  better per epoch on big catalogues, but BCE with one negative is the recipe of the published
  SASRec numbers and the cheapest on a CPU (two dot products per position instead of a
  ``(positions x catalogue)`` matrix).
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

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

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
    """Hyper-parameters. Defaults follow the paper (2 blocks, ``max_len`` 50, Adam 1e-3, batch
    128) with the embedding size of ReChorus' table (64) and a dropout between the paper's
    0.2 (dense data) and 0.5 (sparse Amazon data)."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 50
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW (0 = plain Adam, the paper's setting)."""
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

    def __init__(self, n_items: int, params: SASRecParams) -> None:
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

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        last = self.hidden(history)[:, -1, :]
        return (last @ self.item_vectors().T).float()


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
        self._seen_keys = np.unique(users * self.n_items + items)

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

    def _training_batches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Users with >= 2 train items; their inputs (all but the last item) and targets (all
        but the first), both as left-padded tokens."""
        users = np.array(
            [u for u, s in enumerate(self.train_sequences) if len(s) >= 2], dtype=np.int64
        )
        if not len(users):
            raise ValueError("no user has 2 or more train interactions to learn a sequence from")
        inputs = encode_histories(
            [self.train_sequences[u][:-1] for u in users], self.params.max_len
        )
        targets = encode_histories(
            [self.train_sequences[u][1:] for u in users], self.params.max_len
        )
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
        params = self.params
        self._index(split)
        self.device = _pick_device(params.device)
        users, inputs, targets = self._training_batches()
        lengths = (targets != PAD).sum(axis=1)
        cuda = self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        devices = [self.device.index or 0] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(params.seed)
            rng = np.random.default_rng(params.seed)
            self.net = SASRecNet(self.n_items, params).to(self.device)
            optimiser = torch.optim.AdamW(
                self.net.parameters(), lr=params.lr, weight_decay=params.weight_decay
            )
            scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
            self.loss_history, self.epoch_seconds = [], []
            self.net.train()
            for epoch in range(params.epochs):
                started = time.perf_counter()
                total, count = 0.0, 0
                for batch in self._batches(rng, lengths):
                    negatives = self._negatives(rng, users[batch], targets[batch])
                    stacked = _trim(np.concatenate([inputs[batch], targets[batch], negatives]))
                    x, pos, neg = torch.from_numpy(stacked).to(self.device).chunk(3)
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=cuda):
                        hidden = self.net.hidden(x)
                        vectors = self.net.item_embedding
                        pos_logits = (hidden * vectors(pos)).sum(-1).float()
                        neg_logits = (hidden * vectors(neg)).sum(-1).float()
                    real = pos != PAD
                    losses = -nn.functional.logsigmoid(pos_logits) - nn.functional.logsigmoid(
                        -neg_logits
                    )
                    n_real = int(real.sum())
                    loss = losses[real].sum() / n_real
                    optimiser.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimiser)
                    scaler.update()
                    total += float(loss.detach()) * n_real
                    count += n_real
                self.loss_history.append(total / count)
                self.epoch_seconds.append(time.perf_counter() - started)
                log.info(
                    "SASRec epoch %d/%d loss %.4f %.1f s",
                    epoch + 1,
                    params.epochs,
                    self.loss_history[-1],
                    self.epoch_seconds[-1],
                )
                if not math.isfinite(self.loss_history[-1]):
                    raise FloatingPointError(f"SASRec loss diverged: {self.loss_history}")
        self.net.eval()
        return self

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
        """Parameters and training summary (for a run log or a model card)."""
        return {
            **asdict(self.params),
            "n_items": getattr(self, "n_items", None),
            "epochs_run": len(self.loss_history),
            "train_seconds": round(sum(self.epoch_seconds), 1),
            "final_loss": self.loss_history[-1] if self.loss_history else None,
        }


def export_onnx(model: SASRec | SASRecNet, path: Path | str, opset: int = 17) -> Path:
    """Export the scoring function to ONNX: input ``HISTORY`` int64 ``[B, max_len]`` (left-padded
    tokens, item index + 1, 0 = padding), output ``SCORES`` float32 ``[B, n_items]``, dynamic
    batch axis. The graph is traced in float32 on the CPU (the model itself is not moved)."""
    import copy
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
