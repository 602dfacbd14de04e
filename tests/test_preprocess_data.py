"""Preprocessing contracts, calibration maths, near-duplicate grouping and group-aware splits."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from core.calibration import choose_threshold, expected_calibration_error, fit_temperature, sensitivity_specificity, softmax
from core.lab.data import (
    Record,
    difference_hash,
    near_duplicate_groups,
    split_audit,
    split_groups,
    stratified_group_split,
)
from core.imaging import read_scan
from core.preprocess import EvalPreset, augment, display_rgb, eight_bit, normalize, resize_square
from core.tasks import TASKS, get_task, positive_classes, tasks_for_page
from tests.conftest import make_dicom, synthetic_slice


def test_registry_lookups_fail_loudly() -> None:
    with pytest.raises(ValueError, match="one of"):
        get_task("knee_xray")
    with pytest.raises(ValueError, match="one of"):
        tasks_for_page("Dermatology")
    with pytest.raises(ValueError, match="glioma"):
        get_task("brain_mri").label_index("tumour")
    assert [s.key for s in tasks_for_page("Lung CT")] == ["ct_covid", "ct_cancer"]


@pytest.mark.parametrize("key", sorted(TASKS))
def test_registry_labels_are_the_data_folder_names(key: str) -> None:
    """The class keys are the folder names (and manifest labels) of the model's data; findings are manifest columns."""
    import csv

    from tests.conftest import data_folder

    spec = TASKS[key]
    folder = data_folder(spec.data_folder)
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert {row["label"] for row in rows} == set(spec.labels)
    assert {row["path"].split("/")[1] for row in rows} == set(spec.labels)
    assert set(spec.findings) <= set(reader.fieldnames or ())
    assert spec.outputs == spec.labels + spec.findings and spec.num_outputs == len(spec.labels) + len(spec.findings)
    assert spec.positive is None or set(positive_classes(spec.positive)) <= set(spec.labels)


def test_model_input_contract(png_bytes: bytes) -> None:
    spec = get_task("brain_mri")
    prepared = EvalPreset(spec)(read_scan(png_bytes, "x.png"))
    tensor = prepared.tensor
    assert prepared.pixels.dtype == np.uint8 and prepared.grey.shape == (spec.input_size, spec.input_size)
    assert not prepared.cropped and prepared.region == (0, prepared.scan_shape[0], 0, prepared.scan_shape[1])
    assert tensor.shape == (1, 3, spec.input_size, spec.input_size) and tensor.dtype == torch.float32
    # channel 0 of a white pixel is (1 - mean) / std
    white = normalize(torch.ones(1, 1, 4, 4), spec)
    assert float(white[0, 0, 0, 0]) == pytest.approx((1 - spec.mean[0]) / spec.std[0])


def test_preprocessing_rejects_bad_ranges() -> None:
    spec = get_task("brain_mri")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize(torch.full((1, 1, 8, 8), 2.0), spec)
    with pytest.raises(ValueError, match="N, 1, S, S"):
        normalize(torch.zeros(1, 3, 8, 8), spec)
    from core.imaging import Scan

    with pytest.raises(ValueError):
        eight_bit(Scan(pixels=np.full((4, 4), -0.5, dtype=np.float32), kind="image"), spec)
    with pytest.raises(ValueError, match="finite"):
        eight_bit(Scan(pixels=np.full((4, 4), np.nan, dtype=np.float32), kind="image"), spec)
    with pytest.raises(ValueError):
        resize_square(np.zeros((2, 4, 4), dtype=np.float32), 8)


