"""Strict readers for interaction exports and item metadata of the recommendation family.

The rules are the search reader's (:mod:`recsys.data`): every column is read as text and a
cell that is not exactly what the schema says is *not* repaired. It becomes a missing value in
the typed frame, and its raw text and the rule it broke are recorded under
``frame.attrs[READ_REJECTS]`` (the same key, so :func:`recsys.quality.validate_frame`
quarantines the row as ``read:<column>(<problem>)`` with the raw text). Rows are never dropped
here: rows in = clean + quarantined is the gate's invariant, and it only holds if the reader
hands over every row.

Ids are opaque tokens, not numbers. The Amazon export happens to use decimal integers, but a
shop's export uses ASINs (``B000E1FZHS``), SKUs or UUIDs, and nothing ever does arithmetic on an
id: the split maps them to contiguous integers anyway. Reading ids as integers would also merge
``"007"`` and ``"7"`` (two different ids in a string-keyed system) or reject a valid ASIN. So an
id is kept as the exact text of the file and must be a *plain token*: 1 to 64 ASCII characters,
letters, digits and ``_ . : -``, starting with a letter or a digit. That refuses whitespace
(``" 7"`` and ``"7"`` must not silently become two users), quotes, separators, non-ASCII look-
alikes (Arabic-Indic digits, full-width letters) and anything a spreadsheet would evaluate
(``=``, ``+``, ``-``, ``@`` first). Words that exports write for a missing value (``NA``,
``null``, ``None``, ...) are refused too: as ids they would merge every row without a user into
one busy user.

``time`` is integer unix seconds written as a plain decimal integer (ASCII digits, no sign, no
leading zero, fraction, exponent or separator; at most 2**63 - 1). Its plausible *range* is the
suite's check (:mod:`.suite`), so an out-of-range timestamp reaches the gate with its value.

Separators: a file whose header line holds a tab is read as tab-separated with quoting off (a
``"`` in a TSV cell is data, and then not a plain token); otherwise as a comma-separated CSV
with standard quoting (needed for item metadata, whose lists contain commas).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data import (
    ID_TOO_LARGE,
    NOT_AN_ID,
    READ_REJECTS,
    DataFormatError,
    parse_plain_integers,
)

log = logging.getLogger(__name__)

__all__ = [
    "BAD_LIST",
    "ID_TOO_LONG",
    "INTERACTION_COLUMNS",
    "ITEM_META_COLUMNS",
    "LIST_COLUMNS",
    "NOT_A_TIME",
    "NOT_A_TOKEN",
    "NULL_WORD",
    "READ_REJECTS",
    "TIME_TOO_LARGE",
    "DataFormatError",
    "catalogue_items",
    "read_interactions",
    "read_item_meta",
]

USER, ITEM, TIME = "user_id", "item_id", "time"
INTERACTION_COLUMNS = (USER, ITEM, TIME)
ITEM_META_COLUMNS = ("item_id", "i_category", "r_complement", "r_substitute")
LIST_COLUMNS = ("r_complement", "r_substitute")
"""Item-id lists of the metadata: Amazon's "also bought" and "also viewed" products."""

NOT_A_TOKEN = "not a plain id token"
NULL_WORD = "a missing-value word, not an id"
ID_TOO_LONG = "longer than 64 characters"
NOT_A_TIME = NOT_AN_ID
"""A timestamp follows the platform's integer rule (:func:`recsys.data.parse_plain_integers`)."""
TIME_TOO_LARGE = ID_TOO_LARGE
BAD_LIST = "not a list of plain id tokens like [12, 7]"

MAX_ID_LENGTH = 64
NULL_WORDS = frozenset({"na", "nan", "null", "none", "nil", "undefined"})
"""Words that exports write for a missing value (pandas, R, SQL, Python, JavaScript). Taken as
ids they would merge every row without a user into one busy user, so they are rejected."""
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9_.:\-]*"  # ASCII classes: str.isalnum() also takes "١٢"
_LIST = re.compile(rf"\[(?:\s*{_TOKEN}(?:\s*,\s*{_TOKEN})*\s*)?\]")
_LIST_ITEM = re.compile(_TOKEN)


def _separator(path: Path) -> str:
    """``"\\t"`` when the header line holds a tab, else ``","``."""
    with path.open("rb") as handle:
        header = handle.readline(65536)
    return "\t" if b"\t" in header else ","


