"""The feedback log of a rollout: which arm showed what to whom, and what the shopper did.

The router answers every request with a request id, the version and the arm ("stable" or
"candidate") that served it. The front end (or a load generator) logs that answer as an
*impression* and later logs the shopper's clicks and purchases as *events* keyed by the same
request id. Joining the two gives each arm's conversions, which :mod:`recsys.delivery.stats`
compares.

Format: JSON lines in ``<home>/feedback/<model>.jsonl``, one record per line,
``{"kind": "impression", ...}`` or ``{"kind": "event", ...}``. Several processes write the same
file (Triton instances, a web tier, a load generator), so every append holds an exclusive
``flock`` and writes whole lines in one go; readers hold a shared lock, so they never see a line
another process is half-way through. A line can still be torn by a crash mid-write; such a line
is skipped and *counted* (``unreadable_lines``), never a crash and never silently hidden, and
the next append starts on a fresh line so the torn fragment cannot swallow a good record.

Events carry no arm or rollout: the shopper's browser only knows the request id. An event whose
request id has no impression anywhere in the log is an *orphan* (its impression was lost, or the
id is wrong); orphans are reported in every summary because they cannot be attributed to an arm,
and a growing count means the comparison is missing data.

Appends are not ``fsync``-ed unless asked (``FeedbackLog(path, fsync=True)``): a process crash
loses nothing (the kernel has the bytes), a machine crash may lose the last records, and a load
generator logging thousands of records a second cannot afford a disk flush per record.
"""

from __future__ import annotations

import fcntl
import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.config import check_model_name, check_version_number

ARMS = ("stable", "candidate")
EVENTS = ("click", "purchase")
IMPRESSION, EVENT = "impression", "event"


def feedback_log_path(home: Path, model: str) -> Path:
    """``<home>/feedback/<model>.jsonl``; ``model`` must be a valid model name (it becomes a
    file name), else a ``ValueError``."""
    return Path(home) / "feedback" / f"{check_model_name(model)}.jsonl"


