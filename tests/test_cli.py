"""The `recsys` command in-process against real GX, Triton and MLflow: exit codes and output."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from recsys import registry
from recsys.audit import append_record
from recsys.cli import main
from recsys.operations import build_train_conf
from recsys.pipeline import register_model
from recsys.triton.control import TritonControl
from tests.triton_testing import free_port


@pytest.fixture
def register(tiny_bert_dir, homedepot_sample, tmp_path):
    """Register a new version of the platform's model (serving artifacts logged to MLflow, no
    Triton folder published), as the pipeline's register task does."""
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.export import build_serving_artifacts

    catalog = product_catalog(read_relevance_csv(homedepot_sample))

    def build(settings, name: str) -> int:
        artifacts = build_serving_artifacts(
            tiny_bert_dir, catalog, tmp_path / name, model_name="x", fault_injection=None
        )
        run_id = registry.start_training_run(
            settings.mlflow_tracking_uri, "cli-tests", name, {"epochs": 1}, {}
        )
        return register_model(settings, run_id, str(artifacts), {"data_hash": "h"})["version"]

    return build


def _champion(settings) -> int | None:
    return registry.alias_version(settings.mlflow_tracking_uri, settings.model_name, "champion")


# -- data validate ----------------------------------------------------------------------------


def test_data_validate_passes_the_fixture(homedepot_sample, tmp_path, capsys):
    assert main(["data", "validate", str(homedepot_sample), "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out
    assert "rows in 560, clean 560, quarantined 0" in out
    assert "relevance_labels     passed" in out
    assert (tmp_path / "q" / "summary.json").is_file()
    assert (tmp_path / "q" / "docs" / "index.html").is_file()


def test_data_validate_fails_on_label_drift(homedepot_sample, tmp_path, capsys):
    frame = pd.read_csv(homedepot_sample, encoding="latin-1")
    frame["relevance"] = 1.0
    drifted = tmp_path / "drifted.csv"
    frame.to_csv(drifted, index=False)

    assert main(["data", "validate", str(drifted), "--out", str(tmp_path / "q")]) == 1
    captured = capsys.readouterr()
    assert "relevance_labels     FAILED" in captured.out
    assert "recsys data validate: data-quality gate failed" in captured.err
    assert "kl_divergence" in captured.err
    assert "Traceback" not in captured.err


def test_data_validate_on_a_missing_file_is_bad_input(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "absent.csv")]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_validate_runs_only_the_named_suites(homedepot_sample, tmp_path, capsys):
    args = ["data", "validate", str(homedepot_sample), "--suite", "queries", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "queries" in out and "relevance_labels" not in out


# -- train ------------------------------------------------------------------------------------


def test_build_train_conf_sends_only_what_was_set(homedepot_sample):
    assert build_train_conf() == {}
    conf = build_train_conf(data_path=homedepot_sample, epochs=2, max_steps=5, max_rows=100)
    assert conf == {
        "data_path": str(homedepot_sample.resolve()),
        "epochs": 2,
        "max_steps": 5,
        "max_rows": 100,
    }
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        build_train_conf(epochs=0)


def test_train_rejects_bad_input_before_calling_airflow(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "absent.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as parse_error:
        main(["train", "--epochs", "many"])
    assert parse_error.value.code == 2


def test_train_without_a_running_airflow_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_AIRFLOW_PORT", str(free_port()))
    assert main(["train", "--max-steps", "3", "--wait"]) == 3
    assert "Airflow api-server at http://127.0.0.1:" in capsys.readouterr().err


# -- deploy / rollback / status / audit against real Triton + MLflow --------------------------


def test_deploy_rebuilds_a_deleted_version_from_mlflow_and_rollback_moves_back(
    platform, register, capsys, monkeypatch
):
    v1, v2 = register(platform, "first"), register(platform, "second")
    version_dir = platform.triton_repo / platform.model_name / str(v1)
    assert not version_dir.exists()  # registered only: as if its folder had been deleted

    assert main(["deploy", "--version", str(v1)]) == 0
    assert "rebuilt from MLflow" in capsys.readouterr().out
    assert (version_dir / "manifest.json").is_file()
    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v1]
    assert len(control.search(platform.model_name, "angle bracket", 5)) == 5

    assert main(["deploy", "--version", str(v2)]) == 0
    assert _champion(platform) == v2
    assert main(["rollback", "--reason", "operator says so"]) == 0
    assert f"from v{v2} to v{v1}" in capsys.readouterr().out
    assert control.loaded_versions(platform.model_name) == [v1]
    assert _champion(platform) == v1

    shutil.rmtree(platform.triton_repo / platform.model_name / str(v2))
    assert main(["deploy", "--version", str(v2)]) == 0  # deleted after serving: rebuilt again
    assert control.loaded_versions(platform.model_name) == [v2]

    assert main(["deploy", "--version", str(v1)]) == 0  # folder present: loaded in place
    assert f"v{v1} loaded" in capsys.readouterr().out

    assert main(["deploy", "--version", "999"]) == 2
    assert "999 is not registered" in capsys.readouterr().err
    assert _champion(platform) == v1

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"loaded versions: v{v1}" in out
    assert f"champion  v{v1}" in out and f"previous  v{v2}" in out
    assert "deploy" in out

    assert main(["audit", "--model", platform.model_name, "--action", "rollback", "--json"]) == 0
    records = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(records) == 1 and '"reason": "operator says so"' in records[0]

    # --model aims deploy/rollback/query at another served model (e.g. the reranker model).
    monkeypatch.setenv("RECSYS_MODEL_NAME", f"{platform.model_name}_other")
    assert main(["query", "angle bracket", "--top-k", "3", "--model", platform.model_name]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["rollback", "--model", platform.model_name, "--to", str(v2)]) == 0
    assert f"{platform.model_name} rolled back from v{v1} to v{v2}" in capsys.readouterr().out
    assert control.loaded_versions(platform.model_name) == [v2]


def test_rollback_complete_pending_with_nothing_pending(monkeypatch, tmp_path, capsys):
    """Nothing pending is answered from the audit log alone (no MLflow call); ``--to`` and
    ``--complete-pending`` exclude each other. The replay itself is tested with MLflow really
    down and back in tests/test_faults.py."""
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert main(["rollback", "--complete-pending"]) == 0
    assert "no rollback has a pending registry update" in capsys.readouterr().out
    with pytest.raises(SystemExit) as parse_error:
        main(["rollback", "--complete-pending", "--to", "3"])
    assert parse_error.value.code == 2


def test_status_with_triton_down_says_so_and_exits_3(monkeypatch, tmp_path, mlflow_server, capsys):
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("RECSYS_MODEL_NAME", "status_nothing_serves")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    assert main(["status"]) == 3
    captured = capsys.readouterr()
    assert "Triton" in captured.out and "UNREACHABLE" in captured.out
    assert "champion  -" in captured.out  # MLflow is up and still reported
    assert "Traceback" not in captured.err


def test_audit_filters_by_model_and_action(monkeypatch, tmp_path, capsys):
    from recsys.config import load_settings

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    audit_log = load_settings().audit_log
    append_record(audit_log, "deploy", "shoes", version=1, replaced=None)
    append_record(audit_log, "deploy", "shoes", version=2, replaced=1)
    append_record(audit_log, "rollback", "shoes", from_version=2, to_version=1, reason="errors")
    append_record(audit_log, "deploy", "tools", version=7, replaced=None)

    assert main(["audit", "--model", "shoes", "--action", "rollback"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["time", "(UTC)", "action"]
    assert len(lines) == 2 and "v2->v1" in lines[1] and "errors" in lines[1]

    assert main(["audit", "--action", "deploy", "--json", "--limit", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["version"]) for r in records] == [("shoes", 2), ("tools", 7)]

    assert main(["audit", "--model", "nobody"]) == 0
    assert "no audit records match" in capsys.readouterr().out


def test_progress_bars_follow_the_environment(monkeypatch):
    from recsys.progress import progress_bar, progress_enabled

    monkeypatch.setenv("RECSYS_PROGRESS", "0")
    assert not progress_enabled()
    assert progress_bar(total=3, desc="x").disable
    monkeypatch.setenv("RECSYS_PROGRESS", "1")
    assert progress_enabled()
    monkeypatch.delenv("RECSYS_PROGRESS")
    assert not progress_enabled()  # pytest's stderr is not a terminal
