"""Append-only audit trail of every deploy and rollback, plus alert delivery.

One JSON object per line: who/what/when/why and a metrics snapshot. Lines are appended under an
exclusive lock and never rewritten, so the file is a faithful history that `recsys audit`
and the DAGs' task logs can show.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def append_record(audit_log: Path, action: str, model: str, **fields: Any) -> dict[str, Any]:
    """Append one record and return it (with its timestamp and actor)."""
    record = {
        "ts": datetime.now(UTC).isoformat(),
        "action": action,
        "model": model,
        "actor": os.environ.get("AIRFLOW_CTX_DAG_ID")
        or f"{getpass.getuser()}@{socket.gethostname()}",
        **fields,
    }
    audit_log.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, sort_keys=True) + "\n"
    with audit_log.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
        fcntl.flock(handle, fcntl.LOCK_UN)
    return record


def read_records(audit_log: Path, model: str | None = None) -> list[dict[str, Any]]:
    """All records (optionally of one model), oldest first; a torn last line is skipped."""
    if not audit_log.exists():
        return []
    records = []
    for line in audit_log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("skipping unreadable audit line in %s", audit_log)
            continue
        if model is None or record.get("model") == model:
            records.append(record)
    return records


def send_alert(
    alerts_log: Path, title: str, details: dict[str, Any], webhook_url: str | None = None
) -> None:
    """Record an alert locally and, when configured (``RECSYS_ALERT_WEBHOOK``), POST it.

    A webhook failure is logged, not raised: the rollback it reports has already happened and
    must not be marked failed because a chat service is down.
    """
    payload = {"ts": datetime.now(UTC).isoformat(), "title": title, **details}
    append_record(alerts_log, "alert", str(details.get("model", "")), title=title, details=details)
    url = webhook_url or os.environ.get("RECSYS_ALERT_WEBHOOK")
    if not url:
        return
    import requests

    try:
        requests.post(url, json=payload, timeout=5).raise_for_status()
    except requests.RequestException as exc:
        log.error("alert webhook %s failed: %s", url, exc)
