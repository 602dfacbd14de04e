"""Readers' agree / disagree feedback, kept in a local SQLite database on the server: never the image.

A row holds the time, the upload's sha256, the model (key, version, weights sha256), what the
model said, the reader's verdict (agree / disagree), the class the reader would give, and a
free-text comment. The store is one SQLite file at `$SECONDLOOK_FEEDBACK` (default
`~/.local/share/secondlook/feedback.sqlite3`), written in WAL mode: every row is one
transaction, so any number of sessions and server processes can append at once without a
torn row or a second header (a CSV appended by two processes got both). The file is made
readable by its owner only. SQLite's locking needs a local file system (not NFS).

A CSV kept by an earlier version at that path (or at the old default
`~/.local/share/secondlook/feedback.csv`, with the variable unset) is imported once, under a
file lock, and kept beside the store as `<name>.imported.csv`.

Export is a CSV through `core.csv_export` (formula cells quoted). The app offers it only to
whoever gives the token set in `$SECONDLOOK_ADMIN_TOKEN` (compared in constant time; unset or
shorter than 16 characters: no export in the app). On the server itself:

    python -m core.feedback count
    python -m core.feedback export feedback.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hmac
import logging
import os
import shutil
import sqlite3
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from core.csv_export import csv_bytes

logger = logging.getLogger(__name__)

VERDICTS = ("agree", "disagree")
MAX_COMMENT = 1000
ENV_PATH = "SECONDLOOK_FEEDBACK"
ENV_ADMIN_TOKEN = "SECONDLOOK_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another one's transaction (each lasts milliseconds)
_SQLITE_MAGIC = b"SQLite format 3\x00"


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
_SCHEMA = ("CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, "
           + ", ".join(f"{name} TEXT NOT NULL" for name in COLUMNS) + ")")


def feedback_path() -> Path:
    """Where feedback is stored: `$SECONDLOOK_FEEDBACK`, else ~/.local/share/secondlook/feedback.sqlite3."""
    configured = os.environ.get(ENV_PATH)
    return Path(configured) if configured else _home_folder() / "feedback.sqlite3"


def _home_folder() -> Path:
    return Path.home() / ".local" / "share" / "secondlook"


def _clean(text: str) -> str:
    """Format characters (zero-width, bidi controls) dropped, other control characters (but the line break) as
    spaces: a row is words, never terminal or file controls."""
    return "".join("" if unicodedata.category(ch) == "Cf" else ch if ch.isprintable() or ch == "\n" else " "
                   for ch in text)


def make_feedback(upload_sha256: str, model: str, model_version: str, weights_sha256: str, model_output: str,
                  verdict: str, reader_label: str = "", comment: str = "", when: datetime | None = None) -> Feedback:
    """A validated feedback row (text kept as written; the export quotes what could run as a formula).

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
    return Feedback(time=when.strftime("%Y-%m-%dT%H:%M:%SZ"), upload_sha256=upload_sha256, model=_clean(model),
                    model_version=_clean(model_version), weights_sha256=_clean(weights_sha256),
                    model_output=_clean(model_output), verdict=verdict, reader_label=_clean(reader_label),
                    comment=_clean(comment.strip()))


# ---------------------------------------------------------------- the store


