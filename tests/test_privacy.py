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
    from tests.test_app import page

    at = page("Lung CT")  # model loading happens before the recording starts
    import pytorch_grad_cam  # noqa: F401 - library import-time setup (matplotlib's cache folder) is not upload data

    caplog.set_level(logging.DEBUG)
    _recording = []
    try:
        at.file_uploader[0].set_value(("IM0001.dcm", data, "application/dicom")).run()
        if any("Not classified" in w.value for w in at.warning):
            at.checkbox[0].check().run()
        next(s for s in at.selectbox if s.label == "Method").set_value("Grad-CAM++").run()
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


def _parse_multipart(size: int) -> list:
    """Parse one upload of `size` bytes the way Streamlit's server does; return the writes it made."""
    import asyncio

    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    global _recording
    boundary = "secondlookboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"IM0001.dcm\"\r\n"
            "Content-Type: application/dicom\r\n\r\n").encode() + os.urandom(size) + f"\r\n--{boundary}--\r\n".encode()

    async def stream():
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    async def parse() -> None:
        form = await MultiPartParser(Headers({"content-type": f"multipart/form-data; boundary={boundary}"}), stream()).parse()
        upload = form["file"]
        assert len(await upload.read()) == size
        await form.close()

    _recording = []
    try:
        asyncio.run(parse())
    finally:
        written, _recording = _recording, None
    return written


def test_server_keeps_large_uploads_in_memory() -> None:
    """A 5 MB upload is parsed without a temporary file once any page (the home page) has run (it would spool to
    disk otherwise)."""
    from starlette.formparsers import MultiPartParser

    from ui.cache import keep_uploads_in_memory

    default = MultiPartParser.spool_max_size
    try:
        MultiPartParser.spool_max_size = 1024 * 1024  # Starlette's default
        assert _parse_multipart(5 * 2**20) != [], "the check must see the spooled temporary file"
        AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()  # the home page alone
        assert _parse_multipart(5 * 2**20) == []
    finally:
        MultiPartParser.spool_max_size = max(default, MultiPartParser.spool_max_size)
    keep_uploads_in_memory()
