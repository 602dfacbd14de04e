"""Untrusted text (file names, DICOM tag values, exception messages) never renders as Markdown, and no
identifier, library message or server path reaches a page, a PDF, a CSV or a log."""

from __future__ import annotations

import html
import io
import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from markdown_it import MarkdownIt

from core.csv_export import csv_bytes
from core.guard import check_tags
from core.imaging import read_scan
from core.models import WeightsError
from core.pipeline import analyse, result_row, scan_facts
from core.tasks import TASKS
from tests.conftest import encode, make_dicom, page_texts, synthetic_slice
from tests.test_app import page, upload
from ui.plain import ZERO_WIDTH_SPACE, escape_markdown

HOSTILE_NAME = "**bold** [link](javascript:alert(1)).png"
HOSTILE_TEXTS = [
    HOSTILE_NAME,
    "![x](http://example.invalid/pixel.png) <img src=x onerror=alert(1)> <script>alert(1)</script>",
    "# heading\n- item\n> quote\n```code```",
    ":red[coloured] :material/home: :smile: $x^2$ ~~struck~~ __under__ _em_ `code`",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "&amp; &lt;b&gt; \\*escaped\\* www.example.invalid someone@example.invalid https://example.invalid",
    "DOE^JANE MRN-0042",
    "1. first\n2) second\n+ plus\n=== \n---",
]
# Every Markdown element of a page, and what each shows (widget labels and help are Markdown too).
MARKDOWN_KINDS = ("markdown", "caption", "subheader", "header", "title", "error", "warning", "info", "success")


