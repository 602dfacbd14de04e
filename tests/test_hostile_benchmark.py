"""`python -m benchmarks.hostile` runs and reports each case's time, peak memory and outcome.

Only small cases run here; the figures themselves come from running the command (see its docstring).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.hostile import CASES
from tests.conftest import REPO


def test_hostile_benchmark_reports_every_case_it_runs() -> None:
    cases = ["png_512_reference", "tiff_float_3e38", "dicom_nested_200", "zip_600k_entries"]
    result = subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--json", "--cases", ",".join(cases)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["case"] for row in rows] == cases
    for row in rows:
        assert row["seconds"] is not None and row["peak_mb"] is not None, row
        assert row["verdict"] == "ok", row
        assert row["outcome"].startswith("accepted" if CASES[row["case"]][2] == "accepted" else "refused"), row


def test_unknown_case_is_named_with_the_choices() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--cases", "nope"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0 and "unknown case" in result.stderr and "png_rgba_40mp" in result.stderr


@pytest.mark.slow
def test_the_app_path_is_measured_with_the_model_and_the_heatmap() -> None:
    """`--through app`: an accepted scan gets a call (the model ran, its heatmap made), a refused one its reason."""
    cases = ["png_512_reference", "tiff_float_3e38", "zip_600k_entries"]
    result = subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--json", "--through", "app", "--cases",
                             ",".join(cases)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["case"] for row in rows] == cases
    assert all(row["verdict"] == "ok" and row["idle_mb"] > 300 for row in rows), rows  # the idle child holds torch
    assert rows[0]["outcome"].startswith("accepted 512 x 512: ") and "guard" in rows[0]["outcome"]
    assert rows[1]["outcome"].startswith("refused: ") and rows[2]["outcome"].startswith("refused: ")