@dataclass(frozen=True)
class ArmOutcome:
    """What one arm of a rollout showed and how many of those requests converted."""

    arm: str
    versions: list[int]
    """Sorted versions that served this arm (more than one if the arm was redeployed)."""
    impressions: int
    """Requests this arm answered (each request id counted once)."""
    conversions: int
    """Requests with at least one event of the summary's kind on an item they showed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FeedbackSummary:
    """Per-arm outcomes of one rollout for one event kind, and what could not be counted."""

    rollout_id: str
    event: str
    arms: dict[str, ArmOutcome]
    """Both arms, always present (zero impressions when an arm served nothing yet)."""
    orphan_events: int = 0
    """Events of this kind whose request id has no impression anywhere in the log."""
    events_on_unshown_items: int = 0
    """Events of this kind on a request of this rollout, but on an item that request did not
    show (a logging bug, or a click through another page); they do not convert the request."""
    unreadable_lines: int = 0
    """Lines that are not a valid record (torn by a crash mid-write, or corrupted)."""
    duplicate_impressions: int = 0
    """Impressions of this rollout repeating a request id already seen; the first one counts."""
    notes: list[str] = field(default_factory=list)

    @property
    def stable(self) -> ArmOutcome:
        return self.arms["stable"]

    @property
    def candidate(self) -> ArmOutcome:
        return self.arms["candidate"]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["arms"] = {arm: outcome.to_dict() for arm, outcome in self.arms.items()}
        return out


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be one line, got {value!r}")
    return value


def _version(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers from a response array are fine
    return check_version_number(value)


def _timestamp(ts: Any) -> float:
    if ts is None:
        return time.time()
    if isinstance(ts, bool) or not isinstance(ts, numbers.Real) or not math.isfinite(ts):
        raise ValueError(f"ts must be a finite number of unix seconds, got {ts!r}")
    return float(ts)


def _impression(
    request_id: Any,
    *,
    model: Any,
    version: Any,
    arm: Any,
    items: Any,
    rollout_id: Any,
    ts: Any = None,
) -> dict[str, Any]:
    """A validated impression record (``ValueError`` naming the bad field otherwise)."""
    request_id = _text(request_id, "request_id")
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise ValueError(f"items must be a list of item ids, got {items!r}")
    shown = [_text(item, "item id") for item in items]
    return {
        "kind": IMPRESSION,
        "request_id": request_id,
        "model": check_model_name(model),
        "version": _version(version),
        "arm": arm,
        "items": shown,
        "rollout_id": _text(rollout_id, "rollout_id"),
        "ts": _timestamp(ts),
    }


def _event(request_id: Any, event: Any, item: Any, *, ts: Any = None) -> dict[str, Any]:
    """A validated event record (``ValueError`` naming the bad field otherwise)."""
    request_id = _text(request_id, "request_id")
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    return {
        "kind": EVENT,
        "request_id": request_id,
        "event": event,
        "item": _text(item, "item id"),
        "ts": _timestamp(ts),
    }


def _from_mapping(build: Any, record: Any, what: str) -> dict[str, Any]:
    """``build(**record)``, with a missing or unknown key reported as a ``ValueError`` too."""
    if not isinstance(record, Mapping):
        raise ValueError(f"each {what} must be a mapping of its fields, got {record!r}")
    try:
        return build(**record)
    except TypeError as exc:
        raise ValueError(f"bad {what} record {dict(record)!r}: {exc}") from None


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record on ``line``, or None when it is not a complete, valid record."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            return None
        if record.get("kind") == IMPRESSION:
            fields = {k: record.get(k) for k in ("model", "version", "arm", "items", "rollout_id")}
            return _impression(record.get("request_id"), ts=record["ts"], **fields)
        if record.get("kind") == EVENT:
            return _event(
                record.get("request_id"), record.get("event"), record.get("item"), ts=record["ts"]
            )
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError too
        return None
    return None


class FeedbackLog:
    """Append-only JSON-lines log of impressions and events, safe for many writing processes."""

    def __init__(self, path: Path | str, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"FeedbackLog({str(self.path)!r})"

    # -- writing ----------------------------------------------------------------------------

    def record_impression(
        self,
        request_id: str,
        *,
        model: str,
        version: int,
        arm: str,
        items: list[str],
        rollout_id: str,
        ts: float | None = None,
    ) -> dict[str, Any]:
        """Log that ``arm`` (served by ``version``) showed ``items`` for ``request_id``; returns
        the record written."""
        record = _impression(
            request_id,
            model=model,
            version=version,
            arm=arm,
            items=items,
            rollout_id=rollout_id,
            ts=ts,
        )
        self._append([record])
        return record

    def record_event(
        self, request_id: str, event: str, item: str, *, ts: float | None = None
    ) -> dict[str, Any]:
        """Log a ``"click"`` or ``"purchase"`` of ``item`` in the answer to ``request_id``."""
        record = _event(request_id, event, item, ts=ts)
        self._append([record])
        return record

    def record_impressions(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Log many impressions (mappings with :meth:`record_impression`'s arguments as keys)
        under one lock in one write. All are validated first: one bad record writes none."""
        out = [_from_mapping(_impression, record, IMPRESSION) for record in records]
        self._append(out)
        return out

    def record_events(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Log many events (mappings with ``request_id``, ``event``, ``item`` and optionally
        ``ts``) under one lock in one write; one bad record writes none."""
        out = [_from_mapping(_event, record, EVENT) for record in records]
        self._append(out)
        return out

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # R: pread
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # The previous writer died mid-line: end its fragment so it stays one
                # unreadable line instead of corrupting this batch's first record.
                data = b"\n" + data
            view = memoryview(data)
            while view:  # os.write may write less than asked (signals, large batches)
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    # -- reading ----------------------------------------------------------------------------

    @contextmanager
    def _shared(self) -> Iterator[Any]:
        with self.path.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)  # no writer is half-way through a line
            yield handle

    def records(self) -> Iterator[dict[str, Any] | None]:
        """Every line's record in file order, None for an unreadable line (blank lines are
        skipped). Reads under a shared lock, so keep the consumer quick or collect to a list."""
        if not self.path.exists():
            return
        with self._shared() as handle:
            for line in handle:
                if line.strip():
                    yield _parse(line)

    def arm_outcomes(self, rollout_id: str, event: str = "click") -> FeedbackSummary:
        """Impressions and conversions per arm of ``rollout_id`` for ``event`` ("click" or
        "purchase").

        A request converts when it has at least one ``event`` on an item it showed; several
        clicks on one request still count once, since the unit of the comparison is the
        request (the rates and their intervals assume independent Bernoulli trials).
        """
        rollout_id = _text(rollout_id, "rollout_id")
        if event not in EVENTS:
            raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
        shown: dict[str, tuple[str, frozenset[str]]] = {}  # request id -> (arm, items)
        versions: dict[str, set[int]] = {arm: set() for arm in ARMS}
        impressed: set[str] = set()  # request ids with an impression of any rollout
        events: list[tuple[str, str]] = []
        unreadable = duplicates = 0
        for record in self.records():
            if record is None:
                unreadable += 1
            elif record["kind"] == IMPRESSION:
                impressed.add(record["request_id"])
                if record["rollout_id"] != rollout_id:
                    continue
                if record["request_id"] in shown:
                    duplicates += 1
                    continue
                shown[record["request_id"]] = (record["arm"], frozenset(record["items"]))
                versions[record["arm"]].add(record["version"])
            elif record["event"] == event:
                # Kept until the end: a click may be logged before its impression by
                # another process.
                events.append((record["request_id"], record["item"]))

        converted: set[str] = set()
        orphans = unshown = 0
        for request_id, item in events:
            if request_id not in impressed:
                orphans += 1
            elif request_id in shown:
                if item in shown[request_id][1]:
                    converted.add(request_id)
                else:
                    unshown += 1
        impressions = dict.fromkeys(ARMS, 0)
        conversions = dict.fromkeys(ARMS, 0)
        for request_id, (arm, _) in shown.items():
            impressions[arm] += 1
            conversions[arm] += request_id in converted
        notes = []
        if unreadable:
            notes.append(f"{unreadable} unreadable line(s) in {self.path} skipped")
        if orphans:
            notes.append(f"{orphans} {event} event(s) without any impression in the log")
        return FeedbackSummary(
            rollout_id=rollout_id,
            event=event,
            arms={
                arm: ArmOutcome(arm, sorted(versions[arm]), impressions[arm], conversions[arm])
                for arm in ARMS
            },
            orphan_events=orphans,
            events_on_unshown_items=unshown,
            unreadable_lines=unreadable,
            duplicate_impressions=duplicates,
            notes=notes,
        )
