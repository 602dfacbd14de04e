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


def page_texts(at) -> str:
    """Every text element an AppTest page shows, joined."""
    kinds = ("markdown", "caption", "subheader", "title", "error", "warning", "info")
    return "\n".join(str(e.value) for kind in kinds for e in getattr(at, kind))


@pytest.fixture
def png_bytes() -> bytes:
    return encode(synthetic_slice(160, seed=1))
