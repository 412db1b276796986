"""What the registry answers when it cannot answer: only a missing model or alias is "none";
a failing, refusing or unreachable MLflow is an error that names itself, against a real
``mlflow server``.

MLflow 3.17.2, measured here: a missing registered model is ``RESOURCE_DOES_NOT_EXIST``
(404), a missing alias of an existing model ``INVALID_PARAMETER_VALUE`` (400), a login without
permission ``PERMISSION_DENIED`` (403, also for a model that does not exist). A server-side
database failure is injected by hiding the alias table from the server: its SQLite error takes
the same path as a locked database (``OperationalError`` -> HTTP 503 TEMPORARILY_UNAVAILABLE,
which the client retries and reports as INTERNAL_ERROR "too many 503 error responses"), but at
once, where a lock held with ``BEGIN EXCLUSIVE`` waits out the server's 20 s SQLite busy
timeout on every attempt (65 s with the platform's 2 retries). Making the file read-only does
not fail anything when the tests run as root. The helpers here are shared with the fault tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from recsys import registry
from recsys.cli import main
from recsys.config import load_settings
from recsys.operations import VersionNotRegisteredError, registered_run_id
from tests.triton_testing import free_port

ALIAS_TABLE = "registered_model_aliases"


@contextlib.contextmanager
def failing_registry_db(db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the MLflow server behind ``db`` fail every request that reads aliases (model and
    version reads), with the client's retries off for the rest of the test so each failure is
    reported at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute(f"ALTER TABLE {ALIAS_TABLE} RENAME TO {ALIAS_TABLE}_hidden")
    try:
        yield
    finally:
        connection.execute(f"ALTER TABLE {ALIAS_TABLE}_hidden RENAME TO {ALIAS_TABLE}")
        connection.close()


def create_mlflow_user(uri: str, grants: dict[str, str] | None = None) -> tuple[str, str]:
    """A new login on the server's basic-auth app (created with the session's admin login),
    with ``grants`` ({registered model: READ/EDIT/MANAGE}) and the stack's default of no
    permission on anything else. Returns ``(user, password)``."""
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=uri)
    user, password = f"user_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    auth.create_user(user, password)
    for model, permission in (grants or {}).items():
        auth.grant_user_permission(user, "registered_model", model, permission)
    return user, password


def log_in_as(monkeypatch: pytest.MonkeyPatch, login: tuple[str, str]) -> None:
    """MLflow's client (and the platform's reachability check) use this login from now on."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])


@dataclass
class PrivateRegistry:
    uri: str
    db: Path
    model: str
    version: int


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory) -> Iterator[PrivateRegistry]:
    """A real ``mlflow server`` of this module only (its database is broken on purpose), with a
    registered model whose v1 is ``champion``."""
    from recsys.stack import running_mlflow_server

    home = tmp_path_factory.mktemp("mlflow-errors")
    with running_mlflow_server(home, free_port()) as uri:
        client = MlflowClient(uri, registry_uri=uri)
        model = "errors_test"
        client.create_registered_model(model)
        run = client.create_run(client.create_experiment("errors"))
        source = f"runs:/{run.info.run_id}/model"
        version = int(client.create_model_version(model, source, run_id=run.info.run_id).version)
        client.set_registered_model_alias(model, registry.CHAMPION, str(version))
        yield PrivateRegistry(
            uri=uri, db=home / "mlflow" / "mlflow.db", model=model, version=version
        )


def _code(call) -> str:
    with pytest.raises(MlflowException) as raised:
        call()
    return raised.value.error_code


def test_only_a_missing_model_or_alias_is_none(private_registry):
    """The codes MLflow answers for "missing" (asserted, so an MLflow upgrade that changes them
    fails here), and ``alias_version`` maps exactly those to None."""
    uri, model = private_registry.uri, private_registry.model
    client = MlflowClient(uri, registry_uri=uri)
    assert _code(lambda: client.get_registered_model("no_such_model")) == registry.NOT_FOUND
    missing_alias = _code(lambda: client.get_model_version_by_alias(model, registry.PREVIOUS))
    assert missing_alias == "INVALID_PARAMETER_VALUE"  # ambiguous: why aliases come from the model
    assert _code(lambda: client.get_model_version(model, "99")) == registry.NOT_FOUND

    assert registry.alias_version(uri, model, registry.CHAMPION) == private_registry.version
    assert registry.alias_version(uri, model, registry.PREVIOUS) is None
    assert registry.alias_version(uri, "no_such_model", registry.CHAMPION) is None


def test_failing_registry_database_is_an_error_not_a_missing_alias(
    private_registry, monkeypatch, capsys
):
    """With the server's database failing, every read of the champion raises a
    RegistryRequestError carrying MLflow's answer: not None (which would let the champion gate
    promote without a comparison), not "version not registered" (CLI exit 3, not 2)."""
    uri, model = private_registry.uri, private_registry.model
    settings = dataclasses.replace(load_settings(), mlflow_tracking_uri=uri, model_name=model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RECSYS_MODEL_NAME", model)
    with failing_registry_db(private_registry.db, monkeypatch):
        with pytest.raises(registry.RegistryRequestError, match="503") as failure:
            registry.alias_version(uri, model, registry.CHAMPION)
        assert f"reading alias 'champion' of {model}" in str(failure.value)
        assert isinstance(failure.value.__cause__, MlflowException)
        # The model table still answers, so a missing model is still told apart.
        assert registry.alias_version(uri, "no_such_model", registry.CHAMPION) is None

        with pytest.raises(registry.RegistryRequestError, match="503"):
            registered_run_id(settings, private_registry.version)
        assert main(["deploy", "--version", str(private_registry.version)]) == 3
        err = capsys.readouterr().err
        assert "RegistryRequestError" in err and "not registered" not in err

    # The same calls once the database is back: the real answers.
    assert registry.alias_version(uri, model, registry.CHAMPION) == private_registry.version
    with pytest.raises(VersionNotRegisteredError, match="version 99 is not registered"):
        registered_run_id(settings, 99)
    assert main(["deploy", "--version", "99"]) == 2
    assert "99 is not registered" in capsys.readouterr().err


def test_login_without_permission_is_refused_not_missing(private_registry, monkeypatch, capsys):
    """A login MLflow refuses (403 PERMISSION_DENIED) is a RegistryAuthError naming the user,
    for an existing and a non-existing model alike: MLflow checks permission first, so "not
    found" cannot even be known."""
    uri, model = private_registry.uri, private_registry.model
    login = create_mlflow_user(uri)
    log_in_as(monkeypatch, login)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RECSYS_MODEL_NAME", model)
    for name in (model, "no_such_model"):
        with pytest.raises(registry.RegistryAuthError, match="PERMISSION_DENIED") as refused:
            registry.alias_version(uri, name, registry.CHAMPION)
        assert login[0] in str(refused.value) and "refused" in str(refused.value)
        assert isinstance(refused.value, registry.RegistryUnavailableError)
    settings = dataclasses.replace(load_settings(), mlflow_tracking_uri=uri, model_name=model)
    with pytest.raises(registry.RegistryAuthError, match="PERMISSION_DENIED"):
        registered_run_id(settings, private_registry.version)
    assert main(["deploy", "--version", str(private_registry.version)]) == 3
    assert "refused" in capsys.readouterr().err
