"""The one CSV writer: every CSV the app offers (the batch table, the readers' feedback) goes through it.

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` as a formula (`=HYPERLINK(...)`
sends data away, `=cmd|...` starts programs in old Excel), and so does one that starts with a tab
or a carriage return. OWASP's rule (CSV Injection): prefix such a cell with a single quote, so it
is read as text. Text from outside (file names, comments) may hide the trigger behind characters
a reader does not see, so the test is made after skipping leading whitespace and invisible or
format characters (zero-width space U+200B, byte-order mark U+FEFF, right-to-left override U+202E
and the like), and those format characters are dropped from every cell: they only ever hide or
reorder what a reader sees. Other control characters become spaces; line breaks stay (the csv
module quotes them).
"""

from __future__ import annotations

import csv
import io
import itertools
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TRIGGERS = frozenset("=+-@")
LEADING_TRIGGERS = frozenset("\t\r")


def _invisible(ch: str) -> bool:
    """Whitespace, control, format (Cf: zero-width, bidi controls, BOM) or separator characters."""
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def is_formula(text: str) -> bool:
    """Whether a spreadsheet could take this cell for a formula (OWASP's rule, invisible characters skipped).

    Full-width look-alikes (U+FF1D FULLWIDTH EQUALS SIGN) count as their ASCII form: some
    spreadsheets accept them.
    """
    for ch in text:
        if ch in LEADING_TRIGGERS:
            return True
        if _invisible(ch):
            continue
        return unicodedata.normalize("NFKC", ch)[:1] in TRIGGERS
    return False


def safe_cell(value: Any) -> Any:
    """A cell as written: text cleaned and quoted where it could run as a formula; numbers and None unchanged.

    Format characters are removed, other control characters (but the line break) become spaces,
    and a cell that `is_formula` gets a leading single quote.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    formula = is_formula(text)
    cleaned = "".join("" if unicodedata.category(ch) == "Cf"
                      else " " if unicodedata.category(ch) == "Cc" and ch != "\n" else ch for ch in text)
    return "'" + cleaned if formula else cleaned


def csv_bytes(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> bytes:
    """Rows as UTF-8 CSV bytes, every cell through `safe_cell`; the header from `columns` or the first row.

    Keys a row has beyond `columns` are left out; a missing key is an empty cell. No rows and
    no columns give empty bytes.
    """
    rows = iter(rows)
    first = next(rows, None)
    if columns is None:
        columns = list(first) if first is not None else []
    if not columns:
        return b""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([safe_cell(c) for c in columns])
    for row in itertools.chain([first] if first is not None else [], rows):
        writer.writerow([safe_cell(row.get(c)) for c in columns])
    return buffer.getvalue().encode("utf-8")
