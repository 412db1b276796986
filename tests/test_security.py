"""Security of the platform against real services: Triton's model control needs the admin key
(inference does not), MLflow refuses anonymous API calls, repository paths cannot be steered
outside the model repository, and no secret shows up in what the stack prints or records."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from recsys.credentials import (
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USER_ENV,
    TRITON_ADMIN_HEADER,
    TRITON_ADMIN_KEY_ENV,
    redact_command,
    secrets_dir,
)
from recsys.families.search.client import search
from recsys.triton.control import TritonAuthError, TritonControl
from recsys.triton.repository import (
    InvalidModelNameError,
    UnsafePathError,
    list_versions,
    publish_version,
    verify_version_dir,
)
from recsys.triton.server import (
    ARGV_SECRET_ENV,
    KEY_PLACEHOLDER,
    SHM_PREFIX,
    TritonServer,
    TritonStartError,
)
from tests.triton_testing import (
    CATALOG,
    PeakMemory,
    TritonHarness,
    build_test_serving_artifacts,
    free_port,
    grpc_shape_bomb,
    running_triton,
)

MODEL = "product_search"
QUERY = CATALOG["100009"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_serving_artifacts(tmp_path_factory.mktemp("artifacts") / "healthy")


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[TritonHarness]:
    """A restricted server serving v1 of ``MODEL``."""
    with running_triton(tmp_path_factory.mktemp("triton")) as harness:
        publish_version(harness.repo, MODEL, 1, artifacts)
        TritonControl(harness.grpc_url, timeout_s=30).load_version(MODEL, 1, harness.repo)
        yield harness


def _still_serving_v1(harness: TritonHarness) -> None:
    assert TritonControl(harness.grpc_url).loaded_versions(MODEL) == [1]
    assert search(TritonControl(harness.grpc_url, admin_key=""), MODEL, QUERY, 1)[0][0] == "100009"


# -- Triton model control -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "wrong-key-0123456789"], ids=["no-key", "wrong-key"])
def test_grpc_model_control_needs_the_admin_key(triton: TritonHarness, key: str) -> None:
    anonymous = TritonControl(triton.grpc_url, timeout_s=30, admin_key=key)
    with pytest.raises(TritonAuthError, match="admin key"):
        anonymous.unload(MODEL)
    with pytest.raises(TritonAuthError, match="admin key"):
        anonymous.load_version(MODEL, 1, triton.repo)
    with pytest.raises(TritonAuthError, match="admin key"):
        anonymous.loaded_versions(MODEL)
    # Inference needs no key, and the refused calls changed nothing.
    assert search(anonymous, MODEL, QUERY, 3)[0][0] == "100009"
    _still_serving_v1(triton)


def test_http_model_control_needs_the_admin_key(triton: TritonHarness) -> None:
    base = triton.server.http_url
    unload = f"{base}/v2/repository/models/{MODEL}/unload"
    for headers in ({}, {TRITON_ADMIN_HEADER: "wrong-key-0123456789"}):
        for url in (
            unload,
            f"{base}/v2/repository/models/{MODEL}/load",
            f"{base}/v2/repository/index",
        ):
            refused = requests.post(url, headers=headers, timeout=30)
            assert refused.status_code == 403, (url, refused.text)
            assert TRITON_ADMIN_HEADER in refused.text
    _still_serving_v1(triton)

    admin = {TRITON_ADMIN_HEADER: triton.admin_key}
    index = requests.post(f"{base}/v2/repository/index", headers=admin, timeout=30)
    assert index.status_code == 200
    assert {"name": MODEL, "version": "1", "state": "READY"} in index.json()

    # Inference over HTTP is for key holders (Triton's JSON path allocates by declared shape);
    # clients infer over gRPC, which needs no key.
    body = {
        "inputs": [
            {"name": "QUERY", "shape": [1, 1], "datatype": "BYTES", "data": [QUERY]},
            {"name": "TOP_K", "shape": [1, 1], "datatype": "INT32", "data": [2]},
        ]
    }
    infer = f"{base}/v2/models/{MODEL}/infer"
    assert requests.post(infer, json=body, timeout=30).status_code == 403
    answer = requests.post(infer, json=body, headers=admin, timeout=30)
    assert answer.status_code == 200, answer.text
    ids = next(o for o in answer.json()["outputs"] if o["name"] == "PRODUCT_IDS")["data"]
    assert ids[0] == "100009"
    assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{base}/v2/models/{MODEL}", timeout=10).json()["name"] == MODEL


def test_authenticated_model_control_works(triton: TritonHarness) -> None:
    import tritonclient.grpc as grpcclient

    # The default client finds the key in the environment, as pipeline tasks do.
    control = TritonControl(triton.grpc_url, timeout_s=30)
    control.unload(MODEL)
    assert control.loaded_versions(MODEL) == []
    control.load_version(MODEL, 1, triton.repo)
    _still_serving_v1(triton)

    # A raw client gets the key's header name from Triton's refusal and works once it sends it.
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(Exception, match="triton-grpc-protocol-recsys-admin-key"):
        raw.get_model_repository_index()
    headers = {"triton-grpc-protocol-recsys-admin-key": triton.admin_key}
    assert raw.get_model_repository_index(headers=headers).models


def test_admin_key_stays_out_of_logs_and_records(triton: TritonHarness) -> None:
    key = triton.admin_key
    command = triton.server.command()
    assert any(KEY_PLACEHOLDER in arg for arg in command), "the server must be restricted"
    assert (
        f"model-repository,model-config,shared-memory,statistics,trace,logging:{TRITON_ADMIN_HEADER}="
        in " ".join(command)
    )
    assert key not in " ".join(command)
    assert key not in " ".join(redact_command(command))
    assert key not in repr(triton.server)
    assert key not in repr(TritonControl(triton.grpc_url, admin_key=key))
    assert key not in triton.server.log_path.read_text(errors="replace")


def _http_operator_calls(base: str) -> list[tuple[str, str, dict | None]]:
    """(method, url, json body) of every HTTP API besides inference, health and metadata."""
    region = f"/v2/systemsharedmemory/region/{SHM_PREFIX}x/register"
    return [
        ("POST", f"{base}/v2/logging", {"log_info": False}),
        ("GET", f"{base}/v2/logging", None),
        ("POST", f"{base}/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
        ("GET", f"{base}/v2/trace/setting", None),
        ("POST", f"{base}{region}", {"key": f"/{SHM_PREFIX}x", "offset": 0, "byte_size": 64}),
        ("GET", f"{base}/v2/systemsharedmemory/status", None),
        ("POST", f"{base}/v2/cudasharedmemory/region/x/unregister", {}),
        ("GET", f"{base}/v2/models/stats", None),
        ("GET", f"{base}/v2/models/{MODEL}/config", None),
        ("POST", f"{base}/v2/repository/index", {}),
    ]


def test_every_operator_api_needs_the_admin_key(triton: TritonHarness) -> None:
    """Logging, trace, shared memory, statistics, model config and model control are refused
    without the key over HTTP and gRPC; with it they work; logging stays on."""
    import tritonclient.grpc as grpcclient

    for method, url, body in _http_operator_calls(triton.server.http_url):
        for headers in ({}, {TRITON_ADMIN_HEADER: "wrong-key-0123456789"}):
            refused = requests.request(method, url, json=body, headers=headers, timeout=30)
            assert refused.status_code == 403, (method, url, refused.text)
    admin = {TRITON_ADMIN_HEADER: triton.admin_key}
    logging_settings = requests.get(f"{triton.server.http_url}/v2/logging", headers=admin)
    assert logging_settings.status_code == 200 and logging_settings.json()["log_info"] is True

    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        anonymous_calls = [
            lambda: raw.update_log_settings({"log_info": False}),
            lambda: raw.get_log_settings(),
            lambda: raw.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            lambda: raw.register_system_shared_memory(f"{SHM_PREFIX}x", f"/{SHM_PREFIX}x", 64),
            lambda: raw.get_system_shared_memory_status(),
            lambda: raw.get_inference_statistics(MODEL),
            lambda: raw.get_model_config(MODEL),
            lambda: raw.get_model_repository_index(),
        ]
        for call in anonymous_calls:
            with pytest.raises(Exception, match="restricted, expecting header"):
                call()
        headers = triton.admin_headers
        assert raw.get_log_settings(headers=headers, as_json=True)["settings"]["log_info"]
        assert raw.get_model_config(MODEL, headers=headers, as_json=True)["config"]["name"]
    finally:
        raw.close()
    _still_serving_v1(triton)


def test_shape_bombs_are_refused_before_any_allocation(triton: TritonHarness) -> None:
    """A 150-byte request declaring a billion rows: over HTTP Triton would size a tensor from
    the declared shape (gigabytes); it is refused at the key check. Over gRPC Triton checks
    the batch size first. Either way the server's memory does not move."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    bomb = {
        "inputs": [
            {"name": "QUERY", "shape": [10**9, 1], "datatype": "BYTES", "data": ["x"]},
            {"name": "TOP_K", "shape": [10**9, 1], "datatype": "INT32", "data": [1]},
        ]
    }
    infer = f"{triton.server.http_url}/v2/models/{MODEL}/infer"
    request = grpc_shape_bomb(MODEL)
    with (
        grpc.insecure_channel(triton.grpc_url) as channel,
        PeakMemory(triton.server.pid, with_children=False) as memory,
    ):
        for _ in range(5):
            refused = requests.post(infer, json=bomb, timeout=30)
            assert refused.status_code == 403, refused.text
            with pytest.raises(grpc.RpcError) as error:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "batch-size must be <= " in error.value.details()
    assert memory.peak_mb - memory.before_mb < 64, (memory.before_mb, memory.peak_mb)
    _still_serving_v1(triton)


