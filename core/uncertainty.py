"""Test-time augmentation: how much a prediction moves when the scan is shifted a little.

The views are drawn from the same augmentation the model was trained with
(`core.preprocess.TrainPreset`: small rotations, scales, shifts, mirrors where allowed, contrast,
brightness and gamma), at the model's input resolution (a large, finely textured scan resampled
from its full size would alias differently in every view), from a fixed seed so the same upload
always gives the same spread.
A model that changes its call under such views is unsure, whatever its probability says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.decision import card_probabilities, decide
from core.models import Classifier
from core.preprocess import EvalPreset, ModelInput, TrainPreset

TTA_VIEWS = 16


@dataclass(frozen=True)
class Spread:
    """Calibrated probabilities of the original scan and of its augmented views.

    Attributes:
        labels: Class keys in model order.
        original: float64 (C,) probabilities of the scan as uploaded.
        views: float64 (V, C) probabilities of each augmented view.
        decisions: int64 (V,) the class each view is called (threshold rule of the card).
    """

    labels: tuple[str, ...]
    original: np.ndarray
    views: np.ndarray
    decisions: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Mean probability per class over the views."""
        return self.views.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation per class over the views."""
        return self.views.std(axis=0)

    def agreement(self, index: int) -> float:
        """Share of views called the same class as `index` (the original decision)."""
        return float((self.decisions == index).mean())

    def summary(self, index: int) -> str:
        """One sentence: how many views keep the call `index`, and the spread of its probability."""
        label = self.labels[index]
        return (f"{round(self.agreement(index) * len(self.views))} of {len(self.views)} augmented views give the same "
                f"call ({label}); P({label}) over the views {self.mean[index]:.1%} +- {self.std[index]:.1%} (SD).")


def augmented_views(prepared: ModelInput, classifier: Classifier, views: int = TTA_VIEWS, seed: int = 0) -> torch.Tensor:
    """Normalised model inputs (V + 1, 3, S, S): the prepared input itself, then V augmented views of it."""
    spec = classifier.spec
    rng = np.random.default_rng(seed)
    draw = TrainPreset(spec)
    stack = [prepared.grey] + [draw(prepared.grey, rng) for _ in range(views)]
    return EvalPreset(spec).tensor(np.stack(stack))


def tta_spread(classifier: Classifier, prepared: ModelInput, views: int = TTA_VIEWS, seed: int = 0) -> Spread:
    """Predict the prepared input and `views` augmented copies of it in one batch.

    Args:
        classifier: A loaded model.
        prepared: The scan's model input (`core.preprocess.EvalPreset`).
        views: Number of augmented views (>= 2).
        seed: Seed of the views.

    Raises:
        ValueError: If fewer than two views are asked for.
    """
    if views < 2:
        raise ValueError(f"test-time augmentation needs at least 2 views, got {views}")
    logits = classifier.runner.logits(augmented_views(prepared, classifier, views, seed))
    card, spec = classifier.card, classifier.spec
    probabilities = card_probabilities(logits, spec, card)[0]
    decisions = decide(probabilities[1:], spec.labels, card.positive, card.threshold)
    return Spread(spec.labels, probabilities[0], probabilities[1:], decisions)
