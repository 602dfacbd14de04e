"""The workflow around a result: PDF report, readers' feedback, batch of files or ZIPs, model cards page."""

from __future__ import annotations

import csv
import io
import re
import threading
import zipfile
import zlib
from datetime import datetime, timezone

import numpy as np
import pytest

from core.cards import read_card
from core.feedback import COLUMNS, feedback_csv, make_feedback, read_feedback, record_feedback
from core.models import WEIGHTS_DIR
from core.decision import Band, Prediction
from core.report import ReportContent, render_pdf
from core.tasks import TASKS, describe_preprocessing
from tests.conftest import encode, make_dicom, page_texts, synthetic_slice
from tests.test_app import page

SHA = "ab" * 32


def pdf_text(data: bytes) -> bytes:
    """The page content streams of a PDF, inflated."""
    text = b""
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", data, re.S):
        try:
            text += zlib.decompress(stream)
        except zlib.error:
            text += stream
    return text.replace(b"\\(", b"(").replace(b"\\)", b")")  # PDF string escapes


def test_pdf_report_is_one_page_with_the_facts_and_no_identifiers() -> None:
    card = read_card(WEIGHTS_DIR / "cxr_covid.json")
    image = np.zeros((300, 240, 3), np.uint8)
    prediction = Prediction(tuple(card.labels), np.array([0.3, 0.7]), 1, card.threshold, card.positive, "covid19")
    when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    data = render_pdf(ReportContent(image, image, prediction, card, "0123abcd", "covid19", "Grad-CAM",
                                    "Faithfulness (ROAD) +0.20: test line"), when)
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 1
    text = pdf_text(data)
    for fact in (b"covid19 70%", card.sha256.encode(), f"{card.threshold:.3f}".encode(), b"2026-01-02 03:04 UTC",
                 b"0123abcd", b"not for diagnosis", card.version.encode(), b"Faithfulness (ROAD) +0.20"):
        assert fact in text, fact
    # the metadata names the project only: no user, host or file
    assert b"/Author" not in data


def test_pdf_report_says_uncertain_inside_the_band() -> None:
    card = read_card(WEIGHTS_DIR / "ct_covid.json")
    image = np.zeros((64, 64, 3), np.uint8)
    threshold = card.threshold
    prediction = Prediction(tuple(card.labels), np.array([threshold + 0.01, 0.99 - threshold]), 0, threshold,
                            card.positive, "covid19", band=Band(0.5))
    assert prediction.uncertain
    said = f"uncertain: covid19 {threshold + 0.01:.0%}, near its {threshold:.0%} threshold".encode()
    assert said in pdf_text(render_pdf(ReportContent(image, image, prediction, card, "x", "covid19", "Grad-CAM")))


