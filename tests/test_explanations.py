"""Faithfulness, localisation, the randomisation check, test-time augmentation and the card appraisal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.lab.appraisal import (bootstrap_intervals, indeterminate_band, randomisation_stages, reliability, roc_curves,
                            sanity_check, stratified_sample)
from core.cards import card_from_spec, read_card
from core.explain import CLASS_INDEPENDENT, METHODS, compute_cam, draw_region, locate, road_score
from core.imaging import Scan
from core.models import WEIGHTS_DIR, Classifier, load_model
from core.decision import Band, Prediction, decision_distance
from core.preprocess import EvalPreset
from core.tasks import TASKS, get_task
from core.uncertainty import tta_spread
from tests.conftest import synthetic_slice


class RegionModel(torch.nn.Module):
    """A model whose class-0 logit is the mean brightness of one square: its evidence is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = x[:, 0, 40:120, 40:120].mean(dim=(1, 2))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def region_classifier() -> Classifier:
    spec = get_task("ct_covid")
    return Classifier(spec=spec, card=card_from_spec(spec, name="toy", version="0"), module=RegionModel())


def bright_input(spec) -> torch.Tensor:
    """A bright square (the evidence) on a dark background."""
    pixels = np.full((224, 224), 0.1, dtype=np.float32)
    pixels[40:120, 40:120] = 0.9
    return EvalPreset(spec)(Scan(pixels=pixels, kind="image")).tensor


def test_road_scores_a_heatmap_on_the_evidence_above_one_elsewhere() -> None:
    classifier = region_classifier()
    tensor = bright_input(classifier.spec)
    on_evidence = np.zeros((224, 224), np.float32)
    on_evidence[40:120, 40:120] = 1.0
    elsewhere = np.zeros((224, 224), np.float32)
    elsewhere[140:220, 140:220] = 1.0
    right = road_score(classifier, tensor, on_evidence, 0)
    wrong = road_score(classifier, tensor, elsewhere, 0)
    assert right.score > 0.05 and right.most_relevant_drop > right.least_relevant_drop
    assert wrong.score < right.score - 0.05
    assert "points at pixels the model relies on" in right.reading("covid19")
    assert road_score(classifier, tensor, on_evidence, 0).score == right.score  # seeded: reproducible


def test_road_rejects_bad_arguments() -> None:
    classifier = region_classifier()
    tensor = bright_input(classifier.spec)
    with pytest.raises(ValueError, match="out of range"):
        road_score(classifier, tensor, np.zeros((224, 224)), 5)
    with pytest.raises(ValueError, match="heatmap must be"):
        road_score(classifier, tensor, np.zeros((7, 7)), 0)


def test_locate_keeps_the_component_around_the_peak() -> None:
    heat = np.zeros((100, 200), np.float32)
    heat[10:30, 20:60] = 0.7  # a second, weaker blob
    heat[50:90, 120:180] = 0.9
    heat[70, 150] = 1.0
    region = locate(heat, 0.5)
    assert region is not None
    assert region.box == pytest.approx((120 / 200, 50 / 100, 180 / 200, 90 / 100))
    assert region.area == pytest.approx(40 * 60 / (100 * 200))
    assert locate(np.zeros((7, 7))) is None
    with pytest.raises(ValueError):
        locate(heat, 0.0)
    image = np.zeros((300, 600, 3), np.uint8)
    boxed, outlined = draw_region(image, region, "box"), draw_region(image, region, "outline")
    assert boxed.shape == image.shape and boxed.any() and outlined.any() and not image.any()
    ys, xs = np.nonzero(boxed[..., 1])
    assert 355 <= xs.min() <= 365 and 535 <= xs.max() <= 545 and 145 <= ys.min() <= 155 and 265 <= ys.max() <= 275


