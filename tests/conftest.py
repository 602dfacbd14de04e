"""Shared fixtures: synthetic images made on the fly, and the real data folder where present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.samples import encode, make_dicom, synthetic_slice  # noqa: F401 - shared with the tests

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("SECONDLOOK_DATA", REPO.parent / "shared" / "data"))


def data_folder(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    folder = DATA_ROOT / name
    if not folder.is_dir():
        pytest.skip(f"real images not available: {folder} is absent (set SECONDLOOK_DATA to the data root)")
    return folder


def head_ct_dicom(body_part: str = "HEAD") -> bytes:
    """A head-CT-like DICOM slice in HU: skull ring (1000), brain (35), a 70 HU crescent by the skull."""
    import numpy as np

    yy, xx = np.mgrid[0:160, 0:160]
    r = np.hypot(yy - 80, xx - 80)
    hu = np.full((160, 160), -1000.0)
    hu[r < 70] = 1000.0
    hu[r < 62] = 35.0
    hu[(r > 54) & (r < 62) & (xx < 70)] = 70.0
    return make_dicom((hu + 1024).astype(np.int16), extra={"BodyPartExamined": body_part})


def page_texts(at) -> str:
    """Every text element an AppTest page shows, joined."""
    kinds = ("markdown", "caption", "subheader", "title", "error", "warning", "info", "text")
    return "\n".join(str(e.value) for kind in kinds for e in getattr(at, kind))


@pytest.fixture
def png_bytes() -> bytes:
    return encode(synthetic_slice(160, seed=1))


@pytest.fixture(autouse=True)
def feedback_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Readers' feedback goes to a fresh temporary store in every test, never to the home folder; no export token."""
    path = tmp_path_factory.mktemp("feedback") / "feedback.sqlite3"
    monkeypatch.setenv("SECONDLOOK_FEEDBACK", str(path))
    monkeypatch.delenv("SECONDLOOK_ADMIN_TOKEN", raising=False)
    return path


def viewer_figure(at) -> dict:
    """The synced image viewer's plotly figure on an AppTest page (the chart made of image traces)."""
    import json

    for chart in at.get("plotly_chart"):
        figure = json.loads(chart.proto.spec)
        if figure["data"] and all(trace["type"] == "image" for trace in figure["data"]):
            return figure
    raise AssertionError("no image viewer on the page")


def viewer_sources(at) -> tuple[str, str]:
    """(left image, overlay) data URIs shown by the viewer."""
    left, right = viewer_figure(at)["data"]
    return left["source"], right["source"]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway Orthanc with its DICOMweb plugin (tests/orthanc.py), or skip with the reason where it is missing."""
    from tests.orthanc import orthanc_missing, orthanc_server

    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