def _markdown() -> MarkdownIt:
    """CommonMark with GitHub's tables and strikethrough: the syntax Streamlit's renderer accepts and more."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_escaped_text_renders_as_exactly_its_characters(text: str) -> None:
    rendered = _markdown().render(escape_markdown(text)).replace(ZERO_WIDTH_SPACE, "")
    flat = re.sub(r"[\r\n]+", " ", text).strip()
    assert rendered == f"<p>{html.escape(flat, quote=True)}</p>\n", rendered
    assert ":" + ZERO_WIDTH_SPACE in escape_markdown(":smile:")  # no emoji short code survives either


def _markdown_bodies(at) -> list[str]:
    bodies = [str(e.value) for kind in MARKDOWN_KINDS for e in getattr(at, kind)]
    for kind in ("button", "checkbox", "radio", "selectbox", "text_input", "text_area", "slider", "file_uploader"):
        for widget in at.get(kind):
            bodies += [str(getattr(widget.proto, "label", "")), str(getattr(widget.proto, "help", ""))]
    return bodies


def _assert_nothing_rendered(at, *secrets: str) -> None:
    """No Markdown element of the page holds a secret as written, nor renders a link, image or HTML from one."""
    md = _markdown()
    for body in _markdown_bodies(at):
        for secret in secrets:
            assert secret not in body, body
        rendered = md.render(body)
        assert "javascript:" not in rendered and "<strong>bold</strong>" not in rendered, rendered
        assert "example.invalid/pixel" not in rendered, rendered


def test_a_file_name_made_of_markdown_is_never_rendered() -> None:
    data = encode(synthetic_slice(200, seed=7))
    at = page("Brain MRI")
    upload(at, HOSTILE_NAME, data)
    assert not at.exception, at.exception
    assert any(s.value.startswith("Model output:") for s in at.subheader)
    _assert_nothing_rendered(at, HOSTILE_NAME, "**bold**", "javascript")

    batch = page("Batch")
    batch.selectbox[0].set_value("brain_mri").run()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(HOSTILE_NAME, data)
        zf.writestr("=HYPERLINK(\"http://example.invalid\",\"x\").png", b"not an image")
    batch.file_uploader[0].set_value([(HOSTILE_NAME, data, "image/png"),
                                      ("[x](javascript:y).zip", archive.getvalue(), "application/zip")]).run()
    next(b for b in batch.button if b.label.startswith("Analyse")).click().run()
    assert not batch.exception, batch.exception
    names = list(batch.dataframe[0].value["file"])
    assert names[0] == HOSTILE_NAME and f"[x](javascript:y).zip/{HOSTILE_NAME}" in names  # shown, as plain text
    _assert_nothing_rendered(batch, HOSTILE_NAME, "**bold**", "javascript", "HYPERLINK")


# Tag values that name a person. The first is not a valid DICOM code string, so the reader never
# passes it on; the others are valid code strings (upper case, digits, spaces, at most 16 characters).
IDENTIFIERS = {"BodyPartExamined": ["DOE^JANE MRN-0042", "DOE JANE MRN0042"], "Modality": ["JANE DOE 1970"]}


def _dicom(modality: str = "CT", body_part: str | None = None) -> bytes:
    yy, xx = np.mgrid[0:128, 0:128]
    stored = np.where(((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2, 1064, 24).astype(np.int16)
    return make_dicom(stored, modality=modality, extra={"BodyPartExamined": body_part} if body_part else None)


def _identifying_uploads() -> list[tuple[str, bytes, str]]:
    uploads = [(f"IM{i}.dcm", _dicom(body_part=value), value) for i, value in enumerate(IDENTIFIERS["BodyPartExamined"])]
    uploads += [(f"IM9{i}.dcm", _dicom(modality=value), value) for i, value in enumerate(IDENTIFIERS["Modality"])]
    return uploads


def test_guard_reasons_and_scan_facts_name_tag_values_only_from_the_vocabulary() -> None:
    spec = TASKS["ct_covid"]
    for _, data, value in _identifying_uploads():
        scan = read_scan(data, "x.dcm")
        told = " ".join(scan_facts(scan)) + " " + (check_tags(scan, spec) or "")
        for word in value.replace("^", " ").replace("-", " ").split():
            if not word.isdigit():
                assert word not in told, (value, told)
    knee = read_scan(_dicom(body_part="KNEE"), "x.dcm")
    assert "body part is KNEE" in check_tags(knee, spec) and "body part KNEE" in scan_facts(knee)
    assert "another body part" in check_tags(read_scan(_dicom(body_part="DOE JANE MRN0042"), "x.dcm"), spec)
    assert "not a DICOM code" in check_tags(read_scan(_dicom(modality="JANE DOE 1970"), "x.dcm"), spec)


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[\s^-]+", value) if w and not w.isdigit()]


def test_identifying_tag_values_reach_no_page_pdf_csv_or_log(caplog: pytest.LogCaptureFixture) -> None:
    from ui.task_page import report_notes
    from core.report import ReportContent, render_pdf
    from core.preprocess import display_rgb
    from tests.test_workflow import pdf_text

    uploads = _identifying_uploads()  # (pydicom warns, quoting the value, when a test writes an invalid one)
    at = page("Lung CT")
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    for name, data, value in uploads:
        upload(at, name, data, "application/dicom")
        assert not at.exception, at.exception
        assert any(s.value.startswith("Model output:") for s in at.subheader)
        shown = page_texts(at) + " ".join(_markdown_bodies(at)) + " ".join(str(c.value) for c in at.code)
        for word in _words(value):
            assert word not in shown, (value, word)
        analysis = next(reversed(at.session_state["analyses"].values()))
        rgb = display_rgb(analysis.scan)
        pdf = render_pdf(ReportContent(rgb, rgb, analysis.prediction, analysis.classifier.card, analysis.digest,
                                       "covid19", "Grad-CAM", notes=report_notes(analysis)))
        text = pdf_text(pdf)
        assert b"Wrong-input guard" in text  # the guard's reason is on the report, in the vocabulary's words
        for word in _words(value):
            assert word.encode() not in text, (value, word)
        row = result_row(name, analyse(analysis.classifier, data, name))
        # refused by its tags, or (tags that confirm a CT and a synthetic image) answered as borderline
        assert row["status"] == "rejected" or row["guard"]["outcome"] == "borderline", row
        listed = json.dumps(row) + csv_bytes([row]).decode()
        for word in _words(value):
            assert word not in listed, (value, word)
    for _, _, value in uploads:
        for word in _words(value):
            assert word not in caplog.text, (value, word)


def test_archive_series_lists_name_tag_values_only_from_the_vocabulary() -> None:
    from core.dicomweb import NoSuitableSeries, SeriesEntry, suitable_series

    series = [SeriesEntry("1.2", "1.2.3", "JANE DOE", "Doe^Jane head", 1, 8, "MRN0042 DOE"),
              SeriesEntry("1.2", "1.2.4", "CT", "x", 2, 4, "HEAD")]
    with pytest.raises(NoSuitableSeries) as caught:
        suitable_series(series, TASKS["ct_covid"])
    message = str(caught.value)
    assert "another modality another body part (8 images)" in message and "CT HEAD (4 images)" in message
    assert "JANE" not in message and "DOE" not in message and "MRN" not in message


# ---------------------------------------------------------------- failures told in plain words

SERVER_PATH = "/srv/secondlook-secret/weights/brain_mri.safetensors"


@pytest.mark.parametrize("name", ["Brain MRI", "Model cards", "Batch"])
def test_a_model_that_does_not_load_is_told_without_library_text_or_paths(
        name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import ui.batch_page
    import ui.cards_page
    import ui.task_page

    def broken(key: str):
        raise WeightsError(f"weights file not found: {SERVER_PATH}")

    for module in (ui.task_page, ui.cards_page, ui.batch_page):
        monkeypatch.setattr(module, "get_classifier", broken)
    caplog.set_level(logging.ERROR)
    at = page(name)
    if name == "Batch":
        at.selectbox[0].set_value("brain_mri").run()
    if name == "Model cards":
        at.selectbox[0].set_value("brain_mri").run()
    errors = " ".join(e.value for e in at.error)
    assert "cannot be loaded on this server" in errors
    assert "secondlook-secret" not in page_texts(at) and "weights file not found" not in page_texts(at)
    assert SERVER_PATH in caplog.text  # the operator's detail is in the log


def test_a_feedback_store_that_cannot_be_written_is_told_without_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("SECONDLOOK_FEEDBACK", str(blocker / "feedback.sqlite3"))
    caplog.set_level(logging.ERROR)
    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    next(b for b in at.button if b.label == "Save my read").click().run()
    assert not at.exception, at.exception
    errors = " ".join(e.value for e in at.error)
    assert "could not be saved" in errors
    assert "not-a-folder" not in page_texts(at) and "Errno" not in page_texts(at)
    assert "not-a-folder" in caplog.text


def test_an_unexpected_failure_is_told_in_plain_words_and_logged_without_its_message(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import core.pipeline
    from ui.cache import get_classifier

    def failing(*args, **kwargs):
        raise RuntimeError(f"cannot handle DOE^JANE at {SERVER_PATH}")

    monkeypatch.setattr(core.pipeline, "predict", failing)
    caplog.set_level(logging.DEBUG)
    data = encode(synthetic_slice(200, seed=7))
    outcome = analyse(get_classifier("brain_mri"), data, "scan.png")
    assert outcome.status == "error" and outcome.digest in outcome.reason
    assert "RuntimeError" not in outcome.reason and "DOE" not in outcome.reason and "/srv" not in outcome.reason
    assert "RuntimeError at" in caplog.text and outcome.digest in caplog.text
    assert "DOE^JANE" not in caplog.text and "secondlook-secret" not in caplog.text

    at = page("Brain MRI")
    at.file_uploader[0].set_value(("scan.png", data, "image/png")).run()
    assert not at.exception, at.exception
    assert any("Something went wrong on the server" in e.value for e in at.error)
    assert "RuntimeError" not in page_texts(at) and "DOE" not in page_texts(at)


def test_archive_failures_carry_neither_the_address_nor_the_library_text(caplog: pytest.LogCaptureFixture) -> None:
    import requests

    from core.dicomweb import Archive

    archive = Archive.from_environment({"SECONDLOOK_DICOMWEB_URL": "http://user:pw@pacs.internal.example:8042/dicom-web"})
    caplog.set_level(logging.WARNING)
    try:
        for exc in (requests.ConnectionError("HTTPConnectionPool(host='pacs.internal.example', port=8042): Max retries"),
                    requests.Timeout("read timed out"), ValueError("Expecting value: line 1 column 1 (char 0)"),
                    requests.RequestException("weird")):
            message = str(archive._failure(exc, "the study search"))
            assert "pacs.internal" not in message and "HTTPConnectionPool" not in message, message
            assert type(exc).__name__ not in message and "Expecting value" not in message, message
            with pytest.raises(Exception):
                archive._call("the study search", lambda: (_ for _ in ()).throw(exc))
        assert "pacs.internal.example" in caplog.text and "pw@" not in caplog.text  # the operator's detail, no password
    finally:
        archive.close()