def test_randomising_the_head_changes_gradient_maps_but_not_eigencam() -> None:
    """EigenCAM ignores the head (it is the first principal component of the activations): it must
    survive the head's randomisation unchanged, while Grad-CAM, which weights by the head's
    gradients, must change. The check reports exactly that."""
    classifier = load_model(get_task("ct_covid"))
    tensors = [EvalPreset(classifier.spec)(Scan(pixels=synthetic_slice(224, seed=s).astype(np.float32) / 255,
                                                kind="image")).tensor for s in (1, 2)]
    result = sanity_check(classifier, tensors, [0, 1], stages=1)
    assert result["stages"] == ["classifier"]
    assert result["methods"]["EigenCAM"][0] > 0.99
    assert result["methods"]["Grad-CAM"][0] < 0.95
    # the shared model itself is untouched
    again = compute_cam(classifier, tensors[0], 0, "Grad-CAM")
    assert np.allclose(again, compute_cam(load_model(get_task("ct_covid")), tensors[0], 0, "Grad-CAM"), atol=1e-5)


def test_randomisation_cascade_runs_from_the_head_down() -> None:
    classifier = load_model(get_task("ct_covid"))
    names = [name for name, _ in randomisation_stages(classifier.module, classifier.spec.arch)]
    assert names[:3] == ["classifier", "features.18", "features.17"]


def test_tta_spread_is_reproducible_and_reports_agreement() -> None:
    classifier = load_model(get_task("brain_mri"))
    scan = EvalPreset(classifier.spec)(Scan(pixels=synthetic_slice(256, seed=4).astype(np.float32) / 255, kind="image"))
    first, second = tta_spread(classifier, scan, views=6), tta_spread(classifier, scan, views=6)
    assert first.views.shape == (6, 4) and np.allclose(first.views.sum(axis=1), 1.0)
    assert np.array_equal(first.views, second.views)
    assert 0.0 <= first.agreement(0) <= 1.0
    assert np.allclose(first.std, first.views.std(axis=0))
    with pytest.raises(ValueError):
        tta_spread(classifier, scan, views=1)


def test_indeterminate_distance_for_thresholded_and_argmax_models() -> None:
    probs = np.array([[0.55, 0.45], [0.9, 0.1]])
    assert decision_distance(probs, ("a", "b"), None, None) == pytest.approx([np.log(0.55 / 0.45), np.log(9.0)])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert decision_distance(probs, ("a", "b"), "b", 0.4) == pytest.approx([logit(0.45) - logit(0.4),
                                                                             logit(0.4) - logit(0.1)])
    near = Prediction(("a", "b"), probs[0], 0, 0.4, "b", band=Band(0.5))
    far = Prediction(("a", "b"), probs[1], 0, 0.4, "b", band=Band(0.5))
    assert near.uncertain and not far.uncertain
    assert not Prediction(("a", "b"), probs[0], 0).uncertain  # no band in the card: never uncertain


def test_bootstrap_intervals_resample_groups_and_bracket_the_estimate() -> None:
    spec = get_task("ct_covid")
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 200)
    scores = np.clip(targets * 0.6 + rng.normal(0.2, 0.25, 200), 0, 1)
    probs = np.stack([scores, 1 - scores], axis=1)  # class 0 is covid19
    preds = probs.argmax(axis=1)
    singletons = bootstrap_intervals(targets, probs, preds, np.arange(200), spec, None, resamples=300)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
        v = singletons["metrics"][name]
        assert v["low"] <= v["estimate"] <= v["high"] and v["high"] - v["low"] < 0.3
    # The same images in 10 big groups: fewer independent units, a wider interval.
    grouped = bootstrap_intervals(targets, probs, preds, np.arange(200) % 10, spec, None, resamples=300)
    assert grouped["groups"] == 10
    width = lambda found: found["metrics"]["accuracy"]["high"] - found["metrics"]["accuracy"]["low"]  # noqa: E731
    assert width(grouped) >= width(singletons) * 0.5
    with_threshold = bootstrap_intervals(targets, probs, preds, np.arange(200), spec, "covid19", resamples=50)
    assert {"sensitivity", "specificity"} <= set(with_threshold["metrics"])


