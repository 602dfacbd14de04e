"""Registry invariants over the bundled weights, and predict / explain contracts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cards import read_card, write_card
from core.explain import COLORMAPS, METHODS, compute_cam, overlay
from core.imaging import read_scan
from core.models import WEIGHTS_DIR, WeightsError, build_model, dequantize_state, load_model, quantize_state, resolve_layer
from core.decision import decide
from core.pipeline import predict_scan
from core.preprocess import EvalPreset, display_rgb
from core.tasks import TASKS, get_task
from tests.conftest import REPO, encode, synthetic_slice

SPECS = list(TASKS.values())


@pytest.fixture(scope="module")
def classifiers() -> dict:
    return {}


def loaded(classifiers: dict, key: str):
    if key not in classifiers:
        classifiers[key] = load_model(get_task(key))
    return classifiers[key]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_cam_layer_resolves_to_a_spatial_block(spec) -> None:
    model = build_model(spec).eval()
    layer = resolve_layer(model, spec.cam_layer)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    handle.remove()
    assert out.shape == (1, spec.num_outputs)
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][-1] >= 4


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_bundled_weights_load_strictly_and_match_their_card(spec, classifiers) -> None:
    weights = WEIGHTS_DIR / f"{spec.key}.safetensors"
    assert weights.is_file(), f"bundled weights missing for {spec.key}"
    assert weights.stat().st_size <= 10 * 2**20
    classifier = loaded(classifiers, spec.key)
    card = classifier.card
    assert card.labels == list(spec.labels) and card.arch == spec.arch and card.input_size == spec.input_size
    assert card.temperature > 0
    assert card.metrics.split == "test" and card.metrics.n > 0
    assert card.split.near_duplicate_groups_across_splits == 0
    assert not card.split.patients_across_splits
    assert card.training.command.startswith("python -m core.train")
    assert (spec.positive is None) == (card.threshold is None)


def test_weights_folder_fits_the_budget() -> None:
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total < 30 * 2**20


def test_card_or_weights_mismatch_is_refused(tmp_path: Path) -> None:
    spec = get_task("ct_covid")
    weights = tmp_path / "ct_covid.safetensors"
    shutil.copy(WEIGHTS_DIR / "ct_covid.safetensors", weights)
    shutil.copy(WEIGHTS_DIR / "ct_covid.json", tmp_path / "ct_covid.json")
    (tmp_path / "guard").mkdir()
    shutil.copy(WEIGHTS_DIR / "guard" / "ct_covid.safetensors", tmp_path / "guard" / "ct_covid.safetensors")
    load_model(spec, weights)  # the copies are fine
    card = read_card(tmp_path / "ct_covid.json")
    card.labels = ["non_covid", "covid19"]
    write_card(card, tmp_path / "ct_covid.json")
    with pytest.raises(WeightsError, match="labels"):
        load_model(spec, weights)
    shutil.copy(WEIGHTS_DIR / "ct_covid.json", tmp_path / "ct_covid.json")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_model(spec, weights)
    with pytest.raises(WeightsError, match="not found"):
        load_model(spec, tmp_path / "missing.safetensors")


def test_quantized_state_round_trips_closely() -> None:
    model = build_model(get_task("brain_mri"))
    state = model.state_dict()
    restored = dequantize_state(quantize_state(state))
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            scale = float(tensor.abs().max()) or 1.0
            assert float((restored[name] - tensor).abs().max()) <= scale / 127 + 1e-6, name


def test_prediction_contract(classifiers) -> None:
    classifier = loaded(classifiers, "brain_mri")
    prediction = predict_scan(classifier, read_scan(encode(synthetic_slice(180, seed=2)), "x.png"))
    assert prediction.probabilities.shape == (4,)
    assert prediction.probabilities.sum() == pytest.approx(1.0)
    assert prediction.label == prediction.labels[int(np.argmax(prediction.probabilities))]
    assert set(prediction.as_dict()) == set(get_task("brain_mri").labels)


def test_decide_uses_the_operating_threshold() -> None:
    probs = np.array([[0.3, 0.7], [0.8, 0.2], [0.55, 0.45]])
    labels = ("normal", "covid19")
    np.testing.assert_array_equal(decide(probs, labels, "covid19", 0.4), [1, 0, 1])
    np.testing.assert_array_equal(decide(probs, labels, None, None), [1, 0, 0])


@pytest.fixture(scope="module")
def cam_input():
    return read_scan(encode(synthetic_slice(200, seed=4)), "cam.png")


@pytest.mark.parametrize("method", METHODS)
def test_every_cam_method_gives_a_unit_heatmap_and_releases_hooks(method, classifiers, cam_input) -> None:
    classifier = loaded(classifiers, "ct_cancer")
    spec = classifier.spec
    tensor = EvalPreset(spec)(cam_input).tensor

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in classifier.module.modules())

    before = hook_count()
    with torch.inference_mode():  # the app may call from a thread in inference mode
        heatmap = compute_cam(classifier, tensor, 2, method)
    assert heatmap.shape == (spec.input_size, spec.input_size) and heatmap.dtype == np.float32
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0
    assert hook_count() == before


def test_cam_refuses_bad_requests(classifiers, cam_input) -> None:
    classifier = loaded(classifiers, "cxr_covid")
    tensor = EvalPreset(classifier.spec)(cam_input).tensor
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="out of range"):
            compute_cam(classifier, tensor, bad)
    with pytest.raises(ValueError, match="one of"):
        compute_cam(classifier, tensor, 0, "MagicCAM")
    with pytest.raises(ValueError, match="tensor must be"):
        compute_cam(classifier, tensor[:, :, :100], 0)


def test_cam_targets_differ_by_class(classifiers, cam_input) -> None:
    classifier = loaded(classifiers, "brain_mri")
    tensor = EvalPreset(classifier.spec)(cam_input).tensor
    maps = [compute_cam(classifier, tensor, i, "Grad-CAM") for i in range(4)]
    assert any(not np.allclose(maps[0], m) for m in maps[1:])


def test_overlay_blends_only_as_asked(cam_input) -> None:
    rgb = display_rgb(cam_input)
    heatmap = np.zeros((16, 16), dtype=np.float32)
    heatmap[:8] = 1.0
    np.testing.assert_array_equal(overlay(rgb, heatmap, opacity=0.0), rgb)
    full = overlay(rgb, heatmap, opacity=1.0, colormap="jet", threshold=0.5)
    assert full.shape == rgb.shape and full.dtype == np.uint8
    h = rgb.shape[0]
    np.testing.assert_array_equal(full[h - 5 :], rgb[h - 5 :])  # below threshold: untouched
    assert not np.array_equal(full[:5], rgb[:5])
    for name in COLORMAPS:
        overlay(rgb, heatmap, 0.5, name, 0.1)
    with pytest.raises(ValueError, match="colormap"):
        overlay(rgb, heatmap, 0.5, "rainbow-unicorn")
    with pytest.raises(ValueError):
        overlay(rgb, heatmap, 1.5)


def test_predict_command_never_stops_on_a_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode(synthetic_slice(128, seed=9)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    missing = tmp_path / "missing.png"
    result = subprocess.run(
        [sys.executable, "-m", "core.predict", "--task", "brain_mri", str(good), str(bad), str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in rows][1:] == ["rejected", "error"]
    if rows[0]["status"] == "ok":
        assert rows[0]["prediction"] in get_task("brain_mri").labels
        assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    else:  # the synthetic slice may not look like a brain MRI to the wrong-input guard
        assert rows[0]["status"] == "rejected" and rows[0]["reason"].startswith("Not classified")
    assert "not a readable image" in rows[1]["reason"]
    wrong = subprocess.run([sys.executable, "-m", "core.predict", "--task", "nope", str(good)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert wrong.returncode == 2


def test_decide_with_a_threshold_on_one_of_three_classes() -> None:
    labels = ("normal", "benign", "malignant")
    probabilities = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.05, 0.35], [0.05, 0.15, 0.8]])
    assert decide(probabilities, labels, None, None).tolist() == [0, 1, 0, 2]
    # malignant at >= 0.25: called even when another class is likelier; otherwise the likeliest other class
    assert decide(probabilities, labels, "malignant", 0.25).tolist() == [0, 2, 2, 2]
    assert decide(probabilities, labels, "malignant", 0.9).tolist() == [0, 1, 0, 1]


def test_a_threshold_on_a_group_of_classes() -> None:
    """cxr_pneumonia screens for pneumonia = bacterial + viral: the summed probability is thresholded."""
    from core.lab.appraisal import _binary_scores
    from core.lab.evaluate import compute_metrics, threshold_figures
    from core.decision import decision_distance, positive_mask, positive_score

    labels = ("normal", "bacterial", "viral")
    group = "bacterial+viral"
    probabilities = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    assert positive_mask(labels, group).tolist() == [False, True, True]
    assert positive_score(probabilities, labels, group) == pytest.approx([0.3, 0.5, 0.8, 0.1])
    # at or above the threshold the likelier of bacterial / viral is called, below it normal
    assert decide(probabilities, labels, group, 0.45).tolist() == [0, 2, 1, 0]
    assert decide(probabilities, labels, group, 0.25).tolist() == [1, 2, 1, 0]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert decision_distance(probabilities, labels, group, 0.45) == pytest.approx(
        [abs(logit(p) - logit(0.45)) for p in (0.3, 0.5, 0.8, 0.1)])
    targets = np.array([0, 2, 1, 1])
    figures = threshold_figures(probabilities, targets, labels, group, 0.45)
    assert figures == {"sensitivity": pytest.approx(2 / 3), "specificity": 1.0}
    decided = decide(probabilities, labels, group, 0.45)
    assert _binary_scores(targets, decided, positive_mask(labels, group)) == (pytest.approx(2 / 3), 1.0)
    metrics = compute_metrics(targets, probabilities, decided, get_task("cxr_pneumonia"))
    assert metrics["positive_vs_rest"]["accuracy"] == 0.75  # the last image: pneumonia called normal
    assert metrics["positive_vs_rest"]["roc_auc"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown classes"):
        positive_mask(labels, "bacterial+fungal")
    assert get_task("cxr_pneumonia").positive_title == "pneumonia (bacterial + viral)"
