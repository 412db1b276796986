"""Shared helpers for tests (and benchmarks) that start the whole embedded stack.

The stack is started exactly as `recsys stack up` starts it, only on free loopback ports and a
fresh state folder, so several can run on one machine and none touches a user's ``.recsys/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.triton_testing import free_port

T = TypeVar("T")

STACK_PORT_VARIABLES = (
    "RECSYS_TRITON_HTTP_PORT",
    "RECSYS_TRITON_GRPC_PORT",
    "RECSYS_TRITON_METRICS_PORT",
    "RECSYS_MLFLOW_PORT",
    "RECSYS_AIRFLOW_PORT",
)


LOCAL_SERVICES = frozenset(
    {
        "triton",
        "mlflow",
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    }
)
"""The services ``recsys stack up`` starts with the default (local) executor."""


def isolated_stack_environment(root: Path) -> dict[str, str | None]:
    """The variables that put a whole stack on free ports with its state under ``root``
    (``None``: unset it): the default model name, no cron for the pipeline, the stack's own
    MLflow and the built-in monitor thresholds."""
    env: dict[str, str | None] = {key: str(free_port()) for key in STACK_PORT_VARIABLES}
    env.update(
        {
            "RECSYS_HOME": str(Path(root) / "home"),
            "RECSYS_TRITON_REPO": str(Path(root) / "repo"),
            "RECSYS_MODEL_NAME": "product_search",
            "RECSYS_PIPELINE_SCHEDULE": None,
            "MLFLOW_TRACKING_URI": None,
            "RECSYS_MONITOR_CONFIG": None,
        }
    )
    return env


def benchmark_stack_environment(root: Path, **overrides: str | None) -> dict[str, str | None]:
    """:func:`isolated_stack_environment` for a benchmark run as a user runs it: offline
    models, the stack's own generated MLflow login and no webhook (alerts stay in the alert
    log); ``overrides`` on top (``None`` unsets)."""
    return {
        **isolated_stack_environment(root),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_USERNAME": None,
        "MLFLOW_TRACKING_PASSWORD": None,
        "RECSYS_ALERT_WEBHOOK": None,
        **overrides,
    }


def export_environment(env: dict[str, str | None]) -> None:
    """Set (or, for ``None``, unset) ``env`` in this process's environment, for its children."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def apply_environment(env: dict[str, str | None], patch: Any) -> None:
    """Set (or, for ``None``, unset) ``env`` with a ``pytest.MonkeyPatch``."""
    for key, value in env.items():
        if value is None:
            patch.delenv(key, raising=False)
        else:
            patch.setenv(key, value)


def wait_for(what: str, condition: Callable[[], T], timeout_s: float, poll_s: float = 1.0) -> T:
    """``condition()``'s first truthy value; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
