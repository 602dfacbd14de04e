"""The readers' feedback store: concurrent processes, the earlier CSV imported, export for the administrator only."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import feedback
from core.feedback import COLUMNS, count_feedback, export_feedback, make_feedback, read_feedback, record_feedback
from tests.conftest import REPO

SHA = "ab" * 32
TOKEN = "a-long-administrator-token-0123"


# A writer process: says it is ready, waits for the go file (so that every process starts at once, the
# store not yet made), then appends its rows. Plain interpreters, not multiprocessing: a page test may have left
# sys.modules["__main__"] pointing at a script multiprocessing would run again in each child.
_WRITER = """
import sys, time
from pathlib import Path
from core.feedback import make_feedback, record_feedback
path, worker, n, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
go.with_name(f"ready{worker}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(n):
    record_feedback(make_feedback("ab" * 32, "brain_mri", "1", "w", f"glioma ({worker}.{i})", "agree",
                                  comment=f"worker {worker} row {i}\\nsecond line, \\"quoted\\""), path)
"""


@pytest.mark.parametrize("legacy", [False, True], ids=["fresh", "from-an-earlier-csv"])
def test_four_processes_appending_at_once_leave_every_row_whole_and_one_header(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "store" / "feedback"
    path.parent.mkdir()
    if legacy:  # a CSV of the earlier store at the same path, with the second header two writers left in it
        header = ",".join(COLUMNS)
        old = f"2025-01-01T00:00:00Z,{SHA},m,1,w,x (0.5),disagree,,old comment"
        path.write_text(f"{header}\n{old}\n{header}\n{old}\n", encoding="utf-8")
    go = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w), "25", str(go)], cwd=REPO)
               for w in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for worker in workers:
        assert worker.wait(120) == 0
    rows = read_feedback(path)
    earlier = 2 if legacy else 0
    assert len(rows) == 100 + earlier == count_feedback(path)
    written = sorted(r["model_output"] for r in rows[earlier:])
    assert written == sorted(f"glioma ({w}.{i})" for w in range(4) for i in range(25))  # none lost, none twice
    assert all(r["comment"].endswith("second line, \"quoted\"") for r in rows[earlier:])
    lines = list(csv.reader(io.StringIO(export_feedback(path).decode("utf-8"))))
    assert lines[0] == list(COLUMNS) and sum(line == list(COLUMNS) for line in lines) == 1
    assert len(lines) == 1 + 100 + earlier
    if legacy:
        assert rows[0]["comment"] == "old comment"
        assert (path.parent / "feedback.imported.csv").read_text(encoding="utf-8").count("old comment") == 2


def test_the_store_is_owner_only_and_absent_until_written(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite3"
    assert count_feedback(path) == 0 and read_feedback(path) == [] and not path.exists()
    record_feedback(make_feedback(SHA, "m", "1", "w", "x", "agree"), path)
    assert os.stat(path).st_mode & 0o077 == 0
    assert count_feedback(path) == 1


def test_the_old_default_csv_is_imported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(feedback.ENV_PATH, raising=False)
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    folder = tmp_path / ".local" / "share" / "secondlook"
    folder.mkdir(parents=True)
    (folder / "feedback.csv").write_text(",".join(COLUMNS) + f"\n2025-01-01T00:00:00Z,{SHA},m,1,w,x,agree,,kept\n",
                                         encoding="utf-8")
    assert feedback.feedback_path() == folder / "feedback.sqlite3"
    assert count_feedback() == 1 and read_feedback()[0]["comment"] == "kept"
    assert not (folder / "feedback.csv").exists() and (folder / "feedback.csv.imported.csv").exists()
    record_feedback(make_feedback(SHA, "m", "1", "w", "x", "agree"))
    assert count_feedback() == 2


def test_a_store_that_cannot_be_used_raises_oserror(tmp_path: Path) -> None:
    not_a_store = tmp_path / "feedback.sqlite3"
    not_a_store.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    with pytest.raises(OSError, match="cannot be used"):
        record_feedback(make_feedback(SHA, "m", "1", "w", "x", "agree"), not_a_store)


def test_the_administrator_token_is_needed_and_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(feedback.ENV_ADMIN_TOKEN, raising=False)
    assert not feedback.admin_token_configured() and not feedback.is_admin_token("")
    monkeypatch.setenv(feedback.ENV_ADMIN_TOKEN, "short")
    assert not feedback.admin_token_configured() and not feedback.is_admin_token("short")
    monkeypatch.setenv(feedback.ENV_ADMIN_TOKEN, TOKEN)
    assert feedback.is_admin_token(TOKEN) and not feedback.is_admin_token(TOKEN[:-1]) and not feedback.is_admin_token("")


def test_the_command_line_counts_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "feedback.sqlite3"
    record_feedback(make_feedback(SHA, "m", "1", "w", "x", "agree", comment="=HYPERLINK(1)"), path)
    assert feedback.main(["count", "--store", str(path)]) == 0 and capsys.readouterr().out.strip() == "1"
    out = tmp_path / "export.csv"
    assert feedback.main(["export", str(out), "--store", str(path)]) == 0
    assert list(csv.DictReader(out.open(encoding="utf-8")))[0]["comment"] == "'=HYPERLINK(1)"


def test_cards_page_counts_without_reading_and_exports_only_for_the_administrator(
        monkeypatch: pytest.MonkeyPatch, feedback_file: Path) -> None:
    from tests.test_app import page

    for i in range(3):
        record_feedback(make_feedback(SHA, "brain_mri", "1", "w", "x", "disagree", comment=f"private {i}"))
    reads: list[int] = []
    original = feedback.read_feedback
    monkeypatch.setattr(feedback, "read_feedback", lambda *a, **k: reads.append(1) or original(*a, **k))

    monkeypatch.delenv(feedback.ENV_ADMIN_TOKEN, raising=False)
    cards = page("Model cards")
    assert "3 verdicts stored on this server" in " ".join(m.value for m in cards.markdown)
    assert not [b for b in cards.get("download_button") if "feedback" in b.proto.label]
    assert any("Export is off on this server" in c.value for c in cards.caption)

    monkeypatch.setenv(feedback.ENV_ADMIN_TOKEN, TOKEN)
    cards = page("Model cards")
    assert not [b for b in cards.get("download_button") if "feedback" in b.proto.label]
    token = next(t for t in cards.text_input if t.key == "feedback_token")
    token.input("not-the-token-at-all").run()
    assert any("not this server's administrator token" in e.value for e in cards.error)
    assert not [b for b in cards.get("download_button") if "feedback" in b.proto.label]
    token.input(TOKEN).run()
    assert not cards.exception, cards.exception
    button = next(b for b in cards.get("download_button") if "feedback" in b.proto.label)
    assert not button.proto.disabled
    assert reads == []  # every run counted; none read the rows (the export reads them when clicked)
