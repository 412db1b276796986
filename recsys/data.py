"""Loading and splitting of query-product relevance data.

The pipeline accepts any CSV with the Home Depot columns, so a shop can point it at its own export
(``RECSYS_DATA_PATH`` or the DAG's ``data_path`` param). Loading is strict about structure and
lenient about encoding: the Kaggle file is latin-1, a shop's export is usually UTF-8.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("id", "product_uid", "product_title", "search_term", "relevance")


class DataFormatError(ValueError):
    """The input file cannot be read as relevance data; the message says why and where."""


EXPECTED_FORMAT = f"expected a comma-separated CSV with the columns {', '.join(REQUIRED_COLUMNS)}"


def _first_line(path: Path, limit: int = 80) -> str:
    """The file's first line as text, shortened, for an error message about its format."""
    with path.open("rb") as handle:
        head = handle.readline(4096)
    text = head.decode("latin-1").rstrip("\r\n")
    return text if len(text) <= limit else text[:limit] + "..."


def _not_text(path: Path) -> str | None:
    """ "found an empty file" / "found binary data ..." when ``path`` is not text at all (pandas
    happily parses some binaries into garbled columns), else None."""
    with path.open("rb") as handle:
        sample = handle.read(8192)
    if not sample.strip():
        return "found an empty file"
    if b"\0" in sample:
        return "found binary data (NUL bytes), not text"
    return None


def _what_was_found(path: Path, exc: Exception) -> str:
    """Say what ``path`` holds instead of relevance CSV, in a person's words, from the file
    itself and from the parser's complaint (pandas' own text is kept as the cause)."""
    not_text = _not_text(path)
    if not_text:
        return not_text
    found = f"found a first line of {_first_line(path)!r}"
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
    if fields:
        header, line, saw = fields.groups()
        return f"{found}, and line {line} has {saw} fields where that header has {header}"
    return f"{found}, which does not parse as CSV ({exc})"


def read_relevance_csv(path: Path | str) -> pd.DataFrame:
    """Read a relevance CSV as strings/floats without dropping or repairing any row.

    Cleaning is the data-quality gate's job: it quarantines bad rows with a reason, which a
    loader that silently coerced or dropped them would make impossible.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path} is a directory; {EXPECTED_FORMAT}")
    if not path.is_file():
        raise DataFormatError(f"relevance data not found at {path} (set RECSYS_DATA_PATH)")
    frame = None
    for encoding in ("utf-8", "latin-1"):
        try:
            frame = pd.read_csv(
                path, encoding=encoding, dtype={"product_title": str, "search_term": str}
            )
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataFormatError(
                f"{path} is not a relevance CSV: {EXPECTED_FORMAT}; {_what_was_found(path, exc)}"
            ) from exc
        except OSError as exc:  # unreadable (permissions, I/O error): bad input, not a crash
            raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if frame is None:  # pragma: no cover - latin-1 decodes any byte sequence
        raise DataFormatError(f"{path} has an unknown text encoding")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        found = _not_text(path) or f"found the column(s) {[str(c) for c in frame.columns]}"
        if len(frame.columns) == 1 and re.search(r"[;\t|:]", str(frame.columns[0])):
            found += " (one column: is the file separated by something other than commas?)"
        raise DataFormatError(
            f"{path} lacks required column(s) {missing}: {EXPECTED_FORMAT}; {found}"
        )
    # A blank or garbled id becomes a missing value (nullable Int64) for the quality gate to
    # report, instead of silently turning the whole column into floats or strings.
    for column in ("id", "product_uid"):
        values = pd.to_numeric(frame[column], errors="coerce")
        frame[column] = values.astype("int64" if values.notna().all() else "Int64")
    return frame


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the frame's content, recorded as lineage on every registered model version."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


@dataclass(frozen=True)
class QuerySplit:
    """Train and held-out frames with no search term in both, so evaluation never sees a
    training query (a split by row would leak the query and inflate every metric)."""

    train: pd.DataFrame
    test: pd.DataFrame


def split_by_query(frame: pd.DataFrame, test_fraction: float = 0.2, seed: int = 13) -> QuerySplit:
    """Split rows so that every search term lands wholly in train or wholly in test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    queries = np.array(sorted(frame["search_term"].unique()))
    if len(queries) < 2:
        raise DataFormatError("need at least two distinct search terms to split by query")
    rng = np.random.default_rng(seed)
    rng.shuffle(queries)
    n_test = max(1, round(len(queries) * test_fraction))
    test_queries = set(queries[:n_test])
    is_test = frame["search_term"].isin(test_queries)
    return QuerySplit(
        train=frame[~is_test].reset_index(drop=True), test=frame[is_test].reset_index(drop=True)
    )


def product_catalog(frame: pd.DataFrame) -> pd.DataFrame:
    """Distinct products (id as string, title) that the served model ranks."""
    catalog = frame[["product_uid", "product_title"]].drop_duplicates("product_uid")
    catalog = catalog.assign(product_uid=catalog["product_uid"].astype(str))
    return catalog.sort_values("product_uid").reset_index(drop=True)
