"""The `recsys` command in-process against real GX, Triton and MLflow: exit codes and output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from recsys import registry
from recsys.audit import append_record
from recsys.cli import main
from recsys.deploy import register_model
from recsys.families.search.client import search
from recsys.operations import build_train_conf
from recsys.triton.control import TritonControl
from tests.triton_testing import (
    CATALOG,
    build_test_serving_artifacts,
    copy_artifacts,
    free_port,
)


@pytest.fixture
def register(tiny_bert_dir, homedepot_sample, tmp_path):
    """Register a new version of the platform's model (serving artifacts logged to MLflow, no
    Triton folder published), as the pipeline's register task does."""
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.families.search.export import build_serving_artifacts

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


def test_data_validate_on_a_file_that_is_not_relevance_csv_says_what_it_expected(tmp_path, capsys):
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        "odd,line,with,commas\n"
    )
    assert main(["data", "validate", str(passwd)]) == 2
    err = capsys.readouterr().err
    assert "id, product_uid, product_title, search_term, relevance" in err
    assert "found a first line of 'root:x:0:0:root:/root:/bin/bash'" in err
    assert "line 3 has 4 fields where that header has 1" in err
    assert "C error" not in err and "Traceback" not in err

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00,\x00\n\x00,,\n")
    assert main(["data", "validate", str(binary)]) == 2
    assert "found binary data" in capsys.readouterr().err


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


# -- bad arguments: exit 2 before any service is asked ----------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["query", ""], "got ''"),
        (["query", "   "], "got '   '"),
        (["query", "drill", "--top-k", "0"], "got 0"),
        (["rollback", "--to", "0"], "got 0"),
        (["rollback", "--to", "-3"], "got -3"),
        (["rollback", "--to", "v2"], "got 'v2'"),
        (["deploy", "--version", "0"], "got 0"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(argv, named, monkeypatch, capsys):
    # Nothing listens here: a value that slipped through would fail with exit 3, not 2.
    monkeypatch.setenv("RECSYS_TRITON_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as parse_error:
        main(argv)
    assert parse_error.value.code == 2
    err = capsys.readouterr().err
    assert named in err
    assert "breached" not in err


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
    assert len(search(control, platform.model_name, "angle bracket", 5)) == 5

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
    header, *hits = capsys.readouterr().out.splitlines()
    assert header == f"{platform.model_name} v{v1}: 'angle bracket'"
    assert len(hits) == 3
    assert all(len(line.split(maxsplit=3)) == 4 for line in hits)  # rank, id, score, title
    assert main(["rollback", "--model", platform.model_name, "--to", str(v2)]) == 0
    assert f"{platform.model_name} rolled back from v{v1} to v{v2}" in capsys.readouterr().out
    assert control.loaded_versions(platform.model_name) == [v2]


def test_query_shows_the_titles_of_the_version_that_answered(platform_and_triton, tmp_path, capsys):
    """Titles come from the answering version's folder: v2 carries other titles than v1 for
    the same products, and v3 was exported before titles existed (ids only, said so)."""
    from recsys.triton.repository import publish_version

    settings, triton = platform_and_triton
    model = settings.model_name
    v1 = build_test_serving_artifacts(tmp_path / "v1")
    with np.load(v1 / "products.npz", allow_pickle=False) as products:
        stored = {name: products[name] for name in products.files}
    assert dict(zip(stored["ids"], stored["titles"], strict=True)) == CATALOG  # the export

    v2 = copy_artifacts(v1, tmp_path / "v2")
    np.savez(v2 / "products.npz", **{**stored, "titles": np.char.upper(stored["titles"])})
    v3 = copy_artifacts(v1, tmp_path / "v3")
    np.savez(v3 / "products.npz", ids=stored["ids"], embeddings=stored["embeddings"])
    control = TritonControl(triton.grpc_url)
    for version, artifacts in ((1, v1), (2, v2), (3, v3)):
        publish_version(triton.repo, model, version, artifacts)

    query = CATALOG["100003"]  # an exact title ranks its own product first
    control.load_version(model, 1, triton.repo)
    capsys.readouterr()  # the export's own output
    assert main(["query", query, "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"{model} v1: {query!r}"
    rank, product_id, score, title = lines[1].split(maxsplit=3)
    assert (rank, product_id, title) == ("1.", "100003", CATALOG["100003"])
    assert float(score) > 0.99
    assert len(lines) == 4 and all(len(line.split(maxsplit=3)) == 4 for line in lines[1:])
    assert captured.err == ""

    control.load_version(model, 2, triton.repo)
    assert main(["query", query, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{model} v2: {query!r}"
    assert lines[1].endswith(CATALOG["100003"].upper())

    control.load_version(model, 3, triton.repo)
    assert main(["query", query, "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"{model} v3: {query!r}"
    rank, product_id, score = lines[1].split()  # rank, id, score: no title
    assert (rank, product_id) == ("1.", "100003")
    assert len(lines) == 4
    assert "product titles unavailable: v3 was exported without titles" in captured.err


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


def test_a_canary_moved_by_hand_through_the_cli(platform, register, capsys, monkeypatch):
    """`recsys deploy --canary --no-analysis`, then `canary status|weight|abort`, a refused
    plain deploy while it runs, and `feedback`: the operator's path without the DAG."""
    from recsys.delivery.client import ask
    from recsys.delivery.feedback import FeedbackLog, feedback_log_path
    from recsys.delivery.routing import read_routing
    from recsys.families import get_family

    v1, v2 = register(platform, "first"), register(platform, "second")
    assert main(["deploy", "--version", str(v1)]) == 0
    assert main(["canary", "status"]) == 0
    assert "no rollout under way" in capsys.readouterr().out

    assert main(["deploy", "--version", str(v2), "--canary", "--steps", "10,100",
                 "--no-analysis"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"canary of v{v2} against v{v1} started" in out and "10% of routed traffic" in out
    assert f"{platform.model_name}_router" in out
    control = TritonControl(platform.triton_grpc_url)
    assert control.loaded_versions(platform.model_name) == [v1, v2]

    assert main(["deploy", "--version", str(v1)]) == 1  # no all-at-once deploy mid-rollout
    assert "promote or abort it" in capsys.readouterr().err
    assert main(["canary", "weight", "40"]) == 0
    assert read_routing(platform.triton_repo, platform.model_name).candidate_weight == 0.4
    assert main(["canary", "status"]) == 0
    assert "candidate weight 40%" in capsys.readouterr().out
    assert main(["status"]) == 0
    assert f"rollout: canary of v{v2} against v{v1}, 40% of routed traffic" in (
        capsys.readouterr().out
    )

    answer = ask(control, platform.model_name, get_family("search"), {"query": "angle bracket"})
    assert answer.version in (v1, v2) and answer.arm in ("stable", "candidate")
    assert main(["feedback", "--request-id", answer.request_id, "--item", answer.ids[0]]) == 0
    log = FeedbackLog(feedback_log_path(platform.home, platform.model_name))
    assert [r["request_id"] for r in log.records() if r] == [answer.request_id]

    assert main(["canary", "abort", "--reason", "looks wrong"]) == 0
    assert f"v{v2} aborted; v{v1} serves alone" in capsys.readouterr().out
    assert control.loaded_versions(platform.model_name) == [v1]
    assert main(["canary", "abort"]) == 1
    assert "no rollout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_weight:
        main(["canary", "weight", "101"])
    assert bad_weight.value.code == 2
