"""Loading and splitting of query-product relevance data.

The pipeline accepts any CSV with the Home Depot columns, so a shop can point it at its own export
(``RECSYS_DATA_PATH`` or the DAG's ``data_path`` param). Loading is strict about structure and
lenient about 8-bit encodings: the Kaggle file is latin-1, a shop's export is usually UTF-8. A
UTF-16 or UTF-32 export (Excel's "Unicode text") is refused with the ``iconv`` command that
converts it, rather than decoded as latin-1 garbage.

Nothing is coerced on the way in. Every column is read as text; ``id`` and ``product_uid`` must
be plain decimal integers (ASCII digits, no sign, no leading zero, no fraction, exponent,
whitespace or separators; at most 2**63 - 1) and ``relevance`` a plain unsigned decimal number
(no exponent, ``inf`` or ``nan``; its range, 1 to 3, is the ``relevance_labels`` suite's
check, so an out-of-range label is quarantined by GX with the number intact). A cell that
breaks its rule is *not* repaired: it becomes a missing value in the typed frame and its raw
text and the rule it broke are recorded in ``frame.attrs[READ_REJECTS]``, from which the
quality gate quarantines the row with that reason.
So every value of a row the gate passes is exactly what the file said: ids print back to the
same digits, text is the same string, and a label is the number the file wrote. Only an empty
cell is missing; words like ``NA``, ``null`` or ``None`` stay text (they are real search terms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "product_uid", "product_title", "search_term", "relevance")
ID_COLUMNS = ("id", "product_uid")
LABEL_COLUMN = "relevance"

READ_REJECTS = "recsys.read_rejects"
"""Key in ``DataFrame.attrs`` of the cells :func:`read_relevance_csv` could not take as they are:
``{row label: {column: [problem, raw text]}}``. The cell itself holds a missing value; the gate
quarantines the row as ``read:<column>(<problem>)`` with the raw text."""

NOT_AN_ID = "not a plain decimal integer"
ID_TOO_LARGE = "larger than the int64 maximum 9223372036854775807"
NOT_A_LABEL = "not a finite plain decimal number"

_INT64_MAX = str(np.iinfo(np.int64).max)
_ID_PATTERN = r"0|[1-9][0-9]*"  # ASCII digits only: str.isdigit/int() also take "١٢", " 7", "1_0"
_LABEL_PATTERN = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"


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


_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32", "UTF-32 (little-endian, with a byte-order mark)"),
    (b"\x00\x00\xfe\xff", "UTF-32", "UTF-32 (big-endian, with a byte-order mark)"),
    (b"\xff\xfe", "UTF-16", "UTF-16 (little-endian, with a byte-order mark)"),
    (b"\xfe\xff", "UTF-16", "UTF-16 (big-endian, with a byte-order mark)"),
)


def _wide_encoding(sample: bytes) -> tuple[str, str] | None:
    """(iconv name, description) when ``sample`` is UTF-16/32 text, from its byte-order mark or,
    without one, from the NUL byte that every ASCII character carries in UTF-16."""
    for bom, iconv_name, description in _BOMS:
        if sample.startswith(bom):
            return iconv_name, description
    pairs = len(sample) // 2
    if pairs < 4:
        return None
    even_nul = sample[0 : 2 * pairs : 2].count(0) / pairs
    odd_nul = sample[1 : 2 * pairs : 2].count(0) / pairs
    if odd_nul > 0.5 and even_nul < 0.05:
        return "UTF-16LE", "UTF-16 (little-endian, no byte-order mark)"
    if even_nul > 0.5 and odd_nul < 0.05:
        return "UTF-16BE", "UTF-16 (big-endian, no byte-order mark)"
    return None


def _encoding_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as 8-bit text, with the command that converts it; else None.

    Decoded as latin-1 (the fallback for non-UTF-8 files) UTF-16 would become every character
    followed by a NUL and fail much later with a baffling "Expected 5 fields in line 37".
    """
    with path.open("rb") as handle:
        sample = handle.read(8192)
    wide = _wide_encoding(sample)
    if wide:
        iconv_name, description = wide
        target = path.with_name(f"{path.stem}-utf8{path.suffix or '.csv'}")
        return (
            f"{path} is encoded as {description}, not UTF-8: convert it to UTF-8 first, e.g. "
            f"iconv -f {iconv_name} -t UTF-8 {shlex.quote(str(path))} > "
            f"{shlex.quote(str(target))} (or save it from the spreadsheet as 'CSV UTF-8')"
        )
    if b"\0" in sample:
        return (
            f"{path} is not a relevance CSV: {EXPECTED_FORMAT}; found binary data (NUL bytes), "
            "not text (if it is a text export, save it as UTF-8 CSV)"
        )
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