def test_admin_key_is_not_readable_by_other_local_users(triton: TritonHarness) -> None:
    """What any local user can read of the server (its argv in /proc) holds a placeholder, not
    the key; the key reached the server (authorised control works) and no python stub, which
    runs repository code, inherits it or the preload."""
    pid = triton.server.pid
    key = triton.admin_key.encode()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert KEY_PLACEHOLDER.encode() in cmdline and key not in cmdline
    environ_file = Path(f"/proc/{pid}/environ")
    assert stat.S_IMODE(environ_file.stat().st_mode) & 0o077 == 0  # owner-only, by the kernel
    assert key not in environ_file.read_bytes()  # and wiped in place all the same
    stubs = [
        entry
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent_pid(entry) == pid
    ]
    assert stubs, "the loaded model runs in a python stub under the server"
    for stub in stubs:
        environ = (stub / "environ").read_bytes()
        assert key not in environ
        assert ARGV_SECRET_ENV.encode() not in environ and b"LD_PRELOAD=" not in environ
    assert TritonControl(triton.grpc_url, timeout_s=30).loaded_versions(MODEL) == [1]


def _parent_pid(proc_entry: Path) -> int | None:
    try:
        stat_fields = (proc_entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(stat_fields[1])


def test_server_refuses_a_work_folder_planted_by_someone_else(tmp_path: Path) -> None:
    """The server loads code from its work folder (backend links, keyguard): a folder planted
    at its (guessable /tmp) path is refused instead of used, be it a symlink to elsewhere or,
    where the test may create one (as root), a folder another user owns."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    server = TritonServer(tmp_path / "repo", grpc_port=port, admin_key="k" * 32)
    planted_link = server.workdir  # the default: /tmp/recsys-triton-<grpc port>
    planted_link.symlink_to(elsewhere)
    try:
        with pytest.raises(TritonStartError, match="not a folder owned by this user"):
            server.command()
    finally:
        planted_link.unlink()
    assert not any(elsewhere.iterdir()), "nothing may be written through the planted link"

    if os.getuid() == 0:  # only root can make a folder owned by another user
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o777)
        os.chown(planted, 65534, 65534)
        server = TritonServer(tmp_path / "repo", workdir=planted, admin_key="k" * 32)
        with pytest.raises(TritonStartError, match="not a folder owned by this user"):
            server.command()


# -- repository paths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", ""])
def test_traversal_model_names_are_refused(triton: TritonHarness, artifacts: Path, name: str):
    with pytest.raises(InvalidModelNameError):
        publish_version(triton.repo, name, 1, artifacts)
    with pytest.raises(InvalidModelNameError):
        TritonControl(triton.grpc_url).load_version(name, 1, triton.repo)
    with pytest.raises(InvalidModelNameError):
        TritonControl(triton.grpc_url).unload(name)
    with pytest.raises(InvalidModelNameError):
        list_versions(triton.repo, name)
    assert not (triton.repo.parent / "x").exists()


def test_symlinks_escaping_the_repository_are_refused(
    triton: TritonHarness, artifacts: Path, tmp_path: Path
) -> None:
    control = TritonControl(triton.grpc_url, timeout_s=30)
    outside = tmp_path / "outside"
    shutil.copytree(triton.repo / MODEL / "1", outside / "5")

    # A version folder that is a symlink to a complete version elsewhere.
    (triton.repo / MODEL / "5").symlink_to(outside / "5", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        verify_version_dir(triton.repo / MODEL / "5")
    with pytest.raises(UnsafePathError):
        control.load_version(MODEL, 5, triton.repo)
    assert 5 not in list_versions(triton.repo, MODEL)

    # A real version folder whose model code is a symlink to a file elsewhere.
    shutil.copytree(triton.repo / MODEL / "1", triton.repo / MODEL / "6")
    (triton.repo / MODEL / "6" / "model.py").unlink()
    (triton.repo / MODEL / "6" / "model.py").symlink_to(outside / "5" / "model.py")
    with pytest.raises(UnsafePathError, match=r"model\.py"):
        control.load_version(MODEL, 6, triton.repo)

    # A model folder that is a symlink out of the repository: nothing is written through it.
    (outside / "evil").mkdir()
    (triton.repo / "evil").symlink_to(outside / "evil", target_is_directory=True)
    with pytest.raises(UnsafePathError):
        publish_version(triton.repo, "evil", 1, artifacts)
    assert list((outside / "evil").iterdir()) == []
    with pytest.raises(ValueError):
        verify_version_dir(triton.repo / MODEL / ".." / ".." / "1")

    _still_serving_v1(triton)


# -- MLflow -------------------------------------------------------------------------------


def test_mlflow_refuses_anonymous_and_wrong_logins(mlflow_server: str, monkeypatch) -> None:
    import os

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from recsys import registry

    experiments = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    login = (os.environ[MLFLOW_USER_ENV], os.environ[MLFLOW_PASSWORD_ENV])
    assert requests.get(experiments, timeout=10).status_code == 401
    assert requests.get(experiments, auth=(login[0], "password1234"), timeout=10).status_code == 401
    assert requests.get(experiments, auth=("admin", "wrong"), timeout=10).status_code == 401
    assert requests.get(experiments, auth=login, timeout=10).status_code == 200
    assert requests.get(f"{mlflow_server}/health", timeout=10).text == "OK"

    # The platform's client authenticates from the environment ...
    registry.client(mlflow_server).search_experiments(max_results=1)
    # ... and a wrong password is refused, not silently accepted.
    monkeypatch.setenv(MLFLOW_PASSWORD_ENV, "not-the-password")
    with pytest.raises(MlflowException, match=r"401|[Uu]nauthenticated|not authenticated"):
        MlflowClient(mlflow_server).search_experiments(max_results=1)


def test_mlflow_admin_password_is_generated_private_and_not_in_argv(tmp_path, monkeypatch):
    import dataclasses

    from recsys import stack
    from recsys.config import load_settings

    monkeypatch.delenv(MLFLOW_PASSWORD_ENV, raising=False)
    monkeypatch.delenv(MLFLOW_USER_ENV, raising=False)
    settings = dataclasses.replace(load_settings(), home=tmp_path / "home", mlflow_port=free_port())
    service = stack.mlflow_service(settings, {"MLFLOW_AUTH_ADMIN_PASSWORD": "leaked"})

    password_file = secrets_dir(settings.home) / "mlflow_admin_password"
    password = password_file.read_text().strip()
    ini = Path(service.env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets_dir(settings.home).stat().st_mode) == 0o700
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert len(password) >= 24 and password != "password1234"
    assert f"admin_password = {password}" in ini.read_text()
    assert str(settings.home) in ini.read_text()  # the auth DB lives in the state folder
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in service.env
    assert service.command[-2:] == ["--app-name", "basic-auth"]
    assert not any(password in arg for arg in service.command)


# -- the stack and the audit trail --------------------------------------------------------


def test_stack_generates_private_secrets_and_never_prints_them(tmp_path, monkeypatch) -> None:
    from recsys import registry, stack
    from recsys.config import load_settings

    for name in (TRITON_ADMIN_KEY_ENV, MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    ports = ("TRITON_HTTP", "TRITON_GRPC", "TRITON_METRICS", "MLFLOW", "AIRFLOW")
    for port in ports:
        monkeypatch.setenv(f"RECSYS_{port}_PORT", str(free_port()))
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_TRITON_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("RECSYS_PIPELINE_SCHEDULE", "none")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_settings()

    printed: list[str] = []
    try:
        stack.up(settings, echo=printed.append)
        folder = secrets_dir(settings.home)
        values = {path.name: path.read_text().strip() for path in folder.iterdir()}
        assert {"triton_admin_key", "mlflow_admin_password", "airflow_admin_password"} <= set(
            values
        )
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE((folder / n).stat().st_mode) == 0o600 for n in values)

        # Airflow workers get what they need as clients.
        worker_env = stack.airflow_env(settings)
        assert worker_env[TRITON_ADMIN_KEY_ENV] == values["triton_admin_key"]
        assert worker_env[MLFLOW_PASSWORD_ENV] == values["mlflow_admin_password"]

        # Triton: anonymous model control refused, the default client (secret file) accepted.
        http = f"http://{settings.triton_http_url}"
        assert requests.post(f"{http}/v2/repository/index", timeout=10).status_code == 403
        with pytest.raises(TritonAuthError):
            TritonControl(settings.triton_grpc_url, admin_key="").loaded_versions(MODEL)
        assert TritonControl(settings.triton_grpc_url).loaded_versions(MODEL) == []

        # MLflow: anonymous refused, the CLI's client logs in from the secret file.
        uri = settings.mlflow_tracking_uri
        experiments = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(experiments, timeout=10).status_code == 401
        assert registry.client(uri).search_experiments(max_results=1)

        # The PID files record each command, the Triton one with its key masked.
        pid_dir = stack.stack_dir(settings) / "pids"
        pid_records = [path.read_text() for path in pid_dir.glob("*.json")]
        triton_command = json.loads((pid_dir / "triton.json").read_text())["command"]
        restricted = "model-repository,model-config,shared-memory,statistics,trace,logging"
        assert f"--http-restricted-api=inference,{restricted}:{TRITON_ADMIN_HEADER}=***" in (
            triton_command
        )
        # The running server's argv, which any local user can read, holds no key either.
        triton_pid = json.loads((pid_dir / "triton.json").read_text())["pid"]
        assert values["triton_admin_key"].encode() not in (
            Path(f"/proc/{triton_pid}/cmdline").read_bytes()
        )
    finally:
        stack.down(settings, echo=printed.append)

    recorded = [
        "\n".join(printed),
        *pid_records,
        *(
            path.read_text(errors="replace")
            for path in (stack.stack_dir(settings) / "logs").rglob("*")
            if path.is_file()
        ),
        *(
            path.read_text(errors="replace")
            for path in (settings.home / "airflow" / "logs").rglob("*")
            if path.is_file()
        ),
    ]
    assert any("triton: started" in text for text in recorded)
    for name, value in values.items():
        assert not any(value in text for text in recorded), f"{name} leaked"


def test_audit_records_and_task_logs_hold_no_secrets(
    platform, tiny_bert_dir, homedepot_sample, tmp_path, monkeypatch, caplog
) -> None:
    import logging
    import os

    from recsys import registry
    from recsys.audit import read_records
    from recsys.data import product_catalog, read_relevance_csv
    from recsys.deploy import deploy_model, register_model
    from recsys.families.search.export import build_serving_artifacts

    caplog.set_level(logging.DEBUG)
    catalog = product_catalog(read_relevance_csv(homedepot_sample))
    good = build_serving_artifacts(tiny_bert_dir, catalog, tmp_path / "good", model_name="x")
    run_id = registry.start_training_run(platform.mlflow_tracking_uri, "sec", "t", {}, {})
    v1 = register_model(platform, run_id, str(good), {"data_hash": "h"})["version"]
    deploy_model(platform, v1, str(good), {"query": "angle bracket", "top_k": 5})

    key = os.environ[TRITON_ADMIN_KEY_ENV]
    password = os.environ[MLFLOW_PASSWORD_ENV]
    # A deploy by someone without the key changes nothing that serves.
    monkeypatch.setenv(TRITON_ADMIN_KEY_ENV, "stolen-or-guessed-key")
    with pytest.raises(TritonAuthError):
        deploy_model(platform, v1 + 1, str(good), {"query": "angle bracket", "top_k": 5})
    monkeypatch.setenv(TRITON_ADMIN_KEY_ENV, key)
    assert TritonControl(platform.triton_grpc_url).loaded_versions(platform.model_name) == [v1]

    records = read_records(platform.audit_log)
    # The refused attempt is on record (without the key it used), and nothing else changed.
    assert [r["action"] for r in records] == ["deploy", "deploy_failed"]
    assert records[-1]["version"] == v1 + 1 and "admin key" in records[-1]["reason"]
    audit_text = platform.audit_log.read_text()
    for secret in (key, password, "stolen-or-guessed-key"):
        assert secret not in audit_text
        assert secret not in caplog.text