def test_quantize_and_resize() -> None:
    from core.imaging import Scan

    pixels = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    q = eight_bit(Scan(pixels=pixels, kind="image"), get_task("brain_mri"))
    np.testing.assert_array_equal(q, np.round(pixels * 255).astype(np.uint8))
    out = resize_square(q.astype(np.float32) / 255, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1


def test_ct_model_window_is_independent_of_the_viewer() -> None:
    """ct_cancer was trained on soft-tissue exports: its input uses that window, not the display one."""
    yy, xx = np.mgrid[0:64, 0:64]
    stored = np.where(((yy - 32) ** 2 + (xx - 32) ** 2) < 400, 1064, 24).astype(np.int16)  # 40 HU disc, -1000 HU air
    scan = read_scan(make_dicom(stored), "ct.dcm")
    cancer, covid = get_task("ct_cancer"), get_task("ct_covid")
    soft = EvalPreset(cancer)(scan).grey
    lung = EvalPreset(covid)(scan).grey
    centre = cancer.input_size // 2
    assert soft[centre, centre] == pytest.approx(0.5, abs=0.01)  # 40 HU is the soft-tissue centre
    assert lung[centre, centre] == pytest.approx(np.round((40 + 600 + 750) / 1500 * 255) / 255, abs=0.01)
    # a display window for the viewer changes the picture, never the model input
    before = EvalPreset(cancer)(scan).grey
    shown = display_rgb(scan, window=(400.0, 1800.0))
    assert shown.shape == (64, 64, 3) and shown.dtype == np.uint8
    np.testing.assert_array_equal(before, EvalPreset(cancer)(scan).grey)


def test_augment_contract() -> None:
    rng = np.random.default_rng(0)
    pixels = synthetic_slice(100).astype(np.float32) / 255
    out = augment(pixels, 64, rng, hflip=True)
    assert out.shape == (64, 64) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


# ------------------------------------------------------------------ calibration


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 3))
    targets = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    fitted = fit_temperature(true_logits * 3.0, targets)  # over-confident by a factor 3
    assert fitted == pytest.approx(3.0, rel=0.1)
    ece_raw = expected_calibration_error(softmax(true_logits * 3.0), targets)
    ece_fit = expected_calibration_error(softmax(true_logits * 3.0, fitted), targets)
    assert ece_fit < ece_raw


def test_choose_threshold_meets_a_sensitivity_floor() -> None:
    rng = np.random.default_rng(1)
    positives = rng.random(500) < 0.4
    scores = np.clip(positives * 0.3 + rng.random(500) * 0.7, 0, 1)
    threshold = choose_threshold(scores, positives, min_sensitivity=0.95)
    sens, _ = sensitivity_specificity(scores, positives, threshold)
    assert sens >= 0.95
    youden = choose_threshold(scores, positives)
    assert 0 < youden < 1


# ------------------------------------------------------------------ near-duplicates and splits


def _variants(base: np.ndarray) -> dict[str, np.ndarray]:
    f = base.astype(np.float32) / 255
    return {
        "exact": f.copy(),
        "resized": cv2.resize(cv2.resize(f, (150, 130), interpolation=cv2.INTER_AREA), (200, 200)),
        "mirrored": f[:, ::-1].copy(),
        "contrast": np.clip((f - 0.5) * 1.4 + 0.55, 0, 1),
        "gamma": np.power(f, 0.7),
    }


def _textured(seed: int) -> np.ndarray:
    """A smooth random field: structure at every hash cell, like anatomy, unlike flat noise."""
    coarse = np.random.default_rng(seed).random((9, 9)).astype(np.float32)
    return (cv2.resize(coarse, (200, 200), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def test_near_duplicates_are_grouped_and_distinct_images_are_not() -> None:
    bases = [_textured(s) for s in range(6)]
    images, origin = [], []
    for b, base in enumerate(bases):
        images.append(base.astype(np.float32) / 255)
        origin.append(b)
        if b < 3:
            for variant in _variants(base).values():
                images.append(variant)
                origin.append(b)
    hashes = np.stack([difference_hash(i) for i in images])
    mirrored = np.stack([difference_hash(i[:, ::-1]) for i in images])
    groups = near_duplicate_groups(hashes, mirrored)
    for i in range(len(images)):
        for j in range(len(images)):
            assert (groups[i] == groups[j]) == (origin[i] == origin[j]), (i, j, origin[i], origin[j])


def test_group_split_never_straddles_and_respects_patients() -> None:
    rng = np.random.default_rng(0)
    records = [Record(path=None, rel=f"{i}.png", label=["a", "b"][i % 2], patient=f"p{i // 4}") for i in range(400)]  # type: ignore[arg-type]
    near_dup = np.array([i // 2 for i in range(400)])  # pairs of near-duplicates
    near_dup[rng.choice(400, 10, replace=False)] = 7  # a few copies far from their patient
    groups = split_groups(records, near_dup)
    sides = stratified_group_split([r.label for r in records], groups, 0.15, 0.15, seed=3)
    audit = split_audit(records, groups, near_dup, sides)
    assert audit["near_duplicate_groups_across_splits"] == 0
    assert audit["patients_across_splits"] == 0
    counts = {s: sum(v.values()) for s, v in audit["counts"].items()}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
