"""Nothing uploaded touches the disk, and DICOM patient tags never reach the page or the logs."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO, make_dicom, page_texts

_recording: list | None = None


def _audit(event: str, args: tuple) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing:
            _recording.append((event, path))
    elif event in ("os.rename", "os.replace", "os.mkdir", "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp"):
        _recording.append((event, args[0] if args else None))


sys.addaudithook(_audit)


def test_upload_to_heatmap_writes_nothing_and_shows_no_patient_tags(caplog) -> None:
    global _recording
    yy, xx = np.mgrid[0:128, 0:128]
    stored = np.where(((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2, 1064, 24).astype(np.int16)
    data = make_dicom(stored)  # carries PatientName Secret^Patient and PatientID ID-12345
    at = AppTest.from_file(str(REPO / "pages/3_Lung_CT.py"), default_timeout=180)
    at.run()  # model loading happens before the recording starts
    import pytorch_grad_cam  # noqa: F401 - library import-time setup (matplotlib's cache folder) is not upload data

    caplog.set_level(logging.DEBUG)
    _recording = []
    try:
        at.file_uploader[0].set_value(("IM0001.dcm", data, "application/dicom")).run()
        if any("Not classified" in w.value for w in at.warning):
            at.checkbox[0].check().run()
        at.selectbox[1].set_value("Grad-CAM++").run()
        at.slider[0].set_value(0.7).run()
    finally:
        written, _recording = _recording, None
    assert not at.exception
    assert any(s.value.startswith("Model output:") for s in at.subheader)
    assert written == [], f"files written during an upload: {written}"
    page_text = page_texts(at)
    for secret in ("Secret", "Patient^", "ID-12345"):
        assert secret not in page_text
        assert secret not in caplog.text
    assert "IM0001" not in caplog.text  # logs carry a hash of the upload, not its name
