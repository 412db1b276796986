"""Session-wide test environment: isolated state folders, offline models, a real Airflow DB.

Airflow reads ``AIRFLOW_HOME`` when it is first imported, so the variables are set here at
import time, before any test module can import it; the metadata database is reset once per
session. Nothing in the suite downloads anything.
"""

from __future__ import annotations

import os
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
    }
)

HOMEDEPOT_SAMPLE = FIXTURES / "homedepot_sample.csv"


@pytest.fixture(scope="session")
def homedepot_sample() -> Path:
    return HOMEDEPOT_SAMPLE


@pytest.fixture(scope="session")
def tiny_bert_dir() -> Path:
    """A 2-layer BERT with a WordPiece vocabulary of the fixture's words, built offline."""
    import pandas as pd

    from recsys.tiny_model import build_tiny_bert

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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` (SQLite + local artifact store) on a free loopback port, started
    exactly as the stack starts it; yields its tracking URI."""
    import dataclasses
    import subprocess
    import time

    import requests

    from recsys.config import load_settings
    from recsys.stack import mlflow_service

    port = free_port()
    home = SESSION_DIR / "mlflow-server"
    settings = dataclasses.replace(load_settings(), home=home, mlflow_port=port)
    service = mlflow_service(settings, dict(os.environ))
    log_path = home / "mlflow.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            service.command,
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if requests.get(service.health_url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, f"mlflow server died: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "mlflow server did not become healthy in 120 s"
            time.sleep(0.5)
        yield service.ui
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
