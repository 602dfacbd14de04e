"""Readers' agree / disagree feedback, kept in a local CSV file: never the image.

A row holds the time, the upload's sha256, the model (key, version, weights sha256), what the
model said, the reader's verdict (agree / disagree), the class the reader would give, and a
free-text comment. The file lives at `$SECONDLOOK_FEEDBACK` (default
`~/.local/share/secondlook/feedback.csv`), appended under a lock so several sessions can
write at once. Cells that a spreadsheet would run as a formula are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

VERDICTS = ("agree", "disagree")
MAX_COMMENT = 1000
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Feedback:
    """One reader's verdict on one model output."""

    time: str
    upload_sha256: str
    model: str
    model_version: str
    weights_sha256: str
    model_output: str
    verdict: str
    reader_label: str
    comment: str


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Feedback))


def feedback_path() -> Path:
    """Where feedback is stored: `$SECONDLOOK_FEEDBACK`, else ~/.local/share/secondlook/feedback.csv."""
    configured = os.environ.get("SECONDLOOK_FEEDBACK")
    return Path(configured) if configured else Path.home() / ".local" / "share" / "secondlook" / "feedback.csv"


def _safe_cell(text: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection) and control characters."""
    text = "".join(ch if ch.isprintable() or ch in "\n" else " " for ch in text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def make_feedback(upload_sha256: str, model: str, model_version: str, weights_sha256: str, model_output: str,
                  verdict: str, reader_label: str = "", comment: str = "", when: datetime | None = None) -> Feedback:
    """A validated feedback row.

    Raises:
        ValueError: On an unknown verdict, a malformed hash, or an over-long comment.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; one of {', '.join(VERDICTS)}")
    if len(upload_sha256) != 64 or any(c not in "0123456789abcdef" for c in upload_sha256):
        raise ValueError("upload_sha256 must be a full lowercase hex sha256")
    if len(comment) > MAX_COMMENT:
        raise ValueError(f"the comment is longer than {MAX_COMMENT} characters")
    when = when or datetime.now(timezone.utc)
    return Feedback(time=when.strftime("%Y-%m-%dT%H:%M:%SZ"), upload_sha256=upload_sha256, model=model,
                    model_version=model_version, weights_sha256=weights_sha256, model_output=_safe_cell(model_output),
                    verdict=verdict, reader_label=_safe_cell(reader_label), comment=_safe_cell(comment.strip()))


def record_feedback(entry: Feedback, path: Path | None = None) -> Path:
    """Append one row (the header first if the file is new); returns the file written.

    Raises:
        OSError: If the file cannot be written.
    """
    path = Path(path) if path is not None else feedback_path()
    with _LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(asdict(entry))
    return path


def read_feedback(path: Path | None = None) -> list[dict[str, str]]:
    """All rows stored so far (empty when there is no file yet)."""
    path = Path(path) if path is not None else feedback_path()
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def feedback_csv(rows: list[dict[str, str]]) -> bytes:
    """Rows as CSV bytes for download."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")
