"""Shared helpers for tests that need real serving artifacts or a real Triton server.

Nothing here downloads anything: the encoder is a randomly initialised two-layer BERT with a
WordPiece vocabulary trained on the test catalogue, so the full path (tokenizer.json -> ONNX ->
python backend -> gRPC) runs for real in seconds on a CPU. Its search quality is irrelevant; an
exact title still finds its own product because identical texts embed identically.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_QUERY_TOKENS = 64

CATALOG: dict[str, str] = {
    "100001": "cordless drill driver kit with two batteries",
    "100002": "hammer drill masonry bit set",
    "100003": "angle bracket galvanized steel",
    "100004": "wood screws stainless steel box",
    "100005": "interior latex paint eggshell white",
    "100006": "exterior wood stain cedar",
    "100007": "garden hose expandable fifty feet",
    "100008": "led light bulb soft white dimmable",
    "100009": "ceiling fan with remote control",
    "100010": "kitchen faucet pull down chrome",
    "100011": "toilet flapper universal replacement",
    "100012": "vinyl plank flooring oak",
    "100013": "ceramic floor tile gray",
    "100014": "circular saw blade carbide",
    "100015": "extension ladder aluminum",
    "100016": "smoke detector battery operated",
    "100017": "door knob satin nickel privacy",
    "100018": "deadbolt lock keyed entry",
    "100019": "window air conditioner energy star",
    "100020": "water heater electric tank",
    "100021": "lawn mower gas self propelled",
    "100022": "leaf blower cordless battery",
    "100023": "pressure treated lumber board",
    "100024": "drywall sheet gypsum panel",
    "100025": "caulk silicone clear bathroom",
    "100026": "outdoor patio chair wicker",
    "100027": "storage shelf steel garage",
    "100028": "tool box plastic portable",
    "100029": "mailbox post mount black",
    "100030": "shower head rain chrome",
    "100031": "garbage disposal half horsepower",
    "100032": "electrical outlet tamper resistant",
    "100033": "pvc pipe schedule forty",
    "100034": "concrete mix quick setting",
    "100035": "fence picket cedar dog ear",
    "100036": "wet dry vacuum shop",
}

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_SAMPLE = re.compile(
    r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)", re.MULTILINE
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _train_tokenizer(texts: list[str]):
    """A BERT-style WordPiece fast tokenizer trained on ``texts`` (CLS/SEP template included,
    as a real ``tokenizer.json`` exported from Hugging Face would have)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        texts, WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenize like the served model does: truncate to MAX_QUERY_TOKENS, pad per batch."""
    tokenizer.enable_truncation(MAX_QUERY_TOKENS)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def build_test_serving_artifacts(tmp_dir: Path | str, fault_injection: Any = None) -> Path:
    """Write a complete serving-artifacts folder (encoder.onnx, tokenizer.json, products.npz,
    manifest.json) under ``tmp_dir`` and return it.

    Product embeddings are computed with the exported ONNX graph itself, so a query equal to a
    product title scores ~1.0 against that product in Triton.
    """
    import onnxruntime as ort
    import torch
    from transformers import BertConfig, BertModel

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(CATALOG)
    titles = [CATALOG[i] for i in ids]
    tokenizer = _train_tokenizer(titles)
    tokenizer.save(str(out / "tokenizer.json"))

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )

    class _Encoder(torch.nn.Module):
        """BERT + masked mean pooling + L2 normalisation, as the platform's bi-encoder."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    model = _Encoder().eval()
    sample = _encode(tokenizer, ["sample query", "a longer sample query for tracing"])
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(sample[n]) for n in names),
            str(out / "encoder.onnx"),
            input_names=names,
            output_names=["embeddings"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in names},
                "embeddings": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )

    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    embeddings = session.run(["embeddings"], _encode(tokenizer, titles))[0].astype(np.float32)
    np.savez(out / "products.npz", ids=np.array(ids), embeddings=embeddings)
    manifest = {
        "model_name": "product_search",
        "version": None,
        "max_query_tokens": MAX_QUERY_TOKENS,
        "max_top_k": 100,
        "onnx_inputs": names,
        "embedding_dim": int(embeddings.shape[1]),
        "fault_injection": fault_injection,
        "source": "tests.triton_testing",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TritonHarness:
    """A running test server and what tests need to talk to it."""

    server: Any
    repo: Path
    grpc_url: str
    metrics_url: str


@contextlib.contextmanager
def running_triton(workdir: Path | str | None = None) -> Iterator[TritonHarness]:
    """Start a real tritonserver on free ports with an empty repository; always stop it."""
    from recsys.triton.server import TritonServer

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-test-"))
        root = Path(workdir)
        repo = root / "repo"
        repo.mkdir(parents=True, exist_ok=True)
        server = TritonServer(
            repo,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            log_path=root / "triton.log",
            workdir=root / "server",
        )
        server.start(timeout_s=60)
        stack.callback(server.stop)
        yield TritonHarness(
            server=server,
            repo=repo,
            grpc_url=f"127.0.0.1:{server.grpc_port}",
            metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics",
        )


def copy_artifacts(source: Path, target: Path, **manifest_changes: Any) -> Path:
    """Copy a serving-artifacts folder, overriding manifest keys (e.g. ``fault_injection``)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples called exactly ``name`` whose labels include ``labels``
    (0 if none). Parsed by hand: prometheus_client's parser renames counters to ``*_total``."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode("utf-8")
    total = 0.0
    for match in _SAMPLE.finditer(text):
        if match["name"] != name:
            continue
        found = dict(_LABEL.findall(match["labels"] or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match["value"])
    return total
