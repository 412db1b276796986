"""The used-by paths in a real browser: headless Chromium on the embedded stack's web UIs.

Every other Airflow test runs DAGs under ``dag.test()``; here a person's path is followed
through the pages they use, on one stack (``recsys stack up`` on free ports) for the module:

1. Airflow: sign in, open ``search_model_pipeline``, fill its trigger form with non-default
   params (tiny model, a few rows and steps, no reranker) and watch the run succeed;
2. a bad ``data_path`` typed in the same form gives a failed run whose task log says what was
   wrong in one line;
3. MLflow (basic auth): the registered model with its ``champion`` alias, the gate's decision
   and lineage tags; a forced faulty deploy then moves ``champion`` / ``previous``, client
   traffic breaks it, the scheduled ``triton_monitor`` rolls back, and the registry page shows
   the aliases moved back and the faulty version tagged with why; the monitor's run shows its
   verdict in its task log.

The tests run in that order and build on each other (one pipeline run serves the next). With
``RECSYS_SCREENSHOT_DIR`` set, the pages are also saved there (``scripts/screenshots.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser_testing import AirflowUI, Browser, MlflowUI, browser_missing, chromium
from tests.stack_testing import isolated_stack_environment, wait_for

pytestmark = pytest.mark.browser

PIPELINE = "search_model_pipeline"
MONITOR = "triton_monitor"
MAX_ROWS = 400
MAX_STEPS = 5
BAD_DATA_PATH = "/nonexistent/relevance.csv"


@dataclass
class Platform:
    """The running stack, a REST client for what a person would not click (finding the run
    their click started), the browser, and what earlier tests left for later ones."""

    settings: Any
    airflow: Any
    browser: Browser
    airflow_ui: AirflowUI
    mlflow_ui: MlflowUI
    data_path: Path
    base_model: Path
    first_run: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def platform(tmp_path_factory, tiny_bert_dir, homedepot_sample) -> Iterator[Platform]:
    """One stack for every browser test (a stack start is the expensive part), stopped after."""
    missing = browser_missing()
    if missing:  # setup.sh installs them: a missing browser is a broken setup, not a skip
        pytest.fail(f"the browser tests need {missing}: run scripts/setup.sh")
    from recsys import stack
    from recsys.airflow_client import AirflowClient
    from recsys.config import load_settings
    from recsys.credentials import mlflow_credentials

    root = tmp_path_factory.mktemp("browser")
    patch = pytest.MonkeyPatch()
    env = {
        **isolated_stack_environment(root),
        "RECSYS_ALERT_WEBHOOK": None,  # alerts stay in the stack's alert log
    }
    for key, value in env.items():
        if value is None:
            patch.delenv(key, raising=False)
        else:
            patch.setenv(key, value)
    settings = load_settings()
    try:
        stack.up(settings, timeout_s=300, echo=lambda _: None)
        password = stack.airflow_password(settings)
        airflow = AirflowClient(
            f"http://127.0.0.1:{settings.airflow_port}", stack.AIRFLOW_USER, password
        )
        airflow.wait_for_dag(PIPELINE)
        mlflow_user, mlflow_password = mlflow_credentials(settings) or ("", "")
        with chromium() as driver:
            browser = Browser(driver, root / "screenshots")
            yield Platform(
                settings=settings,
                airflow=airflow,
                browser=browser,
                airflow_ui=AirflowUI(
                    browser,
                    f"http://127.0.0.1:{settings.airflow_port}",
                    stack.AIRFLOW_USER,
                    password,
                ),
                mlflow_ui=MlflowUI(
                    browser, settings.mlflow_tracking_uri, mlflow_user, mlflow_password
                ),
                data_path=homedepot_sample,
                base_model=tiny_bert_dir,
            )
    finally:
        stack.down(settings, echo=lambda _: None)
        patch.undo()


def _aliases(version_page: str) -> str:
    """The aliases a version page lists (between its "Aliases" and "Stage" fields)."""
    return version_page.split("Aliases", 1)[-1].split("Stage", 1)[0]


def _new_run(platform: Platform, dag_id: str, before: set[str]) -> dict[str, Any]:
    """The run a click on "Trigger" started: the DAG's newest run not in ``before``."""

    def started() -> dict[str, Any] | None:
        runs = [r for r in platform.airflow.runs(dag_id, limit=10) if r["dag_run_id"] not in before]
        return runs[0] if runs else None

    return wait_for(f"the {dag_id} run the trigger form started", started, 60)