def test_curves_and_band_from_scores() -> None:
    from sklearn.metrics import roc_auc_score

    spec = get_task("ct_cancer")
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3)) + np.eye(3)[targets] * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    curves = roc_curves(targets, probs, spec, None)
    assert set(curves) == set(spec.labels)
    assert curves["benign"]["auc"] == pytest.approx(roc_auc_score(targets == 1, probs[:, 1]))
    assert curves["benign"]["fpr"][0] == 0 and curves["benign"]["tpr"][-1] == 1
    bins = reliability(targets, probs)
    assert sum(bins["count"]) == 300 and len(bins["count"]) == 10
    distance = decision_distance(probs, spec.labels, None, None)
    correct = probs.argmax(axis=1) == targets
    band = indeterminate_band((distance, correct), (distance, correct), None, None)
    assert band["scale"] == "log-odds" and band["width"] > 0  # near the boundary these scores are often wrong
    assert band["validation"]["share_uncertain"] == pytest.approx((distance < band["width"]).mean())
    assert band["validation"]["share_uncertain"] <= 0.15
    assert band["validation"]["accuracy_inside"] < band["validation"]["accuracy_outside"]
    assert stratified_sample(np.array([0] * 50 + [1] * 5), 10).tolist().count(50) <= 1
    assert sorted(np.bincount(np.array([0] * 50 + [1] * 5)[stratified_sample(np.array([0] * 50 + [1] * 5), 10)])) == [5, 5]


@pytest.mark.parametrize("key", sorted(TASKS))
def test_bundled_cards_carry_intervals_curves_band_and_a_measured_default(key: str) -> None:
    card = read_card(WEIGHTS_DIR / f"{key}.json")
    intervals = card.appraisal.intervals.metrics
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
        v = intervals[name]
        assert v.low <= v.estimate <= v.high, (key, name, v)
        assert v.estimate == pytest.approx(getattr(card.metrics, name))  # same split, same figures as the card
    assert card.appraisal.roc and sum(card.appraisal.reliability.count) == card.metrics.n
    band = card.indeterminate.classes
    assert band.scale == "log-odds" and band.chosen_on == "validation" and band.width >= 0
    assert 0 <= band.test.share_uncertain <= band.validation.share_uncertain + 0.15
    methods = card.explanations.faithfulness.methods
    assert set(methods) == set(METHODS)
    # the default: the most faithful method that depends on the class and passes the randomisation check
    allowed = [m for m in methods if m not in CLASS_INDEPENDENT and m not in card.explanations.fails_randomisation]
    assert card.explanations.default_method == max(allowed, key=lambda m: methods[m].mean)
    sanity = card.explanations.sanity_check
    assert sanity.stages[0] == "classifier" and set(sanity.methods) == set(METHODS)
    json.dumps(card.explanations.to_dict())  # plain JSON


def test_tta_and_ensemble_scoring_average_views_and_choose_thresholds_on_validation() -> None:
    """core.lab.ensemble: views averaged in calibrated probability; each variant's threshold chosen on its own
    validation probabilities by the card's rule."""
    from core.lab.ensemble import member_probabilities, scored

    classifier = load_model(get_task("ct_covid"))
    images = [synthetic_slice(224, seed=s) for s in range(3)]
    plain, views = member_probabilities(classifier, images, 0), member_probabilities(classifier, images, 4)
    assert plain.shape == views.shape == (3, 2) and np.allclose(views.sum(axis=1), 1.0)
    assert not np.allclose(plain, views)  # augmented views move the average
    spec = get_task("ct_covid")
    rng = np.random.default_rng(0)
    targets = {side: rng.integers(0, 2, 60) for side in ("val", "test")}
    probs = {side: np.stack([0.2 + 0.6 * (t == 0) + rng.normal(0, 0.1, 60), np.zeros(60)], axis=1)
             for side, t in targets.items()}
    for p in probs.values():
        p[:, 0] = np.clip(p[:, 0], 0.01, 0.99)
        p[:, 1] = 1 - p[:, 0]
    figures = scored(spec, probs, targets, min_sensitivity=0.95)
    assert figures["val"]["sensitivity"] >= 0.95 and 0 < figures["threshold"] < 1
    assert figures["test"]["roc_auc"] > 0.9
