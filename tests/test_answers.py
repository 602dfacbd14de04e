"""An answer a reader can use: decisions that commit where the model is sure, refusals that say why with their
threshold, and heatmaps that are never empty and stay on the body."""

from __future__ import annotations

import numpy as np
import pytest

from core.decision import Band, Prediction, decide, decision_distance
from core.guard import GuardStats, judge
from core.tasks import TASKS


def test_a_band_around_a_high_threshold_still_calls_pneumonia_at_099() -> None:
    """The old band was +-0.10 in probability: around a threshold of 0.92 it made 0.82-1.00 "uncertain", so the
    pediatric pneumonia model never called pneumonia. In log-odds the same band is narrow near 0.92."""
    spec = TASKS["cxr_pneumonia"]
    labels, positive = spec.labels, spec.positive
    sure = np.array([0.01, 0.69, 0.30])  # P(pneumonia) = 0.99
    near = np.array([0.085, 0.615, 0.30])  # P(pneumonia) = 0.915
    band = Band(1.0)  # a wide band: +-1 log-odds
    for probs, uncertain in ((sure, False), (near, True)):
        index = int(decide(probs[None], labels, positive, 0.92)[0])
        prediction = Prediction(labels, probs, index, 0.92, positive, spec.positive_label, band=band)
        assert prediction.uncertain == uncertain
    called = Prediction(labels, sure, int(decide(sure[None], labels, positive, 0.92)[0]), 0.92, positive,
                        spec.positive_label, band=band)
    assert called.headline() == ("pneumonia", pytest.approx(0.99))
    assert called.headline_text() == "pneumonia 99% (bacterial 69%, viral 30%), at or above its 92% threshold"
    low, high = band.interval(0.92)
    assert 0.80 < low < 0.92 < high < 0.97


def test_a_band_means_the_same_near_a_low_threshold() -> None:
    """Around a threshold of 0.11, a 1% malignancy probability is far from the decision, not uncertain."""
    labels = TASKS["ct_cancer"].labels
    one_percent = np.array([[0.95, 0.04, 0.01]])
    assert decision_distance(one_percent, labels, "malignant", 0.11)[0] > 2.0
    prediction = Prediction(labels, one_percent[0], 0, 0.11, "malignant", "malignant", band=Band(1.0))
    assert not prediction.uncertain and prediction.headline_text() == "normal: malignant 1%, below its 11% threshold"


def test_the_guard_has_three_outcomes_and_names_its_thresholds() -> None:
    stats = GuardStats(np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32), 0.0, 0.30, 0.60)
    spec = TASKS["brain_mri"]
    refused, warned, passed = judge(stats, 0.12, spec), judge(stats, 0.45, spec), judge(stats, 0.89, spec)
    assert (refused.outcome, warned.outcome, passed.outcome) == ("out_of_range", "borderline", "in_range")
    assert refused.refused and not warned.refused and warned.warned and passed.reason is None
    assert "12%" in refused.reason and "below 30% are not classified" in refused.reason
    assert "45%" in warned.reason and "above 60%" in warned.reason
    assert "probability that it belongs" not in refused.reason  # the old message that contradicted itself
    assert judge(stats, 0.9, spec, "the DICOM file says its modality is US").refused


# ---------------------------------------------------------------- heatmaps on phantoms


def phantom(kind: str, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scan (uint8) of a body on black air, and the body's own mask (bool): head, chest CT or radiograph."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    if kind == "chest_xray":  # a radiograph fills the frame but for black corners
        body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.52) ** 2 < 1
        image = np.where(body, 0.55, 0.02)
        for cx in (0.32, 0.68):  # darker lung fields
            image[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.28) ** 2 < 1] = 0.3
    else:
        ry, rx = (0.36, 0.3) if kind == "head" else (0.3, 0.42)
        body = ((xx - 0.5) / rx) ** 2 + ((yy - 0.5) / ry) ** 2 < 1
        image = np.where(body, 0.75, 0.0)  # skull / chest wall
        inner = ((xx - 0.5) / (rx - 0.04)) ** 2 + ((yy - 0.5) / (ry - 0.04)) ** 2 < 1
        image[inner] = 0.45 if kind == "head" else 0.2
        table = (yy > 0.94) & (yy < 0.96) & (np.abs(xx - 0.5) < 0.45)  # a CT table below the body
        image[table] = 0.8
    cx, cy = rng.uniform(0.42, 0.58, size=2)
    image[((xx - cx) ** 2 + (yy - cy) ** 2) < 0.004] += 0.25  # a lesion inside
    image = np.clip(image + 0.03 * rng.standard_normal(image.shape), 0, 1)
    return np.round(image * 255).astype(np.uint8), body