def test_feedback_rows_are_validated_exported_neutralised_and_safe_under_threads(tmp_path) -> None:
    path = tmp_path / "fb.sqlite3"
    with pytest.raises(ValueError, match="verdict"):
        make_feedback(SHA, "m", "1", "w", "a", "maybe")
    with pytest.raises(ValueError, match="sha256"):
        make_feedback("short", "m", "1", "w", "a", "agree")
    with pytest.raises(ValueError, match="longer"):
        make_feedback(SHA, "m", "1", "w", "a", "agree", comment="x" * 5000)
    entry = make_feedback(SHA, "brain_mri", "1", "w", "glioma (0.9)", "disagree", "@SUM(A1)", "\u200b+cmd|' /C calc'!A0")
    assert entry.reader_label == "@SUM(A1)"  # kept as written; the export quotes it

    def write(n: int) -> None:
        for _ in range(n):
            record_feedback(make_feedback(SHA, "brain_mri", "1", "w", "glioma", "agree", comment="line one\nline two"), path)

    threads = [threading.Thread(target=write, args=(25,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record_feedback(entry, path)
    rows = read_feedback(path)
    assert len(rows) == 101 and all(r["comment"] == "line one\nline two" for r in rows[:100])
    exported = feedback_csv(rows).decode()
    assert exported.splitlines()[0] == ",".join(COLUMNS)
    last = list(csv.DictReader(io.StringIO(exported)))[-1]
    assert last["reader_label"] == "'@SUM(A1)" and last["comment"].startswith("'") and "+cmd" in last["comment"]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_batch_page_gives_a_row_per_file_and_a_csv() -> None:
    good = encode(synthetic_slice(160, seed=1))
    archive = _zip({"series/one.png": encode(synthetic_slice(150, seed=2)), "series/notes.txt": b"hello",
                    "series/slice.dcm": make_dicom((synthetic_slice(96, seed=3).astype(np.int16) * 4))})
    at = page("Batch")
    at.selectbox[0].set_value("brain_mri").run()
    at.file_uploader[0].set_value([("a.png", good, "image/png"), ("study.zip", archive, "application/zip"),
                                   ("bad.jpg", b"not a picture", "image/jpeg"),
                                   ("bomb.zip", _zip({"z.bin": bytes(1000)})[:30], "application/zip")]).run()
    assert not at.exception, at.exception
    next(b for b in at.button if b.label.startswith("Analyse 4 uploads")).click().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["file"]) == ["a.png", "study.zip/series/one.png", "study.zip/series/notes.txt",
                                   "study.zip/series/slice.dcm", "bad.jpg", "bomb.zip"]
    statuses = dict(zip(table["file"], table["status"]))
    assert statuses["bad.jpg"] == "rejected" and statuses["study.zip/series/notes.txt"] == "rejected"
    assert statuses["bomb.zip"] == "rejected"
    assert statuses["a.png"] in ("ok", "rejected")  # a synthetic scan may be flagged by the wrong-input guard
    assert {f"p_{label}" for label in TASKS["brain_mri"].labels} <= set(table.columns)
    assert all(reason for status, reason in zip(table["status"], table["reason"]) if status == "rejected")
    assert "6 files:" in page_texts(at)
    download = next(b for b in at.get("download_button") if "table" in b.proto.label)
    assert download.proto.label == "Download the table (CSV)"


@pytest.mark.parametrize("key", sorted(TASKS))
def test_model_cards_page_renders_every_card_with_its_plots(key: str) -> None:
    at = page("Model cards")
    at.selectbox[0].set_value(key).run()
    assert not at.exception, at.exception
    card = read_card(WEIGHTS_DIR / f"{key}.json")
    body = page_texts(at)
    assert card.name in at.header[0].value and card.sha256 in body
    assert card.data.trained_on in body and "Known limitations" in [s.value for s in at.subheader]
    assert len(at.get("plotly_chart")) == 3  # ROC, confusion matrix, reliability diagram
    assert "95% interval" in at.table[1].value.columns if hasattr(at.table[1].value, "columns") else True
    assert f"The app's default method is **{card.explanations.default_method}**" in body
    assert "Model-randomisation sanity check" in body
    assert f"**Image preprocessing** (the same in training and in the app, before resizing to {card.input_size} px): " \
           f"{describe_preprocessing(card.preprocessing)}." in body
    assert ("border crop:" in body) == ("border_crop" in TASKS[key].preprocessing)


def test_model_cards_page_shows_findings_acquisition_and_grouped_thresholds() -> None:
    at = page("Model cards")
    at.selectbox[0].set_value("head_ct").run()
    assert not at.exception, at.exception
    assert "Findings (independent outputs)" in [s.value for s in at.subheader]
    assert "Study call (a whole series)" in [s.value for s in at.subheader]
    assert "hemorrhage when the" in page_texts(at) and "patients" in " ".join(t.value.to_csv() for t in at.table)
    tables = " ".join(t.value.to_csv() for t in at.table)
    assert "subdural" in tables and "patients with hemorrhage" in tables
    at.selectbox[0].set_value("brain_mri").run()
    assert "Acquisition shortcuts: does the frame give the label away?" in [s.value for s in at.subheader]
    at.selectbox[0].set_value("cxr_pneumonia").run()
    body = page_texts(at)
    assert "**pneumonia (bacterial + viral) against the rest**" in body
    assert "Operating threshold:** pneumonia (bacterial + viral) at" in body
