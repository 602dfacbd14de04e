"""ZIP uploads unpacked in memory, within limits that hold for a whole request or session.

One `UploadBudget` is made per request (or session) and handed to every archive of it, so
eight archives share one set of limits instead of each having its own. The central directory
is counted before Python's `zipfile` builds its member list, so an archive of 600,000 entries
is refused in microseconds, holding nothing. Members are then read one at a time, each at most
what is left of the budget; every member that is not passed on is reported with its reason
(folder, hidden or system file, macOS metadata, unsafe path, encrypted, an archive inside the
archive, over a limit, damaged) instead of being dropped silently.

    budget = UploadBudget()
    for upload_name, data in uploads:
        if is_zip(data):
            try:
                archive = open_zip(data, upload_name, budget)
            except ArchiveError as exc:
                ...  # one row for the whole archive: str(exc)
                continue
            for member in archive.members():  # in archive order
                if member.data is None:
                    ...  # a row: member.name, member.reason
                else:
                    ...  # read member.data with core.imaging.read_scan
        else:
            reason = budget.admit(len(data))  # plain files count against the same budget

or, where the order does not matter: `for name, data in archive: ...` then `archive.skipped`.
Names (`Member.name`) are untrusted text with control and formatting characters replaced:
show them as plain text only. Nothing is written to disk.
"""

from __future__ import annotations

import io
import logging
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from core.imaging import MAX_UPLOAD_BYTES

logger = logging.getLogger(__name__)

MAX_FILES = 2000  # files unpacked per request, all archives together
MAX_ENTRIES = 10_000  # central-directory entries (folders and clutter included) read per request
MAX_UNPACKED_BYTES = MAX_UPLOAD_BYTES  # bytes unpacked per request, all archives together
_PEEK = 512  # bytes read first, enough to recognise an archive inside the archive

# First bytes of archive formats not opened inside an archive (tar: "ustar" at offset 257).
_ARCHIVE_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"PK\x03\x04"), (0, b"PK\x05\x06"), (0, b"PK\x07\x08"), (0, b"\x1f\x8b"), (0, b"BZh"),
    (0, b"\xfd7zXZ\x00"), (0, b"7z\xbc\xaf\x27\x1c"), (0, b"Rar!\x1a\x07"), (0, b"\x28\xb5\x2f\xfd"),
    (257, b"ustar"),
)
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})

_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # zipfile.structCentralDir, 46 bytes
_CENTRAL_MAGIC = b"PK\x01\x02"


class ArchiveError(ValueError):
    """A whole archive that is not read; the message is written for the person who uploaded it."""


@dataclass
class UploadBudget:
    """Limits for one request or session, shared by every archive (and plain file) in it.

    Attributes:
        max_files: Files passed on, all archives together (plain files counted through `admit`).
        max_bytes: Bytes unpacked (or admitted), all archives together; a member that is read
            and then skipped (damaged, an archive inside the archive) still counts what was read.
        max_entries: Central-directory entries read, folders and clutter included.
        files, bytes, entries: What has been used so far.
    """

    max_files: int = MAX_FILES
    max_bytes: int = MAX_UNPACKED_BYTES
    max_entries: int = MAX_ENTRIES
    files: int = 0
    bytes: int = 0
    entries: int = 0

    @property
    def bytes_left(self) -> int:
        """Bytes that may still be unpacked."""
        return max(0, self.max_bytes - self.bytes)

    def admit(self, size: int) -> str | None:
        """Count one plain (not archived) file of `size` bytes against the budget.

        Returns:
            None when it fits (and is counted), else the reason it does not (nothing counted).
        """
        reason = self._over(size)
        if reason is None:
            self.files += 1
            self.bytes += size
        return reason

    def _over(self, size: int) -> str | None:
        if self.files >= self.max_files:
            return f"over the limit of {self.max_files} files per upload"
        if size > self.bytes_left:
            return (f"{_mb(size)} would pass the limit of {_mb(self.max_bytes)} unpacked per upload "
                    f"({_mb(self.bytes_left)} left)")
        return None


@dataclass(frozen=True)
class Member:
    """One entry of an archive: its bytes, or the reason it was skipped.

    Attributes:
        name: "archive.zip/path/in/archive", control and formatting characters replaced by "?"
            (untrusted: show as plain text only).
        data: The unpacked bytes; None when skipped.
        reason: Why it was skipped (None when passed on).
    """

    name: str
    data: bytes | None = None
    reason: str | None = None


