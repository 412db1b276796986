"""Session-wide test environment: isolated state folders, offline models, a real Airflow DB.

Airflow reads ``AIRFLOW_HOME`` when it is first imported, so the variables are set here at
import time, before any test module can import it; the metadata database is reset once per
session. Nothing in the suite downloads anything.

The suite runs the secured setup: every Triton it starts restricts model control to one admin
key, and the MLflow server runs the basic-auth app. The session's secrets are generated here
and exported the way the stack exports them to Airflow workers, so every client in the suite
authenticates exactly as the pipeline does.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SESSION_DIR = Path(tempfile.mkdtemp(prefix="recsys-tests-"))

os.environ.update(
    {
        "AIRFLOW_HOME": str(SESSION_DIR / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GX_ANALYTICS_ENABLED": "False",
        "RECSYS_HOME": str(SESSION_DIR / "recsys"),
        "RECSYS_TRITON_ADMIN_KEY": secrets.token_urlsafe(32),
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        # One model instance per deployed version (the platform's default is the CPU count):
        # every load starts one python stub instead of two, which keeps the suite's many
        # deploys and rollbacks fast on 2 cores. test_deploy checks the default itself.
        "RECSYS_TRITON_INSTANCES": "1",
    }
)

HOMEDEPOT_SAMPLE = FIXTURES / "homedepot_sample.csv"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove SESSION_DIR (Airflow DB, MLflow server store, tiny models: hundreds of MB per run).

    This hook runs after the last test's teardown, when every session fixture (the MLflow
    server) and module fixture (Triton servers) has stopped, so nothing writes there any more.
    ``RECSYS_KEEP_TEST_DIR=1`` keeps it for a post-mortem. A failed removal is reported, not
    raised: the tests' verdict stands either way.
    """
    import shutil
    import sys

    if os.environ.get("RECSYS_KEEP_TEST_DIR", "").strip() in {"1", "true", "yes"}:
        print(f"\nkept the test session's state in {SESSION_DIR}", file=sys.stderr)
        return
    try:
        shutil.rmtree(SESSION_DIR)
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(f"\ncould not remove {SESSION_DIR}: {exc}", file=sys.stderr)


@pytest.fixture(scope="session")
def homedepot_sample() -> Path:
    return HOMEDEPOT_SAMPLE


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    """A 2-layer BERT with a WordPiece vocabulary of the fixture's words, built offline."""
    import pandas as pd

    from recsys.families.search.tiny_model import build_tiny_bert

    frame = pd.read_csv(HOMEDEPOT_SAMPLE, encoding="latin-1")
    corpus = frame["product_title"].tolist() + frame["search_term"].tolist()
    return build_tiny_bert(SESSION_DIR / "tiny-bert", corpus)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Reset Airflow's SQLite metadata DB once for the session (tests then use dag.test())."""
    from airflow.utils.db import resetdb

    resetdb()


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` (SQLite + local artifact store) on a free loopback port, started
    exactly as the stack starts it; yields its tracking URI."""
    from recsys.stack import running_mlflow_server
    from tests.triton_testing import free_port

    with running_mlflow_server(SESSION_DIR / "mlflow-server", free_port()) as uri:
        yield uri


@pytest.fixture
def platform_and_triton(monkeypatch, tmp_path, mlflow_server):
    """Point every ``recsys`` setting at a fresh state folder, a real Triton and MLflow; yields
    the settings and the Triton harness (for tests that stop or restart the server)."""
    import uuid

    from tests.triton_testing import running_triton

    with running_triton(tmp_path / "triton") as triton:
        server = triton.server
        monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("RECSYS_TRITON_REPO", str(triton.repo))
        monkeypatch.setenv("RECSYS_TRITON_HTTP_PORT", str(server.http_port))
        monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(server.grpc_port))
        monkeypatch.setenv("RECSYS_TRITON_METRICS_PORT", str(server.metrics_port))
        # One registered model per test: the MLflow server is shared by the session.
        monkeypatch.setenv("RECSYS_MODEL_NAME", f"product_search_{uuid.uuid4().hex[:8]}")
        monkeypatch.setenv("RECSYS_RECOMMEND_MODEL_NAME", f"item_recs_{uuid.uuid4().hex[:8]}")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        monkeypatch.delenv("RECSYS_ALERT_WEBHOOK", raising=False)
        monkeypatch.delenv("RECSYS_MONITOR_CONFIG", raising=False)
        from recsys.config import load_settings

        yield load_settings(), triton


@pytest.fixture
def platform(platform_and_triton):
    """Settings of a fresh platform on a real Triton and MLflow."""
    return platform_and_triton[0]


@pytest.fixture
def search_artifacts(tiny_bert_dir, homedepot_sample, tmp_path):
    """Build search serving folders of the fixture's catalogue with the tiny BERT:
    ``build(name, fault=None)`` (``fault``: the manifest's ``fault_injection``)."""
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.export import build_serving_artifacts

    catalog = product_catalog(read_relevance_csv(homedepot_sample))

    def build(name: str, fault=None) -> Path:
        return build_serving_artifacts(
            tiny_bert_dir, catalog, tmp_path / name, model_name="x", fault_injection=fault
        )

    return build


@pytest.fixture(scope="session")
def frames(homedepot_sample: Path):
    """The fixture's held-out queries (the pipeline's default split) and its product catalogue."""
    from recsys.data import product_catalog, read_relevance_csv, split_by_query

    frame = read_relevance_csv(homedepot_sample)
    return split_by_query(frame, test_fraction=0.2, seed=13).test, product_catalog(frame)


@pytest.fixture
def split_files(homedepot_sample: Path, tmp_path: Path) -> dict[str, str]:
    """The fixture split as the ``train_path``/``test_path``/``catalog_path`` files pipeline
    stages read (the same split and catalogue as ``frames``)."""
    from recsys.data import read_relevance_csv
    from recsys.families.search.pipeline import split_data

    clean = tmp_path / "clean.csv"
    read_relevance_csv(homedepot_sample).to_csv(clean, index=False)
    return split_data(str(clean), tmp_path, test_fraction=0.2, seed=13)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory):
    """One real Triton server for a test module (tests load and unload their own models)."""
    from tests.triton_testing import running_triton

    with running_triton(tmp_path_factory.mktemp("triton")) as harness:
        yield harness


@pytest.fixture(scope="module")
def control(triton):
    """A gRPC model-control client of the module's Triton server."""
    from recsys.triton.control import TritonControl

    with TritonControl(triton.grpc_url, timeout_s=30) as client:
        yield client


@pytest.fixture
def webhook(monkeypatch):
    """A live local webhook receiver with ``RECSYS_ALERT_WEBHOOK`` pointing at it. Request it
    after fixtures that clear the variable (``platform``, ``sampling_platform``)."""
    from tests.webhook_receiver import Receiver

    receiver = Receiver()
    receiver.thread.start()
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK", receiver.url)
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def flaky_triton(tmp_path: Path):
    """A throwaway tritonserver (free ports, always stopped) with the python model ``flaky``
    (raises on negative input) in its repository, not loaded; yields the harness and a gRPC
    client."""
    import tritonclient.grpc as grpcclient

    from tests.triton_testing import install_flaky_model, running_triton

    with running_triton(tmp_path / "triton") as harness:
        install_flaky_model(harness.repo)
        client = grpcclient.InferenceServerClient(harness.grpc_url)
        try:
            yield harness, client
        finally:
            client.close()