def _fill_trigger_form(
    platform: Platform, params: dict[str, str | int], switches: dict[str, bool]
) -> set[str]:
    """Open the pipeline's trigger form, type ``params`` and set ``switches``; return the ids
    of the runs that existed before (to find the one the click on "Trigger" starts)."""
    ui = platform.airflow_ui
    before = {r["dag_run_id"] for r in platform.airflow.runs(PIPELINE, limit=50)}
    ui.open_trigger_form(PIPELINE)
    for name, value in params.items():
        ui.set_param(name, value)
    for name, on in switches.items():
        ui.set_switch(name, on)
    return before


def test_trigger_form_starts_the_pipeline_with_the_typed_params(platform: Platform) -> None:
    ui, browser = platform.airflow_ui, platform.browser
    ui.login()

    # The DAG page explains the pipeline (doc_md) before anyone triggers it.
    ui.open_dag(PIPELINE)

    params = {
        "data_path": str(platform.data_path),
        "base_model": str(platform.base_model),
        "max_rows": MAX_ROWS,
        "max_steps": MAX_STEPS,
        "batch_size": 16,
    }
    before = _fill_trigger_form(platform, params, {"train_reranker": False})
    form = browser.text()
    # What each param is for is readable next to it.
    for description in (
        "Use only the first N rows (0 = all)",
        "'minilm' or a local HF folder",
        "Skip the champion gate (rehearsals only)",
    ):
        assert description in form, description
    ui.show_param("data_path")
    browser.shot("airflow-trigger-form", height=1300)
    ui.submit_trigger()

    run = _new_run(platform, PIPELINE, before)
    conf = run["conf"]
    assert (conf["max_rows"], conf["max_steps"], conf["batch_size"]) == (MAX_ROWS, MAX_STEPS, 16)
    assert conf["data_path"] == str(platform.data_path)
    assert conf["train_reranker"] is False and conf["retrieval"] == "dense"

    run_id = run["dag_run_id"]
    state = platform.airflow.wait_for_run(PIPELINE, run_id, timeout_s=900, poll_s=3)
    assert state == "success", platform.airflow.task_states(PIPELINE, run_id)
    platform.first_run = run

    # What the person watching sees: the run's page says it succeeded, task by task.
    ui.open_run(PIPELINE, run_id)
    text = browser.wait_text("deploy", "champion_gate")
    assert "success" in text.lower()
    browser.shot("airflow-finished-run")
    states = platform.airflow.task_states(PIPELINE, run_id)
    assert states["deploy"] == "success" and states["fine_tune_reranker"] == "skipped", states


def test_a_bad_data_path_fails_with_one_line_saying_why(platform: Platform) -> None:
    ui, browser = platform.airflow_ui, platform.browser
    assert platform.first_run, "needs the first test's run (the pipeline runs one at a time)"
    before = _fill_trigger_form(platform, {"data_path": BAD_DATA_PATH}, {})
    ui.submit_trigger()
    run = _new_run(platform, PIPELINE, before)
    run_id = run["dag_run_id"]
    assert platform.airflow.wait_for_run(PIPELINE, run_id, timeout_s=300, poll_s=2) == "failed"
    assert platform.airflow.task_states(PIPELINE, run_id)["validate_data"] == "failed"

    expected = f"relevance data not found at {BAD_DATA_PATH}"
    text = ui.open_task(PIPELINE, run_id, "validate_data", expected)
    lines = [line for line in text.splitlines() if expected in line]
    assert lines and min(len(line) for line in lines) < 300, lines
    browser.shot("airflow-failed-task-log")