@dataclass
class ZipUpload:
    """An opened ZIP upload: iterate `members()` (all, in order) or the object itself (kept files only).

    Iterate once: every member read is counted against the shared budget.
    """

    name: str
    _archive: zipfile.ZipFile
    _budget: UploadBudget
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _started: bool = False

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each member passed on; the others go to `skipped` as (name, reason)."""
        for member in self.members():
            if member.data is not None:
                yield member.name, member.data

    def members(self) -> Iterator[Member]:
        """Every entry in archive order, read one at a time; skipped ones also go to `skipped`."""
        if self._started:
            raise RuntimeError(f"{self.name}: an archive's members can be read only once (they count against the budget)")
        self._started = True
        for info in self._archive.infolist():
            member = self._read(info)
            if member.reason is not None:
                self.skipped.append((member.name, member.reason))
            yield member

    def _read(self, info: zipfile.ZipInfo) -> Member:
        name = f"{self.name}/{display_name(info.filename)}"
        reason = _skip_reason(info) or self._budget._over(info.file_size)
        if reason is not None:
            return Member(name, reason=reason)
        budget = self._budget
        limit = budget.bytes_left
        try:
            with self._archive.open(info) as handle:
                head = handle.peek(_PEEK)[:_PEEK]  # decompresses a first chunk, consumes nothing
                if _is_archive(head):
                    budget.bytes += len(head)
                    return Member(name, reason="an archive inside the archive (not opened)")
                # At most one byte past what is left (zipfile also stops at the size the header states).
                data = handle.read(limit + 1)
        except NotImplementedError:
            return Member(name, reason="compressed with a method not supported here")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error) as exc:
            logger.info("archive member unreadable: %s", type(exc).__name__)
            return Member(name, reason="damaged (it cannot be unpacked)")
        if len(data) > limit:
            budget.bytes += limit
            return Member(name, reason=f"unpacks to more than its header says, past the {_mb(budget.max_bytes)} "
                                       "unpacked per upload")
        budget.bytes += len(data)
        budget.files += 1
        return Member(name, data=data)


def is_zip(data: bytes) -> bool:
    """True for a ZIP archive, decided from its first bytes (an empty archive starts with its end record)."""
    return bytes(data[:4]) in (b"PK\x03\x04", b"PK\x05\x06")


def open_zip(data: bytes, name: str, budget: UploadBudget | None = None) -> ZipUpload:
    """Open a ZIP upload in memory after counting its central directory against the budget.

    Args:
        data: The whole archive.
        name: The name it was uploaded under (only its last part is used, in member names).
        budget: The request's (or session's) budget, shared with its other archives; a fresh
            one when None.

    Returns:
        A `ZipUpload` to iterate.

    Raises:
        ArchiveError: Not a readable ZIP, larger than an upload may be, or more directory
            entries than the budget has left (checked while counting, before any member list
            is built).
    """
    budget = budget if budget is not None else UploadBudget()
    archive_name = display_name(PurePosixPath(str(name).replace("\\", "/")).name) or "archive"
    unreadable = f"{archive_name} is not a readable ZIP archive."
    data = bytes(data)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ArchiveError(f"{archive_name} is larger than {_mb(MAX_UPLOAD_BYTES)}; split it into smaller archives.")
    entries_left = max(0, budget.max_entries - budget.entries)
    try:
        entries = _count_entries(data, entries_left)
    except zipfile.BadZipFile:
        raise ArchiveError(unreadable) from None
    if entries > entries_left:
        left = "" if entries_left == budget.max_entries else f" ({entries_left} left after the other archives)"
        raise ArchiveError(
            f"{archive_name} holds more than {entries_left} entries (files and folders); an upload may hold at most "
            f"{budget.max_entries} entries and {budget.max_files} files{left}. Split it into smaller archives."
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, struct.error,
            UnicodeDecodeError, NotImplementedError) as exc:
        logger.info("archive unreadable: %s", type(exc).__name__)
        raise ArchiveError(unreadable) from None
    budget.entries += len(archive.filelist)
    return ZipUpload(archive_name, archive, budget)


def _count_entries(data: bytes, limit: int) -> int:
    """Entries in the central directory, counted up to `limit` + 1 without building them.

    The end record is found by zipfile's own reader, so this walks exactly the bytes that
    `zipfile.ZipFile` would then parse into its member list.

    Raises:
        zipfile.BadZipFile: No end record, or a directory outside the file.
    """
    endrec = zipfile._EndRecData(io.BytesIO(data))  # noqa: SLF001 - the same reading ZipFile makes
    if not endrec:
        raise zipfile.BadZipFile("no end of central directory record")
    if endrec[zipfile._ECD_ENTRIES_TOTAL] > limit:  # noqa: SLF001
        return endrec[zipfile._ECD_ENTRIES_TOTAL]  # noqa: SLF001 - the declared count is already too many
    size = endrec[zipfile._ECD_SIZE]  # noqa: SLF001
    start = endrec[zipfile._ECD_LOCATION] - size  # noqa: SLF001 - ZipFile's start_dir (concat included)
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # noqa: SLF001
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if start < 0:
        raise zipfile.BadZipFile("bad offset for central directory")
    end = min(start + size, len(data))
    count, pos = 0, start
    while pos < start + size and count <= limit:
        if pos + _CENTRAL_HEADER.size > end:
            break  # zipfile stops here too ("truncated central directory")
        header = _CENTRAL_HEADER.unpack_from(data, pos)
        if header[0] != _CENTRAL_MAGIC:
            break
        count += 1
        pos += _CENTRAL_HEADER.size + header[12] + header[13] + header[14]
    return count


def _skip_reason(info: zipfile.ZipInfo) -> str | None:
    """Why an entry is not passed on, from its directory record alone; None when it may be read."""
    raw = info.filename.replace("\\", "/")
    parts = [part for part in raw.split("/") if part]
    if info.is_dir():
        return "a folder (its files are listed on their own)"
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or ".." in parts:
        return "an unsafe path (absolute, or leading out of the archive)"
    if "__MACOSX" in parts:
        return "macOS metadata (__MACOSX), not a scan"
    if any(part.startswith(".") for part in parts):
        return "a hidden file"
    if parts and parts[-1].lower() in _SYSTEM_FILES:
        return "a system file, not a scan"
    if info.flag_bits & 0x1:
        return "encrypted (password-protected); add it without a password"
    if info.file_size > MAX_UPLOAD_BYTES:
        return f"larger than {_mb(MAX_UPLOAD_BYTES)} unpacked, the limit for one file"
    return None


def _is_archive(head: bytes) -> bool:
    return any(head[offset:offset + len(magic)] == magic for offset, magic in _ARCHIVE_MAGIC)


def display_name(name: str, limit: int = 200) -> str:
    """An untrusted name made safe to show on one line: control and formatting characters
    (newlines, bidirectional overrides, zero-width characters) become "?", at most `limit` characters."""
    cleaned = "".join("?" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else ch for ch in name)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 1] + "…"


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size / 1024:.0f} KB"
