"""Test-time augmentation: how much a prediction moves when the scan is shifted a little.

The views are drawn from the same augmentation the model was trained with
(`core.data.augment`: small rotations, scales, shifts, mirrors where allowed, contrast,
brightness and gamma), from a fixed seed so the same upload always gives the same spread.
A model that changes its call under such views is unsure, whatever its probability says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.data import augment
from core.imaging import Scan
from core.models import Classifier
from core.predict import card_probabilities, decide, forward
from core.preprocess import base_pixels, model_pixels, normalize

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


def augmented_views(scan: Scan, classifier: Classifier, views: int = TTA_VIEWS, seed: int = 0) -> torch.Tensor:
    """Normalised model inputs (V + 1, 3, S, S): the scan as preprocessed, then V augmented views."""
    spec = classifier.spec
    rng = np.random.default_rng(seed)
    pixels = base_pixels(scan, spec)
    stack = [model_pixels(scan, spec)] + [augment(pixels, spec.input_size, rng, spec.hflip) for _ in range(views)]
    return normalize(torch.from_numpy(np.stack(stack))[:, None], spec)


def tta_spread(classifier: Classifier, scan: Scan, views: int = TTA_VIEWS, seed: int = 0) -> Spread:
    """Predict the scan and `views` augmented copies of it in one batch.

    Args:
        classifier: A loaded model.
        scan: The scan as read.
        views: Number of augmented views (>= 2).
        seed: Seed of the views.

    Raises:
        ValueError: If fewer than two views are asked for.
    """
    if views < 2:
        raise ValueError(f"test-time augmentation needs at least 2 views, got {views}")
    batch = augmented_views(scan, classifier, views, seed)
    logits, _ = forward(classifier, batch.contiguous(memory_format=torch.channels_last))
    card, spec = classifier.card, classifier.spec
    probabilities = card_probabilities(logits, spec, card)[0]
    decisions = decide(probabilities[1:], spec.labels, card.positive, card.threshold)
    return Spread(spec.labels, probabilities[0], probabilities[1:], decisions)
