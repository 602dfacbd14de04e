"""The study view headless (streamlit.testing.v1.AppTest): upload a series ZIP, scroll, jump to a key slice,
the slice heatmap (cached per slice and method), the study report, another series, the batch rows per series."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.study import series_files, zip_files
from core.report import render_study_pdf
from core.study import StudyAnalysis, study_report_content
from tests.conftest import encode, page_texts, synthetic_slice, viewer_figure
from tests.test_app import page
from tests.test_study import mr_series
from tests.test_workflow import pdf_text

UNTRUSTED = "T2 **bold** [x](http://x)"  # mr_series' SeriesDescription


def upload_study(name: str = "Head CT", slices: int = 12):
    at = page(name)
    data = zip_files(series_files(slices, 96) + mr_series())
    at.file_uploader[0].set_value(("study.zip", data, "application/zip")).run()
    assert not at.exception, at.exception
    return at


def analysis_of(at) -> StudyAnalysis:
    analyses = list(at.session_state["study_analyses"].values())
    return analyses[-1]


def strip(at) -> dict:
    for chart in at.get("plotly_chart"):
        figure = json.loads(chart.proto.spec)
        if figure["data"] and figure["data"][0]["type"] == "bar" and figure["data"][0].get("hovertemplate", "") \
                .startswith("slice"):
            return figure
    raise AssertionError("no probability strip on the page")


def shown_line(at) -> str:
    return next(t.value for t in at.text if t.value.startswith("Slice "))


def test_a_series_zip_gives_the_study_call_strip_and_scroller() -> None:
    at = upload_study()
    analysis = analysis_of(at)
    texts = page_texts(at)
    assert "Study call: " in texts and analysis.prediction.headline_text() in texts
    assert at.session_state["study_runs"] == 1 and at.session_state["forward_passes"] == 12
    figure = strip(at)
    bars = figure["data"][0]
    assert bars["x"] == list(range(1, 13)) and np.allclose(bars["y"], analysis.scores)
    red = [i for i, color in enumerate(bars["marker"]["color"]) if color == "#d62728"]
    assert sorted(red) == sorted(analysis.key_slices)
    thresholds = [shape["y0"] for shape in figure["layout"]["shapes"] if shape.get("y0") == shape.get("y1")]
    assert analysis.rule.threshold in thresholds and analysis.classifier.card.threshold in thresholds
    # opens on the most suspicious slice
    top = analysis.key_slices[0]
    assert at.slider[0].value == top + 1 and shown_line(at).startswith(f"Slice {top + 1} of 12")
    # scroll
    at.slider[0].set_value(3).run()
    assert shown_line(at).startswith("Slice 3 of 12")
    at.button(key=next(b.key for b in at.button if b.label == "Next ▶")).click().run()
    assert at.slider[0].value == 4
    # jump to a key slice
    second = analysis.key_slices[1]
    at.button(key=next(b.key for b in at.button if b.label == f"Key slice {second + 1}")).click().run()
    assert at.slider[0].value == second + 1 and "key slice #2" in shown_line(at)
    assert at.session_state["study_runs"] == 1  # scrolling never runs the model again
    # the series listing and warnings are plain text; the untrusted description only in the table
    assert UNTRUSTED not in "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)
    assert any(UNTRUSTED in str(frame.value.to_dict()) for frame in at.dataframe)
    assert "Left out: 1 localizer (scout) image" in "\n".join(t.value for t in at.text)


def test_slice_heatmaps_on_demand_cached_per_slice_and_method() -> None:
    at = upload_study()
    analysis = analysis_of(at)
    assert "cam_runs" not in at.session_state  # nothing until the reader asks
    at.toggle[0].set_value(True).run()
    assert not at.exception and at.session_state["cam_runs"] == 1
    first = viewer_figure(at)["data"][1]["source"]
    other = 2 if analysis.key_slices[0] != 1 else 3  # any slice but the one shown first (the top key slice)
    at.slider[0].set_value(other).run()
    assert at.session_state["cam_runs"] == 2 and viewer_figure(at)["data"][1]["source"] != first
    at.selectbox(key=next(s.key for s in at.selectbox if s.label == "Method")).set_value("LayerCAM").run()
    assert at.session_state["cam_runs"] == 3
    at.slider[0].set_value(analysis.key_slices[0] + 1).run()
    method = next(s for s in at.selectbox if s.label == "Method")
    assert method.value == "LayerCAM" and at.session_state["cam_runs"] == 4  # the control kept its setting
    at.selectbox(key=method.key).set_value(method.options[0] if method.options[0] != "LayerCAM" else method.options[1])
    at.run()
    runs = at.session_state["cam_runs"]
    at.selectbox(key=method.key).set_value("LayerCAM").run()
    assert at.session_state["cam_runs"] == runs  # back to a method already computed for this slice: cached


def test_the_study_report_holds_the_call_and_the_key_slices() -> None:
    at = upload_study()
    assert any(b.label == "Download the study report (PDF)" for b in at.get("download_button"))
    analysis = analysis_of(at)
    text = pdf_text(render_study_pdf(study_report_content(analysis)))
    assert analysis.prediction.headline_text().encode() in text and b"Series 2 (axial, 12 slices" in text
    assert f"Slice {analysis.key_slices[0] + 1}:".encode() in text and UNTRUSTED.encode() not in text


def test_another_series_can_be_chosen_and_says_why_it_is_not_classified() -> None:
    at = upload_study()
    series = next(s for s in at.selectbox if s.label == "Series")
    assert series.options == ["Series 2 (axial, 12 slices, 2.5 mm) (default)", "Series 7 (axial, 4 slices)"]
    at.selectbox(key=series.key).select_index(1).run()
    assert not at.exception
    texts = page_texts(at)
    assert "Not classified" in texts and "modality is MR" in texts
    assert at.session_state["study_runs"] == 2


def test_single_images_keep_their_page_and_xray_pages_send_studies_to_batch() -> None:
    at = page("Head CT")
    at.file_uploader[0].set_value(("scan.png", encode(synthetic_slice(160, seed=1)), "image/png")).run()
    assert "study_analyses" not in at.session_state and "Study call" not in page_texts(at)
    at = page("Chest X-ray")
    at.file_uploader[0].set_value(("study.zip", zip_files(series_files(3, 48)), "application/zip")).run()
    assert "use the Batch page" in page_texts(at) and "study_analyses" not in at.session_state


def test_an_unreadable_study_gets_a_message() -> None:
    at = page("Head CT")
    at.file_uploader[0].set_value([("a.zip", b"PK\x03\x04 broken", "application/zip"),
                                   ("b.txt", b"hello", "text/plain")]).run()
    assert not at.exception and "not a readable ZIP" in "\n".join(e.value for e in at.error)


def test_batch_page_gives_one_row_per_series() -> None:
    at = page("Batch")
    at.selectbox(key="batch_model").set_value("head_ct").run()
    at.file_uploader[0].set_value(("two.zip", zip_files(series_files(5, 64) + mr_series()), "application/zip")).run()
    at.toggle(key="batch_studies").set_value(True).run()
    at.button(key="batch_go").click().run()
    assert not at.exception
    rows = at.dataframe[0].value.to_dict("records")
    assert [(r["series"], r["status"], r["slices"]) for r in rows] == [
        ("Series 2 (axial, 5 slices, 2.5 mm)", "ok", 5), ("Series 7 (axial, 4 slices)", "rejected", 4)]
    assert "2 series:" in page_texts(at)


def test_an_mri_series_on_the_brain_page_gets_a_grouped_study_call() -> None:
    at = page("Brain MRI")
    at.file_uploader[0].set_value(("mr.zip", zip_files(mr_series(6, 96)), "application/zip")).run()
    assert not at.exception, at.exception
    if "Not classified" in page_texts(at):  # a phantom may be out of the guard's range: the reader may ask anyway
        at.checkbox(key=next(c.key for c in at.checkbox if c.key.startswith("study_override_"))).check().run()
    assert not at.exception, at.exception
    analysis = analysis_of(at)
    assert analysis.prediction.positive == "glioma+meningioma+pituitary" and analysis.rule.positive_label == "tumour"
    assert f"Study call: {analysis.prediction.headline_text()}" in page_texts(at)
    assert "not validated per patient" in page_texts(at).lower()
