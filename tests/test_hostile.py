"""Every hostile or unusual upload either reads correctly or is refused with a plain message.

Never an unhandled exception: in core.imaging, in `python -m core.predict`, and in the app.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.imaging import ScanError, read_scan
from tests.conftest import REPO
from tests.test_app import page
from tests.corpus import CORPUS

CASES = sorted(CORPUS)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("case", CASES)
def test_read_scan_reads_or_refuses_plainly(case: str) -> None:
    filename, make, expected = CORPUS[case]
    data = make()
    try:
        scan = read_scan(data, filename)
    except ScanError as exc:
        assert expected in ("refused", "either"), f"{case} was refused: {exc}"
        message = str(exc)
        assert message and "Traceback" not in message and len(message) < 400
        assert message[0].isupper() and message.rstrip().endswith(".")
        return
    assert expected in ("ok", "either"), f"{case} should have been refused"
    assert scan.pixels.dtype == np.float32 and scan.pixels.ndim == 2
    assert 0.0 <= float(scan.pixels.min()) <= float(scan.pixels.max()) <= 1.0
    assert float(scan.pixels.max()) > float(scan.pixels.min())


def test_predict_command_survives_the_whole_corpus(tmp_path: Path) -> None:
    paths = []
    for case in CASES:
        filename, make, _ = CORPUS[case]
        path = tmp_path / case / filename
        path.parent.mkdir()
        path.write_bytes(make())
        paths.append(path)
    result = subprocess.run([sys.executable, "-m", "core.predict", "--task", "brain_mri", *map(str, paths)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(CASES)
    for case, row in zip(CASES, rows):
        expected = CORPUS[case][2]
        assert row["status"] in ("ok", "rejected"), (case, row)
        if expected == "ok":  # read fine: classified, or flagged by the wrong-input guard
            if row["status"] == "ok":
                assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            else:
                assert row["reason"].startswith("Not classified"), (case, row)
        elif expected == "refused":
            assert row["status"] == "rejected" and row["reason"], (case, row)
            assert not row["reason"].startswith("Not classified"), (case, row)


def test_the_app_survives_the_whole_corpus() -> None:
    at = page("Brain MRI")
    at.run()
    for case in CASES:
        filename, make, expected = CORPUS[case]
        at.file_uploader[0].set_value((filename, make(), "application/octet-stream")).run()
        assert not at.exception, (case, at.exception)
        # one image gets a result; a multi-frame DICOM goes to the study view and gets a study call
        got_result = any(s.value.startswith(("Model output:", "Study call:")) for s in at.subheader)
        got_flag = any("Not classified" in w.value for w in at.warning)
        got_message = len(at.error) > 0
        assert got_result + got_flag + got_message == 1, case
        if expected == "ok":
            assert got_result or got_flag, (case, [e.value for e in at.error])
        elif expected == "refused":
            assert got_message, case
