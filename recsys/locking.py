"""Cross-process file locks (``flock``) on files in the platform's state folder.

Deploys and rollbacks of one model, and the monitor's read-modify-write of its state file, run
as Airflow tasks that may overlap; an OS-level lock serialises them without another service.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeoutError(TimeoutError):
    """Someone else held the lock for longer than the caller was willing to wait."""


@contextmanager
def file_lock(path: Path, timeout_s: float, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); the file records the holder's PID."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeoutError(
                        f"could not lock {path} for {purpose} within {timeout_s:.0f}s: "
                        "another process holds it"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def model_lock(lock_dir: Path, model_name: str, timeout_s: float = 300.0):
    """The lock a deploy or rollback of ``model_name`` holds, so the two never interleave.

    ``model_name`` must be a valid model name (``InvalidModelNameError``, a ``ValueError``,
    otherwise), so the lock file stays in ``lock_dir`` whoever calls this."""
    from recsys.config import check_model_name

    check_model_name(model_name)
    return file_lock(lock_dir / f"{model_name}.lock", timeout_s, f"deploy/rollback of {model_name}")