def _is_sqlite(path: Path) -> bool:
    """True for a SQLite database or an empty file (SQLite takes that as an empty database)."""
    with open(path, "rb") as handle:
        head = handle.read(len(_SQLITE_MAGIC))
    return not head or head == _SQLITE_MAGIC


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (a `.lock` file beside the store; fcntl where the system has it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: imports are rare and run at start-up; go without
        yield
        return
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _legacy_rows(csv_path: Path) -> list[tuple[str, ...]]:
    """The rows of a CSV written by the earlier store (a header repeated by concurrent writers is skipped)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return [tuple(row.get(c) or "" for c in COLUMNS) for row in reader
                if row.get("time") and row.get("time") != "time"]


def _import_csv(csv_path: Path, db_path: Path) -> None:
    """Import an earlier CSV store into the database at `db_path`, once; the CSV is kept as `<name>.imported.csv`.

    Where both are the same path, the database is built beside it (without a WAL file, so that it
    is whole in one file) and renamed over it: the store's path never goes missing for another process.
    """
    rows = _legacy_rows(csv_path)
    kept = csv_path.with_name(csv_path.name + ".imported.csv")
    if csv_path == db_path:
        building = db_path.with_name(db_path.name + ".importing")
        building.unlink(missing_ok=True)
        with contextlib.closing(_open(building, wal=False)) as connection, connection:
            _insert(connection, rows)
        if not kept.exists():
            shutil.copyfile(csv_path, kept)
        os.replace(building, db_path)
    else:
        with contextlib.closing(_open(db_path)) as connection, connection:
            _insert(connection, rows)
        os.replace(csv_path, kept)
    logger.info("imported %d feedback rows from an earlier CSV store", len(rows))


def _legacy_default() -> Path | None:
    """The earlier default CSV store, where the variable is unset and that file exists."""
    legacy = _home_folder() / "feedback.csv"
    return legacy if os.environ.get(ENV_PATH) is None and legacy.is_file() else None


def _migrate(path: Path) -> None:
    """Bring an earlier CSV store into the database (at the path itself, or at the old default)."""
    candidates = [p for p in (path if path.is_file() else None, _legacy_default()) if p is not None]
    for candidate in candidates:
        if _is_sqlite(candidate):
            continue
        with _file_lock(path):
            if candidate.exists() and not _is_sqlite(candidate):  # another process may have done it meanwhile
                _import_csv(candidate, path)


def _open(path: Path, wal: bool = True) -> sqlite3.Connection:
    """A connection (in WAL mode unless told) with the table made; the file made owner-only if new."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)  # waits that long for another writer's lock
    if wal:
        connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(_SCHEMA)
    return connection


_INSERT = f"INSERT INTO feedback ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


def _insert(connection: sqlite3.Connection, rows: list[tuple[str, ...]]) -> None:
    connection.executemany(_INSERT, rows)


@contextlib.contextmanager
def _store(path: Path | None, create: bool) -> Iterator[sqlite3.Connection | None]:
    """A connection to the store (None when it does not exist and `create` is False); closed on exit."""
    path = Path(path) if path is not None else feedback_path()
    if not create and not path.exists() and _legacy_default() is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _migrate(path)
        with contextlib.closing(_open(path)) as connection:
            yield connection
    except sqlite3.Error as exc:  # one error type for callers: the store cannot be used, whatever the layer
        raise OSError(f"the feedback store {path} cannot be used: {exc}") from exc


def record_feedback(entry: Feedback, path: Path | None = None) -> Path:
    """Append one row (one transaction); returns the store written.

    Raises:
        OSError: If the store cannot be made or written (no folder, full disk, a file that is not a store).
    """
    path = Path(path) if path is not None else feedback_path()
    with _store(path, create=True) as connection, connection:
        _insert(connection, [tuple(asdict(entry)[c] for c in COLUMNS)])
    return path


def count_feedback(path: Path | None = None) -> int:
    """How many verdicts are stored (no row is read); 0 when there is no store yet.

    Raises:
        OSError: If the store cannot be read.
    """
    with _store(path, create=False) as connection:
        return 0 if connection is None else int(connection.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])


def read_feedback(path: Path | None = None) -> list[dict[str, str]]:
    """All rows stored so far, oldest first (empty when there is no store yet).

    Raises:
        OSError: If the store cannot be read.
    """
    with _store(path, create=False) as connection:
        if connection is None:
            return []
        rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM feedback ORDER BY id").fetchall()
    return [dict(zip(COLUMNS, row)) for row in rows]


def feedback_csv(rows: list[dict[str, str]]) -> bytes:
    """Rows as CSV bytes for download (`core.csv_export`: cells that could run as formulas are quoted)."""
    return csv_bytes(rows, COLUMNS)


def export_feedback(path: Path | None = None) -> bytes:
    """The whole store as CSV bytes (read when asked: the export button's callback)."""
    return feedback_csv(read_feedback(path))


# ---------------------------------------------------------------- who may export


def admin_token_configured() -> bool:
    """Whether `$SECONDLOOK_ADMIN_TOKEN` holds a token long enough to guard the export."""
    return len(os.environ.get(ENV_ADMIN_TOKEN, "")) >= MIN_TOKEN_LENGTH


def is_admin_token(given: str) -> bool:
    """Whether `given` is the configured administrator token (constant-time comparison); False when none is set."""
    if not admin_token_configured():
        return False
    return hmac.compare_digest(given.encode("utf-8"), os.environ[ENV_ADMIN_TOKEN].encode("utf-8"))


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The readers' feedback store on this server.")
    parser.add_argument("action", choices=("count", "export"))
    parser.add_argument("out", nargs="?", type=Path, help="CSV file to write (export; default: standard output)")
    parser.add_argument("--store", type=Path, default=None,
                        help=f"the store (default: ${ENV_PATH}, else ~/.local/share/secondlook/feedback.sqlite3)")
    args = parser.parse_args(argv)
    if args.action == "count":
        print(count_feedback(args.store))
        return 0
    data = export_feedback(args.store)
    if args.out is None:
        sys.stdout.write(data.decode("utf-8"))
    else:
        args.out.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
