"""ZIP uploads, unpacked in memory with limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.imaging import MAX_UPLOAD_BYTES

MAX_ZIP_MEMBERS = 2000


def is_zip(data: bytes) -> bool:
    """True for a ZIP archive (local file header magic)."""
    return data[:4] == b"PK\x03\x04"


def unpack_zip(name: str, data: bytes, max_members: int = MAX_ZIP_MEMBERS,
               max_total: int = MAX_UPLOAD_BYTES) -> Iterator[tuple[str, bytes]]:
    """The files inside a ZIP upload as (archive name/member name, bytes), in archive order.

    Folders, macOS resource forks (__MACOSX/, ._*) and hidden files are skipped; nested
    archives are passed on as files (and refused by the reader). Everything stays in memory.

    Raises:
        ValueError: For an unreadable or encrypted archive, too many members, or more than
            `max_total` bytes once unpacked (a ZIP bomb), with a plain reason.
    """
    import io
    import zipfile

    archive_name = Path(name).name
    too_big = f"{archive_name} unpacks to more than {max_total // 2**20} MB; split it into smaller archives"
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()
                   and not any(part.startswith((".", "__MACOSX")) for part in Path(m.filename).parts)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ValueError(f"{archive_name} is not a readable ZIP archive ({exc})") from None
    if len(members) > max_members:
        raise ValueError(f"{archive_name} holds {len(members)} files; at most {max_members} per archive")
    if sum(m.file_size for m in members) > max_total:
        raise ValueError(too_big)
    if any(m.flag_bits & 0x1 for m in members):
        raise ValueError(f"{archive_name} is encrypted; upload an archive without a password")
    total = 0
    for member in members:
        try:
            with archive.open(member) as handle:
                content = handle.read(max_total - total + 1)  # the sizes in the header may lie
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise ValueError(f"{archive_name}: {member.filename} cannot be unpacked ({exc})") from None
        total += len(content)
        if total > max_total:
            raise ValueError(too_big)
        yield f"{archive_name}/{member.filename}", content


