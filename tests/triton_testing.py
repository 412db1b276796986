"""Shared helpers for tests that need real serving artifacts or a real Triton server.

Nothing here downloads anything: the encoder is a randomly initialised two-layer BERT with a
WordPiece vocabulary trained on the test catalogue, so the full path (tokenizer.json -> ONNX ->
python backend -> gRPC) runs for real in seconds on a CPU. Its search quality is irrelevant; an
exact title still finds its own product because identical texts embed identically.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _shop_queries() -> list[str]:
    """Every in-distribution query of the test shop: each title and each run of two or three
    consecutive words of it, i.e. short queries made of the catalogue's words (243)."""
    queries = []
    for title in CATALOG.values():
        words = title.split()
        for size in (2, 3):
            queries += [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]
        queries.append(title)
    return list(dict.fromkeys(queries))


def _split_shop_queries() -> tuple[list[str], list[str]]:
    """A seeded random two-thirds / one-third split of :func:`_shop_queries`, by query like the
    pipeline's train/test split, so both parts come from the same distribution."""
    queries = _shop_queries()
    held_out = set(random.Random(11).sample(queries, len(queries) // 3))
    return [q for q in queries if q not in held_out], [q for q in queries if q in held_out]


def training_queries() -> list[str]:
    """The queries the test model counts as trained on (its drift reference, 162): two thirds
    of the shop's queries."""
    return _split_shop_queries()[0]


def held_out_queries() -> list[str]:
    """The other third (81): in-distribution queries the reference never saw, what new
    ordinary traffic looks like to the drift check."""
    return _split_shop_queries()[1]


def build_test_serving_artifacts(tmp_dir: Path | str, fault_injection: Any = None) -> Path:
    """Write a complete serving-artifacts folder for ``CATALOG`` under ``tmp_dir`` with the
    platform's own exporter and a tiny offline BERT, and return it; it includes the drift
    check's ``query_reference.json`` for :func:`training_queries`.

    An exact product title used as a query embeds identically to that product, so it scores
    ~1.0 against it in Triton whatever the (random) weights.
    """
    import pandas as pd

    from recsys.families.search.drift_reference import write_query_reference
    from recsys.families.search.export import build_serving_artifacts
    from recsys.families.search.tiny_model import build_tiny_bert

    out = Path(tmp_dir)
    titles = list(CATALOG.values())
    model_dir = build_tiny_bert(out.parent / f"{out.name}-model", titles, vocab_size=400)
    catalog = pd.DataFrame({"product_uid": list(CATALOG), "product_title": titles})
    artifacts = build_serving_artifacts(
        model_dir,
        catalog,
        out,
        model_name="product_search",
        max_query_tokens=MAX_QUERY_TOKENS,
        fault_injection=fault_injection,
    )
    write_query_reference(artifacts, training_queries())
    return artifacts


class PeakMemory:
    """The peak resident memory (MB) of a process, and of its children (Triton's python stubs)
    unless ``with_children`` is False, sampled every 10 ms while in the block; ``before_mb`` is
    the value on entry."""

    def __init__(self, pid: int, *, with_children: bool = True) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.with_children = with_children
        self.before_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> float:
        import psutil

        processes = [self.process]
        if self.with_children:
            with contextlib.suppress(psutil.Error):
                processes += self.process.children(recursive=True)
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.sample())
            self._stop.wait(0.01)

    def __enter__(self) -> PeakMemory:
        self.before_mb = self.peak_mb = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def grpc_shape_bomb(model: str, rows: int = 10**9) -> Any:
    """A raw gRPC ``ModelInferRequest`` of a few bytes whose QUERY and TOP_K declare ``rows``
    rows (what tritonclient would never build: it derives shapes from real arrays)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, content in (
        ("QUERY", "BYTES", b"\x01\0\0\0x"),
        ("TOP_K", "INT32", b"\x01\0\0\0"),
    ):
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.extend([rows, 1])
        request.raw_input_contents.append(content)
    return request


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
    admin_key: str
    """The key the server requires for model control (the session's ``RECSYS_TRITON_ADMIN_KEY``)."""

    def platform_environment(self, mlflow_uri: str) -> dict[str, str]:
        """The ``RECSYS_*`` / MLflow variables that point the platform's settings at this server
        and ``mlflow_uri`` (benchmarks put them in ``os.environ`` before ``load_settings``)."""
        return {
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "RECSYS_TRITON_REPO": str(self.repo),
            "RECSYS_TRITON_GRPC_PORT": str(self.server.grpc_port),
            "RECSYS_TRITON_HTTP_PORT": str(self.server.http_port),
            "RECSYS_TRITON_METRICS_PORT": str(self.server.metrics_port),
        }

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC metadata a raw ``tritonclient`` call needs for load/unload/repository index."""
        from recsys.credentials import TRITON_GRPC_ADMIN_HEADER

        return {TRITON_GRPC_ADMIN_HEADER: self.admin_key}


@contextlib.contextmanager
def running_triton(
    workdir: Path | str | None = None, **server_options: Any
) -> Iterator[TritonHarness]:
    """Start a real tritonserver on free ports with an empty repository; always stop it.
    ``server_options`` go to :class:`~recsys.triton.server.TritonServer` (e.g.
    ``query_sample_dir``).

    Model control is restricted to the platform's admin key, as in the stack, so every test
    that loads or unloads a model goes through the authenticated path."""
    from recsys.config import load_settings
    from recsys.credentials import triton_admin_key
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
            admin_key=triton_admin_key(load_settings(), create=True),
            **server_options,
        )
        server.start(timeout_s=60)
        stack.callback(server.stop)
        yield TritonHarness(
            server=server,
            repo=repo,
            grpc_url=f"127.0.0.1:{server.grpc_port}",
            metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics",
            admin_key=server.admin_key,
        )


def register_version(settings: Any, artifacts_dir: Path | str, experiment: str = "tests") -> int:
    """Register ``artifacts_dir`` as a new version of ``settings.model_name`` (from a fresh
    MLflow run) and return its number."""
    from recsys import registry
    from recsys.deploy import register_model

    run_id = registry.start_training_run(
        settings.mlflow_tracking_uri, experiment, "t", {"epochs": 1}, {}
    )
    return register_model(settings, run_id, str(artifacts_dir), {"data_hash": "h"})["version"]


def copy_artifacts(source: Path, target: Path, **manifest_changes: Any) -> Path:
    """Copy a serving-artifacts folder, overriding manifest keys (e.g. ``fault_injection``)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def metric_value(metrics_url: str, field: str, model: str, version: str) -> float:
    """One counter (a ``ModelVersionCounters`` field such as ``failure``) of one model version,
    read through the platform's own scraper; 0 when the version has no metrics yet."""
    from recsys.monitoring.metrics import scrape

    counters = scrape(metrics_url).models.get((model, version))
    return float(getattr(counters, field)) if counters else 0.0


def settled_value(read: Callable[[], float], expected: float, timeout_s: float = 10.0) -> float:
    """``read()`` once it returns ``expected``, or its last value after ``timeout_s``.

    Triton records a request's statistics after the client already has its answer, so a
    scrape right after the last request can miss it (CI saw 3 of 4 failures counted). Tests
    that assert exact counts wait for them to settle, and still assert on the value returned:
    a wrong count fails after the timeout instead of passing.
    """
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


RERANK_CANDIDATES = 5


def build_test_reranker_artifacts(tmp_dir: Path | str, candidates: int = RERANK_CANDIDATES) -> Path:
    """Like :func:`build_test_serving_artifacts`, plus a cross-encoder reranker: the tiny BERT
    fine-tuned for a few steps as a cross-encoder on ``CATALOG`` (each title and its first two
    words as queries of their own product), exported with ``reranker_dir``."""
    import pandas as pd

    from recsys.families.search.export import build_serving_artifacts
    from recsys.families.search.reranker import RerankerParams, fine_tune_reranker
    from recsys.families.search.tiny_model import build_tiny_bert

    out = Path(tmp_dir)
    titles = list(CATALOG.values())
    model_dir = build_tiny_bert(out.parent / f"{out.name}-model", titles, vocab_size=400)
    judged = pd.DataFrame(
        [
            {"search_term": query, "product_uid": pid, "product_title": title, "relevance": rel}
            for pid, title in CATALOG.items()
            for query, rel in ((title, 3.0), (" ".join(title.split()[:2]), 2.67))
        ]
    )
    params = RerankerParams(batch_size=8, learning_rate=1e-3, max_steps=12, max_length=32)
    reranker = fine_tune_reranker(judged, model_dir, out.parent / f"{out.name}-reranker", params)
    catalog = pd.DataFrame({"product_uid": list(CATALOG), "product_title": titles})
    return build_serving_artifacts(
        model_dir,
        catalog,
        out,
        model_name="product_search_reranker",
        max_query_tokens=MAX_QUERY_TOKENS,
        reranker_dir=reranker.checkpoint_dir,
        rerank_candidates=candidates,
        rerank_max_length=params.max_length,
    )


FLAKY_CONFIG = """
name: "flaky"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

FLAKY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if (data < 0).any():
                raise ValueError("negative input: injected failure")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
"""


def install_flaky_model(repo: Path) -> None:
    """Write the python model ``flaky`` (echoes its input, raises on a negative value) into a
    Triton repository: the smallest real model whose failures Triton counts as BACKEND."""
    model_dir = Path(repo) / "flaky"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(FLAKY_CONFIG)
    (model_dir / "1" / "model.py").write_text(FLAKY_MODEL)


def infer_flaky(client: Any, value: float) -> bool:
    """One request to ``flaky``; True when it succeeded (it fails for a negative ``value``)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    tensor = grpcclient.InferInput("INPUT0", [2], "FP32")
    tensor.set_data_from_numpy(np.full(2, value, dtype=np.float32))
    try:
        client.infer("flaky", [tensor], client_timeout=30)
        return True
    except InferenceServerException:
        return False