PHANTOM_OF = {"brain_mri": "head", "head_ct": "head", "ct_covid": "chest_ct", "ct_cancer": "chest_ct",
              "cxr_covid": "chest_xray", "cxr_pneumonia": "chest_xray"}


@pytest.mark.parametrize("key", sorted(TASKS))
def test_every_default_map_is_non_empty_and_mostly_on_the_body(key: str) -> None:
    """For every class and finding of every model, the page's default heatmap shows something, and most of its
    mass lies on the phantom's body (its own geometry, not the mask the maps are suppressed with)."""
    import cv2

    from core.explain import cam_layers, compute_cam, mass_inside
    from core.imaging import Scan
    from core.models import load_model
    from core.preprocess import EvalPreset
    from ui.task_page import default_method

    classifier = load_model(TASKS[key])
    spec = classifier.spec
    method = default_method(classifier)
    assert len(cam_layers(classifier)) >= 1
    for seed in range(2):
        image, body = phantom(PHANTOM_OF[key], seed=seed)
        prepared = EvalPreset(spec)(Scan(pixels=image.astype(np.float32) / 255.0, kind="image"))
        region = prepared.region
        truth = cv2.resize(body[region[0]:region[1], region[2]:region[3]].astype(np.uint8),
                           (spec.input_size, spec.input_size), interpolation=cv2.INTER_NEAREST).astype(bool)
        truth = cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(np.float32)  # skin and skull
        for output in spec.outputs:
            heatmap = compute_cam(classifier, prepared.tensor, spec.output_index(output), method)
            assert heatmap.max() > 0, (key, output, method, seed)
            assert mass_inside(heatmap, truth) >= 0.8, (key, output, method, seed, mass_inside(heatmap, truth))


def test_a_dicom_whose_tags_confirm_the_model_is_borderline_not_refused_on_its_score() -> None:
    """A real scanner's chest CT (modality CT, body part CHEST) may look unlike exported training slices: a low
    score makes it borderline with the reason; the same score on a PNG (no tags) is refused; wrong tags refuse."""
    from core.guard import TagCheck

    stats = GuardStats(np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32), 0.0, 0.30, 0.60)
    spec = TASKS["ct_covid"]
    confirmed = judge(stats, 0.05, spec, TagCheck(confirms=True))
    assert confirmed.outcome == "borderline" and "DICOM tags say" in confirmed.reason and "5%" in confirmed.reason
    assert judge(stats, 0.05, spec, TagCheck()).refused
    assert judge(stats, 0.95, spec, TagCheck("the DICOM file says the body part is HEAD")).refused


def test_a_colour_photo_is_refused_before_the_model_names_why() -> None:
    """Scans are grey: a colour photo or an annotated screenshot is out of range whatever a model's score says."""
    import skimage.data

    from benchmarks.samples import encode
    from core.guard import read_tags
    from core.imaging import read_scan
    from tests.conftest import synthetic_slice

    photo = read_scan(encode(np.asarray(skimage.data.coffee())), "coffee.png")
    check = read_tags(photo, TASKS["brain_mri"])
    assert check.reason is not None and "colour image" in check.reason and judge(None, None, TASKS["brain_mri"], check).refused
    grey = read_scan(encode(np.repeat(synthetic_slice(128)[..., None], 3, axis=2)), "grey-as-rgb.png")
    assert read_tags(grey, TASKS["brain_mri"]).reason is None  # a grey scan saved as RGB is still a scan