def _read_text(path: Path, what: str, required: tuple[str, ...]) -> pd.DataFrame:
    """Every column as text; only an empty cell is missing (``NA``, ``null`` stay text and are
    then rejected as tokens, rather than silently becoming missing values)."""
    if path.is_dir():
        raise DataFormatError(f"{path} is a directory, not {what}")
    if not path.is_file():
        raise DataFormatError(f"{what} not found at {path}")
    with path.open("rb") as handle:
        sample = handle.read(8192)
    if not sample.strip():
        raise DataFormatError(f"{path} is empty; expected {what} with columns {list(required)}")
    if b"\0" in sample:
        raise DataFormatError(
            f"{path} holds NUL bytes: binary data or UTF-16/UTF-32 text, not {what}; convert a "
            f"text export to UTF-8 first (e.g. iconv -f UTF-16 -t UTF-8)"
        )
    sep = _separator(path)
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    for encoding in ("utf-8", "latin-1"):  # ids are ASCII; latin-1 only keeps text readable
        try:
            frame = pd.read_csv(
                path,
                sep=sep,
                quoting=quoting,
                encoding=encoding,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
            )
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataFormatError(f"{path} does not parse as {what}: {exc}") from exc
        except OSError as exc:
            raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if encoding != "utf-8":
            log.warning("%s is not valid UTF-8; read it as latin-1", path)
        break
    else:  # pragma: no cover - latin-1 decodes every byte
        raise DataFormatError(f"{path} has an unknown text encoding")
    missing = [column for column in required if column not in frame.columns]
    if missing:
        found = [str(column) for column in frame.columns]
        raise DataFormatError(
            f"{path} lacks column(s) {missing} of {what}: found {found} "
            f"(separator detected: {'tab' if sep == chr(9) else 'comma'})"
        )
    return frame


def _parse_tokens(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(the tokens as text, missing where rejected; the problem of each rejected cell)."""
    present = raw.notna().to_numpy()
    plain = raw.str.fullmatch(_TOKEN).fillna(False).to_numpy(dtype=bool)
    too_long = plain & (raw.str.len().fillna(0).to_numpy() > MAX_ID_LENGTH)
    null_word = plain & raw.str.lower().isin(NULL_WORDS).to_numpy(dtype=bool)
    problems = np.full(len(raw), None, dtype=object)
    problems[present & ~plain] = NOT_A_TOKEN
    problems[too_long] = ID_TOO_LONG
    problems[null_word] = NULL_WORD
    values = raw.where(~(present & (~plain | too_long | null_word)))
    return values, pd.Series(problems, index=raw.index, dtype=object)


def _parse_lists(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(tuples of id tokens, missing where empty or rejected; the problem of each rejection).

    ``[]`` is a valid empty list (an item nobody also bought); an empty cell is missing.
    """
    values = np.full(len(raw), None, dtype=object)
    problems = np.full(len(raw), None, dtype=object)
    for position, text in enumerate(raw.to_numpy(dtype=object)):
        if not isinstance(text, str):
            continue
        tokens = _LIST_ITEM.findall(text) if _LIST.fullmatch(text) else None
        if tokens is None or any(len(token) > MAX_ID_LENGTH for token in tokens):
            problems[position] = BAD_LIST
        else:
            values[position] = tuple(tokens)
    return (
        pd.Series(values, index=raw.index, dtype=object),
        pd.Series(problems, index=raw.index, dtype=object),
    )


def _apply(frame: pd.DataFrame, parsers: dict[str, object]) -> pd.DataFrame:
    """Replace each column by its parsed values and record every rejected cell."""
    rejects: dict[int, dict[str, list[str]]] = {}
    for column, parse in parsers.items():
        raw = frame[column]
        values, problems = parse(raw)  # type: ignore[operator]
        for label, problem in problems.dropna().items():
            rejects.setdefault(int(label), {})[column] = [str(problem), str(raw[label])]
        frame[column] = values
    frame.attrs[READ_REJECTS] = rejects
    return frame


def read_interactions(path: Path | str) -> pd.DataFrame:
    """Read a ``user_id, item_id, time`` export (tab- or comma-separated) without dropping,
    casting or repairing a row.

    ``user_id`` and ``item_id`` come back as text, ``time`` as int64 (nullable ``Int64`` when a
    cell is empty or rejected); extra columns are kept as text. Rejected cells are missing in
    the frame and listed with their raw text under ``frame.attrs[READ_REJECTS]``
    (``{row label: {column: [problem, raw text]}}``) for the quality gate.
    """
    path = Path(path)
    frame = _read_text(path, "an interaction export", INTERACTION_COLUMNS)
    return _apply(frame, {USER: _parse_tokens, ITEM: _parse_tokens, TIME: parse_plain_integers})


def read_item_meta(path: Path | str) -> pd.DataFrame:
    """Read item metadata: ``item_id``, ``i_category`` (tokens), ``r_complement`` (also bought)
    and ``r_substitute`` (also viewed) as tuples of item-id tokens.

    Same rules as :func:`read_interactions`: a bad cell is missing and recorded under
    ``frame.attrs[READ_REJECTS]``, never repaired, and no row is dropped. The lists may name
    items that have no row of their own (Amazon's lists reach outside the 5-core subset).
    """
    path = Path(path)
    frame = _read_text(path, "item metadata", ITEM_META_COLUMNS)
    parsers: dict[str, object] = {"item_id": _parse_tokens, "i_category": _parse_tokens}
    parsers.update({column: _parse_lists for column in LIST_COLUMNS})
    return _apply(frame, parsers)


def catalogue_items(item_meta: pd.DataFrame) -> frozenset[str]:
    """The item ids the catalogue knows: every readable ``item_id`` of the metadata.

    Items only mentioned in another item's lists are not in the catalogue: nothing is known
    about them beyond their id.
    """
    return frozenset(item_meta["item_id"].dropna().astype(str))
