"""The app headless (streamlit.testing.v1.AppTest): pages render, uploads give results or messages."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.tasks import PAGES, tasks_for_page
from tests.conftest import REPO, encode, make_dicom, page_texts, synthetic_slice
from ui.widgets import PAGE_FILES

TIMEOUT = 180


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(REPO / PAGE_FILES[name]), default_timeout=TIMEOUT)
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
    assert len(at.file_uploader) == 1


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
    assert len(at.get("plotly_chart")) == 1
    assert len(at.get("image")) == 2  # original and overlay side by side
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 1

    at.slider[0].set_value(0.8).run()  # opacity
    at.slider[1].set_value(0.5).run()  # threshold
    at.selectbox[2].set_value("inferno").run()  # colormap
    assert not at.exception
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 1

    at.selectbox[1].set_value("EigenCAM").run()  # method: a new CAM, no new prediction
    assert at.session_state["forward_passes"] == 1 and at.session_state["cam_runs"] == 2
    at.selectbox[0].set_value("pituitary").run()  # class
    assert at.session_state["cam_runs"] == 3 and at.session_state["forward_passes"] == 1
    assert not at.exception


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
    from core.guard_fit import document_arrays

    at = page("Brain MRI")
    at.file_uploader[0].set_value(("letter.png", encode(document_arrays(1, seed=5)[0]), "image/png")).run()
    assert not at.exception
    assert flagged(at)
    assert not any(s.value.startswith("Model output:") for s in at.subheader)
    assert "forward_passes" in at.session_state and not at.get("image")
    upload(at, "letter.png", encode(document_arrays(1, seed=5)[0]))
    assert any(s.value.startswith("Model output:") for s in at.subheader)


def test_dicom_of_another_modality_is_flagged_by_its_tags() -> None:
    import numpy as np

    at = page("Brain MRI")
    array = np.tile((np.arange(128) * 30).astype(np.uint16), (128, 1))
    at.file_uploader[0].set_value(("us.dcm", make_dicom(array, modality="US", slope=None), "application/dicom")).run()
    assert not at.exception
    assert any("modality is US" in w.value for w in at.warning)


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
    assert len(at.get("image")) == 2
