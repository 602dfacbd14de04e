"""Preprocessing steps (border crop, CLAHE) and candidate recipes (another backbone or other steps).

The steps must run the same way in the app and in training, must not change how the split is
carved, and a card must say which were used: the registry refuses a card with other steps, the
comparison commands (`--weights`) take the card's own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cards import read_card
from core.lab.data import load_pixels, preprocess_pixels, read_records, recorded_split
from core.explain import compute_cam
from core.imaging import Scan, read_scan
from core.models import WeightsError, load_candidate, load_model, recipe_spec
from core.preprocess import PREPROCESSING, EvalPreset, apply_steps, border_box, border_crop, clahe
from core.tasks import PREPROCESSING_STEPS, TaskSpec, get_task
from core.lab.train import get_args_parser, main
from tests.conftest import REPO, encode, synthetic_slice

STEPS = ("border_crop", "clahe")


def framed(seed: int = 0) -> np.ndarray:
    """A textured 200 x 160 image in a black frame (20 rows on top) with a white bar (10 columns, right)."""
    image = np.zeros((200, 160), dtype=np.uint8)
    image[20:, :150] = np.random.default_rng(seed).integers(30, 220, size=(180, 150))
    image[:, 150:] = 255
    return image


def test_border_crop_trims_flat_edges_then_a_margin() -> None:
    cropped = border_crop(framed())
    # flat edges: 20 black rows on top, 10 white columns on the right -> 180 x 150, then 8% off each side
    assert cropped.shape == (180 - 2 * round(180 * 0.08), 150 - 2 * round(150 * 0.08))
    assert cropped.min() >= 30  # none of the frame is left
    inner = np.full((100, 100), 128, dtype=np.uint8)  # a flat image: at most a quarter trimmed per side
    assert border_crop(inner).shape == (50 - 8, 50 - 8)
    tiny = np.random.default_rng(1).integers(0, 255, size=(30, 30)).astype(np.uint8)
    assert border_box(tiny) == (0, 30, 0, 30) and border_crop(tiny).shape == (30, 30)  # too small to crop


def test_flat_edge_runs_match_a_row_by_row_count() -> None:
    from core.preprocess import FLAT_LEVELS, _flat_run

    rng = np.random.default_rng(5)
    for _ in range(200):
        rows = rng.integers(0, 60)
        lines = rng.integers(0, 255, size=(80, 12)).astype(np.uint8)
        lines[:rows] = rng.integers(0, 250) + rng.integers(0, FLAT_LEVELS + 1, size=(rows, 12))
        limit = int(rng.integers(0, 90))
        expected = 0
        while expected < min(limit, 80) and np.ptp(lines[expected].astype(int)) <= FLAT_LEVELS:
            expected += 1
        assert _flat_run(lines, limit) == expected


def test_clahe_raises_a_flat_exposure_and_narrows_the_gap_between_exposures() -> None:
    image = synthetic_slice(256, seed=3).astype(np.float32)
    full = image.astype(np.uint8)
    flat = (100 + image * 40 / 255).astype(np.uint8)  # the same image, low contrast
    assert float(clahe(flat).std()) > 1.3 * float(flat.std())
    before = abs(float(full.std()) - float(flat.std()))
    after = abs(float(clahe(full).std()) - float(clahe(flat).std()))
    assert after < 0.85 * before
    assert clahe(full).dtype == np.uint8 and clahe(full).shape == full.shape
    np.testing.assert_array_equal(clahe(flat), clahe(flat.copy()))


def test_the_model_region_is_where_the_heatmap_goes_back() -> None:
    image = framed()
    scan = Scan(pixels=image.astype(np.float32) / 255.0, kind="image")
    spec = recipe_spec(get_task("cxr_covid"), preprocessing=STEPS)
    prepared = EvalPreset(spec)(scan)
    top, bottom, left, right = prepared.region
    assert (top, bottom, left, right) == border_box(image) and top > 20 and right < 150 and prepared.cropped
    np.testing.assert_array_equal(prepared.pixels, clahe(image[top:bottom, left:right]))
    whole = EvalPreset(recipe_spec(spec, preprocessing=()))(scan)
    assert whole.region == (0, 200, 0, 160) and not whole.cropped  # no steps: the whole scan
    heatmap = np.ones((7, 7), dtype=np.float32)
    placed = prepared.place(heatmap)
    assert placed.shape == (200, 160) and placed[top:bottom, left:right].min() == pytest.approx(1.0)
    assert placed.sum() == pytest.approx((bottom - top) * (right - left))  # nothing outside the region
    assert prepared.outside().sum() == 200 * 160 - (bottom - top) * (right - left)
    assert whole.place(heatmap).shape == (200, 160) and not whole.outside().any()


def test_steps_are_named_in_the_registry_and_bad_ones_refused() -> None:
    assert set(PREPROCESSING) == set(PREPROCESSING_STEPS)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        dataclasses.replace(get_task("cxr_covid"), preprocessing=("sharpen",))
    with pytest.raises(ValueError, match="uint8"):
        apply_steps(np.zeros((8, 8), np.float32), STEPS)
    with pytest.raises(ValueError, match="unknown preprocessing step"):
        apply_steps(np.zeros((8, 8), np.uint8), ("sharpen",))
    assert apply_steps(framed(), ())[0].shape == (200, 160)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of framed synthetic slices, two copies of some (near-duplicate groups)."""
    root = tmp_path_factory.mktemp("framed")
    for kind, label in enumerate(("normal", "benign", "malignant")):
        (root / label).mkdir()
        for i in range(20):
            image = np.zeros((112, 112), dtype=np.uint8)
            image[8:, 4:108] = synthetic_slice(104, seed=100 * kind + i % 16, kind=kind)
            (root / label / f"{label}_{i}.png").write_bytes(encode(image))
    return root


