"""Read the served-query samples that Triton's model appends, from where the last check stopped.

The writer (:class:`recsys.families.search.serving_model.QuerySampler`) appends JSON lines to
``<sample dir>/<model>/<version>/queries-<host>-<pid>-<n>.jsonl``, one writer per file, never
rewriting a byte. So "since the last check" is a byte offset per file: everything after it is
new, and a line without its newline yet is left for the next read (the writer may be
mid-write). A file that is gone (rotated out) or shorter than its offset (replaced) is read
from the start or dropped; a malformed line is skipped and counted, never fatal.

Files cannot say that the writer has stopped writing them, so the drift check compares them with
Triton's own inference count of the version (:func:`parse_sampler_metrics`, from the
``:8002/metrics`` text): many inferences and no samples means the sampler cannot write. (The
writer exports no custom metrics: see :mod:`recsys.families.search.serving_model`.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_GLOB = "queries-*.jsonl"


@dataclass
class SampleRead:
    """The queries found after ``offsets`` and the offsets to store once they are consumed."""

    queries: list[Any] = field(default_factory=list)
    """Each sample: a query string (search), or a request object (families whose requests are
    not text, e.g. recommendation's ``{"user": ..., "items": [...]}``)."""
    offsets: dict[str, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None
    bad_lines: int = 0
    files: int = 0

    def _seen(self, ts: float | None) -> None:
        if ts is None:
            return
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)


def version_sample_dir(sample_dir: Path, model: str, version: int | str) -> Path:
    return Path(sample_dir) / model / str(version)


def read_new_samples(folder: Path, offsets: dict[str, int]) -> SampleRead:
    """Every complete sample in ``folder`` past ``offsets`` (file name -> bytes read): each
    line's ``query`` (non-empty text) or ``request`` (an object).

    The returned offsets cover exactly the files present now, so entries of deleted files
    fall out of the state by themselves.
    """
    result = SampleRead()
    if not folder.is_dir():
        return result
    for path in sorted(folder.glob(SAMPLE_GLOB)):
        try:
            size = path.stat().st_size
            start = offsets.get(path.name, 0)
            if start > size:  # not the file we read before: read it whole
                start = 0
            with path.open("rb") as handle:
                handle.seek(start)
                data = handle.read(size - start)
        except FileNotFoundError:  # rotated out between glob and open
            continue
        result.files += 1
        complete = data.rfind(b"\n") + 1  # a trailing partial line waits for the next read
        result.offsets[path.name] = start + complete
        for line in data[:complete].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                query = record["query"] if "query" in record else record["request"]
                ts = record.get("ts")
                if isinstance(query, dict):
                    pass  # a request object: its family's drift check reads it
                elif not isinstance(query, str) or not query.strip():
                    raise ValueError("no query text")
            except (ValueError, KeyError, TypeError, AttributeError):
                result.bad_lines += 1
                continue
            result.queries.append(query)
            result._seen(float(ts) if isinstance(ts, int | float) else None)
    return result


INFERENCE_COUNT_METRIC = "nv_inference_count"
"""Triton's count of inferences a version ran (cache hits excluded, as they never reach the
model and so are never sampled)."""


@dataclass
class SamplerHealth:
    """What Triton's metrics say about one served version, for telling "no samples because no
    traffic" from "no samples although Triton served": ``inference_count`` is Triton's own
    cumulative count for the version since it was loaded, ``None`` when Triton exports none."""

    inference_count: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"inference_count": self.inference_count}


def _family_name(name: str) -> str:
    """A metric's family name: ``prometheus_client`` drops a counter's ``_total`` from the
    family and adds it to every sample (``nv_inference_count`` samples come out as
    ``nv_inference_count_total``), so names are compared without it."""
    return name.removesuffix("_total")


def parse_sampler_metrics(text: str, model: str, version: int | str) -> SamplerHealth:
    """The :class:`SamplerHealth` of ``model`` ``version`` in Prometheus text from Triton.

    Raises ``ValueError`` on text that does not parse, or that holds no ``nv_`` metric at all
    (not Triton's endpoint): an unreadable endpoint must never read as "sampler healthy".
    """
    from prometheus_client.parser import text_string_to_metric_families

    health = SamplerHealth()
    wanted = {"model": model, "version": str(version)}
    saw_triton = False
    for family in text_string_to_metric_families(text):
        saw_triton = saw_triton or family.name.startswith("nv_")
        if _family_name(family.name) != _family_name(INFERENCE_COUNT_METRIC):
            continue
        for sample in family.samples:
            if any(sample.labels.get(key) != value for key, value in wanted.items()):
                continue
            if not math.isnan(sample.value):
                health.inference_count = (health.inference_count or 0.0) + float(sample.value)
    if not saw_triton:
        raise ValueError("no Triton (nv_*) metrics in the text")
    return health
