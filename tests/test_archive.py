"""core.archive: ZIP uploads within whole-request budgets, every skipped member reported with its reason."""

from __future__ import annotations

import time
import tracemalloc
import zipfile

import pytest

from benchmarks.hostile_files import many_entry_zip, mark_encrypted, zip_of, zip_of_zeros
from core.archive import MAX_FILES, ArchiveError, UploadBudget, display_name, is_zip, open_zip
from tests.conftest import encode, synthetic_slice

PNG = encode(synthetic_slice(32))


def _members(archive) -> dict[str, str | None]:
    """name -> reason (None when passed on), in archive order."""
    return {member.name: member.reason for member in archive.members()}


def test_members_come_in_order_with_their_bytes() -> None:
    data = zip_of({"a/one.png": PNG, "a/two.png": PNG[::-1], "three.dcm": b"DICM"})
    assert is_zip(data)
    archive = open_zip(data, "/srv/incoming/study.zip", UploadBudget())
    got = list(archive)
    assert [name for name, _ in got] == ["study.zip/a/one.png", "study.zip/a/two.png", "study.zip/three.dcm"]
    assert got[0][1] == PNG and got[1][1] == PNG[::-1]
    assert archive.skipped == []
    with pytest.raises(RuntimeError, match="only once"):
        list(archive)


def test_every_skipped_member_has_a_reason() -> None:
    inner = zip_of({"x.png": PNG})
    data = zip_of({
        "scans/": b"",
        "scans/ok.png": PNG,
        "scans/.DS_Store": b"\x00" * 10,
        "__MACOSX/scans/._ok.png": b"\x00" * 10,
        "../escape.png": PNG,
        "/etc/absolute.png": PNG,
        "C:/windows.png": PNG,
        "scans/Thumbs.db": b"\x00",
        "nested.zip": inner,
        "renamed.png": inner,  # an archive by its bytes, whatever its name
    })
    reasons = _members(open_zip(data, "upload.zip"))
    assert reasons.pop("upload.zip/scans/ok.png") is None
    expected = {
        "upload.zip/scans/": "folder",
        "upload.zip/scans/.DS_Store": "hidden",
        "upload.zip/__MACOSX/scans/._ok.png": "__MACOSX",
        "upload.zip/../escape.png": "unsafe path",
        "upload.zip//etc/absolute.png": "unsafe path",
        "upload.zip/C:/windows.png": "unsafe path",
        "upload.zip/scans/Thumbs.db": "system file",
        "upload.zip/nested.zip": "archive inside",
        "upload.zip/renamed.png": "archive inside",
    }
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])


def test_skipped_list_matches_when_iterating_kept_members_only() -> None:
    archive = open_zip(zip_of({"a.png": PNG, ".hidden.png": PNG, "b/": b""}), "u.zip")
    assert [name for name, _ in archive] == ["u.zip/a.png"]
    assert [name for name, _ in archive.skipped] == ["u.zip/.hidden.png", "u.zip/b/"]
    assert all(reason for _, reason in archive.skipped)


def test_encrypted_member_is_skipped_not_opened() -> None:
    data = mark_encrypted(zip_of({"plain.png": PNG, "secret.png": PNG}), "secret.png")
    reasons = _members(open_zip(data, "u.zip"))
    assert reasons["u.zip/plain.png"] is None
    assert "encrypted" in reasons["u.zip/secret.png"]


def test_damaged_member_is_reported() -> None:
    data = bytearray(zip_of({"a.png": PNG}, compression=zipfile.ZIP_STORED))
    at = bytes(data).find(PNG[40:60])
    data[at] ^= 0xFF  # the stored bytes no longer match their CRC
    reasons = _members(open_zip(bytes(data), "u.zip"))
    assert "damaged" in reasons["u.zip/a.png"]


def test_not_a_zip_is_refused_plainly() -> None:
    for data in (b"PK\x03\x04" + b"\x00" * 100, b"not a zip at all" * 10):
        with pytest.raises(ArchiveError, match="not a readable ZIP") as caught:
            open_zip(data, "/srv/uploads/bad.zip")
        assert "/srv" not in str(caught.value)


def test_600k_entries_are_refused_fast_and_small() -> None:
    data = many_entry_zip(600_000)  # ZIP64 end record, as zipfile writes past 65,535 entries
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ArchiveError, match="more than"):
        open_zip(data, "many.zip")
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the archive itself is already in memory; counting must not build 600,000 members
    assert peak < 2 * len(data) + 16 * 2**20, peak
    assert seconds < 5.0, seconds


def test_a_lying_end_record_does_not_hide_the_directory() -> None:
    data = many_entry_zip(12_000, declared=3)  # says 3, holds 12,000
    tracemalloc.start()
    with pytest.raises(ArchiveError, match="more than"):
        open_zip(data, "liar.zip")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * len(data) + 4 * 2**20, peak


def test_entries_within_the_limit_are_read() -> None:
    archive = open_zip(many_entry_zip(300), "ok.zip")
    assert len(list(archive)) == 300


def test_budget_is_shared_across_archives() -> None:
    budget = UploadBudget(max_bytes=3 * 2**20)
    first = open_zip(zip_of_zeros("a.png", 2 * 2**20), "one.zip", budget)
    second = open_zip(zip_of_zeros("b.png", 2 * 2**20), "two.zip", budget)
    assert [len(data) for _, data in first] == [2 * 2**20]
    assert list(second) == []
    (name, reason), = second.skipped
    assert name == "two.zip/b.png" and "limit" in reason and "unpacked per upload" in reason
    assert budget.bytes == 2 * 2**20 and budget.files == 1


def test_file_count_budget_covers_plain_files_and_archives() -> None:
    budget = UploadBudget(max_files=3)
    assert budget.admit(len(PNG)) is None
    archive = open_zip(zip_of({f"{i}.png": PNG for i in range(4)}), "four.zip", budget)
    reasons = _members(archive)
    assert list(reasons.values()) == [None, None, reasons["four.zip/2.png"], reasons["four.zip/3.png"]]
    assert "3 files" in reasons["four.zip/2.png"]
    assert "3 files" in budget.admit(10)
    assert MAX_FILES == UploadBudget().max_files


def test_entry_budget_is_shared_across_archives() -> None:
    budget = UploadBudget(max_entries=500)
    list(open_zip(many_entry_zip(400), "a.zip", budget))
    with pytest.raises(ArchiveError, match="more than 100 entries"):
        open_zip(many_entry_zip(200), "b.zip", budget)


def test_header_that_understates_the_size_is_caught() -> None:
    budget = UploadBudget(max_bytes=2**20)
    data = bytearray(zip_of_zeros("a.png", 3 * 2**20))
    # rewrite the uncompressed size in the central directory to 10 bytes: zipfile stops there
    # and the CRC no longer matches, so nothing past the stated size is ever unpacked
    at = bytes(data).rfind(b"PK\x01\x02")
    data[at + 24:at + 28] = (10).to_bytes(4, "little")
    archive = open_zip(bytes(data), "liar.zip", budget)
    assert list(archive) == []
    assert "damaged" in archive.skipped[0][1]
    assert budget.bytes <= 2**20


def test_names_are_made_safe_to_show() -> None:
    assert display_name("scan\n1\u202e.png") == "scan?1?.png"
    assert display_name("\u200bzero.png") == "?zero.png"
    assert len(display_name("x" * 1000)) == 200
    archive = open_zip(zip_of({"bad\rname.png": PNG}), "a\nb.zip")
    assert [name for name, _ in archive] == ["a?b.zip/bad?name.png"]
