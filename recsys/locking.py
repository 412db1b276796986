"""A per-model file lock so a deploy and a rollback can never interleave.

Both run as Airflow tasks, possibly in different DAG runs at once; an OS-level ``flock`` on a file
in the platform's state folder serialises them across processes without another service.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeoutError(TimeoutError):
    """Another deploy or rollback of the same model held the lock for too long."""


@contextmanager
def model_lock(lock_dir: Path, model_name: str, timeout_s: float = 300.0) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{model_name}.lock"
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
                        f"could not lock {model_name} within {timeout_s:.0f}s: another deploy or "
                        f"rollback holds {path}"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
