"""The chest X-ray shortcut audit: lung-field prior, variants, and the audit of a model with a known shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.cards import card_from_spec, read_card
from core.models import WEIGHTS_DIR, Classifier
from core.lab.shortcuts import audit, format_audit, lung_mask, variant
from core.tasks import get_task


def test_lung_prior_is_two_fields_left_and_right_of_the_midline() -> None:
    mask = lung_mask(224)
    assert 0.25 < mask.mean() < 0.40
    assert not mask[:, 112].any()  # the mediastinum's midline is outside
    assert mask[105, 65] and mask[105, 159]  # the middle of each field is inside
    assert not mask[5].any() and not mask[-5].any()  # neck and abdomen are outside
    left, right = mask[:, :112], mask[:, 112:]
    assert np.array_equal(left, right[:, ::-1])


def test_the_prior_follows_the_anatomy_into_a_border_crop() -> None:
    whole = lung_mask(224)
    np.testing.assert_array_equal(lung_mask(224, (0, 1000, 0, 800), (1000, 800)), whole)  # no crop: the same
    cropped = lung_mask(224, (80, 920, 64, 736), (1000, 800))  # 8% off each side
    assert cropped.mean() > whole.mean() * 1.25  # the same fields fill more of a cropped input
    rows, cols = np.nonzero(cropped)
    assert cols.min() < np.nonzero(whole)[1].min()  # and reach further out
    # the pixel at the crop's input position (u, v) is inside iff the whole image's (x, y) is
    u, v = 30, 120
    x = round((64 + (u + 0.5) / 224 * 672) / 800 * 224 - 0.5)
    y = round((80 + (v + 0.5) / 224 * 840) / 1000 * 224 - 0.5)
    assert cropped[v, u] == whole[y, x]


def test_variants_blank_with_the_image_mean_and_refuse_unknown_names() -> None:
    pixels = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    mask = lung_mask(224)
    blanked, only = variant(pixels, mask, "lungs_blanked"), variant(pixels, mask, "lungs_only")
    assert np.allclose(blanked[mask], pixels.mean()) and np.array_equal(blanked[~mask], pixels[~mask])
    assert np.allclose(only[~mask], pixels.mean()) and np.array_equal(only[mask], pixels[mask])
    assert variant(pixels, mask, "original") is pixels
    with pytest.raises(ValueError):
        variant(pixels, mask, "rotated")


class CornerReader(torch.nn.Module):
    """A 'model' that decides from a bright marker in the top-left corner (a source cue), not the lungs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.zero_()
            self.features[0].weight[0, 0, 1, 1] = 1.0
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, :20, :20].mean(dim=(1, 2))
        self.classifier(self.features(x).mean(dim=(2, 3)))  # the usual blocks run (hooks see them), unused
        return torch.stack([-corner * 3.0, corner * 3.0], dim=1)


def test_audit_exposes_a_model_that_reads_a_corner_marker() -> None:
    spec = get_task("cxr_covid")
    card = card_from_spec(spec, name="toy", version="0")
    classifier = Classifier(spec=spec, card=card, module=CornerReader())
    rng = np.random.default_rng(1)
    images, labels = [], []
    for i in range(40):
        image = (rng.random((224, 224)) * 120 + 60).astype(np.uint8)
        label = "covid19" if i % 2 else "normal"
        image[:20, :20] = 255 if label == "covid19" else 0  # the source marker
        images.append(image)
        labels.append(label)
    section = audit(classifier, images, labels, cam_images=0, method="Grad-CAM")
    scores = section["scores"]
    assert scores["original"]["accuracy"] == 1.0
    assert scores["lungs_blanked"]["accuracy"] == 1.0  # without lungs it still "works": a shortcut
    assert scores["lungs_only"]["accuracy"] == 0.5  # with the marker blanked it knows nothing
    assert "lungs_blanked" in format_audit(section, "toy")


@pytest.mark.parametrize("key", ["cxr_covid", "cxr_pneumonia"])
def test_bundled_chest_cards_carry_the_audit(key: str) -> None:
    card = read_card(WEIGHTS_DIR / f"{key}.json")
    section = card.shortcuts
    assert set(section.scores) == {"original", "lungs_blanked", "lungs_only"}
    assert section.scores["original"]["accuracy"] == pytest.approx(card.metrics.accuracy)  # same split, same input
    assert 0.0 <= section.cam["mass_in_lungs_mean"] <= 1.0