def test_the_app_and_the_trainer_see_the_same_preprocessed_pixels(folder: Path) -> None:
    spec = recipe_spec(get_task("ct_cancer"), preprocessing=STEPS)
    records = read_records(folder)[:5]
    trained = load_pixels(records, spec)
    assert trained[0].shape != (112, 112)  # cropped
    raw = load_pixels(records, spec, preprocess=False)
    assert raw[0].shape == (112, 112)
    for a, b in zip(preprocess_pixels(raw, spec), trained):
        np.testing.assert_array_equal(a, b)
    preset = EvalPreset(spec)
    for record, pixels in zip(records, trained):
        app = preset(read_scan(record.path.read_bytes(), record.path.name))
        np.testing.assert_array_equal(app.pixels, pixels)
        np.testing.assert_allclose(app.tensor.numpy(), preset.from_pixels(pixels).tensor.numpy(), atol=1e-6)
    plain = EvalPreset(get_task("ct_cancer"))(read_scan(records[0].path.read_bytes(), records[0].path.name)).tensor
    assert not np.allclose(plain.numpy(), preset.from_pixels(trained[0]).tensor.numpy())  # the steps change the input


def test_the_split_does_not_depend_on_the_preprocessing(folder: Path) -> None:
    config = {"seed": 0, "val_frac": 0.2, "test_frac": 0.2}
    records = read_records(folder)
    _, _, plain = recorded_split(records, get_task("ct_cancer"), config)
    _, images, stepped = recorded_split(records, recipe_spec(get_task("ct_cancer"), preprocessing=STEPS), config)
    np.testing.assert_array_equal(plain, stepped)
    assert images[0].shape != (112, 112)


@pytest.fixture(scope="module")
def candidate(folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("candidate")
    argv = ["--task", "ct_cancer", "--data", str(folder), "--arch", "squeezenet1_1", "--preprocessing",
            "border_crop,clahe", "--pretrained", "none", "--head-epochs", "0", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--out", str(out)]
    main(get_args_parser().parse_args(argv), argv)
    return out / "ct_cancer.safetensors"


def test_a_candidate_recipe_is_recorded_refused_by_the_registry_and_loads_as_a_candidate(
        candidate: Path, folder: Path) -> None:
    card = read_card(candidate.with_suffix(".json"))
    assert card.preprocessing == list(STEPS) and card.arch == "squeezenet1_1" and card.cam_layer == "features.12"
    with pytest.raises(WeightsError, match="preprocessing"):
        load_model(get_task("ct_cancer"), candidate)
    classifier = load_candidate(get_task("ct_cancer"), candidate)
    assert classifier.spec.preprocessing == STEPS and classifier.spec.arch == "squeezenet1_1"
    records = read_records(folder)[:1]
    heatmap = compute_cam(classifier, EvalPreset(classifier.spec).from_pixels(load_pixels(records, classifier.spec)[0]).tensor, 0,
                          "Grad-CAM")
    assert heatmap.shape == (224, 224) and np.isfinite(heatmap).all()
    result = subprocess.run([sys.executable, "-m", "core.evaluate", "--task", "ct_cancer", "--data", str(folder),
                             "--weights", str(candidate), "--card-split", "test", "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["n"] == card.metrics.n and scored["accuracy"] == pytest.approx(card.metrics.accuracy)


def test_a_card_naming_an_unknown_step_is_refused_with_its_name(candidate: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "ct_cancer.safetensors"
    shutil.copy(candidate, broken)
    raw = json.loads(candidate.with_suffix(".json").read_text())
    raw["preprocessing"] = ["sharpen"]
    broken.with_suffix(".json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="ct_cancer.json.*sharpen"):
        load_candidate(get_task("ct_cancer"), broken)


def test_registry_specs_name_only_known_steps() -> None:
    from core.tasks import TASKS

    for spec in TASKS.values():
        assert isinstance(spec, TaskSpec) and set(spec.preprocessing) <= set(PREPROCESSING_STEPS)
