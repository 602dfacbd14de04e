"""The app headless (streamlit.testing.v1.AppTest): pages render, uploads give results or messages."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.tasks import PAGES, tasks_for_page
from tests.conftest import (REPO, encode, head_ct_dicom, make_dicom, page_texts, synthetic_slice, viewer_figure,
                            viewer_sources)
from ui.navigation import BATCH, CARDS

TIMEOUT = 180


def _task_page(name: str) -> None:
    from ui.task_page import render_task_page

    render_task_page(name)


def page(name: str) -> AppTest:
    """A task page of the registry (run alone), or the Model cards / Batch page."""
    if name in PAGES:
        at = AppTest.from_function(_task_page, args=(name,), default_timeout=TIMEOUT)
    else:
        at = AppTest.from_file(str({"Model cards": CARDS, "Batch": BATCH}[name]), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    """Upload a file; where the wrong-input guard flags it, ask to see the output anyway."""
    at.file_uploader[0].set_value((name, data, mime)).run()
    if flagged(at):
        at.checkbox(key=next(c.key for c in at.checkbox if c.key.startswith("override_"))).check().run()
    return at


def flagged(at: AppTest) -> bool:
    return any("Not classified" in w.value for w in at.warning)




def test_home_page_lists_tasks_and_the_notice() -> None:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    body = page_texts(at)
    assert at.title[0].value == "SecondLook"
    assert "not for diagnosis" in body
    for name in PAGES:
        for spec in tasks_for_page(name):
            assert spec.title in body


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_with_notice_and_model_card(name: str) -> None:
    at = page(name)
    body = page_texts(at)
    assert "not for diagnosis" in body
    assert "Held-out test split" in body
    assert len(at.file_uploader) == 1 and at.title[0].value == name


def test_two_model_pages_say_what_each_model_was_trained_on() -> None:
    at = page("Chest X-ray")
    radio = at.radio[0]
    assert len(radio.options) == 2
    assert "Pediatric" in radio.options[0] or "Pediatric" in page_texts(at)
    radio.set_value(radio.options[1]).run()
    assert not at.exception
    assert "Adult COVID-19" in page_texts(at)


def test_upload_gives_prediction_and_heatmap_and_sliders_only_reblend() -> None:
    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    assert not at.exception, at.exception
    assert any(s.value.startswith("Model output:") for s in at.subheader)
    assert len(at.get("plotly_chart")) == 2  # probabilities, and the viewer
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 1
    assert at.session_state["road_runs"] == 1 and "Faithfulness (ROAD)" in page_texts(at)
    image, first = viewer_sources(at)
    assert image.startswith("data:image/png;base64,") and first.startswith("data:image/png;base64,")

    at.slider[0].set_value(0.8).run()  # opacity
    assert viewer_sources(at)[1] != first and viewer_sources(at)[0] == image  # the overlay re-blends, the image stays
    at.slider[1].set_value(0.5).run()  # threshold
    at.selectbox[2].set_value("inferno").run()  # colormap
    assert not at.exception
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 1
    assert at.session_state["road_runs"] == 1

    at.selectbox[1].set_value("EigenCAM").run()  # method: a new CAM, no new prediction
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 2
    at.selectbox[0].set_value("pituitary").run()  # class
    assert at.session_state["cam_runs"] == 3 and at.session_state["forward_passes"] == 1
    assert not at.exception


def test_the_viewer_panels_zoom_and_pan_together() -> None:
    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    layout = viewer_figure(at)["layout"]
    assert layout["xaxis2"]["matches"] == "x" and layout["yaxis2"]["matches"] == "y"
    assert layout["dragmode"] == "zoom"


def test_default_method_is_the_one_the_card_measured_most_faithful() -> None:
    from ui.cache import get_classifier

    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    card = get_classifier("brain_mri").card
    expected = card.explanations.default_method
    assert next(s for s in at.selectbox if s.label == "Method").value == expected


def test_strongest_region_outline_and_box_redraw_the_overlay_only() -> None:
    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    image, plain = viewer_sources(at)
    region = next(r for r in at.radio if r.label == "Strongest region")
    region.set_value("box").run()
    boxed = viewer_sources(at)[1]
    assert boxed != plain and viewer_sources(at)[0] == image
    assert "Strongest region: where the heatmap reaches 50%" in page_texts(at)
    next(r for r in at.radio if r.label == "Strongest region").set_value("outline").run()
    assert viewer_sources(at)[1] not in (plain, boxed)
    assert at.session_state["cam_runs"] == 1 and at.session_state["forward_passes"] == 1


def test_stability_check_runs_only_on_request_and_once() -> None:
    at = page("Brain MRI")
    upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
    assert "tta_runs" not in at.session_state
    next(b for b in at.button if b.label.startswith("Check stability")).click().run()
    assert not at.exception, at.exception
    assert at.session_state["tta_runs"] == 1
    assert "augmented views give the same call" in page_texts(at)
    assert len(at.get("plotly_chart")) == 3  # probabilities, spread, viewer
    at.slider[0].set_value(0.8).run()
    assert at.session_state["tta_runs"] == 1 and "augmented views give the same call" in page_texts(at)


def test_inside_the_indeterminate_band_the_page_says_uncertain() -> None:
    from ui.cache import get_classifier

    card = get_classifier("brain_mri").card  # the process-wide cached model the page will use
    saved = card.indeterminate
    card.indeterminate = {"classes": {"scale": "log-odds", "width": 50.0, "rule": "a band wider than any output",
                                      "chosen_on": "test", "selection": "test", "validation": {"n": 0, "share_uncertain": None,
                                      "accuracy_outside": None, "accuracy_inside": None},
                                      "test": {"n": 0, "share_uncertain": None, "accuracy_outside": None,
                                               "accuracy_inside": None}}}
    try:
        at = page("Brain MRI")
        upload(at, "scan.png", encode(synthetic_slice(200, seed=7)))
        assert any(s.value.startswith("Model output: uncertain (likelier ") for s in at.subheader)
        assert any("indeterminate band" in w.value for w in at.warning)
    finally:
        card.indeterminate = saved


def test_feedback_is_stored_as_hash_and_words_and_exported(feedback_file, monkeypatch) -> None:
    import csv
    import hashlib
    import io

    from core.feedback import ENV_ADMIN_TOKEN, export_feedback, read_feedback

    data = encode(synthetic_slice(200, seed=7))
    at = page("Brain MRI")
    upload(at, "Doe_Jane_1970.png", data)
    at.radio(key=next(r.key for r in at.radio if r.key.startswith("fb_verdict_"))).set_value("disagree")
    at.text_area[0].input("=HYPERLINK(1) looks like meningioma to me")
    next(b for b in at.button if b.label == "Save my read").click().run()
    assert not at.exception, at.exception
    assert any("Saved: disagree" in s.value for s in at.success)
    rows = read_feedback(feedback_file)
    assert len(rows) == 1
    row = rows[0]
    assert row["upload_sha256"] == hashlib.sha256(data).hexdigest() and row["model"] == "brain_mri"
    assert row["verdict"] == "disagree" and row["comment"].startswith("=HYPERLINK")
    exported = list(csv.DictReader(io.StringIO(export_feedback(feedback_file).decode("utf-8"))))
    assert exported[0]["comment"].startswith("'=HYPERLINK")  # no live formula in the export
    stored = b"".join(p.read_bytes() for p in feedback_file.parent.iterdir())
    assert b"Doe_Jane" not in stored and len(stored) < 64 * 1024  # no file name, no pixels

    monkeypatch.setenv(ENV_ADMIN_TOKEN, "a-long-administrator-token-0123")
    cards = page("Model cards")
    assert "1 verdicts stored" in page_texts(cards)
    cards.text_input(key="feedback_token").input("a-long-administrator-token-0123").run()
    assert not next(b for b in cards.get("download_button") if "feedback" in b.proto.label).proto.disabled


def test_dicom_upload_on_the_ct_page() -> None:
    import numpy as np

    yy, xx = np.mgrid[0:128, 0:128]
    stored = np.where(((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2, 1064, 24).astype(np.int16)
    at = page("Lung CT")
    upload(at, "IMG0001", make_dicom(stored), "application/octet-stream")
    assert not at.exception, at.exception
    body = page_texts(at)
    assert "DICOM" in body and "Hounsfield" in body
    assert any(s.value.startswith("Model output:") for s in at.subheader)


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("notes.png", b"this is a text file", "not a readable image"),
        ("empty.jpg", b"", "empty"),
        ("fake.dcm", b"0123456789" * 50, "not a readable DICOM"),
    ],
)
def test_bad_files_get_a_plain_message_and_the_page_keeps_working(name: str, data: bytes, message: str) -> None:
    at = page("Brain MRI")
    at.file_uploader[0].set_value((name, data, "application/octet-stream")).run()
    assert not at.exception
    assert any(message in e.value for e in at.error)
    upload(at, "good.png", encode(synthetic_slice(150, seed=1)))
    assert not at.exception
    assert any(s.value.startswith("Model output:") for s in at.subheader)


def test_a_flagged_upload_is_not_classified_until_the_reader_asks() -> None:
    """A document on the Brain MRI page: flagged, no output shown, unless the reader insists."""
    from core.lab.guard_fit import document_arrays

    at = page("Brain MRI")
    at.file_uploader[0].set_value(("letter.png", encode(document_arrays(1, seed=5)[0]), "image/png")).run()
    assert not at.exception
    assert flagged(at)
    assert not any(s.value.startswith("Model output:") for s in at.subheader)
    assert "forward_passes" in at.session_state and len(at.get("plotly_chart")) == 0
    upload(at, "letter.png", encode(document_arrays(1, seed=5)[0]))
    assert any(s.value.startswith("Model output:") for s in at.subheader)


def test_dicom_of_another_modality_is_flagged_by_its_tags() -> None:
    import numpy as np

    at = page("Brain MRI")
    array = np.tile((np.arange(128) * 30).astype(np.uint16), (128, 1))
    at.file_uploader[0].set_value(("us.dcm", make_dicom(array, modality="US", slope=None), "application/dicom")).run()
    assert not at.exception
    assert flagged(at) and "modality is US" in page_texts(at)


def test_ct_display_window_never_changes_the_model_input_and_planes_are_checked() -> None:
    import numpy as np

    yy, xx = np.mgrid[0:128, 0:128]
    stored = np.where(((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2, 1064, 24).astype(np.int16)
    coronal = make_dicom(stored, extra={"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]})
    at = page("Lung CT")
    upload(at, "IMG0002", coronal, "application/octet-stream")
    assert not at.exception, at.exception
    assert any("This slice is coronal" in w.value and "axial" in w.value for w in at.warning)
    window = next(s for s in at.selectbox if s.label == "Display window")
    assert window.value == "Lung"  # the window the scan was read in
    probabilities = [s.value for s in at.subheader if s.value.startswith("Model output:")]
    passes, cams = at.session_state["forward_passes"], at.session_state["cam_runs"]
    window.set_value("Bone").run()
    assert "Shown at centre 400 / width 1800 HU." in page_texts(at)
    assert "The model always sees centre / width -600 / 1500 HU." in page_texts(at)
    next(s for s in at.selectbox if s.label == "Display window").set_value("Custom").run()
    at.number_input[0].set_value(50.0).run()
    at.number_input[1].set_value(350.0).run()
    assert "Shown at centre 50 / width 350 HU." in page_texts(at)
    assert not at.exception
    assert at.session_state["forward_passes"] == passes and at.session_state["cam_runs"] == cams
    assert [s.value for s in at.subheader if s.value.startswith("Model output:")] == probabilities
    viewer_sources(at)


def test_head_ct_page_shows_each_finding_and_explains_any_output() -> None:
    at = page("Head CT")
    upload(at, "IMG0003", head_ct_dicom(), "application/octet-stream")
    assert not at.exception, at.exception
    body = page_texts(at)
    assert any(s.value.startswith("Model output:") for s in at.subheader)
    assert "**Findings** (independent outputs" in body
    spec = tasks_for_page("Head CT")[0]
    table = at.dataframe[0].value
    assert list(table["finding"]) == list(spec.finding_titles)
    assert all(v in ("yes", "no") for v in table["above threshold"])
    assert len(at.get("plotly_chart")) == 3  # classes, findings, viewer
    window = next(s for s in at.selectbox if s.label == "Display window")
    assert window.value == "Brain"  # the model's own window is offered first
    assert "The model always sees centre / width 40 / 80 HU." in page_texts(at)
    explain = next(s for s in at.selectbox if s.label == "Explain output")
    assert explain.options == [spec.output_title(k) for k in spec.outputs]
    cams = at.session_state["cam_runs"]
    explain.set_value("sdh").run()
    assert not at.exception, at.exception
    assert at.session_state["cam_runs"] == cams + 1 and at.session_state["forward_passes"] == 1
    assert "for 'subdural'" in str(viewer_figure(at)["layout"])


def test_a_chest_ct_dicom_is_flagged_on_the_head_ct_page() -> None:
    at = page("Head CT")
    at.file_uploader[0].set_value(("IMG0004", head_ct_dicom("CHEST"), "application/octet-stream")).run()
    assert not at.exception
    assert flagged(at) and "body part is CHEST" in page_texts(at)


def _decode(uri: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_a_cropping_model_says_so_and_its_heatmap_stays_inside_the_crop() -> None:
    import numpy as np

    from core.tasks import get_task

    spec = next(s for s in tasks_for_page("Chest X-ray") if "border_crop" in s.preprocessing)
    at = page("Chest X-ray")
    at.radio[0].set_value(next(o for o in at.radio[0].options if o == spec.title)).run()
    image = np.zeros((240, 200), dtype=np.uint8)  # a black frame around a chest-like slice
    image[20:230, 10:190] = synthetic_slice(210, seed=4)[:, 15:195]
    upload(at, "framed.png", encode(image))
    assert not at.exception, at.exception
    body = page_texts(at)
    assert "Before the model sees it, as in its training: border crop" in body
    caption = next(c.value for c in at.caption if c.value.startswith("The model looked at rows"))
    rows, cols = caption.split("rows ")[1].split(" and")[0], caption.split("columns ")[1].split(" of")[0]
    top, bottom = map(int, rows.split("-"))
    left, right = map(int, cols.split("-"))
    assert 20 < top < bottom < 230 and 10 < left < right < 190  # inside the frame, margins cut
    at.slider[1].set_value(0.0).run()  # show every activation: inside the crop the overlay colours the image
    shown, blended = (_decode(uri) for uri in viewer_sources(at))
    outside = np.ones(shown.shape[:2], dtype=bool)
    outside[top:bottom, left:right] = False
    np.testing.assert_array_equal(blended[outside], shown[outside])  # nothing the model did not see is coloured
    assert not np.array_equal(blended[top:bottom, left:right], shown[top:bottom, left:right])
    assert get_task(spec.key).preprocessing == spec.preprocessing
