"""`python -m benchmarks.hostile` runs and reports each case's time, peak memory and outcome.

Only small cases run here; the figures themselves come from running the command (see its docstring).
"""

from __future__ import annotations

import json
import subprocess
import sys

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
