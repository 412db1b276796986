"""Secrets of the platform: where they come from and how they stay out of code and logs.

Every secret is either given in the environment (a deployment injects it) or, for the
single-machine stack, generated once into ``$RECSYS_HOME/stack/secrets/<name>`` with mode 0600
so that the stack, its Airflow workers and the CLI on the same machine all agree on it without
it ever being written in code, a config file under version control, or a log line.

Secrets used here:

* the Triton admin key (``RECSYS_TRITON_ADMIN_KEY``): Triton only accepts model-repository
  calls (load, unload, repository index) that carry it in the :data:`TRITON_ADMIN_HEADER`
  header, because loading a model runs arbitrary python from the repository;
* the MLflow admin password (``MLFLOW_TRACKING_PASSWORD``, user ``MLFLOW_TRACKING_USERNAME``),
  which MLflow's own client reads from those variables;
* Airflow's admin password and signing keys (see :mod:`recsys.stack`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

from recsys.config import Settings

TRITON_ADMIN_KEY_ENV = "RECSYS_TRITON_ADMIN_KEY"
TRITON_ADMIN_HEADER = "recsys-admin-key"
"""HTTP header Triton checks on restricted APIs (gRPC metadata keys must be lowercase)."""
TRITON_GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{TRITON_ADMIN_HEADER}"
"""Triton's gRPC frontend prefixes the configured key with ``triton-grpc-protocol-``."""
TRITON_OPEN_APIS = ("health", "metadata")
"""What anyone who reaches the ports may use over both protocols (plus gRPC inference)."""
TRITON_GRPC_RESTRICTED = (
    "model-repository",
    "model-config",
    "shared-memory",
    "statistics",
    "trace",
    "logging",
)
"""gRPC protocols that need the admin key: everything except health, metadata and inference.
Model control runs arbitrary python from the repository; logging and trace settings can blind
the operators; shared-memory registration can map any region (the python backend's own
included) into the server; statistics and model configs are operator data."""
TRITON_HTTP_RESTRICTED = ("inference", *TRITON_GRPC_RESTRICTED)
"""HTTP restricts inference as well. Triton 2.51's JSON handling allocates a tensor from the
*declared* shape before it checks the data (a 150-byte request declaring ``[1e9, 1]`` costs
gigabytes) and has no request-size limit; its gRPC path checks sizes first. Clients infer over
gRPC; HTTP inference is for key holders (who could load arbitrary code anyway)."""

MLFLOW_USER_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_ADMIN_USER = "admin"

REDACTED = "***"


def secrets_dir(home: Path) -> Path:
    """Folder of generated secrets under a state folder."""
    return Path(home) / "stack" / "secrets"


def stored_secret(home: Path, name: str, nbytes: int = 24, *, create: bool = True) -> str | None:
    """The secret ``name`` kept under ``home`` (generated on first use when ``create``).

    The file is written to a private temporary name and hard-linked into place, so two
    processes generating it at once agree on one value and nobody reads a half-written file;
    permissions wider than 0600 are tightened on read.
    """
    folder = secrets_dir(home)
    path = folder / name
    if not path.exists():
        if not create:
            return None
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(nbytes))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return path.read_text().strip()


def triton_admin_key(settings: Settings, *, create: bool = False) -> str | None:
    """The key that authorises Triton model control: ``$RECSYS_TRITON_ADMIN_KEY``, else the
    stack's generated secret (created only when ``create``: a server that is about to start
    needs one, a client that finds none has nothing valid to send)."""
    return os.environ.get(TRITON_ADMIN_KEY_ENV) or stored_secret(
        settings.home, "triton_admin_key", 32, create=create
    )


def triton_restriction_flags(admin_key: str) -> list[str]:
    """tritonserver flags that refuse every API except health, metadata and (gRPC) inference
    without the admin header."""
    if not admin_key or any(c in admin_key for c in ",:= \n"):
        raise ValueError("the Triton admin key must be non-empty and free of ',:= ' characters")
    header = f"{TRITON_ADMIN_HEADER}={admin_key}"
    return [
        f"--grpc-restricted-protocol={','.join(TRITON_GRPC_RESTRICTED)}:{header}",
        f"--http-restricted-api={','.join(TRITON_HTTP_RESTRICTED)}:{header}",
    ]


def mlflow_credentials(settings: Settings, *, create: bool = False) -> tuple[str, str] | None:
    """MLflow admin ``(user, password)``: ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` when set,
    else ``admin`` and the stack's generated password (None when neither exists)."""
    user = os.environ.get(MLFLOW_USER_ENV) or MLFLOW_ADMIN_USER
    password = os.environ.get(MLFLOW_PASSWORD_ENV) or stored_secret(
        settings.home, "mlflow_admin_password", 24, create=create
    )
    return (user, password) if password else None


def redact(text: str, values: Iterable[str | None]) -> str:
    """``text`` with every (non-trivial) secret in ``values`` replaced by ``***``."""
    for value in values:
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    return text


def redact_command(command: list[str]) -> list[str]:
    """An argv safe to record: the values of Triton's restriction flags are masked."""
    out = []
    for arg in command:
        flag, sep, value = arg.partition("=")
        if sep and flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
            apis, _, header = value.partition(":")
            arg = f"{flag}={apis}:{header.partition('=')[0]}={REDACTED}"
        out.append(arg)
    return out
