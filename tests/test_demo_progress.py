"""What the demo and `recsys train --wait` show while a pipeline run goes, on the real stack.

The embedded stack (Airflow's api-server, scheduler, dag-processor and triggerer, with Triton
and MLflow) runs for this module. A pipeline run pointed at a file that is not relevance data
fails in its first task within seconds, which is enough to see every task reported once, as it
finishes, with its state and the time since the run started, and the UI address of the run.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
import requests

from tests.stack_testing import apply_environment, isolated_stack_environment

PIPELINE = "search_model_pipeline"
RUN_TIMEOUT_S = 300.0
TASK_LINE = re.compile(r"^  \[\s*(?:(\d+)h)?(\d+)m(\d\d)s\] (\S+)\s+(\S+)$")


@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory):
    """The whole embedded stack on free loopback ports, manual-only pipeline schedule."""
    from recsys import stack

    home = tmp_path_factory.mktemp("demo-stack")
    with pytest.MonkeyPatch.context() as patch:
        apply_environment(isolated_stack_environment(home), patch)
        patch.delenv("RECSYS_ALERT_WEBHOOK", raising=False)
        from recsys.config import load_settings

        settings = load_settings()
        try:
            stack.up(settings, echo=lambda _: None)
            yield settings
        finally:
            stack.down(settings, echo=lambda _: None)


@pytest.fixture(scope="module")
def airflow(stack_settings):
    from recsys.operations import airflow_client

    client = airflow_client(stack_settings)
    client.wait_for_dag(PIPELINE, timeout_s=180)
    return client


@pytest.fixture
def not_relevance_data(tmp_path):
    """A file the pipeline's validate_data task rejects at once (not the relevance CSV)."""
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:\nsync,x,4,65534\n")
    return path


def _task_lines(out: str) -> dict[str, tuple[str, int]]:
    """``{task: (state, elapsed seconds)}`` from the printed task lines; each task once."""
    seen: dict[str, tuple[str, int]] = {}
    for line in out.splitlines():
        match = TASK_LINE.match(line)
        if match:
            hours, minutes, seconds, task, state = match.groups()
            assert task not in seen, f"{task} reported twice:\n{out}"
            seen[task] = (state, int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds))
    return seen


def test_demo_unpauses_the_pipeline_only_without_a_time_schedule(airflow):
    """The demo must not let a paused, time-scheduled DAG start its scheduled runs: it stops
    and says why. query_drift (hourly) stands in for a pipeline on @weekly once paused."""
    from recsys.demo import ScheduledRunsWouldStartError, _unpause_pipeline

    assert airflow.wait_for_dag("query_drift", timeout_s=180)["timetable_periodic"] is True
    airflow.set_paused("query_drift", True)
    try:
        with pytest.raises(ScheduledRunsWouldStartError, match=r"query_drift is paused.*sched"):
            _unpause_pipeline(airflow, "query_drift")
        assert airflow.wait_for_dag("query_drift")["is_paused"] is True
    finally:
        airflow.set_paused("query_drift", False)  # as the stack runs it (unpaused at creation)

    _unpause_pipeline(airflow, PIPELINE)  # RECSYS_PIPELINE_SCHEDULE=none: manual + drift only
    dag = airflow.wait_for_dag(PIPELINE)
    assert dag["is_paused"] is False
    assert dag["timetable_periodic"] is False and dag["next_dagrun_run_after"] is None


def test_demo_prints_each_task_as_it_finishes_and_where_to_watch(
    airflow, stack_settings, not_relevance_data, capsys
):
    from recsys.demo import _follow_pipeline_run, _unpause_pipeline
    from recsys.operations import TrainingRunFailedError

    _unpause_pipeline(airflow, PIPELINE)
    run_id = airflow.trigger(PIPELINE, {"data_path": str(not_relevance_data)})
    with pytest.raises(TrainingRunFailedError, match=r"at task validate_data"):
        _follow_pipeline_run(airflow, run_id, timeout_s=RUN_TIMEOUT_S)
    out = capsys.readouterr().out

    # The UI route is /dags/:dagId/runs/:runId; run ids hold ':' and '+', hence quoted.
    run_path = quote(run_id, safe="")
    url = f"http://127.0.0.1:{stack_settings.airflow_port}/dags/{PIPELINE}/runs/{run_path}"
    assert f"watch it in the Airflow UI: {url}" in out
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()  # the UI's run page

    reported = _task_lines(out)
    final = airflow.task_states(PIPELINE, run_id)
    assert {task: state for task, (state, _) in reported.items()} == final
    assert reported["validate_data"][0] == "failed"
    assert "upstream_failed" in {state for state, _ in reported.values()}
    assert all(0 <= elapsed < RUN_TIMEOUT_S for _, elapsed in reported.values())


def test_train_wait_without_a_terminal_prints_one_line_per_finished_task(
    airflow, not_relevance_data, capsys, monkeypatch
):
    from recsys.cli import main

    monkeypatch.setenv("RECSYS_PROGRESS", "0")  # as in a pipe or CI log: no bar

    assert main(["train", "--data", str(not_relevance_data), "--unpause", "--wait"]) == 1
    captured = capsys.readouterr()
    run_id = re.search(rf"triggered {PIPELINE} run (\S+) ", captured.out).group(1)
    assert f"watch it in the Airflow UI: {airflow.ui_run_url(PIPELINE, run_id)}" in captured.out
    reported = _task_lines(captured.out)
    assert reported["validate_data"][0] == "failed"
    assert set(reported) == set(airflow.task_states(PIPELINE, run_id))
    assert "TrainingRunFailedError" in captured.err and "validate_data" in captured.err