def _read_text_frame(path: Path) -> pd.DataFrame:
    """Every column as text (``str``); only an empty cell is missing."""
    problem = _encoding_problem(path)
    if problem:
        raise DataFormatError(problem)
    for encoding in ("utf-8", "latin-1"):
        try:
            frame = pd.read_csv(
                path, encoding=encoding, dtype=str, keep_default_na=False, na_values=[""]
            )
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataFormatError(
                f"{path} is not a relevance CSV: {EXPECTED_FORMAT}; {_what_was_found(path, exc)}"
            ) from exc
        except OSError as exc:  # unreadable (permissions, I/O error): bad input, not a crash
            raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if encoding != "utf-8":
            log.warning(
                "%s is not valid UTF-8; read it as %s (one character per byte)", path, encoding
            )
        return frame
    raise DataFormatError(f"{path} has an unknown text encoding")  # pragma: no cover


def parse_plain_integers(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(plain decimal integers as int64, or Int64 with missing values; the problem of each
    rejected cell). The rule of every integer column the platform reads, ids and timestamps
    alike: ASCII digits without sign, leading zero or separators, at most the int64 maximum."""
    present = raw.notna().to_numpy()
    plain = raw.str.fullmatch(_ID_PATTERN).fillna(False).to_numpy(dtype=bool)
    lengths = raw.str.len().fillna(0).to_numpy()
    digits = len(_INT64_MAX)
    longest = (lengths == digits) & (raw.fillna("") > _INT64_MAX).to_numpy(dtype=bool)
    too_large = plain & ((lengths > digits) | longest)
    good = plain & ~too_large
    ints = np.zeros(len(raw), dtype=np.int64)
    ints[good] = [int(text) for text in raw[good]]
    problems = np.full(len(raw), None, dtype=object)
    problems[present & ~plain] = NOT_AN_ID
    problems[too_large] = ID_TOO_LARGE
    if good.all():
        values = pd.Series(ints, index=raw.index, dtype="int64")
    else:
        values = pd.Series(pd.arrays.IntegerArray(ints, ~good), index=raw.index)
    return values, pd.Series(problems, index=raw.index, dtype=object)


def _parse_labels(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(labels as float64, NaN where missing or rejected; the problem of each rejected cell)."""
    present = raw.notna().to_numpy()
    plain = raw.str.fullmatch(_LABEL_PATTERN).fillna(False).to_numpy(dtype=bool)
    floats = np.full(len(raw), np.nan)
    floats[plain] = [float(text) for text in raw[plain]]
    bad = (present & ~plain) | (plain & ~np.isfinite(floats))  # 400 digits overflow to inf
    floats[bad] = np.nan
    problems = np.full(len(raw), None, dtype=object)
    problems[bad] = NOT_A_LABEL
    return pd.Series(floats, index=raw.index), pd.Series(problems, index=raw.index, dtype=object)


def read_relevance_csv(path: Path | str) -> pd.DataFrame:
    """Read a relevance CSV without dropping, coercing or repairing any row.

    Cleaning is the data-quality gate's job: it quarantines bad rows with a reason, which a
    loader that silently coerced or dropped them would make impossible. Ids come back as int64
    (nullable ``Int64`` when a cell is empty or rejected), ``relevance`` as float64, the text
    columns as ``str``. A cell that is not exactly what the schema says (see the module
    docstring) is missing in the frame and listed, with its raw text, under
    ``frame.attrs[READ_REJECTS]`` for :func:`recsys.quality.validate_frame` to quarantine.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path} is a directory; {EXPECTED_FORMAT}")
    if not path.is_file():
        raise DataFormatError(f"relevance data not found at {path} (set RECSYS_DATA_PATH)")
    frame = _read_text_frame(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        found = _not_text(path) or f"found the column(s) {[str(c) for c in frame.columns]}"
        if len(frame.columns) == 1 and re.search(r"[;\t|:]", str(frame.columns[0])):
            found += " (one column: is the file separated by something other than commas?)"
        raise DataFormatError(
            f"{path} lacks required column(s) {missing}: {EXPECTED_FORMAT}; {found}"
        )
    rejects: dict[int, dict[str, list[str]]] = {}
    parsers = [(c, parse_plain_integers) for c in ID_COLUMNS] + [(LABEL_COLUMN, _parse_labels)]
    for column, parse in parsers:
        raw = frame[column]
        values, problems = parse(raw)
        for label, problem in problems.dropna().items():
            rejects.setdefault(int(label), {})[column] = [problem, str(raw[label])]
        frame[column] = values
    frame.attrs[READ_REJECTS] = rejects
    return frame


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the frame's content, recorded as lineage on every registered model version.

    Cells the loader rejected are missing in the frame, so their raw text (``READ_REJECTS``)
    is hashed too: two files that differ only in a garbled cell get different fingerprints.
    """
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    rejects = frame.attrs.get(READ_REJECTS)
    if rejects:
        digest.update(json.dumps(sorted(rejects.items()), ensure_ascii=False).encode())
    return digest.hexdigest()


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
