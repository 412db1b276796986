"""A tiny BERT built entirely offline, for tests and smoke runs.

It has the same interface as MiniLM (BERT architecture, WordPiece fast tokenizer) so every stage
(training, ONNX export, Triton serving) runs the real code path in seconds on a CPU without any
download. Its quality is irrelevant; its shape is what matters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(
    target_dir: Path | str,
    corpus: Iterable[str],
    *,
    vocab_size: int = 2000,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Train a WordPiece tokenizer on ``corpus`` and save a randomly initialised 2-layer BERT
    with it as a Hugging Face folder loadable by ``AutoModel``/``AutoTokenizer``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    texts = [t for t in corpus if isinstance(t, str) and re.search(r"\w", t)]
    tokenizer.train_from_iterator(
        texts, WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(str(target))

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(target))
    return target
