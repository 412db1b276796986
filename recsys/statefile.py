"""Small JSON state files in the platform's home: atomic writes and their read-modify-write lock.

The monitor's breach counts and the drift check's read offsets are both rewritten by Airflow
tasks that may be killed or overlap; one writer here keeps them whole and serialised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from recsys.locking import file_lock

log = logging.getLogger(__name__)
T = TypeVar("T")


def read_json_state(
    path: Path, parse: Callable[[Any], T], purpose: str
) -> tuple[T | None, str | None]:
    """``(parse(content), None)``; ``(None, None)`` when the file does not exist yet; ``(None,
    problem)`` when it is corrupt (unparseable JSON, or ``parse`` rejects it), logged as a
    warning. A corrupt state file means starting again from an empty state, not a task that
    fails every run until someone deletes it. Unreadable files (permissions) still raise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    try:
        return parse(json.loads(text)), None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        log.warning(
            "%s %s is corrupt (%s); starting again from an empty state", purpose, path, problem
        )
        return None, problem


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temp file in the same folder, fsynced, then
    ``os.replace``: a reader (or a task killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def state_lock(path: Path, timeout_s: float, purpose: str):
    """Exclusive lock on ``<path>.lock`` for one read-modify-write of the state file ``path``."""
    return file_lock(path.with_name(path.name + ".lock"), timeout_s, purpose)