def test_registry_page_after_a_faulty_deploy_and_the_monitors_rollback(
    platform: Platform,
) -> None:
    from recsys import registry
    from recsys.audit import read_records
    from tests.test_stack_monitoring import Traffic

    assert platform.first_run, "needs the first test's deployed v1"
    settings = platform.settings
    model, uri = settings.model_name, settings.mlflow_tracking_uri
    mlflow, browser = platform.mlflow_ui, platform.browser
    assert registry.alias_version(uri, model, registry.CHAMPION) == 1

    # v1 as the registry page shows it: champion, with the gate's decision and its lineage.
    mlflow.open_model(model, "Version 1", "champion")
    version_1 = mlflow.open_version(model, 1, "no champion yet", "passed")
    assert "@ champion" in _aliases(version_1)
    for tag in ("data_hash", "git_sha", "airflow_run_id", "gx_success", "metrics"):
        assert tag in version_1, tag
    assert platform.first_run["dag_run_id"] in version_1

    # A forced faulty v2 (rehearsal params): it answers its smoke query, then raises.
    conf = {
        **platform.first_run["conf"],
        "fault_injection": {"mode": "raise", "after_requests": 2},
        "force_deploy": True,
    }
    faulty_run = platform.airflow.trigger(PIPELINE, conf)
    state = platform.airflow.wait_for_run(PIPELINE, faulty_run, timeout_s=900, poll_s=3)
    assert state == "success", platform.airflow.task_states(PIPELINE, faulty_run)
    assert registry.alias_version(uri, model, registry.CHAMPION) == 2
    mlflow.open_model(model, "Version 2", "champion", "previous")
    version_2 = mlflow.open_version(
        model, 2, "failed, deployed anyway (force_deploy)", "keeping the champion"
    )
    assert "@ champion" in _aliases(version_2)
    assert "@ previous" in _aliases(mlflow.open_version(model, 1, "Aliases"))

    # Client traffic breaks v2; the scheduled monitor rolls back to v1.
    traffic = Traffic(settings.triton_grpc_url, model)
    traffic.start()
    try:

        def rollback_record() -> list[dict[str, Any]]:
            records = read_records(settings.audit_log, model)
            return [r for r in records if r["action"] == "rollback"]

        rollbacks = wait_for("the monitor's rollback", rollback_record, timeout_s=300, poll_s=2)
    finally:
        traffic.stop_event.set()
        traffic.join(15)
    assert [(r["from_version"], r["to_version"], r["actor"]) for r in rollbacks] == [
        (2, 1, MONITOR)
    ]

    # The registry pages after the rollback: champion back on v1, v2 tagged with why.
    mlflow.open_model(model, "Version 2", "champion")
    browser.shot("mlflow-registry-after-rollback", height=1900)  # both versions' rows
    assert "@ champion" in _aliases(mlflow.open_version(model, 1, "Aliases"))
    version_2 = mlflow.open_version(model, 2, "rolled_back", "rollback_reason", "error rate")
    assert "champion" not in _aliases(version_2) and "previous" not in _aliases(version_2)
    mlflow.show_tag("rollback_reason")
    browser.shot("mlflow-version-rolled-back")

    # The monitor's run that rolled back shows its verdict in the rollback task's log.
    def rollback_run() -> str | None:
        for run in platform.airflow.runs(MONITOR, limit=20):
            states = platform.airflow.task_states(MONITOR, run["dag_run_id"])
            if states.get("rollback") == "success":
                return run["dag_run_id"]
        return None

    monitor_run = wait_for("the monitor run that rolled back", rollback_run, 120, 2)
    text = platform.airflow_ui.open_task(
        MONITOR, monitor_run, "rollback", f"Verdict on {model}: rollback due"
    )
    assert "error rate" in text
    browser.shot("airflow-monitor-verdict")
